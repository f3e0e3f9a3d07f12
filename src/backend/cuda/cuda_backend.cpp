// The CUDA backend: cuBLASLt GEMMs (gemm.h), the attention kernels (attention.h) and our
// element-wise kernels (kernels.h), behind the Backend interface, for one device. Every entry
// checks that its views live on this device and have the shapes and dtypes the interface names
// (the checks and messages it shares with the CPU backend: src/backend/checks.h), then queues
// its kernels on the device's compute stream and returns without waiting. download() is the
// synchronisation point.
//
// Dtypes follow the CPU backend: every F32 / BF16 combination it accepts is accepted here, and the
// kernels widen BF16 inputs to fp32 and round a BF16 output once, so the CPU and CUDA backends agree
// to fp32 rounding (fp32) or one bf16 rounding (bf16 outputs).
//
// The device's backend and caching allocator are created on first use, by the device initialiser
// this file registers at load time (core/device.h): backend_for(Device::cuda(i)) or a tensor on
// cuda:i is enough.
#include <algorithm>
#include <cmath>
#include <mutex>
#include <set>
#include <vector>

#include <fmt/format.h>

#include "backend/checks.h"
#include "backend/cuda/allocator.h"
#include "backend/cuda/attention.h"
#include "backend/cuda/cublaslt.h"
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"
#include "ops/cpu/kernels_internal.h"  // cpu::rope_inv_freq: the same fp32 frequencies as the CPU
#include "tsp/backend/backend.h"
#include "tsp/core/error.h"

namespace tsp::cuda {
namespace {

constexpr MemCategory kWork = MemCategory::Workspace;

using namespace checks;

bool is_bf16(const TensorView& t) {
  return t.dtype() == DType::BF16;
}
// One block per row: the grid's x dimension bounds the row count.
void check_rows(int64_t rows, const char* op) {
  TSP_CHECK(rows <= int64_t{0x7fffffff}, "{}: {} rows exceed one CUDA grid", op, rows);
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int index) : index_(index) {
    set_device(index);
    cudaDeviceProp prop{};
    TSP_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
    sm_ = prop.major * 10 + prop.minor;
    const size_t lt = cublaslt().get_version();  // e.g. 130000 for 13.0.0
    name_ = fmt::format("cuda:{} ({}, sm_{}, cuBLASLt {}.{})", index, prop.name, sm_, lt / 10000,
                        lt / 100 % 100);
    compute_stream(index);  // created now, not inside the first timed operation
  }

  Device device() const override { return Device::cuda(index_); }
  std::string name() const override { return name_; }
  bool native_bf16() const override { return sm_ >= 80; }  // bf16 tensor cores from Ampere on

  // ---- memory -------------------------------------------------------------------------------
  void zero(TensorView t) override {
    check_here({&t}, "zero");
    if (t.nbytes()) TSP_CUDA_CHECK(cudaMemsetAsync(t.data(), 0, t.nbytes(), stream()));
  }
  void fill(TensorView t, float value) override {
    check_here({&t}, "fill");
    if (t.dtype() != DType::F32) check_dtype(t, DType::BF16, "fill", "the tensor");
    TSP_CUDA_CHECK(kernels::fill(t.data(), is_bf16(t), t.numel(), value, stream()));
  }
  void copy(TensorView src, TensorView dst) override {
    check_here({&src, &dst}, "copy");
    TSP_CHECK(src.numel() == dst.numel(), "copy: {} elements {} into {} elements {}", src.numel(),
              shape_str(src.shape()), dst.numel(), shape_str(dst.shape()));
    if (src.numel() == 0) return;
    if (src.dtype() == dst.dtype()) {
      if (src.data() != dst.data())
        TSP_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), src.nbytes(),
                                       cudaMemcpyDeviceToDevice, stream()));
      return;
    }
    TSP_CHECK((src.dtype() == DType::F32 || src.dtype() == DType::BF16) &&
                  (dst.dtype() == DType::F32 || dst.dtype() == DType::BF16),
              "copy: no conversion from {} to {}", dtype_name(src.dtype()),
              dtype_name(dst.dtype()));
    TSP_CUDA_CHECK(
        kernels::cast(src.data(), is_bf16(src), dst.data(), is_bf16(dst), src.numel(), stream()));
  }
  void copy_2d(TensorView src, int64_t src_stride, TensorView dst, int64_t dst_stride, int64_t rows,
               int64_t cols) override {
    check_here({&src, &dst}, "copy_2d");
    if (!check_copy_2d(src, src_stride, dst, dst_stride, rows, cols)) return;
    const size_t es = dtype_size(src.dtype());
    TSP_CUDA_CHECK(cudaMemcpy2DAsync(dst.data(), dst_stride * es, src.data(), src_stride * es,
                                     cols * es, rows, cudaMemcpyDeviceToDevice, stream()));
  }
  void swap_leading_dims(TensorView src, TensorView dst) override {
    check_here({&src, &dst}, "swap_leading_dims");
    TSP_CHECK(src.rank() >= 2 && src.dtype() == dst.dtype(),
              "swap_leading_dims: source {} {} must have two leading dimensions, and dtype {}",
              shape_str(src.shape()), dtype_name(src.dtype()), dtype_name(dst.dtype()));
    Shape want = src.shape();
    std::swap(want[0], want[1]);
    TSP_CHECK(dst.shape() == want, "swap_leading_dims: destination is {}, expected {}",
              shape_str(dst.shape()), shape_str(want));
    const int64_t a = src.dim(0), b = src.dim(1);
    if (a * b == 0) return;
    TSP_CHECK(src.data() != dst.data() || a == 1 || b == 1,
              "swap_leading_dims: source and destination are the same memory");
    const int64_t inner_bytes = static_cast<int64_t>(src.nbytes()) / (a * b);
    TSP_CUDA_CHECK(kernels::swap_leading_dims(src.data(), dst.data(), a, b, inner_bytes, stream()));
  }
  void upload(const void* host, TensorView dst) override {
    check_here({&dst}, "upload");
    if (dst.nbytes())
      TSP_CUDA_CHECK(
          cudaMemcpyAsync(dst.data(), host, dst.nbytes(), cudaMemcpyHostToDevice, stream()));
  }
  void download(TensorView src, void* host) override {
    check_here({&src}, "download");
    cudaStream_t s = stream();
    // Also the point where an error of any kernel queued earlier surfaces. Waits first, then
    // copies: a copy to pageable memory would wait for the stream itself, unwatched
    // (wait_for_stream in cuda_common.h).
    wait_for_stream(s);
    if (src.nbytes())
      TSP_CUDA_CHECK(cudaMemcpyAsync(host, src.data(), src.nbytes(), cudaMemcpyDeviceToHost, s));
    wait_for_stream(s);
  }
  void synchronize() override { wait_for_stream(stream()); }

  // ---- element-wise and reductions -----------------------------------------------------------
  void add(TensorView y, TensorView x) override {
    check_here({&y, &x}, "add");
    check_numel(x, y.numel(), "add", "x");
    check_float(x, "add", "x");
    check_float(y, "add", "y");
    TSP_CUDA_CHECK(kernels::add(y.data(), is_bf16(y), x.data(), is_bf16(x), y.numel(), stream()));
  }
  void scale(TensorView y, float factor) override {
    check_here({&y}, "scale");
    check_float(y, "scale", "y");
    TSP_CUDA_CHECK(kernels::scale(y.data(), is_bf16(y), factor, y.numel(), stream()));
  }
  void sum_squares(TensorView x, TensorView out) override {
    check_here({&x, &out}, "sum_squares");
    check_dtype(x, DType::F32, "sum_squares", "x");
    check_dtype(out, DType::F64, "sum_squares", "out");
    const int64_t n = x.numel();
    if (n == 0) return;
    Tensor partials({kernels::sum_squares_partials(n)}, DType::F64, kWork, device());
    TSP_CUDA_CHECK(kernels::sum_squares(static_cast<const float*>(x.data()), n,
                                        static_cast<double*>(partials.data()),
                                        static_cast<double*>(out.data()), stream()));
  }
  void count_non_finite(TensorView x, TensorView out, bool also_negative) override {
    check_here({&x, &out}, "count_non_finite");
    check_dtype(out, DType::I64, "count_non_finite", "out");
    if (x.dtype() != DType::F32) check_dtype(x, DType::BF16, "count_non_finite", "x");
    TSP_CUDA_CHECK(kernels::count_non_finite(x.data(), is_bf16(x), x.numel(), also_negative,
                                             static_cast<int64_t*>(out.data()), stream()));
  }

  // ---- linear (cuBLASLt, gemm.h: the dtype rules are the CPU backend's) ---------------------
  void linear_forward(TensorView x, TensorView w, TensorView y, bool accumulate) override {
    check_here({&x, &w, &y}, "linear_forward");
    cuda::linear_forward(x, w, y, accumulate, stream());
  }
  void linear_backward(TensorView dy, TensorView x, TensorView w, TensorView dx,
                       TensorView dw) override {
    check_here({&dy, &x, &w, &dx, &dw}, "linear_backward");
    cuda::linear_backward(dy, x, w, dx, dw, stream());
  }

  // ---- RMSNorm ------------------------------------------------------------------------------
  void rmsnorm_forward(TensorView x, TensorView w, TensorView y, TensorView rstd,
                       float eps) override {
    const char* op = "rmsnorm_forward";
    check_here({&x, &w, &y, &rstd}, op);
    const auto [N, h] = check_rmsnorm(x, w, y, rstd, eps, op);
    check_rows(N, op);
    TSP_CUDA_CHECK(kernels::rmsnorm_forward(x.data(), is_bf16(x), w.data(), is_bf16(w), y.data(),
                                            is_bf16(y), f32(rstd), N, h, eps, stream()));
  }
  void rmsnorm_apply(TensorView x, TensorView w, TensorView rstd, TensorView y) override {
    const char* op = "rmsnorm_apply";
    check_here({&x, &w, &y, &rstd}, op);
    const auto [N, h] = check_rmsnorm(x, w, y, rstd, /*eps=*/0.f, op);
    check_rows(N, op);
    TSP_CUDA_CHECK(kernels::rmsnorm_apply(x.data(), is_bf16(x), w.data(), is_bf16(w), f32(rstd),
                                          y.data(), is_bf16(y), N, h, stream()));
  }
  void rmsnorm_backward(TensorView dy, TensorView x, TensorView w, TensorView rstd, TensorView dx,
                        TensorView dw) override {
    const char* op = "rmsnorm_backward";
    check_here({&dy, &x, &w, &rstd, &dx, &dw}, op);
    const auto [N, h] = check_rmsnorm_backward(dy, x, w, rstd, dx, dw);
    check_rows(N, op);
    TSP_CUDA_CHECK(kernels::rmsnorm_backward(f32(dy), x.data(), is_bf16(x), w.data(), is_bf16(w),
                                             f32(rstd), dx.empty() ? nullptr : f32(dx),
                                             dw.empty() ? nullptr : f32(dw), N, h, stream()));
  }

  // ---- RoPE ---------------------------------------------------------------------------------
  void rope(TensorView x, TensorView pos, float theta, bool forward) {
    const char* op = forward ? "rope_forward" : "rope_backward";
    check_here({&x, &pos}, op);
    check_rope(x, pos, op);
    const int64_t N = x.dim(0), heads = x.dim(1), d = x.dim(2);
    cpu::check_rope(op, N, heads, d, theta);
    TSP_CHECK(d / 2 <= kernels::kRopeMaxHalf, "{}: head dim {} above the CUDA kernel's {}", op, d,
              2 * kernels::kRopeMaxHalf);
    check_rows(N, op);
    if (N == 0 || heads == 0 || d == 0) return;
    kernels::RopeFreqs freqs{};
    const std::vector<float> inv = cpu::rope_inv_freq(d, theta);
    std::copy(inv.begin(), inv.end(), freqs.inv);
    TSP_CUDA_CHECK(kernels::rope(x.data(), is_bf16(x), static_cast<const int64_t*>(pos.data()), N,
                                 heads, d, freqs, forward ? 1.f : -1.f, stream()));
  }
  void rope_forward(TensorView x, TensorView pos, float theta) override {
    rope(x, pos, theta, true);
  }
  void rope_backward(TensorView dx, TensorView pos, float theta) override {
    rope(dx, pos, theta, false);
  }

  // ---- SwiGLU -------------------------------------------------------------------------------
  void swiglu_forward(TensorView g, TensorView u, TensorView a) override {
    const char* op = "swiglu_forward";
    check_here({&g, &u, &a}, op);
    check_swiglu_forward(g, u, a);
    TSP_CUDA_CHECK(
        kernels::swiglu_forward(f32(g), f32(u), a.data(), is_bf16(a), g.numel(), stream()));
  }
  void swiglu_backward(TensorView da, TensorView g, TensorView u, TensorView dg,
                       TensorView du) override {
    const char* op = "swiglu_backward";
    check_here({&da, &g, &u, &dg, &du}, op);
    check_swiglu_backward(da, g, u, dg, du);
    TSP_CUDA_CHECK(
        kernels::swiglu_backward(f32(da), f32(g), f32(u), f32(dg), f32(du), g.numel(), stream()));
  }

  // ---- embedding ----------------------------------------------------------------------------
  void embedding_forward(TensorView ids, TensorView table, TensorView out, int64_t v0) override {
    const char* op = "embedding_forward";
    check_here({&ids, &table, &out}, op);
    const auto [N, h] = check_embedding_forward(ids, table, out, v0);
    check_float(table, op, "table");  // the kernel converts between F32 and BF16 only
    check_float(out, op, "out");
    check_rows(N, op);
    TSP_CUDA_CHECK(kernels::embedding_forward(i32(ids), table.data(), is_bf16(table), out.data(),
                                              is_bf16(out), N, h, v0, table.dim(0), stream()));
  }
  void embedding_backward(TensorView ids, TensorView dout, TensorView dtable, int64_t v0) override {
    const char* op = "embedding_backward";
    check_here({&ids, &dout, &dtable}, op);
    const auto [N, h] = check_embedding_backward(ids, dout, dtable, v0);
    check_rows(N, op);
    TSP_CUDA_CHECK(kernels::embedding_backward(i32(ids), f32(dout), f32(dtable), N, h, v0,
                                               dtable.dim(0), stream()));
  }

  // ---- cross-entropy ------------------------------------------------------------------------
  void cross_entropy(TensorView logits, TensorView labels, TensorView dlogits, float grad_scale,
                     TensorView loss, int32_t ignore_index) override {
    const char* op = "cross_entropy";
    check_here({&logits, &labels, &dlogits, &loss}, op);
    const auto [N, V] = check_cross_entropy(logits, labels, dlogits, loss);
    check_rows(N, op);
    if (N == 0) return;
    Tensor row_loss({N}, DType::F64, kWork, device());
    TSP_CUDA_CHECK(kernels::cross_entropy(f32(logits), i32(labels),
                                          dlogits.empty() ? nullptr : f32(dlogits),
                                          static_cast<double*>(row_loss.data()), N, V, grad_scale,
                                          ignore_index, f64(loss), stream()));
  }
  void online_softmax_update(TensorView logits, TensorView labels, TensorView row_max,
                             TensorView row_sum, TensorView target, int64_t v0) override {
    const char* op = "online_softmax_update";
    check_here({&logits, &labels, &row_max, &row_sum, &target}, op);
    const auto [N, V] = check_online_softmax_update(logits, labels, row_max, row_sum, target);
    check_rows(N, op);
    TSP_CUDA_CHECK(kernels::online_softmax_update(f32(logits), i32(labels), f32(row_max),
                                                  f32(row_sum), f32(target), N, V, v0, stream()));
  }
  void online_softmax_merge(TensorView max_a, TensorView sum_a, TensorView max_b,
                            TensorView sum_b) override {
    const char* op = "online_softmax_merge";
    check_here({&max_a, &sum_a, &max_b, &sum_b}, op);
    const int64_t N = check_online_softmax_merge(max_a, sum_a, max_b, sum_b);
    TSP_CUDA_CHECK(
        kernels::online_softmax_merge(f32(max_a), f32(sum_a), f32(max_b), f32(sum_b), N, stream()));
  }
  void online_softmax_backward(TensorView logits, TensorView labels, TensorView row_max,
                               TensorView row_sum, TensorView dlogits, int64_t v0, float grad_scale,
                               int32_t ignore_index) override {
    const char* op = "online_softmax_backward";
    check_here({&logits, &labels, &row_max, &row_sum, &dlogits}, op);
    const auto [N, V] = check_online_softmax_backward(logits, labels, row_max, row_sum, dlogits);
    check_rows(N, op);
    TSP_CUDA_CHECK(kernels::online_softmax_backward(f32(logits), i32(labels), f32(row_max),
                                                    f32(row_sum), f32(dlogits), N, V, v0,
                                                    grad_scale, ignore_index, stream()));
  }
  void online_softmax_loss(TensorView row_max, TensorView row_sum, TensorView target,
                           TensorView labels, TensorView loss, int32_t ignore_index) override {
    const char* op = "online_softmax_loss";
    check_here({&row_max, &row_sum, &target, &labels, &loss}, op);
    const int64_t N = check_online_softmax_loss(row_max, row_sum, target, labels, loss);
    if (N == 0) return;
    Tensor row_loss({N}, DType::F64, kWork, device());
    TSP_CUDA_CHECK(kernels::online_softmax_loss(f32(row_max), f32(row_sum), f32(target),
                                                i32(labels), static_cast<double*>(row_loss.data()),
                                                N, ignore_index, f64(loss), stream()));
  }

  // ---- attention (attention.h: reference and flash kernels, the CPU's semantics) ------------
  void attention_forward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                         TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                         float scale) override {
    check_here({&q, &k, &v, &q_pos, &k_pos, &q_doc_pos, &o, &lse}, "attention_forward");
    cuda::attention_forward(q, k, v, q_pos, k_pos, q_doc_pos, o, lse, scale, stream());
  }
  void attention_backward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                          TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                          TensorView dout, TensorView dq, TensorView dk, TensorView dv,
                          float scale) override {
    check_here({&q, &k, &v, &q_pos, &k_pos, &q_doc_pos, &o, &lse, &dout, &dq, &dk, &dv},
               "attention_backward");
    cuda::attention_backward(q, k, v, q_pos, k_pos, q_doc_pos, o, lse, dout, dq, dk, dv, scale,
                             stream());
  }
  void attention_merge(TensorView o_a, TensorView lse_a, TensorView o_b,
                       TensorView lse_b) override {
    check_here({&o_a, &lse_a, &o_b, &lse_b}, "attention_merge");
    cuda::attention_merge(o_a, lse_a, o_b, lse_b, stream());
  }

  // ---- optimizer ----------------------------------------------------------------------------
  void adamw(TensorView w, TensorView g, TensorView m, TensorView v, const AdamWStep& st) override {
    const char* op = "adamw";
    check_here({&w, &g, &m, &v}, op);
    check_adamw(w, g, m, v);
    const kernels::AdamWConstants c{st.grad_scale,
                                    st.beta1,
                                    st.one_minus_beta1,
                                    st.beta2,
                                    st.one_minus_beta2,
                                    st.step_size,
                                    st.inv_sqrt_bias2,
                                    st.eps,
                                    st.decay};
    TSP_CUDA_CHECK(kernels::adamw(f32(w), f32(g), f32(m), f32(v), w.numel(), c, stream()));
  }

 private:
  // The compute stream, with this device made current on the calling thread (kernel launches and
  // cudaMalloc act on the current device).
  cudaStream_t stream() const { return compute_stream(index_); }

  // Every non-empty view lives on this device (the interface's first rule).
  void check_here(std::initializer_list<const TensorView*> views, const char* op) const {
    check_device(views, device(), op);
  }
  // Raw device pointers of checked views (TensorView::f32() is host access only).
  static float* f32(const TensorView& t) { return static_cast<float*>(t.data()); }
  static double* f64(const TensorView& t) { return static_cast<double*>(t.data()); }
  static const int32_t* i32(const TensorView& t) { return static_cast<const int32_t*>(t.data()); }

  int index_;
  int sm_ = 0;
  std::string name_;
};

// The device initialiser (core/device.h): the first use of cuda:i creates its caching allocator
// and backend, once.
void initialize_cuda_device(int index) {
  static std::mutex mutex;
  static std::set<int> ready;
  std::lock_guard lock(mutex);
  if (ready.count(index)) return;
  const int n = device_count();
  TSP_CHECK(
      index >= 0 && index < n,
      "no CUDA device {}: found {} device{}{} (use --device cpu, or another cuda:N)", index, n,
      n == 1 ? "" : "s",
      n == 0 ? " (no driver or no GPU visible: check nvidia-smi and CUDA_VISIBLE_DEVICES)" : "");
  register_allocator(DeviceKind::CUDA, index, make_caching_allocator(index));
  register_backend(Device::cuda(index), std::make_unique<CudaBackend>(index));
  ready.insert(index);
}

[[maybe_unused]] const bool registered = [] {
  register_device_initializer(DeviceKind::CUDA, &initialize_cuda_device);
  return true;
}();

}  // namespace
}  // namespace tsp::cuda
