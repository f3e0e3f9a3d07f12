// The cuDNN attention path's graphs (src/backend/cuda/attention_cudnn.cpp, make_graph) through
// the cuDNN frontend's own checks, on the CPU: no GPU is needed, only libcudnn.so.9 (cuDNN's
// graph library builds the operation graph without a device). What a GPU run would otherwise
// find first: dims and strides of the token-major [1, h, n, d] views, the Stats layout (packed
// [1, hq, nq, 1], as cuDNN < 9.26 requires in the backward), the band's attributes (TOP_LEFT,
// right bound q0 - k0), the head dims, GQA, and the implementation the frontend picks — for the
// calls cuda_attention_test's cuDNN cases make (their nk' and bound from
// attention_cudnn_rules.h), on SM 8.0, 9.0 and 10.0. Choosing an engine (heuristics, plan build)
// needs the device: that, and the numbers, are cuda_attention_test's (GPU).
// Skipped in a build without the path or where libcudnn.so.9 does not load.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_cudnn_rules.h"

namespace tsp::cuda {
namespace {

#define SKIP_WITHOUT_CUDNN_LIBRARY()                                                             \
  if (!cudnn_attention_built()) GTEST_SKIP() << "this build has no cuDNN path (TSP_WITH_CUDNN)"; \
  if (const std::string why = cudnn_attention_unavailable(); !why.empty()) GTEST_SKIP() << why

// A call with contiguous positions q_pos = [q0, q0 + nq), k_pos = [k0, k0 + nk).
struct Call {
  int64_t nq, nk;
  int hq, hkv, d;
  int64_t q0, k0;
};

// cuda_attention_test's covered cases (cudnn_covered_cases and the key chunk with merged
// statistics), per head dim.
std::vector<Call> covered_calls() {
  std::vector<Call> cs;
  for (int d : {64, 128}) {
    cs.push_back({64, 64, 4, 4, d, 0, 0});         // from 0, MHA, the smallest nq covered
    cs.push_back({256, 256, 32, 8, d, 0, 0});      // from 0, GQA 32/8
    cs.push_back({200, 300, 8, 2, d, 150, 0});     // a query chunk after a key prefix
    cs.push_back({130, 700, 32, 8, d, 570, 0});    // the bound at nk - nq
    cs.push_back({100, 300, 4, 4, d, 20, 5});      // keys past the last query: nk' = 115
    cs.push_back({96, 200, 8, 2, d, 200 + 7, 0});  // after every key: no mask
    cs.push_back({1000, 1000, 4, 2, d, 0, 0});     // several tiles
    cs.push_back({512, 256, 8, 2, d, 0, 0});       // a key chunk (merged statistics)
  }
  return cs;
}

TEST(CudnnAttentionGraph, CoveredCallsPassTheFrontendChecks) {
  SKIP_WITHOUT_CUDNN_LIBRARY();
  for (const Call& c : covered_calls()) {
    const attn::cudnn::Coverage cov = attn::cudnn::positions_covered(c.nq, c.nk, true, c.q0, c.k0);
    ASSERT_TRUE(cov.covered);
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
    for (int sm : {80, 90, 100})
      for (bool backward : {false, true})
        EXPECT_EQ(cudnn_attention_check_graph(backward, c.nq, cov.nk, c.hq, c.hkv, c.d,
                                              cov.right_bound, scale, sm),
                  "")
            << (backward ? "backward" : "forward") << " nq=" << c.nq << " nk'=" << cov.nk
            << " hq=" << c.hq << " hkv=" << c.hkv << " d=" << c.d << " band=" << cov.right_bound
            << " sm=" << sm;
  }
}

// The checks are live: shapes the frontend refuses come back with its reason. d = 12 is no
// multiple of 8, and hq = 6 no multiple of hkv = 4 (shape_covered keeps both off the path; this
// only shows that the frontend looks, here, without a device).
TEST(CudnnAttentionGraph, RefusedShapesSayWhy) {
  SKIP_WITHOUT_CUDNN_LIBRARY();
  for (bool backward : {false, true}) {
    const std::string d12 = cudnn_attention_check_graph(backward, 128, 128, 4, 4, 12, 0, 0.25f, 90);
    EXPECT_NE(d12.find("hidden_dim"), std::string::npos) << d12;
    const std::string h6 = cudnn_attention_check_graph(backward, 128, 128, 6, 4, 64, 0, 0.125f, 90);
    EXPECT_NE(h6.find("group-query"), std::string::npos) << h6;
  }
}

}  // namespace
}  // namespace tsp::cuda
