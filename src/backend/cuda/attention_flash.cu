// Flash attention on tensor cores: BF16 q/k/v/o, head dim 64 or 128, fp32 accumulation and
// statistics, FlashAttention-2 schedule (Dao 2023), mma.sync.m16n8k16 (bf16 -> f32) through inline
// PTX, operands brought from shared memory with ldmatrix, tiles loaded with cp.async.
//
// Masking is by explicit positions (query i sees key j iff k_pos[j] <= q_pos[i]; with documents
// also k_pos[j] >= s_i = q_pos[i] - q_doc_pos[i], where query i's document starts); nothing assumes
// positions sorted. Per pair of tiles the block decides from the positions, with one barrier
// predicate each (__syncthreads_or / _and) over the rows of one tile of tile_needed / tile_full
// (attention_tile_rules.h, checked on the CPU by attention_tile_rules_test):
//   skip  no key of the key tile is visible to any query of the query tile: no pair (i, j) with
//         s_i <= k_pos[j] <= q_pos[i] (without documents: min k_pos > max q_pos, the causal upper
//         triangle, K/V rounds from the future; with documents also every key before every
//         document start of the tile, e.g. earlier documents of a packed row);
//   full  every query sees every key (max k_pos <= min q_pos, and with documents min k_pos >=
//         max s_i): no element-wise mask;
//   else  element-wise mask.
// Documents are a template parameter (DOCS): the kernels without them are the causal-only code,
// instruction for instruction; the launcher picks the instantiation from q_doc_pos (null: none).
// Rows past the end of a tile get sentinel positions (queries INT64_MIN, keys INT64_MAX), so the
// element-wise mask removes them and they never make a tile "full"; their shared-memory rows are
// zero-filled so no stale or NaN data enters a product.
//
// Forward (one block of 8 warps per 128 queries × head; 16 query rows per warp): loop over key
// tiles of 64 with K/V double-buffered in shared memory (the next needed tile is loaded while the
// current one is computed), S = Q·Kᵀ in registers, online softmax in the log2 domain, P rounded to
// bf16 and O += P·V. o is rounded to bf16 once; lse is fp32.
//
// Backward (one block of 4 warps per 64 keys × kv head; 16 key rows per warp): loop over the
// query heads sharing the kv head and over query tiles of BR, recomputing Sᵀ = K·Qᵀ and
// Pᵀ = exp(Sᵀ·scale − lse); dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − D), dK += dSᵀ·Q in
// registers; dQ += dS·K from dSᵀ staged in shared memory, added to dq with fp32 atomics (red).
// D_i = dout_i·o_i is computed while dout (F32) is converted to bf16 into shared memory. dK and dV
// belong to one block each: plain read-modify-write of dk, dv (no atomics).
//
// Rounding beyond the reference path (fp32 throughout): P (forward and backward) to bf16 before
// P·V and Pᵀ·dO (2^-9 relative per term); dout to bf16 for dV and dP (2^-9 relative per element);
// dS to bf16 for dK and dQ (2^-9 relative per term). The tests derive their bounds from these.
// No tsp::Error here (fmt does not compile under nvcc): launchers return the launch status.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/attention_flash_common.cuh"
#include "backend/cuda/attention_kernels.h"
#include "backend/cuda/launch.cuh"

namespace tsp::cuda::attn {
namespace {

using namespace flash;  // attention_flash_common.cuh

struct Args {
  Shape sh;
  const bf16 *q, *k, *v, *o;
  const int64_t *q_pos, *k_pos;
  const float* dout;
  float *lse_out, *dq, *dk, *dv;
  const float* lse;
  bf16* o_out;
  float scale;
  const int64_t* q_doc_pos;  // [nq] position in its document; read only by the DOCS kernels
};

// ---- forward ----------------------------------------------------------------------------------

constexpr int kFwdWarps = 8, kFwdBR = 16 * kFwdWarps, kFwdBC = 64;

template <int D>
constexpr int fwd_smem_bytes() {
  return (kFwdBR + 4 * kFwdBC) * (D + 8) * 2 + 2 * kFwdBC * 8;
}

template <int D, bool DOCS>
__global__ void __launch_bounds__(32 * kFwdWarps) flash_forward_kernel(Args a) {
  constexpr int BR = kFwdBR, BC = kFwdBC, LD = D + 8, NT = 32 * kFwdWarps;
  TSP_DYNAMIC_SHARED(smem);
  bf16* Qs = reinterpret_cast<bf16*>(smem);                        // [BR][LD]
  bf16* Ks = Qs + BR * LD;                                         // [2][BC][LD]
  bf16* Vs = Ks + 2 * BC * LD;                                     // [2][BC][LD]
  int64_t* kpos_s = reinterpret_cast<int64_t*>(Vs + 2 * BC * LD);  // [2][BC]
  __shared__ int64_t red[DOCS ? 4 : 2][kFwdWarps];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const Shape sh = a.sh;
  // Late query tiles see the most keys (causal): launch them first for a better tail.
  const int64_t q0 = (gridDim.x - 1 - blockIdx.x) * int64_t{BR};
  const int h = blockIdx.y, hk = h / (sh.hq / sh.hkv);
  const int nq_tile = static_cast<int>(min(int64_t{BR}, sh.nq - q0));
  const int64_t q_stride = int64_t{sh.hq} * D, kv_stride = int64_t{sh.hkv} * D;
  const bf16* kg = a.k + hk * D;
  const bf16* vg = a.v + hk * D;
  const int n_tiles = static_cast<int>((sh.nk + BC - 1) / BC);

  load_tile<D, NT>(Qs, a.q + q0 * q_stride + h * D, q_stride, BR, nq_tile, tid);
  cp_async_commit();

  // This thread's two query rows: warp·16 + g and + 8; with documents also where their documents
  // start, ds = q_pos - q_doc_pos (rows past the end: kNoKey, which no min takes and which hides
  // every key, though their kNoQuery position already does).
  int64_t qp[2], ds[2];
  for (int e = 0; e < 2; ++e) {
    const int r = warp * 16 + g + 8 * e;
    qp[e] = query_row(a.q_pos + q0, r, r < nq_tile);
    if constexpr (DOCS) ds[e] = doc_start_row(qp[e], a.q_doc_pos + q0, r, r < nq_tile);
  }
  {
    const int64_t mx = warp_max(max(qp[0], qp[1])), mn = warp_min(min(qp[0], qp[1]));
    if (lane == 0) red[0][warp] = mx, red[1][warp] = mn;
    if constexpr (DOCS) {
      const int64_t dmn = warp_min(min(ds[0], ds[1])), dmx = warp_max(max(ds[0], ds[1]));
      if (lane == 0) red[2][warp] = dmn, red[3][warp] = dmx;
    }
  }
  __syncthreads();
  int64_t q_max = red[0][0], q_min = red[1][0];
  for (int w = 1; w < kFwdWarps; ++w) q_max = max(q_max, red[0][w]), q_min = min(q_min, red[1][w]);
  // With documents: ds_min, the lowest key position any query of the tile may see, and ds_max,
  // the latest document start (kNoKey when the tile has rows past the end: never full, as q_min
  // = kNoQuery already makes it).
  int64_t ds_min = 0, ds_max = 0;
  if constexpr (DOCS) {
    ds_min = red[2][0], ds_max = red[3][0];
    for (int w = 1; w < kFwdWarps; ++w)
      ds_min = min(ds_min, red[2][w]), ds_max = max(ds_max, red[3][w]);
  }

  // The first needed key tile at or after j (n_tiles if none); its positions go to kpos_s[b].
  // Needed: some key lies in [ds_min, q_max] (without documents: some key <= q_max). A visible
  // pair (i, j) has ds_min <= s_i <= k_pos[j] <= q_pos[i] <= q_max, so a tile with no key in that
  // range has none and is skipped; keys past the end (kNoKey) are above q_max. Full: every key
  // <= q_min (so <= every q_pos[i]) and, with documents, >= ds_max (so >= every s_i).
  auto next_tile = [&](int j, int b, bool& full) {
    for (; j < n_tiles; ++j) {
      int64_t kp = kNoKey;
      if (tid < BC) {
        const int64_t jj = int64_t{j} * BC + tid;
        kp = key_row(a.k_pos, jj, jj < sh.nk);
        kpos_s[b * BC + tid] = kp;
      }
      // Each key as a tile of one (k_min = k_max = kp), ORed / ANDed over the tile's BC rows.
      if (__syncthreads_or(tid < BC && tile_needed<DOCS>(q_max, ds_min, kp, kp))) {
        full = __syncthreads_and(tid >= BC || tile_full<DOCS>(q_min, ds_max, kp, kp));
        return j;
      }
    }
    return n_tiles;
  };
  auto load_kv = [&](int j, int b) {
    const int64_t k0 = int64_t{j} * BC;
    const int valid = static_cast<int>(min(int64_t{BC}, sh.nk - k0));
    load_tile<D, NT>(Ks + b * BC * LD, kg + k0 * kv_stride, kv_stride, BC, valid, tid);
    load_tile<D, NT>(Vs + b * BC * LD, vg + k0 * kv_stride, kv_stride, BC, valid, tid);
  };

  bool full = false;
  int j = next_tile(0, 0, full);
  if (j < n_tiles) load_kv(j, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  uint32_t qf[D / 16][4];  // this warp's 16 query rows as A fragments
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[kk], a_addr(Qs, LD, warp * 16, kk * 16, lane));

  const float sl2 = a.scale * kLog2e;  // scores in the log2 domain
  float O[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this thread's partial row sums
  int buf = 0;
  while (j < n_tiles) {
    bool full_next = false;
    const int jn = next_tile(j + 1, buf ^ 1, full_next);
    if (jn < n_tiles) load_kv(jn, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const bf16* K = Ks + buf * BC * LD;
    const bf16* V = Vs + buf * BC * LD;
    float S[BC / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < BC / 16; ++np) {
        uint32_t b[4];
        ldsm_x4(b, bnk_addr(K, LD, np * 16, kk * 16, lane));
        mma(S[2 * np], qf[kk], b[0], b[1]);
        mma(S[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float s = S[n][e] * sl2;
        const int64_t kp = kpos_s[buf * BC + n * 8 + 2 * t + (e & 1)];
        if (!full && (kp > qp[e >> 1] || (DOCS && kp < ds[e >> 1]))) s = -INFINITY;
        S[n][e] = s;
        mx[e >> 1] = fmaxf(mx[e >> 1], s);
      }
    }
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);
      base[r] = m_new == -INFINITY ? 0.f : m_new;  // a row that has seen nothing stays at 0
      const float alpha = ex2(m[r] - base[r]);     // 0 while m = -inf
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) O[n][2 * r] *= alpha, O[n][2 * r + 1] *= alpha;
    }
#pragma unroll
    for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = ex2(S[n][e] - base[e >> 1]);
        S[n][e] = p;
        l[e >> 1] += p;
      }
    }
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t pa[4];
      c_to_a(pa, S[2 * kk], S[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_t(b, bkn_addr(V, LD, kk * 16, dp * 16, lane));
        mma(O[2 * dp], pa, b[0], b[1]);
        mma(O[2 * dp + 1], pa, b[2], b[3]);
      }
    }
    __syncthreads();  // buffer `buf` and kpos_s[buf] are free for the next prefetch
    j = jn;
    full = full_next;
    buf ^= 1;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int row = warp * 16 + g + 8 * r;
    if (row >= nq_tile) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // no visible key: o = 0
    bf16* orow = a.o_out + (q0 + row) * q_stride + h * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * t) =
          pack(O[n][2 * r] * inv, O[n][2 * r + 1] * inv);
    if (t == 0)
      a.lse_out[(q0 + row) * sh.hq + h] = l[r] > 0.f ? (m[r] + __log2f(l[r])) * kLn2 : -INFINITY;
  }
}

// ---- backward ---------------------------------------------------------------------------------

constexpr int kBwdWarps = 4, kBwdBC = 16 * kBwdWarps;

// K, V, Q, dO; dSᵀ; qpos, lse, D of the query tile (and its document starts, with documents).
template <int D, int BR, bool DOCS>
constexpr int bwd_smem_bytes() {
  return (2 * kBwdBC + 2 * BR) * (D + 8) * 2 + kBwdBC * (BR + 8) * 2 + BR * (8 + 4 + 4) +
         (DOCS ? BR * 8 : 0);
}

template <int D, int BR, bool DOCS>
__global__ void __launch_bounds__(32 * kBwdWarps) flash_backward_kernel(Args a) {
  constexpr int BC = kBwdBC, LD = D + 8, LDS = BR + 8, NT = 32 * kBwdWarps;
  constexpr int TPR = NT / BR;        // threads per row converting dout
  constexpr int MT = BR / 16;         // dQ: m16 tiles of the query tile
  constexpr int CG = kBwdWarps / MT;  // dQ: column groups (warp = mt + MT·cg)
  constexpr int DC = D / CG;          // dQ: columns per warp
  static_assert(NT % BR == 0 && kBwdWarps % MT == 0 && DC % 16 == 0, "tile shape");
  TSP_DYNAMIC_SHARED(smem);
  bf16* Ks = reinterpret_cast<bf16*>(smem);                      // [BC][LD]
  bf16* Vs = Ks + BC * LD;                                       // [BC][LD]
  bf16* Qs = Vs + BC * LD;                                       // [BR][LD]
  bf16* dOs = Qs + BR * LD;                                      // [BR][LD]
  bf16* dSs = dOs + BR * LD;                                     // [BC][LDS]  dSᵀ: [key][query]
  int64_t* qpos_s = reinterpret_cast<int64_t*>(dSs + BC * LDS);  // [BR]
  float* lse_s = reinterpret_cast<float*>(qpos_s + BR);          // [BR] lse·log2(e)
  float* D_s = lse_s + BR;                                       // [BR] dout·o
  int64_t* ds_s = reinterpret_cast<int64_t*>(D_s + BR);          // [BR] document starts (DOCS only)
  __shared__ int64_t red[2][kBwdWarps];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const Shape sh = a.sh;
  const int64_t k0 = blockIdx.x * int64_t{BC};
  const int hk = blockIdx.y, G = sh.hq / sh.hkv;
  const int nk_tile = static_cast<int>(min(int64_t{BC}, sh.nk - k0));
  const int64_t q_stride = int64_t{sh.hq} * D, kv_stride = int64_t{sh.hkv} * D;

  load_tile<D, NT>(Ks, a.k + k0 * kv_stride + hk * D, kv_stride, BC, nk_tile, tid);
  load_tile<D, NT>(Vs, a.v + k0 * kv_stride + hk * D, kv_stride, BC, nk_tile, tid);
  cp_async_commit();

  int64_t kp[2];  // this thread's two key rows: warp·16 + g and + 8
  for (int e = 0; e < 2; ++e) {
    const int r = warp * 16 + g + 8 * e;
    kp[e] = key_row(a.k_pos + k0, r, r < nk_tile);
  }
  {
    const int64_t mn = warp_min(min(kp[0], kp[1])), mx = warp_max(max(kp[0], kp[1]));
    if (lane == 0) red[0][warp] = mn, red[1][warp] = mx;
  }
  __syncthreads();
  int64_t k_min = red[0][0], k_max = red[1][0];
  for (int w = 1; w < kBwdWarps; ++w) k_min = min(k_min, red[0][w]), k_max = max(k_max, red[1][w]);

  const float sl2 = a.scale * kLog2e;
  float dK[D / 8][4] = {}, dV[D / 8][4] = {};
  const int nq_tiles = static_cast<int>((sh.nq + BR - 1) / BR);
  for (int h = hk * G; h < (hk + 1) * G; ++h) {
    for (int qt = 0; qt < nq_tiles; ++qt) {
      const int64_t i0 = int64_t{qt} * BR;
      const int nq_tile = static_cast<int>(min(int64_t{BR}, sh.nq - i0));
      int64_t qp = kNoQuery;
      if (tid < BR) qp = query_row(a.q_pos + i0, tid, tid < nq_tile);
      // With documents, where query tid's document starts (rows past the end: kNoKey).
      int64_t ds = kNoKey;
      if (DOCS && tid < BR) ds = doc_start_row(qp, a.q_doc_pos + i0, tid, tid < nq_tile);
      // The mirror of the forward's test: the tile is needed if some query's visible range
      // [ds, qp] meets [k_min, k_max] (a visible pair (i, j) has k_min <= k_pos[j] <= q_pos[i]
      // and s_i <= k_pos[j] <= k_max); else no query sees a key. Rows past the end have qp =
      // kNoQuery < k_min. Full: every query sees [k_min, k_max] whole (qp >= k_max and, with
      // documents, ds <= k_min); keys past the end make k_max = kNoKey: never full. Each query
      // as a tile of one (q_max = q_min = qp, s_min = s_max = ds), ORed / ANDed over BR rows.
      if (!__syncthreads_or(tid < BR && tile_needed<DOCS>(qp, ds, k_min, k_max))) continue;
      if (tid < BR) qpos_s[tid] = qp;
      if (DOCS && tid < BR) ds_s[tid] = ds;
      const bool full = __syncthreads_and(tid >= BR || tile_full<DOCS>(qp, ds, k_min, k_max));

      load_tile<D, NT>(Qs, a.q + i0 * q_stride + h * D, q_stride, BR, nq_tile, tid);
      cp_async_commit();
      {  // dout (F32) -> bf16 in dOs, D_i = dout_i·o_i (fp32, o as stored), lse in log2 units
        const int r = tid / TPR, sub = tid % TPR;
        float dsum = 0.f;
        if (r < nq_tile) {
          const int64_t off = (i0 + r) * q_stride + h * D;
          const float* dr = a.dout + off;
          const bf16* orow = a.o + off;
#pragma unroll 4
          for (int c = sub * 4; c < D; c += 4 * TPR) {
            const float4 d4 = *reinterpret_cast<const float4*>(dr + c);
            const uint2 o4 = *reinterpret_cast<const uint2*>(orow + c);
            const float2 o01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&o4.x));
            const float2 o23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&o4.y));
            dsum += d4.x * o01.x + d4.y * o01.y + d4.z * o23.x + d4.w * o23.y;
            *reinterpret_cast<uint2*>(dOs + r * LD + c) =
                make_uint2(pack(d4.x, d4.y), pack(d4.z, d4.w));
          }
        } else {
          for (int c = sub * 4; c < D; c += 4 * TPR)
            *reinterpret_cast<uint2*>(dOs + r * LD + c) = make_uint2(0u, 0u);
        }
#pragma unroll
        for (int o = 1; o < TPR; o <<= 1) dsum += __shfl_xor_sync(0xffffffffu, dsum, o);
        if (sub == 0) {
          D_s[r] = dsum;
          const float L = r < nq_tile ? a.lse[(i0 + r) * sh.hq + h] : -INFINITY;
          lse_s[r] = L == -INFINITY ? INFINITY : L * kLog2e;  // saw no key: P = 2^-inf = 0
        }
      }
      cp_async_wait<0>();
      __syncthreads();

      // Sᵀ = K·Qᵀ for this warp's 16 keys × BR queries, then Pᵀ.
      float P[BR / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ka[4];
        ldsm_x4(ka, a_addr(Ks, LD, warp * 16, kk * 16, lane));
#pragma unroll
        for (int np = 0; np < BR / 16; ++np) {
          uint32_t b[4];
          ldsm_x4(b, bnk_addr(Qs, LD, np * 16, kk * 16, lane));
          mma(P[2 * np], ka, b[0], b[1]);
          mma(P[2 * np + 1], ka, b[2], b[3]);
        }
      }
#pragma unroll
      for (int n = 0; n < BR / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n * 8 + 2 * t + (e & 1);
          float p = ex2(P[n][e] * sl2 - lse_s[col]);
          if (!full && (kp[e >> 1] > qpos_s[col] || (DOCS && kp[e >> 1] < ds_s[col]))) p = 0.f;
          P[n][e] = p;
        }
      }
      // dV += Pᵀ·dO
#pragma unroll
      for (int kk = 0; kk < BR / 16; ++kk) {
        uint32_t pa[4];
        c_to_a(pa, P[2 * kk], P[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t b[4];
          ldsm_x4_t(b, bkn_addr(dOs, LD, kk * 16, dp * 16, lane));
          mma(dV[2 * dp], pa, b[0], b[1]);
          mma(dV[2 * dp + 1], pa, b[2], b[3]);
        }
      }
      // dPᵀ = V·dOᵀ, then dSᵀ = Pᵀ∘(dPᵀ − D)
      float dS[BR / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t va[4];
        ldsm_x4(va, a_addr(Vs, LD, warp * 16, kk * 16, lane));
#pragma unroll
        for (int np = 0; np < BR / 16; ++np) {
          uint32_t b[4];
          ldsm_x4(b, bnk_addr(dOs, LD, np * 16, kk * 16, lane));
          mma(dS[2 * np], va, b[0], b[1]);
          mma(dS[2 * np + 1], va, b[2], b[3]);
        }
      }
#pragma unroll
      for (int n = 0; n < BR / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dS[n][e] = P[n][e] * (dS[n][e] - D_s[n * 8 + 2 * t + (e & 1)]);
        const int row = warp * 16 + g;
        *reinterpret_cast<uint32_t*>(dSs + row * LDS + n * 8 + 2 * t) = pack(dS[n][0], dS[n][1]);
        *reinterpret_cast<uint32_t*>(dSs + (row + 8) * LDS + n * 8 + 2 * t) =
            pack(dS[n][2], dS[n][3]);
      }
      // dK += dSᵀ·Q
#pragma unroll
      for (int kk = 0; kk < BR / 16; ++kk) {
        uint32_t sa[4];
        c_to_a(sa, dS[2 * kk], dS[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t b[4];
          ldsm_x4_t(b, bkn_addr(Qs, LD, kk * 16, dp * 16, lane));
          mma(dK[2 * dp], sa, b[0], b[1]);
          mma(dK[2 * dp + 1], sa, b[2], b[3]);
        }
      }
      __syncthreads();  // dSᵀ complete

      // dQ[BR×D] += scale · dS·K: warp (mt, cg) takes query rows mt·16.. and columns cg·DC..
      {
        const int mt = warp % MT, cg = warp / MT;
        float acc[DC / 8][4] = {};
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
          uint32_t sa[4];
          ldsm_x4_t(sa, bnk_addr(dSs, LDS, kk * 16, mt * 16, lane));  // A = dS from dSᵀ [k][m]
#pragma unroll
          for (int dp = 0; dp < DC / 16; ++dp) {
            uint32_t b[4];
            ldsm_x4_t(b, bkn_addr(Ks, LD, kk * 16, cg * DC + dp * 16, lane));
            mma(acc[2 * dp], sa, b[0], b[1]);
            mma(acc[2 * dp + 1], sa, b[2], b[3]);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = mt * 16 + g + 8 * r;
          if (row >= nq_tile) continue;
          float* dqr = a.dq + (i0 + row) * q_stride + h * D + cg * DC + 2 * t;
#pragma unroll
          for (int n = 0; n < DC / 8; ++n) {
            atomicAdd(dqr + n * 8, a.scale * acc[n][2 * r]);
            atomicAdd(dqr + n * 8 + 1, a.scale * acc[n][2 * r + 1]);
          }
        }
      }
      __syncthreads();  // Qs, dOs, dSs and the row statistics are free for the next tile
    }
  }

  // This block owns its 64 keys of dk and dv for kv head hk.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    if (row >= nk_tile) continue;
    const int64_t off = (k0 + row) * kv_stride + hk * D + 2 * t;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      a.dk[off + n * 8] += a.scale * dK[n][2 * r];
      a.dk[off + n * 8 + 1] += a.scale * dK[n][2 * r + 1];
      a.dv[off + n * 8] += dV[n][2 * r];
      a.dv[off + n * 8 + 1] += dV[n][2 * r + 1];
    }
  }
}

// The backward's query tile: 64 rows for d = 64; 32 for d = 128 keeps the dK, dV, P and dS
// accumulators (4·16·d/8... registers) within 255 registers, with a small spill left (nvcc 13.0,
// -Xptxas -v: 20 B stored / 20 B loaded per thread without documents, 28 / 40 B with them).
template <int D>
constexpr int bwd_br() {
  return D == 64 ? 64 : 32;
}

template <int D, bool DOCS>
cudaError_t forward_d(const Args& a, cudaStream_t s) {
  constexpr int bytes = fwd_smem_bytes<D>();
  cudaError_t e = cudaFuncSetAttribute(flash_forward_kernel<D, DOCS>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((a.sh.nq + kFwdBR - 1) / kFwdBR),
                  static_cast<unsigned>(a.sh.hq));
  TSP_LAUNCH(grid, 32 * kFwdWarps, bytes, s, flash_forward_kernel<D, DOCS>)(a);
  return cudaGetLastError();
}

template <int D, bool DOCS>
cudaError_t backward_d(const Args& a, cudaStream_t s) {
  constexpr int BR = bwd_br<D>(), bytes = bwd_smem_bytes<D, BR, DOCS>();
  cudaError_t e = cudaFuncSetAttribute(flash_backward_kernel<D, BR, DOCS>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((a.sh.nk + kBwdBC - 1) / kBwdBC),
                  static_cast<unsigned>(a.sh.hkv));
  TSP_LAUNCH(grid, 32 * kBwdWarps, bytes, s, flash_backward_kernel<D, BR, DOCS>)(a);
  return cudaGetLastError();
}

}  // namespace

bool flash_supported(int d) {
  return d == 64 || d == 128;
}

cudaError_t flash_forward(const Fwd& p, cudaStream_t s) {
  if (!p.bf16 || !flash_supported(p.sh.d)) return cudaErrorInvalidValue;
  if (p.sh.nq == 0) return cudaSuccess;
  Args a{};
  a.sh = p.sh;
  a.q = static_cast<const bf16*>(p.q);
  a.k = static_cast<const bf16*>(p.k);
  a.v = static_cast<const bf16*>(p.v);
  a.q_pos = p.q_pos;
  a.k_pos = p.k_pos;
  a.o_out = static_cast<bf16*>(p.o);
  a.lse_out = p.lse;
  a.scale = p.scale;
  a.q_doc_pos = p.q_doc_pos;
  if (p.q_doc_pos) return p.sh.d == 64 ? forward_d<64, true>(a, s) : forward_d<128, true>(a, s);
  return p.sh.d == 64 ? forward_d<64, false>(a, s) : forward_d<128, false>(a, s);
}

cudaError_t flash_backward(const Bwd& p, cudaStream_t s) {
  if (!p.bf16 || !flash_supported(p.sh.d)) return cudaErrorInvalidValue;
  if (p.sh.nq == 0 || p.sh.nk == 0) return cudaSuccess;
  Args a{};
  a.sh = p.sh;
  a.q = static_cast<const bf16*>(p.q);
  a.k = static_cast<const bf16*>(p.k);
  a.v = static_cast<const bf16*>(p.v);
  a.o = static_cast<const bf16*>(p.o);
  a.q_pos = p.q_pos;
  a.k_pos = p.k_pos;
  a.lse = p.lse;
  a.dout = p.dout;
  a.dq = p.dq;
  a.dk = p.dk;
  a.dv = p.dv;
  a.scale = p.scale;
  a.q_doc_pos = p.q_doc_pos;
  if (p.q_doc_pos) return p.sh.d == 64 ? backward_d<64, true>(a, s) : backward_d<128, true>(a, s);
  return p.sh.d == 64 ? backward_d<64, false>(a, s) : backward_d<128, false>(a, s);
}

}  // namespace tsp::cuda::attn
