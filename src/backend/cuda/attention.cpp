// Entry points of the CUDA attention (attention.h): checks at the API boundary (shapes, dtypes,
// devices, with messages that say what to fix), then the choice between cuDNN (opt-in,
// attention_cudnn.cpp: the calls it covers exactly), the flash kernels (attention_flash.cu: BF16,
// d = 64 or 128) and the reference kernels (attention_reference.cu).
#include "backend/cuda/attention.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

#include "backend/cuda/attention_cudnn.h"
#include "backend/cuda/attention_kernels.h"
#include "backend/cuda/cuda_common.h"
#include "tsp/core/error.h"
#include "tsp/plan/measure.h"

namespace tsp::cuda {
namespace {

std::string device_str(Device d) {
  return d.is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(d.index);
}

void check_device(std::initializer_list<const TensorView*> ts, const char* op) {
  const Device dev = (*ts.begin())->device();
  for (const TensorView* t : ts) {
    // An absent tensor (q_doc_pos without documents: a default TensorView, null and "on the
    // CPU") and an empty one hold nothing to check.
    if (t->empty() || t->numel() == 0) continue;
    TSP_CHECK(t->device().kind == DeviceKind::CUDA && t->device().index == dev.index,
              "{}: every tensor must be on one CUDA device ({}), got a {} tensor on {}", op,
              device_str(dev), shape_str(t->shape()), device_str(t->device()));
  }
}

void check_numel(const TensorView& t, int64_t n, const char* op, const char* what) {
  TSP_CHECK(t.numel() == n, "{}: {} must hold {} elements, got {} {}", op, what, n,
            shape_str(t.shape()), t.numel());
}

void check_dtype(const TensorView& t, DType dt, const char* op, const char* what) {
  TSP_CHECK(t.dtype() == dt, "{}: {} must be {}, got {}", op, what, dtype_name(dt),
            dtype_name(t.dtype()));
}

// Shapes and dtypes common to forward and backward; returns the shape and whether q/k/v/o are
// BF16.
attn::Shape common(const TensorView& q, const TensorView& k, const TensorView& v,
                   const TensorView& q_pos, const TensorView& k_pos, const TensorView& o,
                   const TensorView& lse, float scale, const char* op, bool& bf16) {
  TSP_CHECK(q.rank() == 3 && k.rank() == 3 && q.dim(2) == k.dim(2),
            "{}: q must be [nq, hq, d] and k, v [nk, hkv, d], got {} and {}", op,
            shape_str(q.shape()), shape_str(k.shape()));
  attn::Shape sh;
  sh.nq = q.dim(0);
  sh.nk = k.dim(0);
  sh.hq = static_cast<int>(q.dim(1));
  sh.hkv = static_cast<int>(k.dim(1));
  sh.d = static_cast<int>(q.dim(2));
  TSP_CHECK(sh.hq >= 1 && sh.hkv >= 1 && sh.hq % sh.hkv == 0,
            "{}: hq={} must be a positive multiple of hkv={} (GQA shares one kv head among hq/hkv "
            "query heads)",
            op, sh.hq, sh.hkv);
  TSP_CHECK(sh.d >= 1 && sh.d <= attn::kReferenceMaxHeadDim,
            "{}: head dim {} is not supported on CUDA (1 to {})", op, sh.d,
            attn::kReferenceMaxHeadDim);
  TSP_CHECK(std::isfinite(scale), "{}: scale={} must be finite (usually 1/sqrt(head_dim))", op,
            scale);
  check_numel(v, k.numel(), op, "v");
  check_numel(o, q.numel(), op, "o");
  check_numel(lse, sh.nq * sh.hq, op, "lse [nq, hq]");
  check_numel(q_pos, sh.nq, op, "q_pos [nq]");
  check_numel(k_pos, sh.nk, op, "k_pos [nk]");
  check_dtype(lse, DType::F32, op, "lse");
  check_dtype(q_pos, DType::I64, op, "q_pos");
  check_dtype(k_pos, DType::I64, op, "k_pos");
  TSP_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype() && q.dtype() == o.dtype() &&
                (q.dtype() == DType::F32 || q.dtype() == DType::BF16),
            "{}: q, k, v and o must share one dtype, F32 or BF16; got {}, {}, {}, {}", op,
            dtype_name(q.dtype()), dtype_name(k.dtype()), dtype_name(v.dtype()),
            dtype_name(o.dtype()));
  bf16 = q.dtype() == DType::BF16;
  return sh;
}

// q_doc_pos: empty (no documents) or I64 [nq]; the kernels' pointer (null when empty).
const int64_t* doc_positions(const TensorView& q_doc_pos, int64_t nq, const char* op) {
  if (q_doc_pos.empty()) return nullptr;
  check_numel(q_doc_pos, nq, op, "q_doc_pos [nq]");
  check_dtype(q_doc_pos, DType::I64, op, "q_doc_pos");
  return static_cast<const int64_t*>(q_doc_pos.data());
}

attn::Fwd forward_params(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                         TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                         float scale) {
  const char* op = "attention_forward";
  check_device({&q, &k, &v, &q_pos, &k_pos, &q_doc_pos, &o, &lse}, op);
  attn::Fwd p;
  p.sh = common(q, k, v, q_pos, k_pos, o, lse, scale, op, p.bf16);
  p.q_doc_pos = doc_positions(q_doc_pos, p.sh.nq, op);
  p.q = q.data(), p.k = k.data(), p.v = v.data();
  p.q_pos = static_cast<const int64_t*>(q_pos.data());
  p.k_pos = static_cast<const int64_t*>(k_pos.data());
  p.o = o.data(), p.lse = static_cast<float*>(lse.data());
  p.scale = scale;
  return p;
}

attn::Bwd backward_params(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                          TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                          TensorView dout, TensorView dq, TensorView dk, TensorView dv,
                          float scale) {
  const char* op = "attention_backward";
  check_device({&q, &k, &v, &q_pos, &k_pos, &q_doc_pos, &o, &lse, &dout, &dq, &dk, &dv}, op);
  attn::Bwd p;
  p.sh = common(q, k, v, q_pos, k_pos, o, lse, scale, op, p.bf16);
  p.q_doc_pos = doc_positions(q_doc_pos, p.sh.nq, op);
  check_numel(dout, q.numel(), op, "dout");
  check_numel(dq, q.numel(), op, "dq");
  check_numel(dk, k.numel(), op, "dk");
  check_numel(dv, k.numel(), op, "dv");
  for (const TensorView* t : {&dout, &dq, &dk, &dv}) check_dtype(*t, DType::F32, op, "gradients");
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.o = o.data();
  p.q_pos = static_cast<const int64_t*>(q_pos.data());
  p.k_pos = static_cast<const int64_t*>(k_pos.data());
  p.lse = static_cast<const float*>(lse.data());
  p.dout = static_cast<const float*>(dout.data());
  p.dq = static_cast<float*>(dq.data());
  p.dk = static_cast<float*>(dk.data());
  p.dv = static_cast<float*>(dv.data());
  p.scale = scale;
  return p;
}

void merge_checked(TensorView o_a, TensorView lse_a, TensorView o_b, TensorView lse_b,
                   cudaStream_t s) {
  const char* op = "attention_merge";
  check_device({&o_a, &lse_a, &o_b, &lse_b}, op);
  TSP_CHECK(o_a.rank() == 3, "{}: o must be [nq, hq, d], got {}", op, shape_str(o_a.shape()));
  check_numel(o_b, o_a.numel(), op, "o_b");
  check_numel(lse_a, o_a.dim(0) * o_a.dim(1), op, "lse_a [nq, hq]");
  check_numel(lse_b, lse_a.numel(), op, "lse_b");
  check_dtype(lse_a, DType::F32, op, "lse_a");
  check_dtype(lse_b, DType::F32, op, "lse_b");
  for (const TensorView* t : {&o_a, &o_b})
    TSP_CHECK(t->dtype() == DType::F32 || t->dtype() == DType::BF16,
              "{}: o must be F32 or BF16, got {}", op, dtype_name(t->dtype()));
  TSP_CHECK(o_a.dim(2) >= 1 && o_a.dim(2) <= (1 << 30), "{}: bad head dim {}", op, o_a.dim(2));
  TSP_CUDA_CHECK(attn::merge(o_a.data(), o_a.dtype() == DType::BF16,
                             static_cast<float*>(lse_a.data()), o_b.data(),
                             o_b.dtype() == DType::BF16, static_cast<const float*>(lse_b.data()),
                             o_a.dim(0) * o_a.dim(1), static_cast<int>(o_a.dim(2)), s));
}

// The flash kernels load 16-byte chunks (cp.async, float4): every operand they read must be
// 16-byte aligned (row strides are, for d = 64 and 128). Views at odd offsets take the reference.
bool aligned16(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// 0: not chosen yet (TSP_CUDA_FLASH is read at the first flash_version()), else a FlashVersion.
std::atomic<int> g_flash_version{0};

// dq, dk, dv take float2 atomics in v2.
bool aligned8(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) % 8 != 0) return false;
  return true;
}

}  // namespace

FlashVersion flash_version() {
  int v = g_flash_version.load(std::memory_order_relaxed);
  if (v != 0) return static_cast<FlashVersion>(v);
  const char* env = std::getenv("TSP_CUDA_FLASH");
  // The default is v1, the version a GPU has verified (see attention.h).
  int from_env = static_cast<int>(FlashVersion::V1);
  if (env != nullptr && env[0] != '\0') {
    TSP_CHECK(!std::strcmp(env, "v1") || !std::strcmp(env, "v2") || !std::strcmp(env, "cudnn"),
              "TSP_CUDA_FLASH={} is not a flash attention version: use v1, v2 or cudnn (or unset "
              "it for the default, v1)",
              env);
    if (!std::strcmp(env, "v2")) from_env = static_cast<int>(FlashVersion::V2);
    if (!std::strcmp(env, "cudnn")) from_env = static_cast<int>(FlashVersion::Cudnn);
  }
  // A concurrent set_flash_version wins over the environment.
  g_flash_version.compare_exchange_strong(v, from_env);
  return static_cast<FlashVersion>(g_flash_version.load());
}

void set_flash_version(FlashVersion v) {
  TSP_CHECK(v == FlashVersion::V1 || v == FlashVersion::V2 || v == FlashVersion::Cudnn,
            "set_flash_version: bad version {}", static_cast<int>(v));
  g_flash_version.store(static_cast<int>(v));
}

namespace {
// The memory model's question about a cuDNN piece (plan::set_cuda_cudnn_query): its plan's
// workspace. The plan is built with the device's handle, which needs the device current while it
// is built; the caller's current device is given back.
int64_t cudnn_workspace_for_model(const plan::CudnnPieceQuery& q) {
  attn::Shape sh;
  sh.nq = q.nq, sh.nk = q.nk, sh.hq = q.hq, sh.hkv = q.hkv, sh.d = q.d;
  int before = 0;
  TSP_CUDA_CHECK(cudaGetDevice(&before));
  struct Restore {
    int device;
    ~Restore() { cudaSetDevice(device); }
  } restore{before};
  set_device(q.device);
  return attn::cudnn_plan_workspace(q.backward, sh, q.right_bound, q.scale, q.device);
}
}  // namespace

// Load time: the memory model (plan/measure.cpp, the library's CPU part) learns which attention
// path a CUDA run takes, without depending on CUDA itself.
const bool g_flash_query_registered = [] {
  plan::set_cuda_flash_v2_query([] { return flash_version() == FlashVersion::V2; });
  plan::set_cuda_cudnn_query([] { return flash_version() == FlashVersion::Cudnn; },
                             cudnn_workspace_for_model);
  return true;
}();

const char* flash_version_name(FlashVersion v) {
  return v == FlashVersion::V1 ? "v1" : v == FlashVersion::V2 ? "v2" : "cudnn";
}

bool cudnn_attention_built() {
  return attn::cudnn_built();
}

std::string cudnn_attention_unavailable() {
  return attn::cudnn_unavailable_reason();
}

int64_t cudnn_attention_calls() {
  return attn::cudnn_calls_run();
}

std::string cudnn_attention_check_graph(bool backward, int64_t nq, int64_t nk_passed, int hq,
                                        int hkv, int d, int64_t right_bound, float scale, int sm) {
  attn::Shape sh;
  sh.nq = nq, sh.nk = nk_passed, sh.hq = hq, sh.hkv = hkv, sh.d = d;
  return attn::cudnn_check_graph(backward, sh, right_bound, scale, sm);
}

// Whether a call goes to the flash kernels: BF16 with a head dim they serve, with or without
// documents (both flash versions apply the document bound; attention.h).
template <class Params>
bool flash_serves(const Params& p) {
  return p.bf16 && attn::flash_supported(p.sh.d);
}

bool attention_flash_supported(DType dtype, int64_t head_dim) {
  return dtype == DType::BF16 && head_dim <= attn::kReferenceMaxHeadDim &&
         attn::flash_supported(static_cast<int>(head_dim));
}

void attention_forward(TensorView q, TensorView k, TensorView v, TensorView q_pos, TensorView k_pos,
                       TensorView q_doc_pos, TensorView o, TensorView lse, float scale,
                       cudaStream_t s) {
  const attn::Fwd p = forward_params(q, k, v, q_pos, k_pos, q_doc_pos, o, lse, scale);
  if (p.sh.nq == 0) return;
  if (flash_serves(p) && aligned16({p.q, p.k, p.v, p.o})) {
    const FlashVersion fv = flash_version();
    if (fv == FlashVersion::Cudnn && attn::cudnn_forward(p, q.device().index, s)) return;
    if (fv == FlashVersion::V2 && attn::flash_v2_supported(p.sh, false))
      TSP_CUDA_CHECK(attn::flash_forward_v2(p, s));
    else
      TSP_CUDA_CHECK(attn::flash_forward(p, s));
  } else
    TSP_CUDA_CHECK(attn::reference_forward(p, s));
}

void attention_backward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                        TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                        TensorView dout, TensorView dq, TensorView dk, TensorView dv, float scale,
                        cudaStream_t s) {
  const attn::Bwd p =
      backward_params(q, k, v, q_pos, k_pos, q_doc_pos, o, lse, dout, dq, dk, dv, scale);
  if (p.sh.nq == 0 || p.sh.nk == 0) return;  // nothing is visible: += adds nothing
  if (flash_serves(p) && aligned16({p.q, p.k, p.v, p.o, p.dout})) {
    const FlashVersion fv = flash_version();
    if (fv == FlashVersion::Cudnn && attn::cudnn_backward(p, q.device().index, s)) return;
    if (fv == FlashVersion::V2 && attn::flash_v2_supported(p.sh, true) &&
        aligned8({p.dq, p.dk, p.dv}))
      TSP_CUDA_CHECK(attn::flash_backward_v2(p, s));
    else
      TSP_CUDA_CHECK(attn::flash_backward(p, s));
  } else
    TSP_CUDA_CHECK(attn::reference_backward(p, s));
}

void attention_merge(TensorView o_a, TensorView lse_a, TensorView o_b, TensorView lse_b,
                     cudaStream_t s) {
  merge_checked(o_a, lse_a, o_b, lse_b, s);
}

namespace reference {

void attention_forward(TensorView q, TensorView k, TensorView v, TensorView q_pos, TensorView k_pos,
                       TensorView q_doc_pos, TensorView o, TensorView lse, float scale,
                       cudaStream_t s) {
  const attn::Fwd p = forward_params(q, k, v, q_pos, k_pos, q_doc_pos, o, lse, scale);
  if (p.sh.nq == 0) return;
  TSP_CUDA_CHECK(attn::reference_forward(p, s));
}

void attention_backward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                        TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                        TensorView dout, TensorView dq, TensorView dk, TensorView dv, float scale,
                        cudaStream_t s) {
  const attn::Bwd p =
      backward_params(q, k, v, q_pos, k_pos, q_doc_pos, o, lse, dout, dq, dk, dv, scale);
  if (p.sh.nq == 0 || p.sh.nk == 0) return;
  TSP_CUDA_CHECK(attn::reference_backward(p, s));
}

void attention_merge(TensorView o_a, TensorView lse_a, TensorView o_b, TensorView lse_b,
                     cudaStream_t s) {
  merge_checked(o_a, lse_a, o_b, lse_b, s);
}

}  // namespace reference
}  // namespace tsp::cuda
