// The global gradient norm of every layout equals the norm of the full gradient
// gathered on one rank (each parameter counted once, whatever is replicated),
// and an AdamW step keeps replicated shards bit-identical across the ranks
// holding them.
// tsp-test-ranks: 1 2 4
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "mpi_test_util.h"
#include "parallel/registry.h"
#include "tsp/train/optimizer.h"

namespace tsp {
namespace {

// Small, but every sharded dimension (8 heads, 8 kv heads, FFN 128, vocabulary
// 256) divides by 1, 2, 4 and 8, so every layout runs at every tested degree.
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

Batch test_batch(int64_t B, int64_t S) {
  Batch b;
  b.B = B;
  b.S = S;
  b.tokens.resize(B * (S + 1));
  for (size_t i = 0; i < b.tokens.size(); ++i)
    b.tokens[i] = static_cast<int32_t>((i * 2654435761u) >> 7) & 255;
  return b;
}

struct Case {
  const char* layout;
  int dp;  // 0: all ranks are replicas (D = 1)
  int tp;
};

class GradNormLayouts : public ::testing::TestWithParam<Case> {};

TEST_P(GradNormLayouts, GlobalNormEqualsNormOfGatheredGradient) {
  Communicator& world = test::world();
  const Case c = GetParam();
  if (find_layout(c.layout) == nullptr)
    GTEST_SKIP() << "layout " << c.layout << " is not built yet";
  const int dp = c.dp == 0 ? world.size() : c.dp;
  if (world.size() % dp != 0 || (world.size() / dp) % c.tp != 0)
    GTEST_SKIP() << "degree does not fit";
  ParallelConfig par;
  par.layout = c.layout;
  par.dp = dp;
  par.tp = c.tp;
  auto layout = make_layout(test_config(), par, world);
  layout->load(RandomWeights(11));
  layout->zero_grads();
  layout->forward_backward(test_batch(4, 32));
  std::vector<ParamShard> shards = layout->parameters();
  const double norm = global_grad_norm(shards, *layout, world);

  double ref_sumsq = 0;
  layout->gather(true, [&](const ParamSpec&, TensorView full) {
    const float* g = full.f32();
    for (int64_t i = 0; i < full.numel(); ++i) ref_sumsq += static_cast<double>(g[i]) * g[i];
  });
  int64_t bits;
  double ref = std::sqrt(ref_sumsq);
  std::memcpy(&bits, &ref, sizeof bits);
  world.broadcast(&bits, 1, DType::I64, 0);
  std::memcpy(&ref, &bits, sizeof ref);
  ASSERT_GT(ref, 0);
  // Both are double sums of the same f32 squares in different orders: relative
  // 1e-12 is ~1e4 double ulps; counting a replicated shard twice (or missing
  // one) changes the norm by > 1e-4.
  EXPECT_NEAR(norm, ref, 1e-12 * ref) << c.layout;
  // The scale argument scales the norm.
  EXPECT_NEAR(global_grad_norm(shards, *layout, world, 0.5), 0.5 * ref, 1e-12 * ref);

  // One AdamW step: replicated shards stay bit-identical across the group.
  AdamW opt(shards, AdamWConfig{});
  opt.step(1e-2, clip_factor(norm, 1.0));
  for (const ParamShard& s : shards) {
    if (!s.replicated_in_group) continue;
    uint64_t h = 1469598103934665603ull;  // FNV-1a of the bytes
    const auto* p = static_cast<const unsigned char*>(s.value.data());
    for (size_t i = 0; i < s.value.nbytes(); ++i) h = (h ^ p[i]) * 1099511628211ull;
    Communicator& g = layout->group();
    std::vector<int64_t> all(g.size());
    const int64_t mine = static_cast<int64_t>(h);
    g.all_gather(&mine, all.data(), 1, DType::I64);
    for (int r = 0; r < g.size(); ++r)
      EXPECT_EQ(all[r], all[0]) << s.spec->name << " group rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, GradNormLayouts,
                         ::testing::Values(Case{"single", 0, 1}, Case{"tsp", 1, 1},
                                           Case{"tsp", 2, 1}, Case{"tp", 1, 1}, Case{"sp", 1, 1},
                                           Case{"tp-sp", 1, 2}, Case{"fsdp-cp", 1, 1}),
                         [](const auto& info) {
                           std::string n = std::string(info.param.layout) + "_dp" +
                                           std::to_string(info.param.dp) + "_tp" +
                                           std::to_string(info.param.tp);
                           for (char& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

}  // namespace
}  // namespace tsp
