// Layout::token_need: the tokens of a batch a rank reads, and the Batch contract that every other
// position may hold kTokenNotRead.
//
// For every layout at the degrees this world allows (D = world and D = world/2 with dp = 2, so the
// 1, 2, 4, 8-rank runs cover D = 1, 2, 4, 8, each with and without dp), a batch whose unneeded
// positions hold the sentinel must give the loss and every gradient of the full batch BIT FOR BIT
// (same ranks, same arithmetic on the same tokens: no tolerance applies). A layout that read a
// position outside its need would see -1 there (an embedding row skipped as "another shard's", a
// label outside the vocabulary) and the results would differ. A need that misses one position
// the layout reads must throw, not compute.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "layout_harness.h"
#include "mpi_test_util.h"
#include "tsp/core/error.h"
#include "tsp/parallel/layout.h"
#include "tsp/parallel/sharding.h"

namespace tsp {
namespace {

using test::world;

struct Case {
  std::string layout;
  int tp = 1, dp = 1;
  std::string label() const {
    return layout + (tp > 1 ? " tp=" + std::to_string(tp) : "") + " dp=" + std::to_string(dp);
  }
};

// Every layout at D = world (R = 1) and, on an even world, at D = world/2 with R = 2; single
// takes all ranks as replicas. tp-sp needs T = 2 to divide D.
std::vector<Case> cases(int W) {
  std::vector<Case> out = {{"single", 1, W}};
  for (int dp : {1, 2}) {
    if (W % dp != 0) continue;
    const int D = W / dp;
    for (const char* name : {"tp", "sp", "tsp", "fsdp-cp"}) out.push_back({name, 1, dp});
    if (D % 2 == 0) out.push_back({"tp-sp", 2, dp});
  }
  return out;
}

// mask[r·(S+1) + i] = 1 where `need` reads token i of row r.
std::vector<int32_t> need_mask(const TokenNeed& need, int64_t B, int64_t S) {
  std::vector<int32_t> mask(B * (S + 1), 0);
  std::vector<std::pair<int64_t, int64_t>> ranges = need.input_ranges;
  if (ranges.empty()) ranges.push_back({0, S});
  const int64_t r1 = need.row_end < 0 ? B : need.row_end;
  for (int64_t r = need.row_begin; r < r1; ++r)
    for (auto [p0, p1] : ranges)
      for (int64_t i = p0; i <= p1 && p1 > p0; ++i) mask[r * (S + 1) + i] = 1;
  return mask;
}

Batch only_needed(const Batch& full, const std::vector<int32_t>& mask) {
  Batch b = full;
  for (size_t k = 0; k < b.tokens.size(); ++k)
    if (!mask[k]) b.tokens[k] = kTokenNotRead;
  return b;
}

std::unique_ptr<Layout> build(const Case& c, const LlamaConfig& config) {
  ParallelConfig pc;
  pc.layout = c.layout;
  pc.tp = c.tp;
  pc.dp = c.dp;
  std::unique_ptr<Layout> layout = make_layout(config, pc, world());
  layout->load(RandomWeights(77));
  return layout;
}

TEST(ZigzagRanges, ChunksPAnd2DMinus1MinusPMergedWhenTheyTouch) {
  // S = 16, D = 4: chunks of 2.
  EXPECT_EQ(zigzag_ranges(16, 4, 0), (std::vector<Range>{{0, 2}, {14, 16}}));
  EXPECT_EQ(zigzag_ranges(16, 4, 1), (std::vector<Range>{{2, 4}, {12, 14}}));
  EXPECT_EQ(zigzag_ranges(16, 4, 3), (std::vector<Range>{{6, 10}}));  // chunks 3 and 4 touch
  EXPECT_EQ(zigzag_ranges(16, 1, 0), (std::vector<Range>{{0, 16}}));
  for (int D : {1, 2, 4, 8}) {  // the same positions as zigzag_positions, in order
    for (int p = 0; p < D; ++p) {
      std::vector<int64_t> pos;
      for (const Range& r : zigzag_ranges(32, D, p))
        for (int64_t i = r.begin; i < r.end; ++i) pos.push_back(i);
      EXPECT_EQ(pos, zigzag_positions(32, D, p)) << "D=" << D << " p=" << p;
    }
  }
  EXPECT_THROW(zigzag_ranges(12, 4, 0), Error);  // 12 tokens do not cut into 8 chunks
  EXPECT_THROW(zigzag_ranges(16, 4, 4), Error);
}

TEST(TokenNeed, EveryTokenIsReadBySomeRankOfEachReplicaAndTspReadsItsChunks) {
  const int64_t B = 8, S = 16;
  const LlamaConfig config = test::tiny_config();
  for (const Case& c : cases(world().size())) {
    SCOPED_TRACE(c.label());
    std::unique_ptr<Layout> layout = build(c, config);
    const int D = layout->group().size(), R = layout->replicas().size();
    const int p = layout->group().rank(), replica = layout->replicas().rank();
    const TokenNeed need = layout->token_need(B, S);
    EXPECT_EQ(need.row_begin, replica * B / R);
    EXPECT_EQ(need.row_end, (replica + 1) * B / R);
    // The group's needs cover each of its rows whole (every input and every label): nothing a
    // layout computes can come from a token no rank read.
    const std::vector<int32_t> mine = need_mask(need, B, S);
    std::vector<int32_t> all(mine.size() * world().size());
    world().all_gather(mine.data(), all.data(), static_cast<int64_t>(mine.size()), DType::I32);
    const int g0 = replica * D;  // world ranks of this group: g0 .. g0+D-1
    for (int64_t r = need.row_begin; r < need.row_end; ++r) {
      for (int64_t i = 0; i <= S; ++i) {
        bool read = false;
        for (int q = g0; q < g0 + D; ++q) read |= all[q * mine.size() + r * (S + 1) + i] != 0;
        EXPECT_TRUE(read) << "row " << r << " token " << i << " is read by no rank of the group";
      }
    }
    const int64_t rows = B / R, c_len = S / (2 * D);
    if (c.layout == "tsp" || c.layout == "fsdp-cp" || c.layout == "sp") {
      // Chunks p and 2D-1-p (2·S/(2D) inputs) plus one label past each range; the two chunks
      // of rank D-1 touch, so it reads one label fewer. D = 1 reads whole rows.
      const int64_t per_row = D == 1 ? S + 1 : 2 * c_len + (p == D - 1 ? 1 : 2);
      EXPECT_EQ(need.tokens(B, S), rows * per_row) << "group rank " << p << " of " << D;
    } else if (c.layout == "single" || c.layout == "tp") {
      EXPECT_TRUE(need.input_ranges.empty());
      EXPECT_EQ(need.tokens(B, S), rows * (S + 1));
    }
  }
}

TEST(TokenNeed, UnreadPositionsChangeNothingBitForBit) {
  const int64_t B = 8, S = 16;
  const LlamaConfig config = test::tiny_config();
  const Batch full = test::random_batch(B, S, config.vocab_size, 5);
  for (const Case& c : cases(world().size())) {
    SCOPED_TRACE(c.label());
    std::unique_ptr<Layout> layout = build(c, config);
    const TokenNeed need = layout->token_need(B, S);
    const Batch part = only_needed(full, need_mask(need, B, S));
    ASSERT_LT(std::count(part.tokens.begin(), part.tokens.end(), kTokenNotRead),
              static_cast<long>(part.tokens.size()));

    const double loss_full = layout->forward_backward(full);
    const test::GradMap grads_full = test::gather_grads(*layout);
    layout->zero_grads();
    const double loss_part = layout->forward_backward(part);
    const test::GradMap grads_part = test::gather_grads(*layout);
    EXPECT_EQ(loss_part, loss_full);
    EXPECT_EQ(layout->forward(part), layout->forward(full));
    if (world().rank() == 0) {
      ASSERT_EQ(grads_part.size(), grads_full.size());
      for (const auto& [name, g] : grads_full) {
        const std::vector<float>& gp = grads_part.at(name);
        ASSERT_EQ(gp.size(), g.size()) << name;
        EXPECT_EQ(0, std::memcmp(gp.data(), g.data(), g.size() * sizeof(float)))
            << "gradient of " << name << " changes when unread positions hold kTokenNotRead";
      }
    }
  }
}

TEST(TokenNeed, ANeedMissingAPositionThrows) {
  const int64_t B = 8, S = 16;
  const LlamaConfig config = test::tiny_config();
  const Batch full = test::random_batch(B, S, config.vocab_size, 6);
  for (const Case& c : cases(world().size())) {
    SCOPED_TRACE(c.label());
    std::unique_ptr<Layout> layout = build(c, config);
    // Drop the last input (and so its label) of the last range: every rank then misses a token
    // its layout reads, so every rank throws before any collective of run().
    TokenNeed wrong = layout->token_need(B, S);
    if (wrong.input_ranges.empty()) wrong.input_ranges.push_back({0, S});
    wrong.input_ranges.back().second -= 1;
    const Batch part = only_needed(full, need_mask(wrong, B, S));
    try {
      layout->forward_backward(part);
      ADD_FAILURE() << "a batch missing a needed token was computed";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("was not read"), std::string::npos) << e.what();
    }
    EXPECT_THROW(layout->forward(part), Error);
    // An id outside the vocabulary where the layout reads is the vocabulary error; the same id
    // where it does not read is ignored.
    Batch bad = full;
    const TokenNeed need = layout->token_need(B, S);
    const std::vector<int32_t> mask = need_mask(need, B, S);
    const auto first_read = std::find(mask.begin(), mask.end(), 1) - mask.begin();
    bad.tokens[first_read] = static_cast<int32_t>(config.vocab_size);
    try {
      layout->forward(bad);
      ADD_FAILURE() << "token id V was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("outside the vocabulary"), std::string::npos)
          << e.what();
    }
    Batch ignored = full;
    const auto first_unread = std::find(mask.begin(), mask.end(), 0) - mask.begin();
    // Every rank must take the same path; tp and D = R = 1 read every token of their rows, but
    // with R > 1 or a sequence split some token is unread on every rank.
    int64_t have = first_unread < static_cast<int64_t>(mask.size()) ? 1 : 0, all_have = 0;
    std::vector<int64_t> haves(world().size());
    world().all_gather(&have, haves.data(), 1, DType::I64);
    all_have = *std::min_element(haves.begin(), haves.end());
    if (all_have) {
      ignored.tokens[first_unread] = static_cast<int32_t>(config.vocab_size) + 7;
      EXPECT_EQ(layout->forward(ignored), layout->forward(full));
    }
  }
}

TEST(TokenNeed, ValidatesTheBatchShapeLikeAStep) {
  const LlamaConfig config = test::tiny_config();
  const int W = world().size();
  std::unique_ptr<Layout> tsp = build({"tsp", 1, 1}, config);
  // S must cut into 2D equal chunks; S = 2D + 1 never does.
  EXPECT_THROW(tsp->token_need(2, 2 * W + 1), Error);
  if (W % 2 == 0) {
    std::unique_ptr<Layout> dp2 = build({"tsp", 1, 2}, config);
    EXPECT_THROW(dp2->token_need(3, 16), Error);  // 3 rows over 2 replicas
  }
  EXPECT_THROW(tsp->token_need(0, 16), Error);
}

}  // namespace
}  // namespace tsp
