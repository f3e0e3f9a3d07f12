// The one check every layout test runs (tests/parallel/<layout>_mpi_test.cpp):
//
//   TEST(Tsp, MatchesSingle) {
//     test::LayoutCase lc;
//     lc.layout = "tsp";
//     lc.config = test::tiny_config(/*heads=*/8, /*kv_heads=*/8);
//     test::check_layout_against_single(test::world(), lc);
//   }
//
// It builds the random tiny model (RandomWeights(seed)) and a random batch, runs the layout under
// test on the whole world (forward_backward, then forward), gathers the gradients on world rank 0,
// runs the reference ("single" on a size-1 communicator of each rank, whole batch) and compares:
// the loss on every rank, and every parameter's gradient on rank 0 by norm-wise relative error.
// When the layout's group and replica counts are both 1 it requires bitwise equality instead.
// LayoutCase::device puts the layout under test on another device (a GPU: every rank on it); the
// reference stays on the CPU, and the comparison is then never bitwise (kLayoutRtol's argument
// holds for GPU fp32 too: see there).
// It returns (and with TSP_HARNESS_VERBOSE=1 prints) per-rank peak memory and traffic.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "test_util.h"
#include "tsp/comm/communicator.h"
#include "tsp/core/memory.h"
#include "tsp/parallel/layout.h"

namespace tsp::test {

// Norm-wise relative tolerance for a layout against single, both fp32. The two compute the same
// function with different summation orders (sharded GEMMs, partial sums added by collectives,
// online softmax over other key / vocabulary orders). Each f32 result carries a relative error
// of at most K·2^-24 for K-term sums; with K <= 256 here that is 1.5e-5 worst case (about 1e-6
// typical) per step, and the tiny models chain ~2L+2 = 6 such steps forward and back. 1e-4 keeps
// a margin over that while any sharding bug (a wrong or missing shard, a doubled or missing
// 1/R scale, a position off by one) moves a gradient by O(1e-2) or more.
//
// The same bound holds for the layout on a GPU against single on the CPU, both fp32: the GPU
// GEMMs run cuBLASLt with CUBLAS_COMPUTE_32F (true fp32 multiply-adds, not TF32, whose 2^-11
// inputs would need ~1e-3) and our kernels accumulate in fp32 too, so the two differ only in
// summation order (the same K·2^-24 per result) and in the last ulps of exp / rsqrt (CUDA's
// expf and rsqrtf are within 2 ulp: 1.2e-7 each, far below the summation term).
inline constexpr double kLayoutRtol = 1e-4;

// The same comparison when both run in bf16 mixed precision (same dtype for the layout and for
// single). Every fp32 accumulation still differs only by summation order (~1e-6, as above), but
// the results are rounded to bf16 at each sub-block output (q, k, v, o, the residual stream, the
// normed inputs, the MLP activation): where two fp32 values that differ by ~1e-6 straddle a bf16
// rounding boundary, they round one bf16 ulp apart (2^-8 = 3.9e-3 relative). At most every
// element of a stage can flip, so a stage adds at most 2^-8 norm-wise; the tiny models chain
// 2L+2 = 6 rounded stages forward and back: 6·2^-8 = 2.3e-2 bounds the gradients and the loss.
// In practice only the few elements near a boundary flip, and errors stay near 1e-3. A sharding
// bug (a wrong or missing shard, a doubled 1/R, a position off by one) moves a gradient by 1e-1
// or more, so 2.5e-2 still separates them. Layouts must round each sub-block output ONCE, as
// single does: a partial sum (rounds of tsp, ring steps, row-parallel pieces) is accumulated in
// fp32 and rounded into the bf16 residual at the end, else every extra rounding adds 2^-9.
//
// A GPU layout against single on the CPU, both bf16: the same flips at bf16 boundaries, and one
// more rounding the CPU does not make: tensor-core attention multiplies the probabilities P (and
// in backward dS) as bf16, 2^-9 relative each. Those errors are independent over the keys a query
// sums, so norm-wise they add ~2^-9/sqrt(3) = 1.1e-3 per attention stage (4 stages forward and
// back: 4.5e-3, 7.8e-3 if every element erred the same way), which the margin above absorbs.
inline constexpr double kLayoutRtolBf16 = 2.5e-2;

// A tiny Llama for layout tests. Defaults: h=64, 8 query heads (d=8), MHA, L=2, FFN 128, V=128,
// so D in {1, 2, 4, 8} divides heads, FFN and vocabulary. GQA: pass kv_heads < heads.
inline LlamaConfig tiny_config(int64_t heads = 8, int64_t kv_heads = 8, int64_t layers = 2,
                               bool tie = false, int64_t hidden = 64, int64_t ffn = 128,
                               int64_t vocab = 128) {
  LlamaConfig c;
  c.hidden_size = hidden;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.num_hidden_layers = layers;
  c.intermediate_size = ffn;
  c.vocab_size = vocab;
  c.tie_word_embeddings = tie;
  c.max_position_embeddings = 1024;
  c.validate();
  return c;
}

// B rows of S+1 token ids in [0, V), deterministic in seed.
inline Batch random_batch(int64_t B, int64_t S, int64_t V, uint64_t seed) {
  Batch b;
  b.B = B;
  b.S = S;
  b.tokens.resize(B * (S + 1));
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int32_t& t : b.tokens) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;  // xorshift64
    t = static_cast<int32_t>(x % static_cast<uint64_t>(V));
  }
  return b;
}

// Packed documents in a batch: about one token in `every` becomes the separator `sep` (the rest
// stay random, and any other token equal to sep is moved off it), deterministic in seed. With
// every = 0 no separator remains: each row is one document. Sets batch.doc_sep = sep.
inline void add_documents(Batch& b, int32_t sep, int64_t V, uint64_t seed, int every = 5) {
  uint64_t x = seed * 0xD1B54A32D192ED03ull + 7;
  for (int32_t& t : b.tokens) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    if (t == sep) t = static_cast<int32_t>((sep + 1) % V);
    if (every > 0 && x % static_cast<uint64_t>(every) == 0) t = sep;
  }
  b.doc_sep = sep;
}

struct LayoutCase {
  std::string layout = "single";
  int tp = 1;    // tp-sp only
  int dp = 1;    // R; D = world / R
  int zero = 0;  // ZeRO stage over the R replicas
  bool overlap = true;
  LlamaConfig config = tiny_config();
  int64_t B = 2, S = 16;  // B must divide by dp, S by 2D for zigzag layouts
  uint64_t weight_seed = 1234, batch_seed = 99;
  DType dtype = DType::F32;       // the compute dtype of the layout AND of the single reference
  Device device = Device::cpu();  // where the layout under test runs (the reference: the CPU)
  double rtol = 0;                // 0: kLayoutRtol for f32, kLayoutRtolBf16 for bf16
  int32_t doc_sep = -1;           // >= 0: packed documents (add_documents) with this separator
  // --recompute of the layout under test (the single reference recomputes selectively).
  plan::Recompute recompute = plan::Recompute::Selective;
  double tolerance() const {
    return rtol > 0 ? rtol : dtype == DType::BF16 ? kLayoutRtolBf16 : kLayoutRtol;
  }
};

struct LayoutCaseResult {
  double loss = 0, ref_loss = 0;
  double max_rel_err = 0;  // worst gradient (rank 0 only; 0 elsewhere)
  std::string worst_param;
  MemorySnapshot memory;  // this rank, peaks over load + forward_backward of the layout
  CommStats comm;         // this rank, group + replica traffic of one forward_backward
};

// ||a - b|| / ||b|| (||a|| when b is zero).
inline double norm_rel_err(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// For a failure message: the element where a and b differ most, "at [3, 17]: 0.25 vs 0.2501 (max
// |diff| 1e-4)".
inline std::string worst_element(const float* a, const float* b, const Shape& shape) {
  const int64_t n = shape_numel(shape);
  int64_t at = 0;
  double worst = -1;
  for (int64_t i = 0; i < n; ++i) {
    const double d = std::abs(static_cast<double>(a[i]) - b[i]);
    if (d > worst || std::isnan(d)) {
      worst = d, at = i;
      if (std::isnan(d)) break;  // the first NaN is the clearest clue
    }
  }
  Shape idx(shape.size());
  for (int64_t flat = at, d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    idx[d] = shape[d] ? flat % shape[d] : 0;
    flat = shape[d] ? flat / shape[d] : 0;
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, "at %s (flat %lld): %.9g vs %.9g (max |diff| %.3g)",
                shape_str(idx).c_str(), static_cast<long long>(at), n ? a[at] : 0.f,
                n ? b[at] : 0.f, worst);
  return buf;
}

using GradMap = std::map<std::string, std::vector<float>>;

inline GradMap gather_grads(Layout& layout) {
  GradMap out;
  layout.gather(true, [&](const ParamSpec& s, TensorView t) {
    out[s.name].assign(t.f32(), t.f32() + t.numel());
  });
  return out;
}

inline LayoutCaseResult check_layout_against_single(Communicator& world, const LayoutCase& lc) {
  LayoutCaseResult res;
  Batch batch = random_batch(lc.B, lc.S, lc.config.vocab_size, lc.batch_seed);
  if (lc.doc_sep >= 0) add_documents(batch, lc.doc_sep, lc.config.vocab_size, lc.batch_seed);
  const RandomWeights weights(lc.weight_seed);
  int group_size = 0, replicas = 0;
  GradMap got;
  {
    ParallelConfig pc;
    pc.layout = lc.layout;
    pc.tp = lc.tp;
    pc.dp = lc.dp;
    pc.zero = lc.zero;
    pc.overlap = lc.overlap;
    pc.dtype = lc.dtype;
    pc.device = lc.device;
    pc.recompute = lc.recompute;
    MemoryTracker::instance().reset_peaks();
    std::unique_ptr<Layout> layout = make_layout(lc.config, pc, world);
    layout->load(weights);
    const CommStats g0 = layout->group().stats(), r0 = layout->replicas().stats();
    res.loss = layout->forward_backward(batch);
    res.comm = layout->group().stats() - g0;
    res.comm += layout->replicas().stats() - r0;
    res.memory = MemoryTracker::instance().snapshot();
    group_size = layout->group().size();
    replicas = layout->replicas().size();
    got = gather_grads(*layout);
    // forward() is the same loss without the backward.
    const double fwd = layout->forward(batch);
    EXPECT_LE(std::abs(fwd - res.loss), lc.tolerance() * std::abs(res.loss))
        << lc.layout << ": forward() " << fwd << " vs forward_backward() " << res.loss;
  }

  // The reference: single on this rank alone, the whole batch.
  std::unique_ptr<Communicator> self = world.split(world.rank(), 0);
  ParallelConfig ref_pc;  // "single", dp 1, the same compute dtype
  ref_pc.dtype = lc.dtype;
  std::unique_ptr<Layout> ref = make_layout(lc.config, ref_pc, *self);
  ref->load(weights);
  res.ref_loss = ref->forward_backward(batch);
  GradMap want = gather_grads(*ref);  // size-1 group: every rank is its rank 0

  // The same operations in the same order on the same device give the same bits; another device
  // (other kernels, other summation orders) is compared within the tolerance.
  const bool bitwise = group_size == 1 && replicas == 1 && lc.device == ref_pc.device;
  const std::string where = lc.device == ref_pc.device
                                ? std::string()
                                : " on " + lc.device.str() + " vs single on " + ref_pc.device.str();
  if (bitwise) {
    EXPECT_EQ(res.loss, res.ref_loss) << lc.layout << " at D=1, R=1 must equal single bit for bit";
  } else {
    EXPECT_LE(std::abs(res.loss - res.ref_loss), lc.tolerance() * std::abs(res.ref_loss))
        << lc.layout << where << " (" << dtype_name(lc.dtype) << "): loss " << res.loss
        << " vs single " << res.ref_loss << " (rank " << world.rank() << ")";
  }
  if (world.rank() == 0) {
    EXPECT_EQ(got.size(), want.size()) << "gather delivered a different set of parameters";
    for (const auto& [name, w] : want) {
      auto it = got.find(name);
      if (it == got.end()) {
        ADD_FAILURE() << lc.layout << ": no gradient gathered for " << name;
        continue;
      }
      const std::vector<float>& g = it->second;
      if (g.size() != w.size()) {
        ADD_FAILURE() << lc.layout << ": gathered gradient of " << name << " has " << g.size()
                      << " elements, expected " << w.size();
        continue;
      }
      if (bitwise) {
        EXPECT_EQ(0, std::memcmp(g.data(), w.data(), g.size() * sizeof(float)))
            << lc.layout << " at D=1, R=1: gradient of " << name << " differs from single";
      }
      const double err = norm_rel_err(g.data(), w.data(), static_cast<int64_t>(g.size()));
      if (err >= res.max_rel_err) {
        res.max_rel_err = err;
        res.worst_param = name;
      }
      if (!(err <= lc.tolerance())) {
        const ParamSpec* spec = nullptr;
        for (const ParamSpec& s : llama_param_specs(lc.config))
          if (s.name == name) spec = &s;
        ADD_FAILURE() << lc.layout << where << " (" << dtype_name(lc.dtype) << ", D=" << group_size
                      << ", R=" << replicas << "): gradient of " << name << " "
                      << (spec ? shape_str(spec->shape) : std::string("?"))
                      << " has norm-wise relative error " << err << " > " << lc.tolerance()
                      << "; worst element "
                      << worst_element(g.data(), w.data(),
                                       spec ? spec->shape : Shape{static_cast<int64_t>(g.size())});
      }
    }
  }

  if (const char* v = std::getenv("TSP_HARNESS_VERBOSE"); v && *v == '1') {
    // One line per rank, printed by rank 0 in rank order.
    int64_t mine[4] = {res.memory.peak_total,
                       res.memory.peak[static_cast<int>(MemCategory::Activations)],
                       res.comm.total_sent(), res.comm.total_received()};
    std::vector<int64_t> all(4 * world.size());
    world.all_gather(mine, all.data(), 4, DType::I64);
    if (world.rank() == 0) {
      std::printf("# %s D=%d R=%d B=%lld S=%lld  loss=%.9g ref=%.9g  max_rel_err=%.3g (%s)\n",
                  lc.layout.c_str(), group_size, replicas, static_cast<long long>(lc.B),
                  static_cast<long long>(lc.S), res.loss, res.ref_loss, res.max_rel_err,
                  res.worst_param.c_str());
      std::printf("#  rank  peak_MB  act_MB  sent_MB  recv_MB\n");
      for (int r = 0; r < world.size(); ++r)
        std::printf("   %4d  %7.3f  %6.3f  %7.3f  %7.3f\n", r, to_mb(all[4 * r]),
                    to_mb(all[4 * r + 1]), to_mb(all[4 * r + 2]), to_mb(all[4 * r + 3]));
    }
  }
  return res;
}

// A batch whose rows are each one document (a separator id is given, none occurs) must give
// today's results bit for bit: the same positions, the same mask (the document bound hides nothing
// at positions >= 0), the same labels and the same count. The layout of lc on the whole world,
// loss on every rank and every gathered gradient on rank 0.
inline void check_one_document_is_bitwise(Communicator& world, const LayoutCase& lc) {
  Batch plain = random_batch(lc.B, lc.S, lc.config.vocab_size, lc.batch_seed);
  const int32_t sep = static_cast<int32_t>(lc.config.vocab_size - 1);
  add_documents(plain, sep, lc.config.vocab_size, lc.batch_seed, /*every=*/0);
  Batch docs = plain;
  plain.doc_sep = -1;
  ParallelConfig pc;
  pc.layout = lc.layout;
  pc.tp = lc.tp;
  pc.dp = lc.dp;
  pc.dtype = lc.dtype;
  std::unique_ptr<Layout> layout = make_layout(lc.config, pc, world);
  layout->load(RandomWeights(lc.weight_seed));
  const double l_plain = layout->forward_backward(plain);
  const GradMap g_plain = gather_grads(*layout);
  layout->zero_grads();
  const double l_docs = layout->forward_backward(docs);
  const GradMap g_docs = gather_grads(*layout);
  EXPECT_EQ(l_plain, l_docs) << lc.layout << ": one document per row changed the loss";
  if (world.rank() != 0) return;
  for (const auto& [name, g] : g_plain)
    EXPECT_EQ(0, std::memcmp(g.data(), g_docs.at(name).data(), g.size() * sizeof(float)))
        << lc.layout << ": one document per row changed the gradient of " << name;
}

// Gradient accumulation with packed documents (docs/layouts.md, "Documents"): two micro-batches
// run with the step's shared denominator (Layout::counted_labels of each, summed, as
// Batch::loss_denominator) must give one batch holding both: the sum of their returned losses is
// its mean loss and the accumulated gradient its gradient. Micro-batch 1 (lc.B rows of lc.S) has
// about one separator in five; in micro-batch 2 every input is a separator but three, so it
// counts n2 = 3 labels against micro-batch 1's n1 ~ 4/5·B·S: averaging the two micro-batches'
// means (the trainer's arithmetic without documents) would weigh each of its tokens
// (n1 + n2)/(2·n2) times what the exact mean does (9 at B·S = 64).
// The layout of lc on the whole world, loss on every rank, gradients on rank 0.
//
// Tolerance: the two runs apply the same per-token operations with the same gradient scale
// (the float 1/(n1 + n2)); they differ only in how many rows one call holds (the weight
// gradients sum over the tokens in one GEMM or in two added into the slab; a layout's sharded
// sums group them in other ways too), i.e. in fp32 summation order: the harness's argument for
// kLayoutRtol holds as it is, 1e-4 norm-wise (measured ~1e-7). The loss sums are doubles: s1/N +
// s2/N against (s1 + s2)/N adds ~1e-16. Over-weighting micro-batch 2 moves the gradients by O(1)
// (measured 7-11 norm-wise; required > 1e-2) and the loss by more than 10x the tolerance
// (measured 3e-2 to 1.2e-1 at losses near 4.9), which the checks require: the comparison can
// fail.
inline void check_accumulation_with_documents(Communicator& world, const LayoutCase& lc) {
  const int64_t V = lc.config.vocab_size, B = lc.B, S = lc.S;
  const int32_t sep = lc.doc_sep >= 0 ? lc.doc_sep : 5;
  Batch b1 = random_batch(B, S, V, lc.batch_seed);
  add_documents(b1, sep, V, lc.batch_seed);
  Batch b2 = random_batch(B, S, V, lc.batch_seed + 1);
  b2.doc_sep = sep;
  for (int64_t r = 0; r < B; ++r)
    for (int64_t x = 0; x < S; ++x) b2.tokens[r * (S + 1) + x] = sep;
  // Three counted labels: those of inputs 1 and S/2 of row 0 and of input S-1 of the last row.
  for (int64_t at : {int64_t{1}, S / 2, B * (S + 1) - 2}) b2.tokens[at] = (sep + 1) % V;
  Batch both = b1;  // rows of b1, then rows of b2
  both.B = 2 * B;
  both.tokens.insert(both.tokens.end(), b2.tokens.begin(), b2.tokens.end());

  ParallelConfig pc;
  pc.layout = lc.layout;
  pc.tp = lc.tp;
  pc.dp = lc.dp;
  pc.zero = lc.zero;
  pc.dtype = lc.dtype;
  std::unique_ptr<Layout> layout = make_layout(lc.config, pc, world);
  layout->load(RandomWeights(lc.weight_seed));

  const int64_t n1 = layout->counted_labels(b1), n2 = layout->counted_labels(b2);
  EXPECT_EQ(n2, 3) << lc.layout << ": micro-batch 2 counts the labels of its 3 other inputs";
  EXPECT_EQ(layout->counted_labels(both), n1 + n2) << lc.layout;
  const double l_both = layout->forward_backward(both);
  const GradMap g_both = gather_grads(*layout);

  layout->zero_grads();
  b1.loss_denominator = b2.loss_denominator = n1 + n2;
  const double l_acc = layout->forward_backward(b1) + layout->forward_backward(b2);
  const GradMap g_acc = gather_grads(*layout);
  EXPECT_LE(std::abs(l_acc - l_both), kLayoutRtol * l_both)
      << lc.layout << ": micro-batches with the shared denominator: loss " << l_acc
      << " vs one batch holding both " << l_both;

  // The mean of the micro-batches' own means, for contrast (what the trainer computed before).
  layout->zero_grads();
  b1.loss_denominator = b2.loss_denominator = 0;
  const double l_means = (layout->forward_backward(b1) + layout->forward_backward(b2)) / 2;
  const GradMap g_means = gather_grads(*layout);
  // Near the random init every token's loss is close to ln V, so the means differ less than
  // the gradients do (those move by O(1), checked below); still far beyond the tolerance.
  EXPECT_GT(std::abs(l_means - l_both), 10 * kLayoutRtol * l_both)
      << lc.layout << ": the case does not tell the exact mean from the mean of the means";

  // A denominator below the batch's own count is a caller's bug.
  b1.loss_denominator = n1 - 1;
  const std::string error = error_of([&] { layout->forward(b1); });
  EXPECT_NE(error.find("is below the"), std::string::npos) << error;

  if (world.rank() != 0) return;
  double worst = 0, means_worst = 0;
  for (const auto& [name, want] : g_both) {
    const std::vector<float>& got = g_acc.at(name);
    const double err = norm_rel_err(got.data(), want.data(), static_cast<int64_t>(got.size()));
    worst = std::max(worst, err);
    EXPECT_LE(err, kLayoutRtol) << lc.layout << ": accumulated gradient of " << name
                                << " vs one batch holding both micro-batches";
    means_worst = std::max(means_worst, norm_rel_err(g_means.at(name).data(), want.data(),
                                                     static_cast<int64_t>(got.size())));
  }
  EXPECT_GT(means_worst, 1e-2) << lc.layout
                               << ": the case does not tell the gradients of the "
                                  "exact mean and of the mean of the means apart";
  std::printf(
      "# %s accumulation with documents (n1 %lld, n2 %lld): loss %.9f vs %.9f, worst "
      "gradient rel err %.2e (mean of the means: loss %.9f, gradient rel err %.2e)\n",
      lc.layout.c_str(), static_cast<long long>(n1), static_cast<long long>(n2), l_acc, l_both,
      worst, l_means, means_worst);
}

// Gradient accumulation: forward_backward(b1) then forward_backward(b2) without zero_grads must
// give the sum of the two separate gradients (the trainer's accumulation is repeated calls).
// Tolerance: one extra rounding per element (the second call adds onto the first's sums, in
// another order, plus the framework's 1/R rescale): 1e-6 norm-wise is ~10 ulps, while a gradient
// overwritten instead of accumulated (or an accumulator summed Σ times) is off by O(1).
// Collective: every rank calls it; rank 0 checks. A device whose reductions are not
// deterministic (atomics in attention backward, split-K GEMMs) sums each run in its own order:
// pass rtol = kLayoutRtol there (its argument applies), still far below the O(1) of a bug.
inline void check_gradient_accumulation(Layout& layout, const Batch& b1, const Batch& b2,
                                        const std::string& label, double rtol = 1e-6) {
  layout.zero_grads();
  layout.forward_backward(b1);
  const GradMap g1 = gather_grads(layout);
  layout.zero_grads();
  layout.forward_backward(b2);
  const GradMap g2 = gather_grads(layout);
  layout.zero_grads();
  layout.forward_backward(b1);
  layout.forward_backward(b2);
  const GradMap g12 = gather_grads(layout);
  if (layout.group().rank() != 0 || layout.replicas().rank() != 0) return;
  for (const auto& [name, a] : g1) {
    std::vector<float> sum(a.size());
    for (size_t i = 0; i < a.size(); ++i) sum[i] = a[i] + g2.at(name)[i];
    EXPECT_LE(norm_rel_err(g12.at(name).data(), sum.data(), static_cast<int64_t>(sum.size())), rtol)
        << label << " " << name;
  }
}

}  // namespace tsp::test
