// The cuDNN attention path's graphs (src/backend/cuda/attention_cudnn.cpp, make_graph) through
// the cuDNN frontend's own checks, on the CPU: no GPU is needed, only libcudnn.so.9 (cuDNN's
// graph library builds the operation graph without a device). What a GPU run would otherwise
// find first: dims and strides of the token-major [1, h, n, d] views, the Stats layout (packed
// [1, hq, nq, 1], as cuDNN < 9.26 requires in the backward), the band's attributes (TOP_LEFT,
// right bound q0 - k0), the head dims, GQA, and the implementation the frontend picks — for the
// calls cuda_attention_test's cuDNN cases make (each piece's nq, nk' and bound from
// attention_cudnn_pieces.h), on SM 8.0, 9.0 and 10.0. Choosing an engine (heuristics, plan build)
// needs the device: that, and the numbers, are cuda_attention_test's (GPU).
// Skipped in a build without the path or where libcudnn.so.9 does not load.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_cudnn_pieces.h"

namespace tsp::cuda {
namespace {

#define SKIP_WITHOUT_CUDNN_LIBRARY()                                                             \
  if (!cudnn_attention_built()) GTEST_SKIP() << "this build has no cuDNN path (TSP_WITH_CUDNN)"; \
  if (const std::string why = cudnn_attention_unavailable(); !why.empty()) GTEST_SKIP() << why

// A call: its query and key positions, heads and head dim.
struct Call {
  std::vector<int64_t> q_pos, k_pos;
  int hq, hkv, d;
};
std::vector<int64_t> range(int64_t from, int64_t n) {
  std::vector<int64_t> p(n);
  std::iota(p.begin(), p.end(), from);
  return p;
}
// Chunks (each c positions from chunk index · c) one after another.
std::vector<int64_t> chunks(std::initializer_list<int> order, int64_t c) {
  std::vector<int64_t> p;
  for (int o : order) {
    const std::vector<int64_t> r = range(o * c, c);
    p.insert(p.end(), r.begin(), r.end());
  }
  return p;
}

// cuda_attention_test's covered cases (cudnn_covered_cases and the key chunk with merged
// statistics), per head dim.
std::vector<Call> covered_calls() {
  std::vector<Call> cs;
  for (int d : {64, 128}) {
    cs.push_back({range(0, 64), range(0, 64), 4, 4, d});       // from 0, MHA, smallest nq
    cs.push_back({range(0, 256), range(0, 256), 32, 8, d});    // from 0, GQA 32/8
    cs.push_back({range(150, 200), range(0, 300), 8, 2, d});   // a chunk after a key prefix
    cs.push_back({range(570, 130), range(0, 700), 32, 8, d});  // the bound at nk - nq
    cs.push_back({range(20, 100), range(5, 300), 4, 4, d});    // keys past the last query
    cs.push_back({range(207, 96), range(0, 200), 8, 2, d});    // after every key: no mask
    cs.push_back({range(0, 1000), range(0, 1000), 4, 2, d});   // several tiles
    cs.push_back({range(0, 512), range(0, 256), 8, 2, d});     // a key chunk (merged stats)
    // zigzag, D = 4: rank 1's chunks against the gathered keys (c = 64), and rank 2's against a
    // K/V round's (rank 1's chunks, c = 80)
    cs.push_back({chunks({1, 6}, 64), chunks({0, 7, 1, 6, 2, 5, 3, 4}, 64), 32, 8, d});
    cs.push_back({chunks({2, 5}, 80), chunks({1, 6}, 80), 8, 2, d});
  }
  return cs;
}

TEST(CudnnAttentionGraph, CoveredCallsPassTheFrontendChecks) {
  SKIP_WITHOUT_CUDNN_LIBRARY();
  namespace cudnn = attn::cudnn;
  for (const Call& c : covered_calls()) {
    const int64_t nq = static_cast<int64_t>(c.q_pos.size()),
                  nk = static_cast<int64_t>(c.k_pos.size());
    const cudnn::PiecePlan plan =
        cudnn::plan_pieces(cudnn::runs_of(c.q_pos.data(), nq), cudnn::runs_of(c.k_pos.data(), nk));
    ASSERT_TRUE(plan.covered) << "nq=" << nq << " nk=" << nk;
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
    for (const cudnn::Piece& pc : plan.pieces)
      for (int sm : {80, 90, 100})
        for (bool backward : {false, true})
          EXPECT_EQ(cudnn_attention_check_graph(backward, pc.nq, pc.nk, c.hq, c.hkv, c.d,
                                                pc.right_bound, scale, sm),
                    "")
              << (backward ? "backward" : "forward") << " piece nq=" << pc.nq << " nk'=" << pc.nk
              << " hq=" << c.hq << " hkv=" << c.hkv << " d=" << c.d << " band=" << pc.right_bound
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
