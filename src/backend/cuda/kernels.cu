// Element-wise and row-wise kernels of the CUDA backend: see kernels.h for the contract.
//
// Shapes of the work: element-wise kernels are grid-stride loops (any n with a bounded grid);
// row-wise kernels (RMSNorm, RoPE, cross-entropy, the online softmax, embedding rows) run one
// block per row, with warp-shuffle + shared-memory block reductions in fp32 (double for losses
// and sum_squares). Where the CPU kernel's expression has a product feeding a sum (AdamW, the RMSNorm
// and RoPE outputs, the softmax gradients) the explicit-rounding intrinsics (__fmul_rn, __fadd_rn)
// keep nvcc from contracting it into an FMA, so those results are bitwise the CPU's whenever the
// inputs are (the CPU is compiled without FP contraction: ISO C++20, no -ffast-math).
//
// No tsp::Error here (fmt does not compile under nvcc): launchers return cudaGetLastError().
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "backend/cuda/kernels.h"
#include "backend/cuda/launch.cuh"

namespace tsp::cuda::kernels {
namespace {

using bf16_t = uint16_t;  // bf16 storage: the upper 16 bits of an IEEE float (tsp::bf16)

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 8192;  // grid-stride loops cover the rest

int grid_for(int64_t n, int threads = kThreads) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks)));
}

// ---- bf16 bits, as the host's tsp::bf16 (include/tsp/core/bf16.h) ----------------------------
__device__ __forceinline__ bf16_t to_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<bf16_t>(u >> 16);
}
__device__ __forceinline__ float from_bf16(bf16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

__device__ __forceinline__ float ld(const float* p, int64_t i) {
  return p[i];
}
__device__ __forceinline__ float ld(const bf16_t* p, int64_t i) {
  return from_bf16(p[i]);
}
__device__ __forceinline__ void st(float* p, int64_t i, float v) {
  p[i] = v;
}
__device__ __forceinline__ void st(bf16_t* p, int64_t i, float v) {
  p[i] = to_bf16(v);
}

// Calls f(T{}) with T = float or bf16_t per the flag: one template instance per dtype. Launchers
// call cudaGetLastError() once, after every launch (nested dispatch must not consume an error).
template <class F>
void with_type(bool bf16, F&& f) {
  if (bf16)
    f(bf16_t{});
  else
    f(float{});
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// ---- block reductions ----------------------------------------------------------------------------
struct Sum {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <class T, class Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The reduction of v over the block, returned to every thread. Safe to call repeatedly in one
// kernel (the first barrier waits for the previous call's readers). blockDim.x: multiple of 32.
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T partial[32];
  __shared__ T result;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T x = lane < static_cast<int>(blockDim.x >> 5) ? partial[lane] : identity;
    x = warp_reduce(x, op);
    if (lane == 0) result = x;
  }
  __syncthreads();
  return result;
}
__device__ float block_sum(float v) {
  return block_reduce(v, Sum{}, 0.f);
}
__device__ float block_max(float v) {
  return block_reduce(v, Max{}, -INFINITY);
}
__device__ double block_sum(double v) {
  return block_reduce(v, Sum{}, 0.0);
}

// out[0] += Σ parts[i], by one block in a fixed order (deterministic for a given n).
__global__ void sum_into_k(const double* __restrict__ parts, int64_t n, double* out) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += parts[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[0] += acc;
}
void sum_into(const double* parts, int64_t n, double* out, cudaStream_t s) {
  TSP_LAUNCH(1, 1024, 0, s, sum_into_k)(parts, n, out);
}

// Threads of a row kernel: enough to cover short rows with few idle threads, 512 for long ones.
int row_threads(int64_t cols) {
  if (cols <= 128) return 64;
  if (cols <= 1024) return 128;
  if (cols <= 4096) return 256;
  return 512;
}

// ---- memory ----------------------------------------------------------------------------------------
template <class T>
__global__ void fill_k(T* __restrict__ p, int64_t n, float value) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) st(p, i, value);
}

template <class S, class D>
__global__ void cast_k(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) st(dst, i, ld(src, i));
}

// dst [B, A, W words] from src [A, B, W words]; i runs over dst.
template <class Word>
__global__ void swap_leading_k(const Word* __restrict__ src, Word* __restrict__ dst, int64_t A,
                               int64_t B, int64_t W) {
  const int64_t total = A * B * W;
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t k = i % W, row = i / W;  // dst row = b·A + a
    const int64_t a = row % A, b = row / A;
    dst[i] = src[(a * B + b) * W + k];
  }
}

// ---- element-wise and reductions -------------------------------------------------------------------
template <class TY, class TX>
__global__ void add_k(TY* __restrict__ y, const TX* __restrict__ x, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) st(y, i, ld(y, i) + ld(x, i));
}

template <class T>
__global__ void scale_k(T* __restrict__ y, float factor, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) st(y, i, ld(y, i) * factor);
}

__global__ void sum_squares_k(const float* __restrict__ x, int64_t n,
                              double* __restrict__ partials) {
  double acc = 0;
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const double v = x[i];
    acc += v * v;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// Bits: exponent all ones is Inf or NaN; sign set and not -0 is negative (as the CPU backend).
__device__ __forceinline__ bool bad_value(float v, bool also_negative) {
  const uint32_t u = __float_as_uint(v);
  return (u & 0x7f800000u) == 0x7f800000u || (also_negative && u > 0x80000000u);
}
__device__ __forceinline__ bool bad_value(bf16_t u, bool also_negative) {
  return (u & 0x7f80u) == 0x7f80u || (also_negative && u > 0x8000u);
}
template <class T>
__global__ void count_non_finite_k(const T* __restrict__ x, int64_t n, bool also_negative,
                                   unsigned long long* out) {
  double count = 0;  // exact up to 2^53 per block; block_sum has a double instance
  for (int64_t i = global_thread(); i < n; i += grid_threads())
    count += bad_value(x[i], also_negative);
  count = block_sum(count);
  if (threadIdx.x == 0 && count > 0) atomicAdd(out, static_cast<unsigned long long>(count));
}

// ---- RMSNorm ----------------------------------------------------------------------------------------
template <class TX, class TW, class TY>
__global__ void rmsnorm_forward_k(const TX* __restrict__ x, const TW* __restrict__ w,
                                  TY* __restrict__ y, float* __restrict__ rstd, int64_t h,
                                  float eps) {
  const int64_t row = blockIdx.x;
  const TX* xr = x + row * h;
  TY* yr = y + row * h;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    const float v = ld(xr, i);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float r = 1.f / sqrtf(ss / static_cast<float>(h) + eps);
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x)
    st(yr, i, __fmul_rn(__fmul_rn(ld(xr, i), r), ld(w, i)));
  if (threadIdx.x == 0) rstd[row] = r;
}

template <class TX, class TW, class TY>
__global__ void rmsnorm_apply_k(const TX* __restrict__ x, const TW* __restrict__ w,
                                const float* __restrict__ rstd, TY* __restrict__ y, int64_t h) {
  const int64_t row = blockIdx.x;
  const float r = rstd[row];
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x)
    st(y + row * h, i, __fmul_rn(__fmul_rn(ld(x + row * h, i), r), ld(w, i)));
}

// dx = r w dy - c x with c = (Σ dy w x) r³ / h, one block per row.
template <class TX, class TW>
__global__ void rmsnorm_dx_k(const float* __restrict__ dy, const TX* __restrict__ x,
                             const TW* __restrict__ w, const float* __restrict__ rstd,
                             float* __restrict__ dx, int64_t h) {
  const int64_t row = blockIdx.x;
  const float* dyr = dy + row * h;
  const TX* xr = x + row * h;
  float dot = 0.f;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) dot += dyr[i] * ld(w, i) * ld(xr, i);
  dot = block_sum(dot);
  const float r = rstd[row];
  const float c = dot * r * r * r / static_cast<float>(h);
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x)
    dx[row * h + i] = __fsub_rn(__fmul_rn(__fmul_rn(r, ld(w, i)), dyr[i]), __fmul_rn(c, ld(xr, i)));
}

// dw[col] += Σ_n dy[n, col] · x[n, col] · r[n]: a block owns 32 columns and splits the rows over
// its 16 thread rows, then sums the 16 partials in a fixed order (deterministic, no atomics).
// There are only h/32 blocks (128 at h = 4096), so each warp must keep several rows' loads in
// flight: the row loop is unrolled, which issues the loads of 8 rows ahead of their adds and keeps
// each thread's sum in the same sequential order (results unchanged).
constexpr int kDwCols = 32, kDwRows = 16;
template <class TX>
__global__ void rmsnorm_dw_k(const float* __restrict__ dy, const TX* __restrict__ x,
                             const float* __restrict__ rstd, float* __restrict__ dw, int64_t N,
                             int64_t h) {
  __shared__ float partial[kDwRows][kDwCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kDwCols + threadIdx.x;
  float acc = 0.f;
  if (col < h) {
#pragma unroll 8
    for (int64_t n = threadIdx.y; n < N; n += kDwRows)
      acc += __fmul_rn(__fmul_rn(dy[n * h + col], ld(x + n * h, col)), rstd[n]);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < h) {
    float total = 0.f;
    for (int r = 0; r < kDwRows; ++r) total += partial[r][threadIdx.x];
    dw[col] += total;
  }
}

// ---- RoPE ------------------------------------------------------------------------------------------
// One block per token: cos and sign·sin of its half angles into shared memory, then every head.
template <class T>
__global__ void rope_k(T* __restrict__ x, const int64_t* __restrict__ pos, int64_t heads, int64_t d,
                       RopeFreqs freqs, float sign) {
  TSP_DYNAMIC_SHARED(smem);
  float* table = reinterpret_cast<float*>(smem);  // cos [half], sin [half]
  const int64_t n = blockIdx.x, half = d / 2;
  float* cos_t = table;
  float* sin_t = table + half;
  const float p = static_cast<float>(pos[n]);
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = p * freqs.inv[i];
    cos_t[i] = cosf(angle);
    sin_t[i] = sign * sinf(angle);
  }
  __syncthreads();
  T* xn = x + n * heads * d;
  // 32-bit indices within the token (heads·d is far below 2^31; the launcher checks it): a 64-bit
  // division per element is tens of instructions.
  const int pairs = static_cast<int>(heads * half), ihalf = static_cast<int>(half);
  for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
    const int hd = j / ihalf, i = j % ihalf;
    T* lo = xn + hd * d;
    T* hi = lo + half;
    const float a = ld(lo, i), b = ld(hi, i), c = cos_t[i], s = sin_t[i];
    st(lo, i, __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
    st(hi, i, __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
  }
}

// ---- SwiGLU ----------------------------------------------------------------------------------------
__device__ __forceinline__ float sigmoid(float x) {
  return 1.f / (1.f + expf(-x));
}

template <class T>
__global__ void swiglu_forward_k(const float* __restrict__ g, const float* __restrict__ u,
                                 T* __restrict__ a, int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads())
    st(a, i, __fmul_rn(__fmul_rn(g[i], sigmoid(g[i])), u[i]));
}

// dg may alias da: each element is read before it is written, by the same thread.
__global__ void swiglu_backward_k(const float* da, const float* __restrict__ g,
                                  const float* __restrict__ u, float* dg, float* __restrict__ du,
                                  int64_t n) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const float s = sigmoid(g[i]), gi = g[i], dai = da[i];
    const float dsilu = __fadd_rn(1.f, __fmul_rn(gi, __fsub_rn(1.f, s)));
    dg[i] = __fmul_rn(__fmul_rn(__fmul_rn(dai, u[i]), s), dsilu);
    du[i] = __fmul_rn(__fmul_rn(dai, gi), s);
  }
}

// ---- embedding -------------------------------------------------------------------------------------
template <class TT, class TO>
__global__ void embedding_forward_k(const int32_t* __restrict__ ids, const TT* __restrict__ table,
                                    TO* __restrict__ out, int64_t h, int64_t v0, int64_t V_shard) {
  const int64_t n = blockIdx.x, row = static_cast<int64_t>(ids[n]) - v0;
  if (row < 0 || row >= V_shard) return;  // another shard's row: untouched
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) st(out + n * h, i, ld(table + row * h, i));
}

__global__ void embedding_backward_k(const int32_t* __restrict__ ids,
                                     const float* __restrict__ dout, float* dtable, int64_t h,
                                     int64_t v0, int64_t V_shard) {
  const int64_t n = blockIdx.x, row = static_cast<int64_t>(ids[n]) - v0;
  if (row < 0 || row >= V_shard) return;
  // Repeated ids add into one row from several blocks: fp32 atomics, so the summation order (and
  // the last bits of dtable) varies from run to run. A sort-by-id pass would make it
  // deterministic; not needed yet.
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x)
    atomicAdd(dtable + row * h + i, dout[n * h + i]);
}

// ---- cross-entropy ---------------------------------------------------------------------------------
// One block per row. dl may alias l: pass 2 reads l[j] and writes dl[j] in the same thread, and the
// label's logit is read by every thread before the first barrier.
__global__ void cross_entropy_k(const float* l_all, const int32_t* __restrict__ labels,
                                float* dl_all, double* __restrict__ row_loss, int64_t V,
                                float grad_scale, int32_t ignore_index) {
  const int64_t row = blockIdx.x;
  const float* l = l_all + row * V;
  float* dl = dl_all ? dl_all + row * V : nullptr;
  const int32_t label = labels[row];
  if (label == ignore_index) {
    if (dl)
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) dl[j] = 0.f;
    if (threadIdx.x == 0) row_loss[row] = 0.0;
    return;
  }
  const bool bad = label < 0 || label >= V;
  const float target = bad ? NAN : l[label];
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, l[j]);
  m = block_max(m);
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float e = expf(l[j] - m);
    if (dl) dl[j] = e;
    s += e;
  }
  s = block_sum(s);
  if (threadIdx.x == 0)
    row_loss[row] =
        bad ? NAN
            : static_cast<double>(m) + log(static_cast<double>(s)) - static_cast<double>(target);
  if (!dl) return;
  const float k = grad_scale / s;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float v = __fmul_rn(dl[j], k);
    dl[j] = bad ? NAN : (j == label ? __fsub_rn(v, grad_scale) : v);
  }
}

__global__ void online_softmax_update_k(const float* __restrict__ logits,
                                        const int32_t* __restrict__ labels, float* row_max,
                                        float* row_sum, float* __restrict__ target, int64_t V_shard,
                                        int64_t v0) {
  const int64_t row = blockIdx.x;
  const float* l = logits + row * V_shard;
  const int64_t local = static_cast<int64_t>(labels[row]) - v0;
  if (threadIdx.x == 0 && local >= 0 && local < V_shard) target[row] = l[local];
  const float m_old = row_max[row];  // read by every thread before the barriers below
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V_shard; j += blockDim.x) m = fmaxf(m, l[j]);
  const float m_new = fmaxf(m_old, block_max(m));
  if (m_new == -INFINITY) return;  // nothing finite seen yet: the sum stays 0 (uniform branch)
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < V_shard; j += blockDim.x) s += expf(l[j] - m_new);
  s = block_sum(s);
  if (threadIdx.x == 0) {
    // expf(-inf - m_new) = 0 covers the first shard (running max -inf).
    row_sum[row] = __fadd_rn(__fmul_rn(row_sum[row], expf(m_old - m_new)), s);
    row_max[row] = m_new;
  }
}

__global__ void online_softmax_merge_k(float* max_a, float* sum_a, const float* __restrict__ max_b,
                                       const float* __restrict__ sum_b, int64_t N) {
  for (int64_t n = global_thread(); n < N; n += grid_threads()) {
    const float ma = max_a[n], mb = max_b[n];
    const float m = ma < mb ? mb : ma;  // std::max(ma, mb)
    if (m == -INFINITY) continue;       // both empty
    sum_a[n] = __fadd_rn(__fmul_rn(sum_a[n], expf(ma - m)), __fmul_rn(sum_b[n], expf(mb - m)));
    max_a[n] = m;
  }
}

__global__ void online_softmax_backward_k(const float* __restrict__ logits,
                                          const int32_t* __restrict__ labels,
                                          const float* __restrict__ row_max,
                                          const float* __restrict__ row_sum, float* dlogits,
                                          int64_t V_shard, int64_t v0, float grad_scale,
                                          int32_t ignore_index) {
  const int64_t row = blockIdx.x;
  const float* l = logits + row * V_shard;
  float* dl = dlogits + row * V_shard;
  if (labels[row] == ignore_index) {
    for (int64_t j = threadIdx.x; j < V_shard; j += blockDim.x) dl[j] = 0.f;
    return;
  }
  const float m = row_max[row], k = grad_scale / row_sum[row];
  const int64_t local = static_cast<int64_t>(labels[row]) - v0;
  for (int64_t j = threadIdx.x; j < V_shard; j += blockDim.x) {
    const float v = __fmul_rn(expf(l[j] - m), k);
    dl[j] = j == local ? __fsub_rn(v, grad_scale) : v;
  }
}

__global__ void online_softmax_loss_k(const float* __restrict__ row_max,
                                      const float* __restrict__ row_sum,
                                      const float* __restrict__ target,
                                      const int32_t* __restrict__ labels,
                                      double* __restrict__ row_loss, int64_t N,
                                      int32_t ignore_index) {
  for (int64_t n = global_thread(); n < N; n += grid_threads())
    row_loss[n] = labels[n] == ignore_index
                      ? 0.0
                      : static_cast<double>(row_max[n]) + log(static_cast<double>(row_sum[n])) -
                            static_cast<double>(target[n]);
}

// ---- AdamW -----------------------------------------------------------------------------------------
// The CPU backend's expression, operation by operation (rounded intrinsics: no FMA contraction).
__global__ void adamw_k(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                        float* __restrict__ v, int64_t n, AdamWConstants c) {
  for (int64_t j = global_thread(); j < n; j += grid_threads()) {
    const float gj = __fmul_rn(g[j], c.grad_scale);
    const float mj = __fadd_rn(__fmul_rn(c.beta1, m[j]), __fmul_rn(c.one_minus_beta1, gj));
    const float vj =
        __fadd_rn(__fmul_rn(c.beta2, v[j]), __fmul_rn(__fmul_rn(c.one_minus_beta2, gj), gj));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vj), c.inv_sqrt_bias2), c.eps);
    m[j] = mj;
    v[j] = vj;
    w[j] = __fsub_rn(__fmul_rn(w[j], c.decay), __fmul_rn(c.step_size, __fdiv_rn(mj, denom)));
  }
}

}  // namespace

// ---- launchers -------------------------------------------------------------------------------------

cudaError_t fill(void* p, bool bf16, int64_t n, float value, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  with_type(bf16, [&](auto t) {
    using T = decltype(t);
    TSP_LAUNCH(grid_for(n), kThreads, 0, s, fill_k<T>)(static_cast<T*>(p), n, value);
  });
  return cudaGetLastError();
}

cudaError_t cast(const void* src, bool src_bf16, void* dst, bool dst_bf16, int64_t n,
                 cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  with_type(src_bf16, [&](auto ts) {
    using S = decltype(ts);
    with_type(dst_bf16, [&](auto td) {
      using D = decltype(td);
      TSP_LAUNCH(grid_for(n), kThreads, 0, s, cast_k<S, D>)
      (static_cast<const S*>(src), static_cast<D*>(dst), n);
    });
  });
  return cudaGetLastError();
}

cudaError_t swap_leading_dims(const void* src, void* dst, int64_t A, int64_t B, int64_t inner_bytes,
                              cudaStream_t s) {
  if (A * B * inner_bytes <= 0) return cudaSuccess;
  // The widest word that divides the row and both addresses.
  const uintptr_t align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                          static_cast<uintptr_t>(inner_bytes);
  const int64_t total = A * B * inner_bytes;
  if (align % 16 == 0) {
    TSP_LAUNCH(grid_for(total / 16), kThreads, 0, s, swap_leading_k<uint4>)
    (static_cast<const uint4*>(src), static_cast<uint4*>(dst), A, B, inner_bytes / 16);
  } else if (align % 8 == 0) {
    TSP_LAUNCH(grid_for(total / 8), kThreads, 0, s, swap_leading_k<uint2>)
    (static_cast<const uint2*>(src), static_cast<uint2*>(dst), A, B, inner_bytes / 8);
  } else if (align % 4 == 0) {
    TSP_LAUNCH(grid_for(total / 4), kThreads, 0, s, swap_leading_k<uint32_t>)
    (static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), A, B, inner_bytes / 4);
  } else if (align % 2 == 0) {
    TSP_LAUNCH(grid_for(total / 2), kThreads, 0, s, swap_leading_k<uint16_t>)
    (static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), A, B, inner_bytes / 2);
  } else {
    TSP_LAUNCH(grid_for(total), kThreads, 0, s, swap_leading_k<uint8_t>)
    (static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), A, B, inner_bytes);
  }
  return cudaGetLastError();
}

cudaError_t add(void* y, bool y_bf16, const void* x, bool x_bf16, int64_t n, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  with_type(y_bf16, [&](auto ty) {
    using TY = decltype(ty);
    with_type(x_bf16, [&](auto tx) {
      using TX = decltype(tx);
      TSP_LAUNCH(grid_for(n), kThreads, 0, s, add_k<TY, TX>)
      (static_cast<TY*>(y), static_cast<const TX*>(x), n);
    });
  });
  return cudaGetLastError();
}

cudaError_t scale(void* y, bool y_bf16, float factor, int64_t n, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  with_type(y_bf16, [&](auto t) {
    using T = decltype(t);
    TSP_LAUNCH(grid_for(n), kThreads, 0, s, scale_k<T>)(static_cast<T*>(y), factor, n);
  });
  return cudaGetLastError();
}

int64_t sum_squares_partials(int64_t n) {
  return grid_for(n);
}

cudaError_t sum_squares(const float* x, int64_t n, double* partials, double* out, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  const int blocks = grid_for(n);
  TSP_LAUNCH(blocks, kThreads, 0, s, sum_squares_k)(x, n, partials);
  sum_into(partials, blocks, out, s);
  return cudaGetLastError();
}

cudaError_t count_non_finite(const void* x, bool bf16, int64_t n, bool also_negative, int64_t* out,
                             cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  auto* o = reinterpret_cast<unsigned long long*>(out);  // counts are positive: same bits
  with_type(bf16, [&](auto t) {
    using T = decltype(t);
    TSP_LAUNCH(grid_for(n), kThreads, 0, s, count_non_finite_k<T>)
    (static_cast<const T*>(x), n, also_negative, o);
  });
  return cudaGetLastError();
}

cudaError_t rmsnorm_forward(const void* x, bool x_bf16, const void* w, bool w_bf16, void* y,
                            bool y_bf16, float* rstd, int64_t N, int64_t h, float eps,
                            cudaStream_t s) {
  if (N <= 0 || h <= 0) return cudaSuccess;
  with_type(x_bf16, [&](auto tx) {
    with_type(w_bf16, [&](auto tw) {
      with_type(y_bf16, [&](auto ty) {
        using TX = decltype(tx);
        using TW = decltype(tw);
        using TY = decltype(ty);
        TSP_LAUNCH(static_cast<unsigned>(N), row_threads(h), 0, s, rmsnorm_forward_k<TX, TW, TY>)
        (static_cast<const TX*>(x), static_cast<const TW*>(w), static_cast<TY*>(y), rstd, h, eps);
      });
    });
  });
  return cudaGetLastError();
}

cudaError_t rmsnorm_apply(const void* x, bool x_bf16, const void* w, bool w_bf16, const float* rstd,
                          void* y, bool y_bf16, int64_t N, int64_t h, cudaStream_t s) {
  if (N <= 0 || h <= 0) return cudaSuccess;
  with_type(x_bf16, [&](auto tx) {
    with_type(w_bf16, [&](auto tw) {
      with_type(y_bf16, [&](auto ty) {
        using TX = decltype(tx);
        using TW = decltype(tw);
        using TY = decltype(ty);
        TSP_LAUNCH(static_cast<unsigned>(N), row_threads(h), 0, s, rmsnorm_apply_k<TX, TW, TY>)
        (static_cast<const TX*>(x), static_cast<const TW*>(w), rstd, static_cast<TY*>(y), h);
      });
    });
  });
  return cudaGetLastError();
}

cudaError_t rmsnorm_backward(const float* dy, const void* x, bool x_bf16, const void* w,
                             bool w_bf16, const float* rstd, float* dx, float* dw, int64_t N,
                             int64_t h, cudaStream_t s) {
  if (N <= 0 || h <= 0) return cudaSuccess;
  with_type(x_bf16, [&](auto tx) {
    using TX = decltype(tx);
    if (dx)
      with_type(w_bf16, [&](auto tw) {
        using TW = decltype(tw);
        TSP_LAUNCH(static_cast<unsigned>(N), row_threads(h), 0, s, rmsnorm_dx_k<TX, TW>)
        (dy, static_cast<const TX*>(x), static_cast<const TW*>(w), rstd, dx, h);
      });
    if (dw) {
      const dim3 block(kDwCols, kDwRows);
      const int64_t blocks = (h + kDwCols - 1) / kDwCols;
      TSP_LAUNCH(static_cast<unsigned>(blocks), block, 0, s, rmsnorm_dw_k<TX>)
      (dy, static_cast<const TX*>(x), rstd, dw, N, h);
    }
  });
  return cudaGetLastError();
}

cudaError_t rope(void* x, bool bf16, const int64_t* pos, int64_t N, int64_t heads, int64_t d,
                 const RopeFreqs& freqs, float sign, cudaStream_t s) {
  if (N <= 0 || heads <= 0 || d <= 0) return cudaSuccess;
  if (heads * d > int64_t{0x7fffffff}) return cudaErrorInvalidValue;  // rope_k's 32-bit indices
  const size_t smem = sizeof(float) * static_cast<size_t>(d);         // cos and sin, d/2 each
  with_type(bf16, [&](auto t) {
    using T = decltype(t);
    TSP_LAUNCH(static_cast<unsigned>(N), 128, smem, s, rope_k<T>)
    (static_cast<T*>(x), pos, heads, d, freqs, sign);
  });
  return cudaGetLastError();
}

cudaError_t swiglu_forward(const float* g, const float* u, void* a, bool a_bf16, int64_t n,
                           cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  with_type(a_bf16, [&](auto t) {
    using T = decltype(t);
    TSP_LAUNCH(grid_for(n), kThreads, 0, s, swiglu_forward_k<T>)(g, u, static_cast<T*>(a), n);
  });
  return cudaGetLastError();
}

cudaError_t swiglu_backward(const float* da, const float* g, const float* u, float* dg, float* du,
                            int64_t n, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  TSP_LAUNCH(grid_for(n), kThreads, 0, s, swiglu_backward_k)(da, g, u, dg, du, n);
  return cudaGetLastError();
}

cudaError_t embedding_forward(const int32_t* ids, const void* table, bool table_bf16, void* out,
                              bool out_bf16, int64_t N, int64_t h, int64_t v0, int64_t V_shard,
                              cudaStream_t s) {
  if (N <= 0 || h <= 0) return cudaSuccess;
  with_type(table_bf16, [&](auto tt) {
    with_type(out_bf16, [&](auto to) {
      using TT = decltype(tt);
      using TO = decltype(to);
      TSP_LAUNCH(static_cast<unsigned>(N), row_threads(h), 0, s, embedding_forward_k<TT, TO>)
      (ids, static_cast<const TT*>(table), static_cast<TO*>(out), h, v0, V_shard);
    });
  });
  return cudaGetLastError();
}

cudaError_t embedding_backward(const int32_t* ids, const float* dout, float* dtable, int64_t N,
                               int64_t h, int64_t v0, int64_t V_shard, cudaStream_t s) {
  if (N <= 0 || h <= 0) return cudaSuccess;
  TSP_LAUNCH(static_cast<unsigned>(N), row_threads(h), 0, s, embedding_backward_k)
  (ids, dout, dtable, h, v0, V_shard);
  return cudaGetLastError();
}

cudaError_t cross_entropy(const float* logits, const int32_t* labels, float* dlogits,
                          double* row_loss, int64_t N, int64_t V, float grad_scale,
                          int32_t ignore_index, double* loss, cudaStream_t s) {
  if (N <= 0) return cudaSuccess;
  TSP_LAUNCH(static_cast<unsigned>(N), row_threads(V), 0, s, cross_entropy_k)
  (logits, labels, dlogits, row_loss, V, grad_scale, ignore_index);
  sum_into(row_loss, N, loss, s);
  return cudaGetLastError();
}

cudaError_t online_softmax_update(const float* logits, const int32_t* labels, float* row_max,
                                  float* row_sum, float* target, int64_t N, int64_t V_shard,
                                  int64_t v0, cudaStream_t s) {
  if (N <= 0) return cudaSuccess;
  TSP_LAUNCH(static_cast<unsigned>(N), row_threads(V_shard), 0, s, online_softmax_update_k)
  (logits, labels, row_max, row_sum, target, V_shard, v0);
  return cudaGetLastError();
}

cudaError_t online_softmax_merge(float* max_a, float* sum_a, const float* max_b, const float* sum_b,
                                 int64_t N, cudaStream_t s) {
  if (N <= 0) return cudaSuccess;
  TSP_LAUNCH(grid_for(N), kThreads, 0, s, online_softmax_merge_k)(max_a, sum_a, max_b, sum_b, N);
  return cudaGetLastError();
}

cudaError_t online_softmax_backward(const float* logits, const int32_t* labels,
                                    const float* row_max, const float* row_sum, float* dlogits,
                                    int64_t N, int64_t V_shard, int64_t v0, float grad_scale,
                                    int32_t ignore_index, cudaStream_t s) {
  if (N <= 0) return cudaSuccess;
  TSP_LAUNCH(static_cast<unsigned>(N), row_threads(V_shard), 0, s, online_softmax_backward_k)
  (logits, labels, row_max, row_sum, dlogits, V_shard, v0, grad_scale, ignore_index);
  return cudaGetLastError();
}

cudaError_t online_softmax_loss(const float* row_max, const float* row_sum, const float* target,
                                const int32_t* labels, double* row_loss, int64_t N,
                                int32_t ignore_index, double* loss, cudaStream_t s) {
  if (N <= 0) return cudaSuccess;
  TSP_LAUNCH(grid_for(N), kThreads, 0, s, online_softmax_loss_k)
  (row_max, row_sum, target, labels, row_loss, N, ignore_index);
  sum_into(row_loss, N, loss, s);
  return cudaGetLastError();
}

cudaError_t adamw(float* w, const float* g, float* m, float* v, int64_t n, const AdamWConstants& c,
                  cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  TSP_LAUNCH(grid_for(n), kThreads, 0, s, adamw_k)(w, g, m, v, n, c);
  return cudaGetLastError();
}

}  // namespace tsp::cuda::kernels
