// Training with per-rank partial reads (issue 4: "each rank reads only the tokens of its own zigzag
// shard, plus labels"): under tsp at D = 4 a data loader given Layout::token_need reads exactly
// 2·S/(2D) inputs plus their labels per row of its replica, and training on those partial batches
// gives the losses, gradients and weights of training on whole batches, bit for bit.
// tsp-test-ranks: 4 8
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "mpi_test_util.h"
#include "tsp/parallel/layout.h"
#include "tsp/train/data.h"
#include "tsp/train/optimizer.h"

namespace tsp {
namespace {

namespace fs = std::filesystem;
using test::world;

// h=64, 8 heads, FFN 128, V=256 (byte tokens): every sharded dimension divides by D = 4.
LlamaConfig test_config() {
  LlamaConfig c;
  c.hidden_size = 64;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 8;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.vocab_size = 256;
  c.max_position_embeddings = 256;
  return c;
}

// A per-process corpus of pseudo-random printable bytes (text: a corpus that is not text is
// refused; each rank writes its own copy: no shared file to race on).
class PartialRead : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ =
        (fs::temp_directory_path() / ("tsp_partial_read_" + std::to_string(::getpid()))).string();
    std::string bytes(40000, '\0');
    for (size_t i = 0; i < bytes.size(); ++i)
      bytes[i] = static_cast<char>(32 + window_hash(11, i) % 95);
    std::ofstream(path_, std::ios::binary).write(bytes.data(), bytes.size());
    corpus_ = std::make_shared<Corpus>(path_);
  }
  void TearDown() override { fs::remove(path_); }

  std::unique_ptr<Layout> tsp_layout() const {
    ParallelConfig pc;
    pc.layout = "tsp";
    pc.dp = world().size() / 4;  // D = 4; at 8 ranks two replicas
    std::unique_ptr<Layout> layout = make_layout(test_config(), pc, world());
    layout->load(RandomWeights(3));
    return layout;
  }

  std::string path_;
  std::shared_ptr<Corpus> corpus_;
};

TEST_F(PartialRead, TspAtD4ReadsItsTwoChunksAndLabelsPerRow) {
  const int64_t B = 4, S = 32;
  std::unique_ptr<Layout> layout = tsp_layout();
  const int D = layout->group().size(), R = layout->replicas().size();
  const int p = layout->group().rank();
  ASSERT_EQ(D, 4);
  DataLoader loader(corpus_, DataOptions{B, S, 1, 5, 0.1, 8});
  loader.set_need(layout->token_need(B, S));
  // Chunks p and 2D-1-p of S/(2D) = 4 tokens: 8 inputs, and the label after each chunk (the
  // labels of the other inputs are inputs too). Rank D-1's chunks touch (positions 12..19), so
  // their one range has one label past it.
  const int64_t chunk = S / (2 * D);
  const int64_t per_row = 2 * chunk + (p == D - 1 ? 1 : 2);
  const int64_t rows = B / R;
  for (int64_t step = 0; step < 3; ++step) {
    const int64_t before = loader.tokens_read();
    const Batch b = loader.train_batch(step, 0);
    EXPECT_EQ(loader.tokens_read() - before, rows * per_row) << "step " << step << " rank " << p;
    int64_t held = 0;
    for (int32_t t : b.tokens) held += t != kTokenNotRead;
    EXPECT_EQ(held, rows * per_row);
  }
  const int64_t before = loader.tokens_read();
  loader.val_batch(0);
  EXPECT_EQ(loader.tokens_read() - before, rows * per_row) << "validation batch";
}

TEST_F(PartialRead, TrainingOnPartialBatchesEqualsTrainingOnWholeOnes) {
  const int64_t B = 4, S = 32;
  const DataOptions opts{B, S, 1, 5, 0.1, 8};
  DataLoader whole(corpus_, opts), part(corpus_, opts);
  std::unique_ptr<Layout> a = tsp_layout(), b = tsp_layout();
  part.set_need(b->token_need(B, S));
  AdamW opt_a(*a, AdamWConfig{}), opt_b(*b, AdamWConfig{});
  for (int64_t step = 0; step < 4; ++step) {
    a->zero_grads();
    b->zero_grads();
    const double loss_a = a->forward_backward(whole.train_batch(step, 0));
    const double loss_b = b->forward_backward(part.train_batch(step, 0));
    // The same arithmetic on the same tokens: equal bit for bit, no tolerance.
    EXPECT_EQ(loss_b, loss_a) << "step " << step;
    opt_a.step(1e-2, 1.0);
    opt_b.step(1e-2, 1.0);
  }
  EXPECT_EQ(b->forward(part.val_batch(0)), a->forward(whole.val_batch(0)));
  // Every weight shard is identical after the updates.
  const std::vector<ParamShard> pa = a->parameters(), pb = b->parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(
        0, std::memcmp(pa[i].value.data(), pb[i].value.data(), pa[i].value.numel() * sizeof(float)))
        << pa[i].spec->name;
  }
  // The whole-batch loader read every token of every row; the partial one about 10/33 of them.
  EXPECT_EQ(whole.tokens_read(), (4 + 1) * B * (S + 1));
  EXPECT_LT(part.tokens_read(), whole.tokens_read() / 2);
}

}  // namespace
}  // namespace tsp
