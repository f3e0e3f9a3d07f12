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
// Work is split so that warp-wide steps are few: a warp owns one output row (a query's o and dq,
// or a key's dk and dv) and takes the rows on the other side 32 at a time. Lane t computes, on
// its own, the scalars of row j0 + t (its score and weight, a dot product over d: no shuffles);
// the warp then shares those 32 scalars through shared memory and each lane adds its elements
// c = lane + 32·u (u < 8) of the weighted rows into the output row. A reduction or __syncwarp
// thus comes once per 32 rows, not once per pair. Statistics are fp32 (the CPU reference uses
// double: the results agree to fp32 rounding of a K-term softmax). A row that a query does not
// see is never read (its values may be anything, NaN included). No atomics: the backward is
// deterministic.
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
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// a·b over d elements, by one thread.
template <class A, class B>
__device__ __forceinline__ float dot(const A* a, const B* b, int d) {
  float s = 0.f;
  for (int c = 0; c < d; ++c) s += load(a, c) * load(b, c);
  return s;
}

// Where query i's document starts: q_pos - q_doc_pos, or no lower bound without documents
// (q_doc_pos null). Query i sees key j iff doc_start <= k_pos[j] <= q_pos[i] (sees).
__device__ __forceinline__ int64_t doc_start(const int64_t* q_pos, const int64_t* q_doc_pos,
                                             int64_t i) {
  return q_doc_pos ? q_pos[i] - q_doc_pos[i] : INT64_MIN;
}

// Whether a query at position qp whose document starts at lo sees a key at position kp.
__device__ __forceinline__ bool sees(int64_t kp, int64_t qp, int64_t lo) {
  return kp <= qp && kp >= lo;
}

// Lane t of the 32 in `seen`, lowest first (the bits of the rows a warp's lanes saw).
__device__ __forceinline__ int next_seen(unsigned& seen) {
  const int t = __ffs(static_cast<int>(seen)) - 1;
  seen &= seen - 1;
  return t;
}

// One warp per (query i, head h); grid covers nq·hq warps. Keys 32 at a time: lane t scores key
// j0 + t, the warp takes the block's max into the running max m (rescaling what it holds by
// e^{m_old - m}), and each lane adds the block's e^{s - m}·v into its elements of o.
template <class T>
__global__ void __launch_bounds__(32 * kWarps)
    forward_kernel(Shape sh, const T* __restrict__ q, const T* __restrict__ k,
                   const T* __restrict__ v, const int64_t* __restrict__ q_pos,
                   const int64_t* __restrict__ k_pos, const int64_t* __restrict__ q_doc_pos,
                   T* __restrict__ o, float* __restrict__ lse, float scale) {
  __shared__ float weight[kWarps][32];  // e^{s - m} of the block's keys
  const int lane = threadIdx.x % 32, wb = threadIdx.x / 32;
  const int64_t w = blockIdx.x * int64_t{kWarps} + wb;
  if (w >= sh.nq * sh.hq) return;
  const int64_t i = w / sh.hq;
  const int h = static_cast<int>(w % sh.hq), hk = h / (sh.hq / sh.hkv), d = sh.d;
  const T* qi = q + w * d;
  const int64_t qp = q_pos[i], lo = doc_start(q_pos, q_doc_pos, i);
  float acc[kPerLane] = {};
  float m = -INFINITY;  // running max of the scores seen (warp-uniform)
  float l = 0.f;        // this lane's share of Σ e^{s - m} (its own keys)
  for (int64_t j0 = 0; j0 < sh.nk; j0 += 32) {
    const int64_t j = j0 + lane;
    const bool visible = j < sh.nk && sees(k_pos[j], qp, lo);
    const unsigned seen = __ballot_sync(0xffffffffu, visible);
    if (!seen) continue;
    const float s = visible ? scale * dot(qi, k + (j * sh.hkv + hk) * d, d) : -INFINITY;
    const float m_new = fmaxf(m, warp_max(s));
    const float alpha = expf(m - m_new);  // 0 on the first keys seen (m = -inf)
    const float p = visible ? expf(s - m_new) : 0.f;
    l = l * alpha + p;
    weight[wb][lane] = p;
    __syncwarp();
#pragma unroll
    for (int u = 0; u < kPerLane; ++u) acc[u] *= alpha;
    for (unsigned rest = seen; rest;) {
      const int t = next_seen(rest);
      const float pt = weight[wb][t];
      const T* vt = v + ((j0 + t) * sh.hkv + hk) * d;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int c = lane + 32 * u;
        if (c < d) acc[u] += pt * load(vt, c);
      }
    }
    __syncwarp();  // every lane has read the weights before the next block writes them
    m = m_new;
  }
  l = warp_sum(l);
  const float inv = l > 0.f ? 1.f / l : 0.f;  // no visible key: o = 0
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int c = lane + 32 * u;
    if (c < d) store(o + w * d, c, acc[u] * inv);
  }
  if (lane == 0) lse[w] = l > 0.f ? m + logf(l) : -INFINITY;
}

// dq pass: one warp per (query i, head h): dq_i += scale Σ_j dS_ij k_j, keys 32 at a time (lane t
// computes dS of key j0 + t).
template <class T>
__global__ void __launch_bounds__(32 * kWarps)
    backward_dq_kernel(Shape sh, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const T* __restrict__ o,
                       const int64_t* __restrict__ q_pos, const int64_t* __restrict__ k_pos,
                       const int64_t* __restrict__ q_doc_pos, const float* __restrict__ lse,
                       const float* __restrict__ dout, float* __restrict__ dq, float scale) {
  __shared__ float dS_shared[kWarps][32];
  const int lane = threadIdx.x % 32, wb = threadIdx.x / 32;
  const int64_t w = blockIdx.x * int64_t{kWarps} + wb;
  if (w >= sh.nq * sh.hq) return;
  const float L = lse[w];
  if (L == -INFINITY) return;  // saw no key: no gradient
  const int64_t i = w / sh.hq;
  const int h = static_cast<int>(w % sh.hq), hk = h / (sh.hq / sh.hkv), d = sh.d;
  const T* qi = q + w * d;
  const float* doi = dout + w * d;
  const float Di = dot(doi, o + w * d, d);  // dout_i·o_i (every lane the same)
  const int64_t qp = q_pos[i], lo = doc_start(q_pos, q_doc_pos, i);
  float acc[kPerLane] = {};
  for (int64_t j0 = 0; j0 < sh.nk; j0 += 32) {
    const int64_t j = j0 + lane;
    const bool visible = j < sh.nk && sees(k_pos[j], qp, lo);
    const unsigned seen = __ballot_sync(0xffffffffu, visible);
    if (!seen) continue;
    if (visible) {
      const int64_t kv = (j * sh.hkv + hk) * d;
      const float P = expf(scale * dot(qi, k + kv, d) - L);
      dS_shared[wb][lane] = P * (dot(doi, v + kv, d) - Di);
    }
    __syncwarp();
    for (unsigned rest = seen; rest;) {
      const int t = next_seen(rest);
      const float dS = dS_shared[wb][t];
      const T* kt = k + ((j0 + t) * sh.hkv + hk) * d;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int c = lane + 32 * u;
        if (c < d) acc[u] += dS * load(kt, c);
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int c = lane + 32 * u;
    if (c < d) dq[w * d + c] += scale * acc[u];
  }
}

// dk/dv pass: one warp per (key j, kv head hk), over the pairs (query i, query head h sharing
// hk), pair p = i·G + (h - hk·G), 32 at a time (lane t computes P and dS of pair p0 + t):
// dv_j += P dout_i, dk_j += scale dS q_i. D_i is recomputed per pair (O(d)).
template <class T>
__global__ void __launch_bounds__(32 * kWarps)
    backward_dkdv_kernel(Shape sh, const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const T* __restrict__ o,
                         const int64_t* __restrict__ q_pos, const int64_t* __restrict__ k_pos,
                         const int64_t* __restrict__ q_doc_pos, const float* __restrict__ lse,
                         const float* __restrict__ dout, float* __restrict__ dk,
                         float* __restrict__ dv, float scale) {
  __shared__ float P_shared[kWarps][32], dS_shared[kWarps][32];
  const int lane = threadIdx.x % 32, wb = threadIdx.x / 32;
  const int64_t w = blockIdx.x * int64_t{kWarps} + wb;
  if (w >= sh.nk * sh.hkv) return;
  const int64_t j = w / sh.hkv;
  const int hk = static_cast<int>(w % sh.hkv), G = sh.hq / sh.hkv, d = sh.d;
  const T *kj = k + w * d, *vj = v + w * d;
  const int64_t kp = k_pos[j], pairs = sh.nq * G;
  // The row of q, o, dout and lse of pair p.
  auto row = [&](int64_t p) { return p / G * sh.hq + hk * G + p % G; };
  float adk[kPerLane] = {}, adv[kPerLane] = {};
  for (int64_t p0 = 0; p0 < pairs; p0 += 32) {
    const int64_t p = p0 + lane, i = p / G;
    const bool visible =
        p < pairs && sees(kp, q_pos[i], doc_start(q_pos, q_doc_pos, i)) && lse[row(p)] != -INFINITY;
    const unsigned seen = __ballot_sync(0xffffffffu, visible);
    if (!seen) continue;
    if (visible) {
      const int64_t r = row(p);
      const float Di = dot(dout + r * d, o + r * d, d);
      const float P = expf(scale * dot(kj, q + r * d, d) - lse[r]);
      P_shared[wb][lane] = P;
      dS_shared[wb][lane] = P * (dot(dout + r * d, vj, d) - Di);
    }
    __syncwarp();
    for (unsigned rest = seen; rest;) {
      const int t = next_seen(rest);
      const int64_t r = row(p0 + t);
      const float P = P_shared[wb][t], dS = dS_shared[wb][t];
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int c = lane + 32 * u;
        if (c < d) {
          adv[u] += P * dout[r * d + c];
          adk[u] += dS * load(q + r * d, c);
        }
      }
    }
    __syncwarp();
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
