// Every layout on a GPU against single on the CPU (issue 10, "every layout at D = 1, 2, 4 on one
// GPU equal to single on CPU"): the loss on every rank and every parameter's gradient on rank 0,
// fp32 within kLayoutRtol and bf16 mixed precision within kLayoutRtolBf16 (both derived in
// tests/parallel/layout_harness.h, GPU included). All ranks run on cuda:0: the ranks of one job
// share the one GPU, so the layouts' transfers go through MPI staged in host memory (NCCL refuses
// two ranks on one device), while every computation runs in the CUDA backend. GQA and MHA, tied
// and untied; each layout with and without --dp where the world allows it.
// tsp-test-ranks: 1 2 4
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/cuda_common.h"
#include "mpi_test_util.h"
#include "parallel/layout_harness.h"
#include "test_util.h"
#include "tsp/train/optimizer.h"

namespace tsp {
namespace {

struct Model {
  const char* name;
  LlamaConfig config;
};
// h = 64, L = 2, FFN 128, V = 128: heads, kv heads, FFN and vocabulary divide by D <= 4.
std::vector<Model> models() {
  return {{"gqa_untied", test::tiny_config(8, 4, 2, /*tie=*/false)},
          {"mha_tied", test::tiny_config(8, 8, 2, /*tie=*/true)}};
}

struct Config {
  std::string layout;
  int tp = 1;  // tp-sp only
  int dp = 1;
  std::string label(int W) const {
    std::string s = layout == "tp-sp" ? fmt::format("tp-sp T={} S={}", tp, W / dp / tp)
                                      : fmt::format("{} D={}", layout, W / dp);
    return dp > 1 ? s + fmt::format(" R={}", dp) : s;
  }
};

// Every layout at D = W (single: pure data parallelism, D = 1, R = W), and at D = W/2 with R = 2.
std::vector<Config> configs_for(int W) {
  std::vector<Config> out = {{"single", 1, W}};
  for (int dp : {1, 2}) {
    if (W % dp != 0 || (dp > 1 && W < 2)) continue;
    const int D = W / dp;
    for (const char* l : {"tp", "sp", "tsp", "fsdp-cp"}) out.push_back({l, 1, dp});
    out.push_back({"tp-sp", D >= 2 ? 2 : 1, dp});  // T = 2 where D allows, Σ = D / T
    if (D == 4) out.push_back({"tp-sp", 1, dp});   // T = 1, Σ = 4
  }
  return out;
}

void check_every_layout_on_gpu(DType dtype) {
  const int W = test::world().size();
  for (const Config& cf : configs_for(W)) {
    for (const Model& m : models()) {
      test::LayoutCase lc;
      lc.layout = cf.layout;
      lc.tp = cf.tp;
      lc.dp = cf.dp;
      lc.config = m.config;
      lc.dtype = dtype;
      lc.device = Device::cuda(0);
      lc.B = 4;   // divisible by R <= 4
      lc.S = 16;  // 2D | S for D <= 4
      SCOPED_TRACE(cf.label(W) + " " + m.name + " " + std::string(dtype_name(dtype)));
      const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
      if (test::world().rank() == 0)
        std::printf(
            "# cuda:0 %-18s %-10s %s loss %.9f (single on cpu %.9f)  max rel err %.2e (%s)\n",
            cf.label(W).c_str(), m.name, std::string(dtype_name(dtype)).c_str(), r.loss, r.ref_loss,
            r.max_rel_err, r.worst_param.c_str());
    }
  }
}

TEST(CudaLayouts, Fp32MatchesSingleOnCpu) {
  if (tsp::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_every_layout_on_gpu(DType::F32);
}

TEST(CudaLayouts, Bf16MatchesSingleOnCpu) {
  if (tsp::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_every_layout_on_gpu(DType::BF16);
}

// Longer rows (several attention tiles per query block and per key block, and a token count that
// is not a multiple of the kernels' tile sizes) under the sequence-sharded layouts, fp32.
TEST(CudaLayouts, LongerRowsMatchSingleOnCpu) {
  if (tsp::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int W = test::world().size();
  for (const char* layout : {"single", "tsp", "fsdp-cp"}) {
    test::LayoutCase lc;
    lc.layout = layout;
    lc.dp = std::string(layout) == "single" ? W : 1;
    lc.config = test::tiny_config(8, 4, 2, false);
    lc.device = Device::cuda(0);
    lc.B = std::string(layout) == "single" ? 4 : 3;  // single: B divisible by R = W
    lc.S = 200;  // 200 = 8·25: 2D chunks of 25 tokens for D = 4
    SCOPED_TRACE(std::string(layout) + " S=200");
    const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
    if (test::world().rank() == 0)
      std::printf("# cuda:0 %-8s S=200 loss %.9f (single on cpu %.9f)  max rel err %.2e (%s)\n",
                  layout, r.loss, r.ref_loss, r.max_rel_err, r.worst_param.c_str());
  }
}

// The tiny models above have d = 8, which the flash kernels and cuDNN do not take (the reference
// kernels serve them). Here d = 64 (h = 512, 8 query heads, 4 kv heads) and rows of S = 128·W, so
// that every layout's attention calls take the tensor-core path of the version in force
// (TSP_CUDA_FLASH: v1 by default, v2, or cudnn): queries nq >= 64 per call (zigzag chunks of
// S / 2D = 64 at D = W; the unsharded layouts' calls take whole rows). No longer rows: the CUDA
// emulation runs this test at W = 2 in CI (S = 512 took 67 s there, S = 256 takes 37–46 s). With
// cudnn the calls cut into pieces (the chunks against K/V gathered in rank order, or a K/V
// round's chunks). bf16 within kLayoutRtolBf16 (layout_harness.h: the tensor-core rounding of P
// and dS; cuDNN's bf16 dq, dk, dv of each call add 2^-8 of the call's part, norm-wise
// ~2^-8/sqrt(3) = 2.3e-3 per gradient, inside its margin). Under cudnn every rank must have run
// cuDNN calls.
TEST(CudaLayouts, FlashSizedHeadsMatchSingleOnCpu) {
  if (tsp::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int W = test::world().size();
  const bool cudnn = cuda::flash_version() == cuda::FlashVersion::Cudnn;
  for (const Config& cf : configs_for(W)) {
    if (cf.dp > 1 && cf.layout != "single") continue;  // D = W: the longest chunks per rank
    test::LayoutCase lc;
    lc.layout = cf.layout;
    lc.tp = cf.tp;
    lc.dp = cf.dp;
    lc.config = test::tiny_config(8, 4, 2, /*tie=*/false, /*hidden=*/512, /*ffn=*/256);
    lc.dtype = DType::BF16;
    lc.device = Device::cuda(0);
    lc.B = W;  // divisible by R = W (single)
    lc.S = 128 * W;
    SCOPED_TRACE(cf.label(W) + fmt::format(" d=64 S={} flash ", lc.S) +
                 cuda::flash_version_name(cuda::flash_version()));
    const int64_t calls = cuda::cudnn_attention_calls();
    const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
    if (cudnn) {
      EXPECT_GT(cuda::cudnn_attention_calls(), calls) << "no call ran on cuDNN";
    }
    if (test::world().rank() == 0)
      std::printf(
          "# cuda:0 %-18s d=64 S=%lld flash %s loss %.9f (single on cpu %.9f)  max rel err "
          "%.2e (%s)\n",
          cf.label(W).c_str(), static_cast<long long>(lc.S),
          cuda::flash_version_name(cuda::flash_version()), r.loss, r.ref_loss, r.max_rel_err,
          r.worst_param.c_str());
  }
}

// ---- since the last GPU run: ZeRO-1 and packed documents ----------------------------------------
// Both came to the layouts after they last ran on a GPU (commit 0605664). ZeRO-1 (--zero 1, tsp
// train's default under --dp > 1): on one GPU the replicas' in-place reduce-scatter of each
// gradient bucket (started during the backward) and the update's in-place all-gathers (left in
// flight until the next forward reaches each bucket) are MPI transfers of device buffers staged
// through host memory. Documents (--doc-sep): the attention kernels' document bound (the
// reference kernels at d = 8) and the layouts' document positions on the device.

// Every layout against single on the CPU (the harness's bounds), fp32 and bf16: under ZeRO-1 at
// each configuration of configs_for with replicas (R = 2; single: R = W), and with documents (a
// separator about every fifth token, crossing zigzag chunks and ranks) at every configuration. At
// one rank there is no replica to partition over: only the documents run there.
void check_zero_and_documents(Device device) {
  const int W = test::world().size();
  int zero_cases = 0, doc_cases = 0;
  for (const DType dtype : {DType::F32, DType::BF16})
    for (const Config& cf : configs_for(W))
      for (const bool documents : {false, true}) {
        if (!documents && cf.dp == 1) continue;  // nothing to partition
        test::LayoutCase lc;
        lc.layout = cf.layout;
        lc.tp = cf.tp;
        lc.dp = cf.dp;
        lc.zero = documents ? 0 : 1;
        lc.doc_sep = documents ? 5 : -1;
        lc.config = test::tiny_config(8, 4, 2, /*tie=*/false);
        lc.dtype = dtype;
        lc.device = device;
        lc.B = 4;   // divisible by R <= 4
        lc.S = 16;  // 2D | S for D <= 4
        const std::string what =
            cf.label(W) + (documents ? " documents " : " zero-1 ") + std::string(dtype_name(dtype));
        SCOPED_TRACE(what);
        const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
        if (test::world().rank() == 0)
          std::printf("# %s %-28s loss %.9f (single on cpu %.9f)  max rel err %.2e (%s)\n",
                      device.str().c_str(), what.c_str(), r.loss, r.ref_loss, r.max_rel_err,
                      r.worst_param.c_str());
        ++(documents ? doc_cases : zero_cases);
      }
  EXPECT_GE(doc_cases, 2 * 2);  // single and at least one sharded layout, 2 dtypes
  if (W >= 2) {
    EXPECT_GE(zero_cases, 2 * 2);  // single and the layouts at R = 2, 2 dtypes
  }
}

TEST(CudaLayouts, ZeroOneAndDocumentsMatchSingleOnCpu) {
  if (tsp::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_zero_and_documents(Device::cuda(0));
}

// The update under ZeRO-1: each replica's AdamW over its part of the masters, then the parts
// all-gathered in place into the compute copy, waited for by the next forward bucket by bucket.
// One fp32 step (lr 1e-2) on the GPU against single on the CPU: the loss of forward_backward and
// the loss of a forward on another batch after the update, each within kLayoutRtol (the harness's
// fp32 bound). The step carries the gradients' rounding differences (~1e-7 relative between the
// devices) over without amplifying them noticeably: the first AdamW step moves a weight by
// u(g) = lr·g/(|g| + eps), with u'(g) = lr·eps/(|g| + eps)², which is below lr/|g| (a relative
// change in g moves u by less than lr times it) except for gradients within a few eps of zero,
// where u' <= lr/eps = 1e6 turns their ~1e-10 absolute differences into weight changes of ~1e-4
// on those few elements: far below what moves the loss by 1e-4 relative. The update must move that
// loss by more than 10x the bound (measured on the CPU: 6e-3 relative, 60x), so weights left stale
// by a gather, or a replica's part never gathered, fail the comparison. Every layout at R = 2
// (single: R = W); at one rank R = 1 (no partition: the plain update on the GPU).
void check_zero_update(Device device) {
  Communicator& world = test::world();
  const int W = world.size();
  const LlamaConfig c = test::tiny_config(8, 4, 2, /*tie=*/false);
  const Batch first = test::random_batch(4, 16, c.vocab_size, 41);
  const Batch second = test::random_batch(4, 16, c.vocab_size, 42);
  const double lr = 1e-2;
  // single on this rank alone, on the CPU: loss, the second batch's loss before and after.
  std::unique_ptr<Communicator> self = world.split(world.rank(), 0);
  ParallelConfig ref_pc;
  std::unique_ptr<Layout> ref = make_layout(c, ref_pc, *self);
  ref->load(RandomWeights(77));
  AdamW ref_opt(*ref, AdamWConfig{});
  const double ref_loss = ref->forward_backward(first);
  const double ref_before = ref->forward(second);
  ref_opt.step(lr, 1.0);
  const double ref_after = ref->forward(second);
  ASSERT_GT(std::abs(ref_after - ref_before), 10 * test::kLayoutRtol * std::abs(ref_after))
      << "the update does not move the loss enough for the comparison to see it";
  int ran = 0;
  for (const Config& cf : configs_for(W)) {
    if (W >= 2 && cf.dp == 1) continue;  // ZeRO-1 needs replicas
    ParallelConfig pc;
    pc.layout = cf.layout;
    pc.tp = cf.tp;
    pc.dp = cf.dp;
    pc.zero = 1;
    pc.device = device;
    SCOPED_TRACE(cf.label(W) + " zero-1 update");
    std::unique_ptr<Layout> layout = make_layout(c, pc, world);
    layout->load(RandomWeights(77));
    AdamW opt(*layout, AdamWConfig{});
    const double loss = layout->forward_backward(first);
    opt.step(lr, 1.0);
    const double after = layout->forward(second);
    EXPECT_LE(std::abs(loss - ref_loss), test::kLayoutRtol * std::abs(ref_loss))
        << "forward_backward: " << loss << " vs single on the cpu " << ref_loss;
    EXPECT_LE(std::abs(after - ref_after), test::kLayoutRtol * std::abs(ref_after))
        << "after one update: " << after << " vs single on the cpu " << ref_after
        << " (before the update: " << ref_before << ")";
    if (world.rank() == 0)
      std::printf("# %s %-16s zero-1 update: loss after %.9f (single on cpu %.9f, before %.9f)\n",
                  device.str().c_str(), cf.label(W).c_str(), after, ref_after, ref_before);
    ++ran;
  }
  EXPECT_GE(ran, 1);
}

TEST(CudaLayouts, ZeroOneUpdateMatchesSingleOnCpu) {
  if (tsp::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_zero_update(Device::cuda(0));
}

// --recompute full and none (also new since the last GPU run): full replays each layer's forward,
// with its communication, in the backward; none keeps the normed inputs and the MLP's gate/up/act
// (rmsnorm_forward into kept tensors, mlp_forward writing them, mlp_backward reading them). Every
// layout at D = W (single: R = W) in both modes against single on the CPU (selective; on the CPU
// both modes equal selective bit for bit, recompute_mpi_test), fp32 and bf16. That each mode took
// effect shows in the activations' peak: none keeps more than full.
void check_recompute_modes(Device device) {
  const int W = test::world().size();
  int ran = 0;
  for (const DType dtype : {DType::F32, DType::BF16})
    for (const Config& cf : configs_for(W)) {
      if (cf.dp > 1 && cf.layout != "single") continue;  // D = W: the most sharded form
      int64_t activations[2] = {0, 0};
      for (const plan::Recompute mode : {plan::Recompute::Full, plan::Recompute::None}) {
        test::LayoutCase lc;
        lc.layout = cf.layout;
        lc.tp = cf.tp;
        lc.dp = cf.dp;
        lc.recompute = mode;
        lc.config = test::tiny_config(8, 4, 2, /*tie=*/true);
        lc.dtype = dtype;
        lc.device = device;
        lc.B = 4;
        lc.S = 16;
        const std::string what = cf.label(W) + " --recompute " +
                                 std::string(plan::recompute_name(mode)) + " " +
                                 std::string(dtype_name(dtype));
        SCOPED_TRACE(what);
        const test::LayoutCaseResult r = test::check_layout_against_single(test::world(), lc);
        activations[mode == plan::Recompute::None] =
            r.memory.peak[static_cast<int>(MemCategory::Activations)];
        if (test::world().rank() == 0)
          std::printf("# %s %-36s loss %.9f (single on cpu %.9f)  max rel err %.2e (%s)\n",
                      device.str().c_str(), what.c_str(), r.loss, r.ref_loss, r.max_rel_err,
                      r.worst_param.c_str());
      }
      EXPECT_GT(activations[1], activations[0])
          << cf.label(W) << " " << dtype_name(dtype)
          << ": --recompute none keeps no more activations than full";
      ++ran;
    }
  EXPECT_GE(ran, 2 * 2);  // single and at least one sharded layout, 2 dtypes
}

TEST(CudaLayouts, RecomputeFullAndNoneMatchSingleOnCpu) {
  if (tsp::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_recompute_modes(Device::cuda(0));
}

// Gradients accumulate across forward_backward calls on the device exactly as on the CPU (the
// trainer's --accum is repeated calls; a device kernel that overwrites instead of adding, or a
// zero_grads that misses the device slab, is off by O(1)).
TEST(CudaLayouts, GradientsAccumulateAcrossCalls) {
  if (tsp::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const int W = test::world().size();
  const LlamaConfig c = test::tiny_config(8, 4, 2, /*tie=*/true);
  const Batch b1 = test::random_batch(4, 16, c.vocab_size, 7);
  const Batch b2 = test::random_batch(4, 16, c.vocab_size, 8);
  for (const char* layout : {"tsp", "fsdp-cp", "tp-sp"}) {
    ParallelConfig pc;
    pc.layout = layout;
    pc.tp = std::string(layout) == "tp-sp" && W >= 2 ? 2 : 1;
    pc.device = Device::cuda(0);
    std::unique_ptr<Layout> l = make_layout(c, pc, test::world());
    l->load(RandomWeights(3));
    // kLayoutRtol: the GPU's reductions may sum each run in another order (layout_harness.h).
    test::check_gradient_accumulation(*l, b1, b2, std::string("cuda:0 ") + layout,
                                      test::kLayoutRtol);
  }
}

// The guard rail on a real device tensor: typed host access throws with device, shape and dtype.
TEST(CudaLayouts, HostAccessToDeviceTensorThrows) {
  if (tsp::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Tensor t({4, 8}, DType::F32, MemCategory::Workspace, Device::cuda(0));
  const std::string msg = test::error_of([&] { t.f32(); });
  EXPECT_NE(msg.find("host access to a cuda:0 tensor [4, 8] f32"), std::string::npos) << msg;
}

}  // namespace
}  // namespace tsp
