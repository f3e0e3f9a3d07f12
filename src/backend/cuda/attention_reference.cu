// Reference CUDA attention: simple, readable kernels for any head dim up to 256, F32 or BF16 —
// the correctness baseline of the flash kernels (attention_flash.cu) and the path for shapes the
// flash kernels do not cover. The maths is the CPU reference's (src/ops/cpu/attention_reference.cpp):
//
//   s_j  = scale · q_i·k_j            for keys with k_pos[j] <= q_pos[i] and, with documents,
//                                     k_pos[j] >= q_pos[i] - q_doc_pos[i] (the others are absent)
//   lse  = log Σ_j e^{s_j}             (-inf, and o = 0, when no key is visible)
//   o_i  = Σ_j e^{s_j - lse} v_j
//   backward: P_j = e^{s_j - lse}, D_i = dout_i·o_i, dS_j = P_j (dout_i·v_j - D_i),
//             dv_j += P_j dout_i, dq_i += scale Σ_j dS_j k_j, dk_j += scale Σ_i dS_j q_i
//
// Every (query, head) is one warp: lane l holds elements c = l + 32·u (u < 8) of its rows, dot
// products are warp reductions, statistics are fp32 (the CPU reference uses double: the results
// agree to fp32 rounding of a K-term softmax). No atomics: the backward is deterministic.
// No tsp::Error here (fmt does not compile under nvcc): launchers return the launch status.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "backend/cuda/attention_kernels.h"
#include "backend/cuda/launch.cuh"

namespace tsp::cuda::attn {
namespace {

constexpr int kPerLane = kReferenceMaxHeadDim / 32;  // 8 elements of a row per lane
constexpr int kWarps = 4;                            // warps per block

__device__ __forceinline__ float load(const float* p, int64_t i) {
  return p[i];
}
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float* p, int64_t i, float x) {
  p[i] = x;
}
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float x) {
  p[i] = __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Two warp sums at once, each added in warp_sum's order (so bit for bit warp_sum's results): the
// pair travels as one 64-bit shuffle per step. On a GPU that is two SHFL, as two warp_sums are;
// under the CUDA emulation (tests/cuda_emulation) it is one warp-wide operation instead of two,
// and those operations are what the reference kernels spend their time on there.
__device__ __forceinline__ void warp_sum2(float& a, float& b) {
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long pair =
        static_cast<unsigned long long>(__float_as_uint(b)) << 32 | __float_as_uint(a);
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, pair, o);
    a += __uint_as_float(static_cast<unsigned>(other));
    b += __uint_as_float(static_cast<unsigned>(other >> 32));
  }
}

// Lane's share of a row of d elements, widened to fp32 (zeros beyond d).
template <class T>
__device__ __forceinline__ void load_row(const T* row, int d, int lane, float (&x)[kPerLane]) {
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int c = lane + 32 * u;
    x[u] = c < d ? load(row, c) : 0.f;
  }
}

// The lane's share of x·row (its elements c = lane + 32·u); dot_row sums the shares.
template <class T>
__device__ __forceinline__ float partial_dot(const float (&x)[kPerLane], const T* row, int d,
                                             int lane) {
  float s = 0.f;
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int c = lane + 32 * u;
    if (c < d) s += x[u] * load(row, c);
  }
  return s;
}

template <class T>
__device__ __forceinline__ float dot_row(const float (&x)[kPerLane], const T* row, int d,
                                         int lane) {
  return warp_sum(partial_dot(x, row, d, lane));
}

// Where query i's document starts: q_pos - q_doc_pos, or no lower bound without documents
// (q_doc_pos null). Query i sees key j iff doc_start <= k_pos[j] <= q_pos[i].
__device__ __forceinline__ int64_t doc_start(const int64_t* q_pos, const int64_t* q_doc_pos,
                                             int64_t i) {
  return q_doc_pos ? q_pos[i] - q_doc_pos[i] : INT64_MIN;
}

// One warp per (query i, head h); grid covers nq·hq warps.
template <class T>
__global__ void __launch_bounds__(32 * kWarps)
    forward_kernel(Shape sh, const T* __restrict__ q, const T* __restrict__ k,
                   const T* __restrict__ v, const int64_t* __restrict__ q_pos,
                   const int64_t* __restrict__ k_pos, const int64_t* __restrict__ q_doc_pos,
                   T* __restrict__ o, float* __restrict__ lse, float scale) {
  const int lane = threadIdx.x % 32;
  const int64_t w = blockIdx.x * int64_t{kWarps} + threadIdx.x / 32;
  if (w >= sh.nq * sh.hq) return;
  const int64_t i = w / sh.hq;
  const int h = static_cast<int>(w % sh.hq), hk = h / (sh.hq / sh.hkv), d = sh.d;
  float qi[kPerLane], acc[kPerLane] = {};
  load_row(q + w * d, d, lane, qi);
  const int64_t qp = q_pos[i], lo = doc_start(q_pos, q_doc_pos, i);
  float m = -INFINITY, l = 0.f;  // running max and sum of e^{s - m}
  for (int64_t j = 0; j < sh.nk; ++j) {
    if (k_pos[j] > qp || k_pos[j] < lo) continue;  // warp-uniform
    const int64_t kv = (j * sh.hkv + hk) * d;
    const float s = scale * dot_row(qi, k + kv, d, lane);
    const float m_new = fmaxf(m, s);
    const float alpha = expf(m - m_new);  // 0 on the first visible key (m = -inf)
    const float pj = expf(s - m_new);
    l = l * alpha + pj;
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const int c = lane + 32 * u;
      acc[u] = acc[u] * alpha + (c < d ? pj * load(v + kv, c) : 0.f);
    }
    m = m_new;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: o = 0
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int c = lane + 32 * u;
    if (c < d) store(o + w * d, c, acc[u] * inv);
  }
  if (lane == 0) lse[w] = l > 0.f ? m + logf(l) : -INFINITY;
}

// dq pass: one warp per (query i, head h): dq_i += scale Σ_j dS_ij k_j.
template <class T>
__global__ void __launch_bounds__(32 * kWarps)
    backward_dq_kernel(Shape sh, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const T* __restrict__ o,
                       const int64_t* __restrict__ q_pos, const int64_t* __restrict__ k_pos,
                       const int64_t* __restrict__ q_doc_pos, const float* __restrict__ lse,
                       const float* __restrict__ dout, float* __restrict__ dq, float scale) {
  const int lane = threadIdx.x % 32;
  const int64_t w = blockIdx.x * int64_t{kWarps} + threadIdx.x / 32;
  if (w >= sh.nq * sh.hq) return;
  const float L = lse[w];
  if (L == -INFINITY) return;  // saw no key: no gradient
  const int64_t i = w / sh.hq;
  const int h = static_cast<int>(w % sh.hq), hk = h / (sh.hq / sh.hkv), d = sh.d;
  float qi[kPerLane], doi[kPerLane], acc[kPerLane] = {};
  load_row(q + w * d, d, lane, qi);
  load_row(dout + w * d, d, lane, doi);
  const float Di = dot_row(doi, o + w * d, d, lane);
  const int64_t qp = q_pos[i], lo = doc_start(q_pos, q_doc_pos, i);
  for (int64_t j = 0; j < sh.nk; ++j) {
    if (k_pos[j] > qp || k_pos[j] < lo) continue;
    const int64_t kv = (j * sh.hkv + hk) * d;
    float qk = partial_dot(qi, k + kv, d, lane), dP = partial_dot(doi, v + kv, d, lane);
    warp_sum2(qk, dP);  // q_i·k_j and dout_i·v_j
    const float P = expf(scale * qk - L);
    const float dS = P * (dP - Di);
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) {
      const int c = lane + 32 * u;
      if (c < d) acc[u] += dS * load(k + kv, c);
    }
  }
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int c = lane + 32 * u;
    if (c < d) dq[w * d + c] += scale * acc[u];
  }
}

// dk/dv pass: one warp per (key j, kv head hk), over the query heads sharing hk and every query
// that sees key j: dv_j += P dout_i, dk_j += scale dS q_i. D_i is recomputed per pair (O(d)).
template <class T>
__global__ void __launch_bounds__(32 * kWarps)
    backward_dkdv_kernel(Shape sh, const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const T* __restrict__ o,
                         const int64_t* __restrict__ q_pos, const int64_t* __restrict__ k_pos,
                         const int64_t* __restrict__ q_doc_pos, const float* __restrict__ lse,
                         const float* __restrict__ dout, float* __restrict__ dk,
                         float* __restrict__ dv, float scale) {
  const int lane = threadIdx.x % 32;
  const int64_t w = blockIdx.x * int64_t{kWarps} + threadIdx.x / 32;
  if (w >= sh.nk * sh.hkv) return;
  const int64_t j = w / sh.hkv;
  const int hk = static_cast<int>(w % sh.hkv), g = sh.hq / sh.hkv, d = sh.d;
  float kj[kPerLane], vj[kPerLane], adk[kPerLane] = {}, adv[kPerLane] = {};
  load_row(k + w * d, d, lane, kj);
  load_row(v + w * d, d, lane, vj);
  const int64_t kp = k_pos[j];
  for (int64_t i = 0; i < sh.nq; ++i) {
    if (kp > q_pos[i] || kp < doc_start(q_pos, q_doc_pos, i)) continue;
    for (int h = hk * g; h < (hk + 1) * g; ++h) {
      const int64_t r = i * sh.hq + h;
      const float L = lse[r];
      if (L == -INFINITY) continue;
      float doi[kPerLane];
      load_row(dout + r * d, d, lane, doi);
      float Di = partial_dot(doi, o + r * d, d, lane), qk = partial_dot(kj, q + r * d, d, lane);
      warp_sum2(Di, qk);  // dout_i·o_i and k_j·q_i
      float dP = 0.f;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) dP += doi[u] * vj[u];
      const float P = expf(scale * qk - L);
      const float dS = P * (warp_sum(dP) - Di);
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int c = lane + 32 * u;
        if (c < d) {
          adv[u] += P * doi[u];
          adk[u] += dS * load(q + r * d, c);
        }
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int c = lane + 32 * u;
    if (c < d) {
      dk[w * d + c] += scale * adk[u];
      dv[w * d + c] += adv[u];
    }
  }
}

// One warp per row r of [rows, d]: the CPU's merge (src/ops/cpu/attention.cpp), relative to the
// larger lse; an empty side (lse = -inf) has weight exactly 0 and its o is never read.
template <class TA, class TB>
__global__ void __launch_bounds__(32 * kWarps)
    merge_kernel(TA* __restrict__ o_a, float* __restrict__ lse_a, const TB* __restrict__ o_b,
                 const float* __restrict__ lse_b, int64_t rows, int d) {
  const int lane = threadIdx.x % 32;
  const int64_t r = blockIdx.x * int64_t{kWarps} + threadIdx.x / 32;
  if (r >= rows) return;
  const float la = lse_a[r], lb = lse_b[r], m = fmaxf(la, lb);
  TA* oa = o_a + r * d;
  const TB* ob = o_b + r * d;
  if (m == -INFINITY) {  // neither side saw a key
    for (int c = lane; c < d; c += 32) store(oa, c, 0.f);
    return;
  }
  if (lb == -INFINITY) return;  // o_a is the answer as it is
  if (la == -INFINITY) {
    for (int c = lane; c < d; c += 32) store(oa, c, load(ob, c));
    __syncwarp();
    if (lane == 0) lse_a[r] = lb;
    return;
  }
  const float wa = expf(la - m), wb = expf(lb - m), inv = 1.f / (wa + wb);
  for (int c = lane; c < d; c += 32) store(oa, c, (wa * load(oa, c) + wb * load(ob, c)) * inv);
  __syncwarp();  // every lane has read lse_a[r] before lane 0 overwrites it
  if (lane == 0) lse_a[r] = m + logf(wa + wb);
}

inline unsigned warp_blocks(int64_t warps) {
  return static_cast<unsigned>((warps + kWarps - 1) / kWarps);
}

}  // namespace

cudaError_t reference_forward(const Fwd& p, cudaStream_t s) {
  const int64_t warps = p.sh.nq * p.sh.hq;
  if (warps == 0) return cudaSuccess;
  if (p.bf16) {
    using T = __nv_bfloat16;
    TSP_LAUNCH(warp_blocks(warps), 32 * kWarps, 0, s, forward_kernel<T>)
    (p.sh, static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.v),
     p.q_pos, p.k_pos, p.q_doc_pos, static_cast<T*>(p.o), p.lse, p.scale);
  } else {
    TSP_LAUNCH(warp_blocks(warps), 32 * kWarps, 0, s, forward_kernel<float>)
    (p.sh, static_cast<const float*>(p.q), static_cast<const float*>(p.k),
     static_cast<const float*>(p.v), p.q_pos, p.k_pos, p.q_doc_pos, static_cast<float*>(p.o), p.lse,
     p.scale);
  }
  return cudaGetLastError();
}

template <class T>
static cudaError_t reference_backward_t(const Bwd& p, cudaStream_t s) {
  const T *q = static_cast<const T*>(p.q), *k = static_cast<const T*>(p.k);
  const T *v = static_cast<const T*>(p.v), *o = static_cast<const T*>(p.o);
  TSP_LAUNCH(warp_blocks(p.sh.nq * p.sh.hq), 32 * kWarps, 0, s, backward_dq_kernel<T>)
  (p.sh, q, k, v, o, p.q_pos, p.k_pos, p.q_doc_pos, p.lse, p.dout, p.dq, p.scale);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  TSP_LAUNCH(warp_blocks(p.sh.nk * p.sh.hkv), 32 * kWarps, 0, s, backward_dkdv_kernel<T>)
  (p.sh, q, k, v, o, p.q_pos, p.k_pos, p.q_doc_pos, p.lse, p.dout, p.dk, p.dv, p.scale);
  return cudaGetLastError();
}

cudaError_t reference_backward(const Bwd& p, cudaStream_t s) {
  if (p.sh.nq == 0 || p.sh.nk == 0) return cudaSuccess;  // nothing visible: += adds nothing
  return p.bf16 ? reference_backward_t<__nv_bfloat16>(p, s) : reference_backward_t<float>(p, s);
}

cudaError_t merge(void* o_a, bool a_bf16, float* lse_a, const void* o_b, bool b_bf16,
                  const float* lse_b, int64_t rows, int d, cudaStream_t s) {
  if (rows == 0) return cudaSuccess;
  using B = __nv_bfloat16;
  const unsigned blocks = warp_blocks(rows);
  if (a_bf16 && b_bf16) TSP_LAUNCH(blocks, 32 * kWarps, 0, s, merge_kernel<B, B>)
  (static_cast<B*>(o_a), lse_a, static_cast<const B*>(o_b), lse_b, rows, d);
  else if (a_bf16) TSP_LAUNCH(blocks, 32 * kWarps, 0, s, merge_kernel<B, float>)(
      static_cast<B*>(o_a), lse_a, static_cast<const float*>(o_b), lse_b, rows, d);
  else if (b_bf16) TSP_LAUNCH(blocks, 32 * kWarps, 0, s, merge_kernel<float, B>)(
      static_cast<float*>(o_a), lse_a, static_cast<const B*>(o_b), lse_b, rows, d);
  else TSP_LAUNCH(blocks, 32 * kWarps, 0, s, merge_kernel<float, float>)(
      static_cast<float*>(o_a), lse_a, static_cast<const float*>(o_b), lse_b, rows, d);
  return cudaGetLastError();
}

}  // namespace tsp::cuda::attn
