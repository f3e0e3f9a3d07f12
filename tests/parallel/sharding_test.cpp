// Exact tests of the sharding maps with coordinate-hash data: a wrong index cannot hide inside a
// tolerance. Also the validation errors (what they say would work).
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>

#include "test_util.h"
#include "tsp/parallel/sharding.h"

namespace tsp {
namespace {

// A value that names its coordinates: (b, s, c) -> distinct integers (exact in f32 below 2^24).
float coord(int64_t b, int64_t s, int64_t c) {
  return static_cast<float>(b * 100000 + s * 100 + c);
}

using test::error_of;

TEST(Zigzag, PositionsOfSmallCase) {
  // S=8, D=2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 holds chunks 1 and 2.
  EXPECT_EQ(zigzag_positions(8, 2, 0), (std::vector<int64_t>{0, 1, 6, 7}));
  EXPECT_EQ(zigzag_positions(8, 2, 1), (std::vector<int64_t>{2, 3, 4, 5}));
  EXPECT_EQ(zigzag_positions(12, 1, 0),
            (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}));
  EXPECT_EQ(zigzag_gathered_positions(8, 2), (std::vector<int64_t>{0, 1, 6, 7, 2, 3, 4, 5}));
}

TEST(Zigzag, PartitionAndBalancedCausalWork) {
  for (int D : {1, 2, 3, 4, 8}) {
    const int64_t S = 2 * D * 3;
    std::vector<int64_t> all = zigzag_gathered_positions(S, D);
    std::vector<int64_t> sorted = all;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> iota(S);
    std::iota(iota.begin(), iota.end(), 0);
    EXPECT_EQ(sorted, iota) << "D=" << D;  // a permutation: every token exactly once
    // Causal work (keys seen = pos + 1, summed) is the same on every rank.
    int64_t work0 = -1;
    for (int p = 0; p < D; ++p) {
      int64_t work = 0;
      for (int64_t q : zigzag_positions(S, D, p)) work += q + 1;
      if (p == 0) work0 = work;
      EXPECT_EQ(work, work0) << "D=" << D << " p=" << p;
    }
  }
}

TEST(Zigzag, TakeAndPutRoundTripEveryRow) {
  const int64_t B = 3, S = 24, C = 5;
  for (int D : {1, 2, 3, 4, 6}) {
    Tensor full = Tensor::f32({B, S, C}, MemCategory::Workspace);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = 0; c < C; ++c) full.f32()[(b * S + s) * C + c] = coord(b, s, c);
    Tensor back = Tensor::f32({B, S, C}, MemCategory::Workspace);
    for (int p = 0; p < D; ++p) {
      Tensor local = Tensor::f32({B, S / D, C}, MemCategory::Workspace);
      zigzag_take(full, local, D, p);
      const auto pos = zigzag_positions(S, D, p);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < S / D; ++i)
          for (int64_t c = 0; c < C; ++c)
            ASSERT_EQ(local.f32()[(b * (S / D) + i) * C + c], coord(b, pos[i], c))
                << "D=" << D << " p=" << p << " b=" << b << " i=" << i;
      zigzag_put(local, back, D, p);
    }
    EXPECT_EQ(0, std::memcmp(full.data(), back.data(), full.nbytes())) << "D=" << D;
  }
}

TEST(Zigzag, IntTokensAndShapeErrors) {
  // Token ids are int32 [B, S]: no trailing dims.
  const int64_t B = 2, S = 8;
  Tensor ids({B, S}, DType::I32, MemCategory::Workspace);
  for (int64_t i = 0; i < B * S; ++i) ids.data_as<int32_t>()[i] = static_cast<int32_t>(i);
  Tensor local({B, S / 2}, DType::I32, MemCategory::Workspace);
  zigzag_take(ids, local, 2, 1);
  EXPECT_EQ(std::vector<int32_t>(local.data_as<int32_t>(), local.data_as<int32_t>() + 8),
            (std::vector<int32_t>{2, 3, 4, 5, 10, 11, 12, 13}));
  Tensor wrong({B, 3}, DType::I32, MemCategory::Workspace);
  EXPECT_THROW(zigzag_take(ids, wrong, 2, 0), Error);
}

TEST(Zigzag, GatheredBlocksRegroupPerRow) {
  // all_gather of per-rank [B, n, c] blocks gives [D, B, n, c]; swap -> [B, D·n, c] at the
  // gathered positions: row b's keys are contiguous.
  const int D = 3, B = 2, C = 4;
  const int64_t S = 12, n = S / D;
  Tensor full = Tensor::f32({B, S, C}, MemCategory::Workspace);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < C; ++c) full.f32()[(b * S + s) * C + c] = coord(b, s, c);
  Tensor gathered = Tensor::f32({D, B, n, C}, MemCategory::Workspace);
  for (int p = 0; p < D; ++p)
    zigzag_take(full, gathered.view().slice(p, p + 1).reshape({B, n, C}), D, p);
  Tensor rows = Tensor::f32({B, D, n, C}, MemCategory::Workspace);
  swap_leading_dims(gathered, rows);
  const auto pos = zigzag_gathered_positions(S, D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < S; ++j)
      for (int64_t c = 0; c < C; ++c)
        ASSERT_EQ(rows.f32()[(b * S + j) * C + c], coord(b, pos[j], c));
  Tensor again = Tensor::f32({D, B, n, C}, MemCategory::Workspace);
  swap_leading_dims(rows, again);  // the inverse (for the reduce-scatter direction)
  EXPECT_EQ(0, std::memcmp(again.data(), gathered.data(), gathered.nbytes()));
}

TEST(Heads, GroupsOfGqa) {
  LlamaConfig c;
  c.hidden_size = 64;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 2;  // g = 4, d = 8
  HeadGroup g1 = head_group(c, 2, 1);
  EXPECT_EQ(g1.q, (Range{4, 8}));
  EXPECT_EQ(g1.kv, (Range{1, 2}));
  EXPECT_EQ(g1.q_rows(), (Range{32, 64}));
  EXPECT_EQ(g1.kv_rows(), (Range{8, 16}));
  // Every query head of a group reads a kv head of the same group (query j reads kv j / g).
  for (int D : {1, 2}) {
    std::set<int64_t> seen;
    for (int r = 0; r < D; ++r) {
      HeadGroup g = head_group(c, D, r);
      for (int64_t j = g.q.begin; j < g.q.end; ++j) {
        EXPECT_GE(j / c.gqa_group(), g.kv.begin);
        EXPECT_LT(j / c.gqa_group(), g.kv.end);
        seen.insert(j);
      }
    }
    EXPECT_EQ(static_cast<int64_t>(seen.size()), c.num_attention_heads);
  }
  EXPECT_EQ(error_of([&] { head_group(c, 4, 0); }),
            "num_key_value_heads=2 is not divisible by D=4; use D in {1, 2}");
  c.num_key_value_heads = 4;
  EXPECT_EQ(error_of([&] { check_heads(c, 8); }),
            "num_key_value_heads=4 is not divisible by D=8; use D in {1, 2, 4}");
}

TEST(Weights, RowColumnAndVocabShardsTile) {
  for (int D : {1, 2, 4}) {
    int64_t next_row = 0, next_col = 0, next_v = 0;
    for (int r = 0; r < D; ++r) {
      Range rr = row_shard(96, D, r), cc = col_shard(32, D, r), vv = vocab_shard(256, D, r);
      EXPECT_EQ(rr.begin, next_row);
      EXPECT_EQ(cc.begin, next_col);
      EXPECT_EQ(vv.begin, next_v);
      EXPECT_EQ(rr.size(), 96 / D);
      next_row = rr.end;
      next_col = cc.end;
      next_v = vv.end;
    }
    EXPECT_EQ(next_row, 96);
    EXPECT_EQ(next_col, 32);
    EXPECT_EQ(next_v, 256);
  }
  EXPECT_EQ(row_shard(12, 3, 2), (Range{8, 12}));
  EXPECT_EQ(col_shard(12, 4, 1), (Range{3, 6}));
}

TEST(Validation, MessagesSayWhatWorks) {
  EXPECT_EQ(error_of([] { check_zigzag(100, 8); }),
            "sequence length S=100 cannot be cut into 2D=16 equal zigzag chunks; use S a multiple "
            "of 16 (e.g. 96 or 112), or D in {1, 2, 5, 10, 25, 50}");
  EXPECT_EQ(error_of([] { check_zigzag(8, 8); }),
            "sequence length S=8 cannot be cut into 2D=16 equal zigzag chunks; use S a multiple of "
            "16 (e.g. 16), or D in {1, 2, 4}");
  EXPECT_NE(error_of([] { check_zigzag(7, 1); }).find("odd S"), std::string::npos);
  EXPECT_NO_THROW(check_zigzag(64, 4));
  EXPECT_EQ(error_of([] { check_vocab(250, 4); }),
            "vocab_size=250 is not divisible by D=4; use D in {1, 2, 5, 10, 25, 50, 125, 250} (or "
            "pad the vocabulary to a multiple of D)");
  EXPECT_EQ(error_of([] { check_ffn(688, 3); }),
            "intermediate_size=688 is not divisible by D=3; use D in {1, 2, 4, 8, 16, 43, 86, 172, "
            "344, 688}");
  EXPECT_EQ(check_world(8, 2, 2), 4);
  EXPECT_EQ(error_of([] { check_world(6, 4); }),
            "6 ranks cannot hold dp=4 equal replicas (world = D·R); use --dp in {1, 2, 3, 6} or a "
            "multiple of 4 ranks");
  EXPECT_EQ(error_of([] { check_world(8, 2, 3); }),
            "the layout group of D=4 ranks (world 8 / dp 2) cannot be split into tp=3 groups; use "
            "--tp in {1, 2, 4}");
  EXPECT_EQ(error_of([] { even_range(10, 4, 0, "hidden_size"); }),
            "hidden_size=10 is not divisible by 4; use a degree in {1, 2, 5, 10}");
}

}  // namespace
}  // namespace tsp
