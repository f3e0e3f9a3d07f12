// The shape decision of the CUDA backend's cuDNN attention path
// (src/backend/cuda/attention_cudnn_rules.h), on the CPU: plain C++ here, this test runs in every
// build (CPU-only and sanitizer builds included). Each condition alone turns the path off. (The
// positions' side, runs cut into one-band pieces: attention_cudnn_pieces_test.)
#include <gtest/gtest.h>

#include <cstdint>

#include "backend/cuda/attention_cudnn_rules.h"

namespace tsp::cuda::attn::cudnn {
namespace {

CallShape covered_shape() {
  CallShape c;
  c.bf16 = true, c.d = 128, c.documents = false, c.aligned = true;
  c.nq = 4096, c.nk = 4096, c.hq = 32, c.hkv = 8;
  return c;
}

TEST(CudnnAttentionRules, ShapeCoveredNeedsEveryCondition) {
  EXPECT_TRUE(shape_covered(covered_shape()));
  CallShape c = covered_shape();
  c.d = 64;
  EXPECT_TRUE(shape_covered(c));
  c.hq = c.hkv = 4;  // MHA
  EXPECT_TRUE(shape_covered(c));
  c.nq = kMinQueries, c.nk = 1;  // the smallest covered call
  EXPECT_TRUE(shape_covered(c));

  // Each condition alone.
  c = covered_shape(), c.bf16 = false;
  EXPECT_FALSE(shape_covered(c)) << "F32";
  for (int d : {8, 32, 96, 200}) {
    c = covered_shape(), c.d = d;
    EXPECT_FALSE(shape_covered(c)) << "d=" << d;
  }
  c = covered_shape(), c.documents = true;
  EXPECT_FALSE(shape_covered(c)) << "documents";
  c = covered_shape(), c.aligned = false;
  EXPECT_FALSE(shape_covered(c)) << "misaligned";
  c = covered_shape(), c.nq = kMinQueries - 1;
  EXPECT_FALSE(shape_covered(c)) << "decode-sized nq";
  c = covered_shape(), c.nk = 0;
  EXPECT_FALSE(shape_covered(c)) << "no keys";
  c = covered_shape(), c.nq = kMaxRows + 1;
  EXPECT_FALSE(shape_covered(c)) << "nq past 32 bits";
  c = covered_shape(), c.nk = kMaxRows + 1;
  EXPECT_FALSE(shape_covered(c)) << "nk past 32 bits";
  c = covered_shape(), c.hq = 12, c.hkv = 8;
  EXPECT_FALSE(shape_covered(c)) << "hq not a multiple of hkv";
}

}  // namespace
}  // namespace tsp::cuda::attn::cudnn
