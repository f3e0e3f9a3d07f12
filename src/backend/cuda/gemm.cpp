// Linear layers through cuBLASLt (see gemm.h for the semantics and the dtype rules).
//
// ---- Row-major tensors as cuBLASLt's column-major matrices --------------------------------------
// cuBLASLt computes D = alpha·op(A)·op(B) + beta·C on column-major matrices: op(A) is m×k, op(B)
// is k×n, C and D are m×n. A row-major [R, C] tensor with row stride C is, read column-major, the
// C×R matrix (its transpose) with leading dimension C. So every product below is computed in its
// transposed form, (P·Q)ᵀ = Qᵀ·Pᵀ, where each ᵀ is free (it is the same memory read column-major):
//
//   forward   y [N, out] = x [N, in] · w [out, in]ᵀ
//             column-major: yᵀ (out×N) = w (out×in, as op(A) = Aᵀ of the stored in×out matrix)
//                                        · xᵀ (in×N, the stored matrix itself)
//             A = w, stored in×out, ld = in, op T;  B = x, stored in×N, ld = in, op N;
//             D = y, out×N, ld = out;  m = out, n = N, k = in.
//
//   dx        dx [N, in] += dy [N, out] · w [out, in]
//             column-major: dxᵀ (in×N) += wᵀ (in×out, the stored matrix) · dyᵀ (out×N, stored)
//             A = w, stored in×out, ld = in, op N;  B = dy, stored out×N, ld = out, op N;
//             D = dx, in×N, ld = in;  m = in, n = N, k = out.
//
//   dw        dw [out, in] += dy [N, out]ᵀ · x [N, in]
//             column-major: dwᵀ (in×out) += xᵀ (in×N, stored) · dy (N×out, as op(B) = Bᵀ of the
//                                           stored out×N matrix)
//             A = x, stored in×N, ld = in, op N;  B = dy, stored out×N, ld = out, op T;
//             D = dw, in×out, ld = in;  m = in, n = out, k = N.
//
// A matrix layout describes the STORED matrix: rows×cols = m×k for op(A) = N, k×m for T (and k×n
// or n×k for B), which is what the "stored" shapes above are.
//
// ---- Precision ----------------------------------------------------------------------------------
// Compute type CUBLAS_COMPUTE_32F with scale type fp32 in both cases:
//   * F32 inputs: a true fp32 GEMM. Not CUBLAS_COMPUTE_32F_FAST_TF32: TF32 keeps 10 mantissa
//     bits, an error of ~2^-11 per product where the CPU (oneDNN fp32) has 2^-24, and every fp32
//     result here must agree with the CPU's within fp32 rounding (tests check K·2^-24·Σ|x||w|).
//   * BF16 inputs: tensor cores, products exact, fp32 accumulation; D F32 or BF16. For a BF16 D
//     we exclude the split-K reduction schemes that reduce partial sums in the output type
//     (INPLACE, OUTPUT_TYPE): they would round to bf16 more than once.
//   * A BF16 y with accumulate (y += x·wᵀ) never reaches cuBLASLt as a BF16 C/D with beta = 1.
//     The CPU's rule (oneDNN's sum post-op) is y = bf16(fp32(x·wᵀ) + fp32(y_old)), one rounding.
//     On an H200 (GPU run 1) cuBLASLt with C = D = BF16, beta = 1 broke that rule: errors up to
//     1.6 bf16 half-ulps, and exact cancellation showing through (got 0 where acc + y_old was
//     -0.0019), as if alpha·acc were rounded to bf16 before beta·C was added. So linear_forward
//     widens y to an F32 Workspace copy, runs the GEMM into it with beta = 1 (an F32 D, exact
//     fp32 epilogue) and rounds the copy back into y once. Cost: 6 extra bytes per element of y
//     read/written; only this case pays it (beta = 0 BF16 outputs passed and are unchanged).
//   The summation order differs from oneDNN's, so results agree with the CPU's within the
//   rounding bound, not bitwise.
//
// ---- State --------------------------------------------------------------------------------------
//   * one cublasLtHandle per device, created lazily under a mutex;
//   * one 32 MiB cuBLASLt workspace per (device, stream), cudaMalloc'd on first use: a workspace
//     is reused by successive matmuls ordered on one stream, so two streams never share one;
//   * a plan cache: per (device, m, n, k, leading dimensions, transposes, dtypes, beta != 0,
//     pointer alignments) the matmul descriptor, the three layouts and the algorithm the
//     heuristic chose (its first result). A steady-state step runs no heuristic at all.
// Handles, workspaces and plans live until the process ends and are never destroyed: freeing CUDA
// objects from static destructors races the CUDA runtime's own teardown.
#include "backend/cuda/gemm.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "backend/checks.h"
#include "backend/cuda/cublaslt.h"
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/gemm_cast.h"
#include "tsp/core/error.h"
#include "tsp/core/memory.h"

namespace tsp::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;
constexpr uint32_t kMaxAlignment = 256;  // cuBLASLt's default (and largest) alignment preference

std::string status_text(cublasStatus_t status) {
  return fmt::format("{} ({})", cublaslt().get_status_name(status),
                     cublaslt().get_status_string(status));
}

// ---- What a GEMM is, for error messages ---------------------------------------------------------

// One matmul of a linear layer: enough to say in an error which call, shapes and dtypes failed.
struct GemmCall {
  const char* op;       // "linear_forward"
  const char* product;  // "y = x·wᵀ"
  int64_t N, in, out;
};

struct Problem {
  int device;
  cublasOperation_t ta, tb;
  int64_t m, n, k, lda, ldb, ldd;
  DType ab, d;  // dtype of A and B; of C and D
  bool accumulate;
  uint32_t align_a, align_b, align_d;  // bytes, powers of two up to kMaxAlignment
  bool operator==(const Problem&) const = default;
};

const char* op_name(cublasOperation_t t) {
  return t == CUBLAS_OP_N ? "N" : "T";
}

std::string describe(const GemmCall& c, const Problem& p) {
  return fmt::format(
      "{} {} with N={} in={} out={} on cuda:{} (cuBLASLt column-major m={} n={} k={}; A {} op {} "
      "ld={} align={} B; B {} op {} ld={} align={} B; D {} ld={} align={} B; beta={})",
      c.op, c.product, c.N, c.in, c.out, p.device, p.m, p.n, p.k, dtype_name(p.ab), op_name(p.ta),
      p.lda, p.align_a, dtype_name(p.ab), op_name(p.tb), p.ldb, p.align_b, dtype_name(p.d), p.ldd,
      p.align_d, p.accumulate ? 1 : 0);
}

#define TSP_LT_CHECK(call, call_ctx, problem)                                                  \
  do {                                                                                         \
    const cublasStatus_t tsp_lt_status_ = (call);                                              \
    TSP_CHECK(tsp_lt_status_ == CUBLAS_STATUS_SUCCESS, "cuBLASLt {} failed for {}: {}", #call, \
              describe(call_ctx, problem), status_text(tsp_lt_status_));                       \
  } while (0)

cudaDataType_t cuda_type(DType t) {
  return t == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t a = kMaxAlignment;
  while (a > 1 && address % a != 0) a /= 2;
  return a;
}

// ---- Per-device state ---------------------------------------------------------------------------

// Makes `device` current for the scope of a call and restores the caller's device after it.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    TSP_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ == device)
      previous_ = -1;
    else
      TSP_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() {
    if (previous_ >= 0) cudaSetDevice(previous_);  // nothing useful to do on failure here
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
};

// The device's handle; the device is current (DeviceScope) when it is created.
cublasLtHandle_t handle_for(int device) {
  static std::mutex mutex;
  static auto* handles = new std::map<int, cublasLtHandle_t>;  // never destroyed, see above
  std::lock_guard lock(mutex);
  auto it = handles->find(device);
  if (it != handles->end()) return it->second;
  cublasLtHandle_t handle = nullptr;
  const cublasStatus_t status = cublaslt().create(&handle);
  TSP_CHECK(status == CUBLAS_STATUS_SUCCESS, "cublasLtCreate failed on cuda:{}: {}", device,
            status_text(status));
  handles->emplace(device, handle);
  return handle;
}

// The cuBLASLt workspace of (device, stream); the device is current when it is allocated.
void* workspace_for(int device, cudaStream_t stream) {
  static std::mutex mutex;
  static auto* workspaces = new std::map<std::pair<int, cudaStream_t>, void*>;  // never freed
  std::lock_guard lock(mutex);
  auto it = workspaces->find({device, stream});
  if (it != workspaces->end()) return it->second;
  void* p = nullptr;
  const cudaError_t status = cudaMalloc(&p, kWorkspaceBytes);
  TSP_CHECK(status == cudaSuccess,
            "cannot allocate the {} MiB cuBLASLt workspace on cuda:{}: {} ({})",
            kWorkspaceBytes >> 20, device, cudaGetErrorString(status), cudaGetErrorName(status));
  workspaces->emplace(std::make_pair(device, stream), p);
  return p;
}

// ---- Plans --------------------------------------------------------------------------------------

struct ProblemHash {
  size_t operator()(const Problem& p) const {
    // FNV-1a over the fields (not the struct bytes: padding is indeterminate).
    uint64_t h = 1469598103934665603ull;
    auto mix = [&h](uint64_t v) {
      h ^= v;
      h *= 1099511628211ull;
    };
    mix(static_cast<uint64_t>(p.device));
    mix(static_cast<uint64_t>(p.ta) * 2 + static_cast<uint64_t>(p.tb));
    for (int64_t v : {p.m, p.n, p.k, p.lda, p.ldb, p.ldd}) mix(static_cast<uint64_t>(v));
    mix(static_cast<uint64_t>(p.ab) * 8 + static_cast<uint64_t>(p.d));
    mix(p.accumulate);
    mix((uint64_t{p.align_a} << 32) ^ (uint64_t{p.align_b} << 16) ^ p.align_d);
    return static_cast<size_t>(h);
  }
};

// The descriptors are host objects (destroying them makes no CUDA call).
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;  // d is also C (C = D in place)
  cublasLtMatmulAlgo_t algo{};
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (d) cublaslt().matrix_layout_destroy(d);
    if (b) cublaslt().matrix_layout_destroy(b);
    if (a) cublaslt().matrix_layout_destroy(a);
    if (desc) cublaslt().matmul_desc_destroy(desc);
  }
};

struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const {
    cublaslt().matmul_preference_destroy(p);
  }
};

template <typename T>
void set_desc(const GemmCall& c, const Problem& p, cublasLtMatmulDesc_t desc,
              cublasLtMatmulDescAttributes_t attr, const T& value) {
  TSP_LT_CHECK(cublaslt().matmul_desc_set_attribute(desc, attr, &value, sizeof value), c, p);
}
template <typename T>
void set_pref(const GemmCall& c, const Problem& p, cublasLtMatmulPreference_t pref,
              cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
  TSP_LT_CHECK(cublaslt().matmul_preference_set_attribute(pref, attr, &value, sizeof value), c, p);
}

std::shared_ptr<const Plan> create_plan(const GemmCall& c, const Problem& p,
                                        cublasLtHandle_t handle) {
  auto plan = std::make_shared<Plan>();
  TSP_LT_CHECK(cublaslt().matmul_desc_create(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), c, p);
  set_desc(c, p, plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, p.ta);
  set_desc(c, p, plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, p.tb);
  // Stored shapes (see the top of the file): A is m×k for op N, k×m for op T; B k×n or n×k.
  const auto rows = [](cublasOperation_t t, int64_t r, int64_t cols) {
    return static_cast<uint64_t>(t == CUBLAS_OP_N ? r : cols);
  };
  TSP_LT_CHECK(cublaslt().matrix_layout_create(&plan->a, cuda_type(p.ab), rows(p.ta, p.m, p.k),
                                               rows(p.ta, p.k, p.m), p.lda),
               c, p);
  TSP_LT_CHECK(cublaslt().matrix_layout_create(&plan->b, cuda_type(p.ab), rows(p.tb, p.k, p.n),
                                               rows(p.tb, p.n, p.k), p.ldb),
               c, p);
  TSP_LT_CHECK(cublaslt().matrix_layout_create(&plan->d, cuda_type(p.d), static_cast<uint64_t>(p.m),
                                               static_cast<uint64_t>(p.n), p.ldd),
               c, p);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  TSP_LT_CHECK(cublaslt().matmul_preference_create(&raw_pref), c, p);
  const std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceDeleter> pref(raw_pref);
  set_pref(c, p, raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
           static_cast<uint64_t>(kWorkspaceBytes));
  // The actual pointers' alignments (views may be offset windows): algorithms that need more are
  // excluded instead of failing or faulting at run time.
  set_pref(c, p, raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, p.align_a);
  set_pref(c, p, raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, p.align_b);
  set_pref(c, p, raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, p.align_d);
  set_pref(c, p, raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, p.align_d);
  if (p.d == DType::BF16) {
    // Round a bf16 output once: no split-K that reduces partial sums in the output type.
    const uint32_t mask = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    set_pref(c, p, raw_pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, mask);
  }

  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  TSP_LT_CHECK(cublaslt().matmul_algo_get_heuristic(handle, plan->desc, plan->a, plan->b, plan->d,
                                                    plan->d, raw_pref, 1, &result, &found),
               c, p);
  TSP_CHECK(found > 0, "cuBLASLt's heuristic found no algorithm for {}", describe(c, p));
  TSP_CHECK(result.state == CUBLAS_STATUS_SUCCESS, "cuBLASLt's heuristic result for {} is {}",
            describe(c, p), status_text(result.state));
  TSP_CHECK(result.workspaceSize <= kWorkspaceBytes,
            "cuBLASLt chose an algorithm needing {} B of workspace (limit {} B) for {}",
            result.workspaceSize, kWorkspaceBytes, describe(c, p));
  plan->algo = result.algo;
  return plan;
}

class PlanCache {
 public:
  // A training run has a few dozen shapes; the cap only guards against a caller sweeping shapes
  // forever (decode with a growing cache), at the price of running the heuristic again.
  static constexpr size_t kCapacity = 4096;

  std::shared_ptr<const Plan> get(const GemmCall& c, const Problem& p, cublasLtHandle_t handle) {
    {
      std::lock_guard lock(mutex_);
      auto it = map_.find(p);
      if (it != map_.end()) return it->second;
    }
    // The heuristic runs outside the lock (other threads' hits must not wait for it); two threads
    // racing on one new problem both create a plan and the first insert wins.
    std::shared_ptr<const Plan> created = create_plan(c, p, handle);
    std::lock_guard lock(mutex_);
    if (map_.size() >= kCapacity) map_.clear();  // plans in use are kept alive by their callers
    return map_.emplace(p, std::move(created)).first->second;
  }
  size_t size() {
    std::lock_guard lock(mutex_);
    return map_.size();
  }

 private:
  std::mutex mutex_;
  std::unordered_map<Problem, std::shared_ptr<const Plan>, ProblemHash> map_;
};

PlanCache& plan_cache() {
  static auto* cache = new PlanCache;  // never destroyed, see the top of the file
  return *cache;
}

// D = op(A)·op(B) (+ D when accumulate), column-major, on `stream` of the current device.
void matmul(const GemmCall& c, int device, cudaStream_t stream, cublasOperation_t ta,
            cublasOperation_t tb, int64_t m, int64_t n, int64_t k, const void* A, int64_t lda,
            const void* B, int64_t ldb, DType ab, void* D, int64_t ldd, DType d, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    // An empty sum (cuBLASLt rejects k = 0): D = 0, or D unchanged when accumulating. D is a
    // whole contiguous tensor here (ldd = m), and all-zero bytes are +0 in f32 and bf16 alike.
    TSP_CHECK(ldd == m, "{}: an empty sum into a strided D (m={} ldd={})", c.op, m, ldd);
    if (!accumulate) TSP_CUDA_CHECK(cudaMemsetAsync(D, 0, m * n * dtype_size(d), stream));
    return;
  }
  const Problem p{device,
                  ta,
                  tb,
                  m,
                  n,
                  k,
                  lda,
                  ldb,
                  ldd,
                  ab,
                  d,
                  accumulate,
                  alignment_of(A),
                  alignment_of(B),
                  alignment_of(D)};
  const cublasLtHandle_t handle = handle_for(device);
  void* workspace = workspace_for(device, stream);
  const std::shared_ptr<const Plan> plan = plan_cache().get(c, p, handle);
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  TSP_LT_CHECK(
      cublaslt().matmul(handle, plan->desc, &alpha, A, plan->a, B, plan->b, &beta, D, plan->d, D,
                        plan->d, &plan->algo, workspace, kWorkspaceBytes, stream),
      c, p);
}

// ---- Argument checks (shapes and dtypes: backend/checks.h, shared with the CPU backend) ---------

// The one CUDA device all the non-empty views live on (-1 when every view is empty).
int device_of(std::initializer_list<std::pair<const TensorView*, const char*>> views,
              const char* op) {
  int device = -1;
  const char* first = nullptr;
  for (const auto& [v, name] : views) {
    if (v->empty()) continue;
    TSP_CHECK(v->device().kind == DeviceKind::CUDA,
              "{}: {} is on {}; the CUDA backend needs every tensor on a CUDA device", op, name,
              v->device().str());
    if (device < 0) {
      device = v->device().index;
      first = name;
    } else {
      TSP_CHECK(v->device().index == device, "{}: {} is on cuda:{} but {} is on cuda:{}", op, name,
                v->device().index, first, device);
    }
  }
  return device;
}

void check_present(const TensorView& t, const char* op, const char* what) {
  TSP_CHECK(!t.empty() || t.numel() == 0, "{}: {} {} has no memory (an empty view)", op, what,
            shape_str(t.shape()));
}

// A bf16 view of t: t itself when it is bf16, else a rounded copy in a Workspace tensor (held by
// `hold`; released when the caller returns, ordered on `stream` by the device allocator).
TensorView as_bf16(TensorView t, Tensor& hold, cudaStream_t stream) {
  if (t.dtype() == DType::BF16) return t;
  hold = Tensor(t.shape(), DType::BF16, MemCategory::Workspace, t.device());
  // t.data(), not t.f32(): the typed accessors are host access (checked, tensor.h).
  TSP_CUDA_CHECK(launch_round_f32_to_bf16(static_cast<const float*>(t.data()),
                                          static_cast<__nv_bfloat16*>(hold.data()), t.numel(),
                                          stream));
  return hold.view();
}

}  // namespace

// ---- The linear layer ---------------------------------------------------------------------------

void linear_forward(TensorView x, TensorView w, TensorView y, bool accumulate, cudaStream_t s) {
  const char* op = "linear_forward";
  const auto [N, in, out] = checks::check_linear_forward(x, w, y);
  check_present(x, op, "x");
  check_present(w, op, "w");
  check_present(y, op, "y");
  const int device = device_of({{&x, "x"}, {&w, "w"}, {&y, "y"}}, op);
  if (N == 0 || out == 0) return;  // in > 0 (rows_of), so x, w, y have memory: device >= 0

  const DeviceScope scope(device);
  const GemmCall call{op, "y = x·wᵀ", N, in, out};
  // All fp32 (output included) runs fp32; anything else is a bf16 GEMM (the CPU's rule: an
  // all-F32 call with a BF16 output rounds x and w too).
  const bool fp32 = x.dtype() == DType::F32 && w.dtype() == DType::F32 && y.dtype() == DType::F32;
  Tensor hx, hw;
  const TensorView xg = fp32 ? x : as_bf16(x, hx, s);
  const TensorView wg = fp32 ? w : as_bf16(w, hw, s);
  // A BF16 y accumulates in an F32 copy and is rounded once (see "Precision" at the top).
  Tensor hy;
  const bool widen_y = accumulate && y.dtype() == DType::BF16;
  if (widen_y) {
    hy = Tensor(y.shape(), DType::F32, MemCategory::Workspace, y.device());
    TSP_CUDA_CHECK(launch_widen_bf16_to_f32(static_cast<const __nv_bfloat16*>(y.data()),
                                            static_cast<float*>(hy.data()), y.numel(), s));
  }
  const TensorView yg = widen_y ? hy.view() : y;
  // yᵀ (out×N, ld out) = op_T(w stored in×out, ld in) · (x stored in×N, ld in)
  matmul(call, device, s, CUBLAS_OP_T, CUBLAS_OP_N, /*m=*/out, /*n=*/N, /*k=*/in, wg.data(), in,
         xg.data(), in, xg.dtype(), yg.data(), out, yg.dtype(), accumulate);
  if (widen_y)
    TSP_CUDA_CHECK(launch_round_f32_to_bf16(static_cast<const float*>(hy.data()),
                                            static_cast<__nv_bfloat16*>(y.data()), y.numel(), s));
}

void linear_backward(TensorView dy, TensorView x, TensorView w, TensorView dx, TensorView dw,
                     cudaStream_t s) {
  const char* op = "linear_backward";
  const auto [N, in, out] = checks::check_linear_backward(dy, x, w, dx, dw);
  check_present(dy, op, "dy");
  if (!dx.empty()) check_present(w, op, "w");
  if (!dw.empty()) check_present(x, op, "x");
  const int device = device_of({{&dy, "dy"}, {&x, "x"}, {&w, "w"}, {&dx, "dx"}, {&dw, "dw"}}, op);
  const bool want_dx = !dx.empty() && N > 0 && in > 0;
  const bool want_dw = !dw.empty() && N > 0 && in > 0;  // N = 0: dw += an empty sum
  if (!want_dx && !want_dw) return;

  const DeviceScope scope(device);
  // The CPU's rule: dy, x, w all F32 runs fp32; otherwise dy (usually an fp32 gradient) and the
  // operands actually used are rounded to bf16 and the GEMMs run in bf16 into the fp32 grads.
  const bool fp32 = dy.dtype() == DType::F32 && x.dtype() == DType::F32 && w.dtype() == DType::F32;
  Tensor hdy, hx, hw;
  const TensorView dyg = fp32 ? dy : as_bf16(dy, hdy, s);
  if (want_dx) {
    const TensorView wg = fp32 ? w : as_bf16(w, hw, s);
    // dxᵀ (in×N, ld in) += (w stored in×out, ld in) · (dy stored out×N, ld out)
    matmul(GemmCall{op, "dx += dy·w", N, in, out}, device, s, CUBLAS_OP_N, CUBLAS_OP_N,
           /*m=*/in, /*n=*/N, /*k=*/out, wg.data(), in, dyg.data(), out, dyg.dtype(), dx.data(), in,
           DType::F32, /*accumulate=*/true);
  }
  if (want_dw) {
    const TensorView xg = fp32 ? x : as_bf16(x, hx, s);
    // dwᵀ (in×out, ld in) += (x stored in×N, ld in) · op_T(dy stored out×N, ld out)
    matmul(GemmCall{op, "dw += dyᵀ·x", N, in, out}, device, s, CUBLAS_OP_N, CUBLAS_OP_T,
           /*m=*/in, /*n=*/out, /*k=*/N, xg.data(), in, dyg.data(), out, dyg.dtype(), dw.data(), in,
           DType::F32, /*accumulate=*/true);
  }
}

size_t gemm_plan_count() {
  return plan_cache().size();
}

}  // namespace tsp::cuda
