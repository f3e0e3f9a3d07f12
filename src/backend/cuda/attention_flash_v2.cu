// Flash attention, version 2 (TSP_CUDA_FLASH=v2; the default is v1, attention_flash.cu). Same
// maths, roundings, masking rules and fragment code as v1 (see attention_flash.cu for the mma /
// ldmatrix layouts and the bf16 rounding budget); what changes is the schedule:
//
// * Tile bounds are precomputed (tile_bounds_kernel: min / max position per tile, padded position
//   copies). Each block turns them into bitmasks in shared memory (needed tiles, fully visible
//   tiles) with one ballot per 32 tiles, so finding the next needed tile is a few shared-memory
//   word scans instead of v1's global load + two block barriers per tile (which also made v1 scan
//   every skipped tile of the causal triangle one by one).
// * Positions of a tile come with its K/V (or Q/dO) through cp.async from the padded copies; rows
//   past the end carry the sentinels (keys kNoKey, queries kNoQuery), so no tile with padding is
//   ever "full".
// * Blocks are ordered heaviest first (causal): forward grid (head, query tile from the last),
//   backward grid (query head, key tile from the first), x fastest, so the first wave holds the
//   longest blocks of every head and the tail is made of short ones.
// * Forward: 4 warps × 32 query rows (two m16 tiles, BR = 128) per block, so each K / V fragment
//   read by ldmatrix feeds two mma (v1: 8 warps × 16 rows, one mma per fragment); keys in tiles
//   of 64 (one cp.async stage) taken in softmax steps of 32 at d = 128 (64 at d = 64) to stay
//   within 255 registers; about 107 KB of shared memory: two blocks per SM, whose barriers do
//   not line up (v1: one block per SM).
// * Backward: a pre-kernel (bwd_prep_kernel) converts dout to bf16 once and computes
//   D_i = dout_i·o_i and lse·log2(e) ([hq][nq_pad], padded rows: D = 0, lse2 = +inf so P = 0); v1
//   redid this per key block. One block of 8 warps per (query head, 128 keys): 8 warps × 16 keys,
//   query tiles of 32 double-buffered with cp.async (the next needed tile loads while the current
//   one is computed). The grid runs over query heads (v1 looped over the G heads of a kv head in
//   one block): dK, dV of the kv head are summed over its G query heads with fp32 atomics at the
//   end of each block (so dk, dv are no longer bitwise deterministic, like dq). dQ: 128 keys per
//   block halve the atomics against v1's 64 and each is a float2 (sm_90 vector atomic).
// * Documents (q_doc_pos non-null): query i also hides keys before its document's start
//   s_i = q_pos[i] - q_doc_pos[i]. The kernels take them as a template parameter (DOCS), so the
//   instantiations without documents are the causal-only code; with documents the tile tests gain
//   the lower bound (needed: the tile's key range meets [min s_i, max q_pos]; full: it lies in
//   [max s_i, min q_pos]; tile_needed / tile_full of attention_tile_rules.h, derived there and
//   checked on the CPU by attention_tile_rules_test) and the element-wise mask hides k_pos < s_i.
//   The backward precomputes per query tile min / max s_i (tile_bounds of s) and a padded copy of
//   s that travels with Q like the positions.
// Scratch (positions, bounds, bf16 dout, D, lse2) is one Workspace tensor of the device's caching
// allocator per call (scratch.h: counted by the MemoryTracker; free of waits on the compute
// stream, ordered explicitly on another), freed when the launcher returns. The memory model
// counts the backward's (plan::flash_v2_backward_scratch) and shows the forward's below the peak
// (src/plan/measure.cpp): a change of either is a change there.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/attention_flash_common.cuh"
#include "backend/cuda/attention_kernels.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/scratch.h"

namespace tsp::cuda::attn {
namespace {

using namespace flash;  // attention_flash_common.cuh

// ---- pre-kernels ------------------------------------------------------------------------------

// One warp per tile of `tile` rows of pos[n] (kind: query or key positions, or with doc_pos the
// document starts pos[i] - doc_pos[i]): tile_min / tile_max over the rows and the padded copy
// padded[n_tiles·tile], rows past n as their sentinel (tile_rows, attention_tile_rules.h).
__global__ void tile_bounds_kernel(Rows kind, const int64_t* pos, const int64_t* doc_pos, int64_t n,
                                   int tile, int n_tiles, int64_t* tile_min, int64_t* tile_max,
                                   int64_t* padded) {
  const int w = static_cast<int>((blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32);
  const int lane = threadIdx.x % 32;
  if (w >= n_tiles) return;
  const TileBounds b = tile_rows(kind, pos, doc_pos, n, tile, w, lane, 32, padded);
  const int64_t lo = warp_min(b.lo), hi = warp_max(b.hi);
  if (lane == 0) tile_min[w] = lo, tile_max[w] = hi;
}

cudaError_t tile_bounds(Rows kind, const int64_t* pos, const int64_t* doc_pos, int64_t n, int tile,
                        int n_tiles, int64_t* tile_min, int64_t* tile_max, int64_t* padded,
                        cudaStream_t s) {
  const int warps_per_block = 8;
  const unsigned blocks = static_cast<unsigned>((n_tiles + warps_per_block - 1) / warps_per_block);
  TSP_LAUNCH(blocks, 32 * warps_per_block, 0, s, tile_bounds_kernel)
  (kind, pos, doc_pos, n, tile, n_tiles, tile_min, tile_max, padded);
  return cudaGetLastError();
}

// Bitmasks of the tiles [0, n_tiles) that satisfy need(t) / full(t), one bit per tile in the
// layout of attention_tile_rules.h (mask_bit, next_set), built by all NT threads of a block: tile
// t = base + tid is bit lane of the warp's ballot, word t / 32 = base / 32 + warp (base is a
// multiple of NT, hence of 32). Ends with a barrier.
template <int NT, class Need, class Full>
__device__ __forceinline__ void build_masks(uint32_t* need_s, uint32_t* full_s, int n_tiles,
                                            int tid, Need need, Full full) {
  static_assert(NT % 32 == 0, "whole warps: one ballot is one mask word");
  const int warp = tid / 32, lane = tid % 32;
  for (int base = 0; base < n_tiles; base += NT) {
    const int t = base + tid;
    bool nd = false, fl = false;
    if (t < n_tiles) {
      nd = need(t);
      fl = nd && full(t);
    }
    const uint32_t nb = __ballot_sync(0xffffffffu, nd), fb = __ballot_sync(0xffffffffu, fl);
    const int word = base / 32 + warp;
    if (lane == 0 && word < kMaskWords) need_s[word] = nb, full_s[word] = fb;
  }
  __syncthreads();
}

// n 16-byte chunks from global to shared, asynchronously (both 16-byte aligned).
template <int NT>
__device__ __forceinline__ void copy_chunks(void* dst, const void* src, int n, int tid) {
  for (int c = tid; c < n; c += NT)
    cp_async16(static_cast<char*>(dst) + 16 * c, static_cast<const char*>(src) + 16 * c, true);
}

// load_tile (attention_flash_common.cuh) as a rolled loop: its unrolled form keeps every chunk's
// address live across the compute, which the forward at d = 128 cannot afford.
template <int D, int kThreads>
__device__ __forceinline__ void load_tile_rolled(bf16* dst, const bf16* src, int64_t stride,
                                                 int rows, int valid, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
#pragma unroll 1
  for (int c = tid; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, cc = (c % kChunks) * 8;
    const bool ok = r < valid;
    cp_async16(dst + r * (D + 8) + cc, ok ? src + r * stride + cc : src, ok);
  }
}

// ---- forward ----------------------------------------------------------------------------------

// 4 warps × MW = 2 m16 tiles (32 query rows) each: BR = 128. Every K / V fragment read from shared
// memory feeds two mma (one per m tile), which halves the shared-memory traffic per flop against
// v1's 16 rows per warp; Q fragments are re-read from shared memory per k step (keeping them in
// registers as v1 does would need 64 more).
constexpr int kFwdWarps = 4, kFwdMW = 2, kFwdBR = 16 * kFwdMW * kFwdWarps, kFwdBC = 64;

struct FwdArgs {
  Shape sh;
  const bf16 *q, *k, *v;
  const int64_t* q_pos;
  const int64_t *kpos_pad, *kt_min, *kt_max;  // [n_kt·BC], [n_kt], [n_kt]
  bf16* o;
  float* lse;
  float scale;
  const int64_t* q_doc_pos;  // [nq] position in its document; read only by the DOCS kernel
};

// Q, K and V (two buffers each), key positions, two masks (and the query tile's document starts,
// with documents).
template <int D, bool DOCS>
constexpr int fwd_smem_bytes() {
  return (kFwdBR + 4 * kFwdBC) * (D + 8) * 2 + 2 * kFwdBC * 8 + 2 * kMaskWords * 4 +
         (DOCS ? kFwdBR * 8 : 0);
}

// The shared-memory budget of sm_90 (H100 / H200): at most 227 KB per block, 228 KB per SM, of
// which the runtime reserves 1 KB per resident block.
constexpr int kSmemPerBlock = 227 * 1024, kSmemPerSm = 228 * 1024, kSmemReserved = 1024;
// The forward's static shared memory: qpos_s [BR] and red [4][warps] (with documents; [2] without).
template <bool DOCS>
constexpr int fwd_static_smem_bytes() {
  return kFwdBR * 8 + (DOCS ? 4 : 2) * kFwdWarps * 8;
}
// Two forward blocks per SM (__launch_bounds__ below; the header's schedule) at either head dim:
// d = 128 with documents takes 2·(108544 + 1152 + 1024) = 221440 of 233472 bytes.
static_assert(2 * (fwd_smem_bytes<128, true>() + fwd_static_smem_bytes<true>() + kSmemReserved) <=
                  kSmemPerSm,
              "two forward blocks per SM");
static_assert(2 * (fwd_smem_bytes<128, false>() + fwd_static_smem_bytes<false>() + kSmemReserved) <=
                  kSmemPerSm,
              "two forward blocks per SM");

template <int D, bool DOCS>
__global__ void __launch_bounds__(32 * kFwdWarps, 2) flash_forward_v2_kernel(FwdArgs a) {
  constexpr int BR = kFwdBR, BC = kFwdBC, LD = D + 8, NT = 32 * kFwdWarps, MW = kFwdMW;
  constexpr int SUB = D == 128 ? 32 : 64;  // keys per softmax step (see the loop)
  TSP_DYNAMIC_SHARED(smem);
  bf16* Qs = reinterpret_cast<bf16*>(smem);                         // [BR][LD]
  bf16* Ks = Qs + BR * LD;                                          // [2][BC][LD]
  bf16* Vs = Ks + 2 * BC * LD;                                      // [2][BC][LD]
  int64_t* kpos_s = reinterpret_cast<int64_t*>(Vs + 2 * BC * LD);   // [2][BC]
  uint32_t* need_s = reinterpret_cast<uint32_t*>(kpos_s + 2 * BC);  // [kMaskWords]
  uint32_t* full_s = need_s + kMaskWords;                           // [kMaskWords]
  int64_t* ds_s = reinterpret_cast<int64_t*>(full_s + kMaskWords);  // [BR] (DOCS only)
  __shared__ int64_t red[DOCS ? 4 : 2][kFwdWarps];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const Shape sh = a.sh;
  // x: head, y: query tile from the last (the causal heavy ones first, for every head).
  const int h = blockIdx.x, hk = h / (sh.hq / sh.hkv);
  const int64_t q0 = (gridDim.y - 1 - blockIdx.y) * int64_t{BR};
  const int nq_tile = static_cast<int>(min(int64_t{BR}, sh.nq - q0));
  const int64_t q_stride = int64_t{sh.hq} * D, kv_stride = int64_t{sh.hkv} * D;
  const bf16* kg = a.k + hk * D;
  const bf16* vg = a.v + hk * D;
  const int n_tiles = static_cast<int>((sh.nk + BC - 1) / BC);
  const int row0 = warp * 16 * MW;  // this warp's first query row; m tile mi: row0 + 16·mi

  load_tile<D, NT>(Qs, a.q + q0 * q_stride + h * D, q_stride, BR, nq_tile, tid);
  cp_async_commit();

  // Query positions in shared memory (registers are short at d = 128), with the block's min / max;
  // with documents also where their documents start, s = q_pos - q_doc_pos (rows past the end:
  // kNoKey, which no min takes and which hides every key), with its min / max.
  __shared__ int64_t qpos_s[BR];
  int64_t qmx = kNoQuery, qmn = kNoKey, dmx = kNoQuery, dmn = kNoKey;
  for (int r = tid; r < BR; r += NT) {
    const int64_t p = query_row(a.q_pos + q0, r, r < nq_tile);
    qpos_s[r] = p;
    qmx = max(qmx, p);
    qmn = min(qmn, p);
    if constexpr (DOCS) {
      const int64_t ds = doc_start_row(p, a.q_doc_pos + q0, r, r < nq_tile);
      ds_s[r] = ds;
      dmx = max(dmx, ds);
      dmn = min(dmn, ds);
    }
  }
  {
    const int64_t mx = warp_max(qmx), mn = warp_min(qmn);
    if (lane == 0) red[0][warp] = mx, red[1][warp] = mn;
    if constexpr (DOCS) {
      const int64_t dx = warp_max(dmx), dn = warp_min(dmn);
      if (lane == 0) red[2][warp] = dx, red[3][warp] = dn;
    }
  }
  __syncthreads();
  int64_t q_max = red[0][0], q_min = red[1][0];
  for (int w = 1; w < kFwdWarps; ++w) q_max = max(q_max, red[0][w]), q_min = min(q_min, red[1][w]);
  // ds_min: the lowest key position a query of the block may see; ds_max: the latest document
  // start (kNoKey when the block has rows past the end: never full, as q_min = kNoQuery makes it).
  int64_t ds_max = 0, ds_min = 0;
  if constexpr (DOCS) {
    ds_max = red[2][0], ds_min = red[3][0];
    for (int w = 1; w < kFwdWarps; ++w)
      ds_max = max(ds_max, red[2][w]), ds_min = min(ds_min, red[3][w]);
  }
  // Key tile t is needed if some key may be visible to some query: its range [kt_min, kt_max]
  // meets [ds_min, q_max] (without documents: kt_min <= q_max). A visible pair (i, j) has
  // ds_min <= s_i <= k_pos[j] <= q_pos[i] <= q_max and kt_min <= k_pos[j] <= kt_max, so a tile
  // failing the test has none. (Padded keys make the last tile's kt_max kNoKey, so the document
  // bound never skips that tile: conservative.) Full if every query sees every key: kt_max <=
  // q_min and, with documents, kt_min >= ds_max (padded keys make kt_max = kNoKey: never full).
  build_masks<NT>(
      need_s, full_s, n_tiles, tid,
      [&](int kt) { return tile_needed<DOCS>(q_max, ds_min, a.kt_min[kt], a.kt_max[kt]); },
      [&](int kt) { return tile_full<DOCS>(q_min, ds_max, a.kt_min[kt], a.kt_max[kt]); });

  auto load_kv = [&](int j, int b) {
    const int64_t k0 = int64_t{j} * BC;
    const int valid = static_cast<int>(min(int64_t{BC}, sh.nk - k0));
    load_tile_rolled<D, NT>(Ks + b * BC * LD, kg + k0 * kv_stride, kv_stride, BC, valid, tid);
    load_tile_rolled<D, NT>(Vs + b * BC * LD, vg + k0 * kv_stride, kv_stride, BC, valid, tid);
    copy_chunks<NT>(kpos_s + b * BC, a.kpos_pad + k0, BC * 8 / 16, tid);
  };

  int j = next_set(need_s, 0, n_tiles);
  if (j < n_tiles) load_kv(j, 0);
  cp_async_commit();

  const float sl2 = a.scale * kLog2e;  // scores in the log2 domain
  float O[MW][D / 8][4] = {};
  float m[MW][2], l[MW][2];  // l: this thread's partial row sums
#pragma unroll
  for (int mi = 0; mi < MW; ++mi) m[mi][0] = m[mi][1] = -INFINITY, l[mi][0] = l[mi][1] = 0.f;
  int buf = 0;
  while (j < n_tiles) {
    const bool full = mask_bit(full_s, j);
    const int jn = next_set(need_s, j + 1, n_tiles);
    if (jn < n_tiles) load_kv(jn, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // Q (first pass) and tile j have landed
    __syncthreads();

    // The tile in sub-tiles of SUB keys, each a full online-softmax step: S and P of a sub-tile
    // fit in registers next to O (two m tiles of 64 S values each would spill at d = 128).
#pragma unroll 1
    for (int sub = 0; sub < BC / SUB; ++sub) {
      const bf16* K = Ks + buf * BC * LD + sub * SUB * LD;
      const bf16* V = Vs + buf * BC * LD + sub * SUB * LD;
      const int64_t* kp = kpos_s + buf * BC + sub * SUB;
      float S[MW][SUB / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[MW][4];
#pragma unroll
        for (int mi = 0; mi < MW; ++mi)
          ldsm_x4(qa[mi], a_addr(Qs, LD, row0 + 16 * mi, kk * 16, lane));
#pragma unroll
        for (int np = 0; np < SUB / 16; ++np) {
          uint32_t b[4];
          ldsm_x4(b, bnk_addr(K, LD, np * 16, kk * 16, lane));
#pragma unroll
          for (int mi = 0; mi < MW; ++mi) {
            mma(S[mi][2 * np], qa[mi], b[0], b[1]);
            mma(S[mi][2 * np + 1], qa[mi], b[2], b[3]);
          }
        }
      }
      uint32_t P16[MW][SUB / 16][4];  // P as the A fragments of P·V
#pragma unroll
      for (int mi = 0; mi < MW; ++mi) {
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < SUB / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float s = S[mi][n][e] * sl2;
            const int64_t kpj = kp[n * 8 + 2 * t + (e & 1)];
            const int row = row0 + 16 * mi + g + 8 * (e >> 1);
            if (!full && (kpj > qpos_s[row] || (DOCS && kpj < ds_s[row]))) s = -INFINITY;
            S[mi][n][e] = s;
            mx[e >> 1] = fmaxf(mx[e >> 1], s);
          }
        }
        float base[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
          const float m_new = fmaxf(m[mi][r], mx[r]);
          base[r] = m_new == -INFINITY ? 0.f : m_new;   // a row that has seen nothing stays at 0
          const float alpha = ex2(m[mi][r] - base[r]);  // 0 while m = -inf
          m[mi][r] = m_new;
          l[mi][r] *= alpha;
#pragma unroll
          for (int n = 0; n < D / 8; ++n) O[mi][n][2 * r] *= alpha, O[mi][n][2 * r + 1] *= alpha;
        }
        // P = 2^(S − base), packed to bf16 A fragments at once (half the registers of fp32 S).
#pragma unroll
        for (int n = 0; n < SUB / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float p = ex2(S[mi][n][e] - base[e >> 1]);
            S[mi][n][e] = p;
            l[mi][e >> 1] += p;
          }
        }
#pragma unroll
        for (int kk = 0; kk < SUB / 16; ++kk) c_to_a(P16[mi][kk], S[mi][2 * kk], S[mi][2 * kk + 1]);
      }
#pragma unroll
      for (int kk = 0; kk < SUB / 16; ++kk) {
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t b[4];
          ldsm_x4_t(b, bkn_addr(V, LD, kk * 16, dp * 16, lane));
#pragma unroll
          for (int mi = 0; mi < MW; ++mi) {
            mma(O[mi][2 * dp], P16[mi][kk], b[0], b[1]);
            mma(O[mi][2 * dp + 1], P16[mi][kk], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // buffer `buf` and kpos_s[buf] are free for the next prefetch
    j = jn;
    buf ^= 1;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float lr = l[mi][r];
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      const int row = row0 + 16 * mi + g + 8 * r;
      if (row >= nq_tile) continue;
      const float inv = lr > 0.f ? 1.f / lr : 0.f;  // no visible key: o = 0
      bf16* orow = a.o + (q0 + row) * q_stride + h * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * t) =
            pack(O[mi][n][2 * r] * inv, O[mi][n][2 * r + 1] * inv);
      if (t == 0)
        a.lse[(q0 + row) * sh.hq + h] = lr > 0.f ? (m[mi][r] + __log2f(lr)) * kLn2 : -INFINITY;
    }
  }
}

// ---- backward ---------------------------------------------------------------------------------

constexpr int kBwdWarps = 8, kBwdBC = 16 * kBwdWarps;

// The backward's query tile: 32 rows keeps the dK, dV (d/2 each per thread), P and dS accumulators
// within 255 registers without spilling (64 rows spill at d = 64).
template <int D>
constexpr int bwd_br() {
  return 32;
}

struct BwdArgs {
  Shape sh;
  int64_t nq_pad;  // nq rounded up to the query tile
  const bf16 *q, *k, *v, *o;
  const int64_t* k_pos;
  const int64_t *qpos_pad, *qt_min, *qt_max;  // [nq_pad], [n_qt], [n_qt]
  const float *lse, *dout;
  bf16* do16;           // [nq_pad, hq, D] dout in bf16 (padded rows 0)
  float *lse2, *delta;  // [hq][nq_pad]: lse·log2(e) (+inf: P = 0), dout·o
  float *dq, *dk, *dv;
  float scale;
  // Documents (DOCS kernel only): document starts q_pos - q_doc_pos padded with kNoKey [nq_pad],
  // and their min / max per query tile [n_qt].
  const int64_t *dstart_pad, *dt_min, *dt_max;
};

// One warp per (query row < nq_pad, head): do16, delta, lse2 (see BwdArgs).
template <int D>
__global__ void bwd_prep_kernel(BwdArgs a) {
  const int64_t w = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  const int hq = a.sh.hq;
  if (w >= a.nq_pad * hq) return;
  const int64_t i = w / hq;
  const int h = static_cast<int>(w % hq);
  const int64_t off = w * D;  // (i·hq + h)·D
  float dsum = 0.f;
  if (i < a.sh.nq) {
    for (int c = lane * 4; c < D; c += 128) {
      const float4 d4 = *reinterpret_cast<const float4*>(a.dout + off + c);
      const uint2 o4 = *reinterpret_cast<const uint2*>(a.o + off + c);
      const float2 o01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&o4.x));
      const float2 o23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&o4.y));
      dsum += d4.x * o01.x + d4.y * o01.y + d4.z * o23.x + d4.w * o23.y;
      *reinterpret_cast<uint2*>(a.do16 + off + c) = make_uint2(pack(d4.x, d4.y), pack(d4.z, d4.w));
    }
  } else {
    for (int c = lane * 4; c < D; c += 128)
      *reinterpret_cast<uint2*>(a.do16 + off + c) = make_uint2(0u, 0u);
  }
  for (int o = 16; o > 0; o >>= 1) dsum += __shfl_xor_sync(0xffffffffu, dsum, o);
  if (lane == 0) {
    const float L = i < a.sh.nq ? a.lse[i * hq + h] : -INFINITY;
    a.lse2[h * a.nq_pad + i] = L == -INFINITY ? INFINITY : L * kLog2e;  // saw no key: P = 0
    a.delta[h * a.nq_pad + i] = dsum;
  }
}

// One query tile buffer: Q, dO [BR][D + 8] bf16, qpos, lse2, delta (and document starts, with
// documents).
template <int D, int BR, bool DOCS>
constexpr int bwd_buf_bytes() {
  return 2 * BR * (D + 8) * 2 + BR * (8 + 4 + 4) + (DOCS ? BR * 8 : 0);
}

template <int D, int BR, bool DOCS>
constexpr int bwd_smem_bytes() {
  // K, V; two query tile buffers; dSᵀ; two masks.
  return 2 * kBwdBC * (D + 8) * 2 + 2 * bwd_buf_bytes<D, BR, DOCS>() + kBwdBC * (BR + 8) * 2 +
         2 * kMaskWords * 4;
}

// One backward block fits the per-block limit (dynamic + static red [2][warps]): d = 128 with
// documents takes 118272 + 128 bytes of 232448.
static_assert(bwd_smem_bytes<128, bwd_br<128>(), true>() + 2 * kBwdWarps * 8 <= kSmemPerBlock,
              "backward shared memory");
static_assert(bwd_smem_bytes<64, bwd_br<64>(), true>() + 2 * kBwdWarps * 8 <= kSmemPerBlock,
              "backward shared memory");

template <int D, int BR, bool DOCS>
__global__ void __launch_bounds__(32 * kBwdWarps, 1) flash_backward_v2_kernel(BwdArgs a) {
  constexpr int BC = kBwdBC, LD = D + 8, LDS = BR + 8, NT = 32 * kBwdWarps;
  constexpr int MT = BR / 16;         // dQ: m16 tiles of the query tile
  constexpr int CG = kBwdWarps / MT;  // dQ: column groups (warp = mt + MT·cg)
  constexpr int DC = D / CG;          // dQ: columns per warp
  static_assert(kBwdWarps % MT == 0 && DC % 16 == 0, "tile shape");
  constexpr int kBufBytes = bwd_buf_bytes<D, BR, DOCS>();
  static_assert(kBufBytes % 16 == 0 && (BR * LD * 2) % 16 == 0, "16-byte aligned buffers");
  TSP_DYNAMIC_SHARED(smem);
  bf16* Ks = reinterpret_cast<bf16*>(smem);  // [BC][LD]
  bf16* Vs = Ks + BC * LD;                   // [BC][LD]
  unsigned char* bufs = reinterpret_cast<unsigned char*>(Vs + BC * LD);
  // Buffer b: Q [BR][LD], dO [BR][LD], qpos [BR], lse2 [BR], delta [BR], document starts [BR]
  // (DOCS only; 16-byte aligned: it follows 2·BR·LD·2 + 16·BR bytes).
  auto Qb = [&](int b) { return reinterpret_cast<bf16*>(bufs + b * kBufBytes); };
  auto dOb = [&](int b) { return Qb(b) + BR * LD; };
  auto qposb = [&](int b) { return reinterpret_cast<int64_t*>(dOb(b) + BR * LD); };
  auto lseb = [&](int b) { return reinterpret_cast<float*>(qposb(b) + BR); };
  auto deltab = [&](int b) { return lseb(b) + BR; };
  auto dsb = [&](int b) { return reinterpret_cast<int64_t*>(deltab(b) + BR); };
  bf16* dSs = reinterpret_cast<bf16*>(bufs + 2 * kBufBytes);       // [BC][LDS] dSᵀ [key][query]
  uint32_t* need_s = reinterpret_cast<uint32_t*>(dSs + BC * LDS);  // [kMaskWords]
  uint32_t* full_s = need_s + kMaskWords;                          // [kMaskWords]
  __shared__ int64_t red[2][kBwdWarps];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const Shape sh = a.sh;
  // x: query head, y: key tile (tile 0, seen by the most queries, first).
  const int h = blockIdx.x, hk = h / (sh.hq / sh.hkv);
  const int64_t k0 = blockIdx.y * int64_t{BC};
  const int nk_tile = static_cast<int>(min(int64_t{BC}, sh.nk - k0));
  const int64_t q_stride = int64_t{sh.hq} * D, kv_stride = int64_t{sh.hkv} * D;
  const int n_qt = static_cast<int>(a.nq_pad / BR);

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
  // Query tile t is needed if some query may see some key: the keys' range [k_min, k_max] meets
  // [dt_min, qt_max] (without documents: qt_max >= k_min). A visible pair (i, j) has k_min <=
  // k_pos[j] <= q_pos[i] <= qt_max and dt_min <= s_i <= k_pos[j] <= k_max, so a tile failing the
  // test has none (the forward's test, mirrored; padded queries carry s = kNoKey, which no dt_min
  // takes). Full if every query sees every key: qt_min >= k_max and, with documents, dt_max <=
  // k_min (padded queries make qt_min = kNoQuery, padded keys k_max = kNoKey: never full).
  // (dt_min, dt_max exist only with documents; without, tile_needed / tile_full ignore them.)
  build_masks<NT>(
      need_s, full_s, n_qt, tid,
      [&](int qt) {
        return tile_needed<DOCS>(a.qt_max[qt], DOCS ? a.dt_min[qt] : 0, k_min, k_max);
      },
      [&](int qt) { return tile_full<DOCS>(a.qt_min[qt], DOCS ? a.dt_max[qt] : 0, k_min, k_max); });

  auto load_q = [&](int qt, int b) {
    const int64_t i0 = int64_t{qt} * BR;
    const int valid = static_cast<int>(min(int64_t{BR}, sh.nq - i0));
    load_tile<D, NT>(Qb(b), a.q + i0 * q_stride + h * D, q_stride, BR, valid, tid);
    load_tile<D, NT>(dOb(b), a.do16 + i0 * q_stride + h * D, q_stride, BR, BR, tid);  // padded
    copy_chunks<NT>(qposb(b), a.qpos_pad + i0, BR * 8 / 16, tid);
    copy_chunks<NT>(lseb(b), a.lse2 + h * a.nq_pad + i0, BR * 4 / 16, tid);
    copy_chunks<NT>(deltab(b), a.delta + h * a.nq_pad + i0, BR * 4 / 16, tid);
    if constexpr (DOCS) copy_chunks<NT>(dsb(b), a.dstart_pad + i0, BR * 8 / 16, tid);
  };

  int qt = next_set(need_s, 0, n_qt);
  if (qt == n_qt) {  // no query of this head sees these keys: nothing to add
    cp_async_wait<0>();
    return;
  }
  load_q(qt, 0);
  cp_async_commit();

  const float sl2 = a.scale * kLog2e;
  float dK[D / 8][4] = {}, dV[D / 8][4] = {};
  int buf = 0;
  while (qt < n_qt) {
    const bool full = mask_bit(full_s, qt);
    const int qn = next_set(need_s, qt + 1, n_qt);
    if (qn < n_qt) load_q(qn, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int64_t i0 = int64_t{qt} * BR;
    const int nq_tile = static_cast<int>(min(int64_t{BR}, sh.nq - i0));
    const bf16* Qs = Qb(buf);
    const bf16* dOs = dOb(buf);
    const int64_t* qpos_s = qposb(buf);
    const float* lse_s = lseb(buf);
    const float* D_s = deltab(buf);
    const int64_t* ds_s = dsb(buf);  // DOCS only

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
        for (int n = 0; n < DC / 8; ++n)
          atomicAdd(reinterpret_cast<float2*>(dqr + n * 8),
                    make_float2(a.scale * acc[n][2 * r], a.scale * acc[n][2 * r + 1]));
      }
    }
    __syncthreads();  // buffer `buf` and dSᵀ are free for the next tile
    qt = qn;
    buf ^= 1;
  }
  cp_async_wait<0>();

  // dk, dv of kv head hk sum over its G query heads (one block each): atomics.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    if (row >= nk_tile) continue;
    const int64_t off = (k0 + row) * kv_stride + hk * D + 2 * t;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      atomicAdd(reinterpret_cast<float2*>(a.dk + off + n * 8),
                make_float2(a.scale * dK[n][2 * r], a.scale * dK[n][2 * r + 1]));
      atomicAdd(reinterpret_cast<float2*>(a.dv + off + n * 8),
                make_float2(dV[n][2 * r], dV[n][2 * r + 1]));
    }
  }
}

// ---- launchers --------------------------------------------------------------------------------

// Bump allocation of 256-byte aligned pieces inside one scratch allocation.
struct Carve {
  size_t off = 0;
  template <class T>
  size_t take(int64_t n) {
    const size_t at = off;
    off += (static_cast<size_t>(n) * sizeof(T) + 255) / 256 * 256;
    return at;
  }
};

template <int D, bool DOCS>
cudaError_t forward_d(const Fwd& p, cudaStream_t s) {
  constexpr int BC = kFwdBC, BR = kFwdBR, bytes = fwd_smem_bytes<D, DOCS>();
  const Shape& sh = p.sh;
  const int n_kt = static_cast<int>((sh.nk + BC - 1) / BC);
  FwdArgs a{};
  a.sh = sh;
  a.q = static_cast<const bf16*>(p.q);
  a.k = static_cast<const bf16*>(p.k);
  a.v = static_cast<const bf16*>(p.v);
  a.q_pos = p.q_pos;
  a.o = static_cast<bf16*>(p.o);
  a.lse = p.lse;
  a.scale = p.scale;
  a.q_doc_pos = p.q_doc_pos;
  // n_kt = 0 (no keys): no tile is needed, the kernel writes o = 0, lse = -inf.
  Carve cv;
  const size_t o_pad = cv.take<int64_t>(int64_t{n_kt} * BC), o_min = cv.take<int64_t>(n_kt),
               o_max = cv.take<int64_t>(n_kt);
  const Scratch held(cv.off > 0 ? cv.off : 256, s);  // a tracked Workspace tensor (scratch.h)
  char* scratch = held.data();
  cudaError_t e = cudaSuccess;
  int64_t* kpos_pad = reinterpret_cast<int64_t*>(scratch + o_pad);
  int64_t* kt_min = reinterpret_cast<int64_t*>(scratch + o_min);
  int64_t* kt_max = reinterpret_cast<int64_t*>(scratch + o_max);
  if (n_kt > 0)
    e = tile_bounds(Rows::kKeys, p.k_pos, nullptr, sh.nk, BC, n_kt, kt_min, kt_max, kpos_pad, s);
  a.kpos_pad = kpos_pad, a.kt_min = kt_min, a.kt_max = kt_max;
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(flash_forward_v2_kernel<D, DOCS>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  // Two blocks per SM need the largest shared-memory split of the SM's L1 / shared memory (228 KB
  // on sm_90); the driver's own choice for a launch may be smaller, and then only one block fits.
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(flash_forward_v2_kernel<D, DOCS>,
                             cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared);
  if (e == cudaSuccess) {
    const dim3 grid(static_cast<unsigned>(sh.hq), static_cast<unsigned>((sh.nq + BR - 1) / BR));
    TSP_LAUNCH(grid, 32 * kFwdWarps, bytes, s, flash_forward_v2_kernel<D, DOCS>)(a);
    e = cudaGetLastError();
  }
  return e;  // `held` goes back to the allocator's cache, after the queued kernels (scratch.h)
}

template <int D, bool DOCS>
cudaError_t backward_d(const Bwd& p, cudaStream_t s) {
  constexpr int BR = bwd_br<D>(), BC = kBwdBC, bytes = bwd_smem_bytes<D, BR, DOCS>();
  const Shape& sh = p.sh;
  const int n_qt = static_cast<int>((sh.nq + BR - 1) / BR);
  const int64_t nq_pad = int64_t{n_qt} * BR;
  BwdArgs a{};
  a.sh = sh;
  a.nq_pad = nq_pad;
  a.q = static_cast<const bf16*>(p.q);
  a.k = static_cast<const bf16*>(p.k);
  a.v = static_cast<const bf16*>(p.v);
  a.o = static_cast<const bf16*>(p.o);
  a.k_pos = p.k_pos;
  a.lse = p.lse;
  a.dout = p.dout;
  a.dq = p.dq;
  a.dk = p.dk;
  a.dv = p.dv;
  a.scale = p.scale;
  Carve cv;
  const size_t o_pad = cv.take<int64_t>(nq_pad), o_min = cv.take<int64_t>(n_qt),
               o_max = cv.take<int64_t>(n_qt), o_do = cv.take<bf16>(nq_pad * sh.hq * D),
               o_lse = cv.take<float>(nq_pad * sh.hq), o_delta = cv.take<float>(nq_pad * sh.hq);
  size_t o_dpad = 0, o_dmin = 0, o_dmax = 0;  // document starts: padded copy, tile min / max
  if constexpr (DOCS) {
    o_dpad = cv.take<int64_t>(nq_pad);
    o_dmin = cv.take<int64_t>(n_qt);
    o_dmax = cv.take<int64_t>(n_qt);
  }
  const Scratch held(cv.off, s);  // a tracked Workspace tensor (scratch.h)
  char* scratch = held.data();
  cudaError_t e = cudaSuccess;
  int64_t* qpos_pad = reinterpret_cast<int64_t*>(scratch + o_pad);
  int64_t* qt_min = reinterpret_cast<int64_t*>(scratch + o_min);
  int64_t* qt_max = reinterpret_cast<int64_t*>(scratch + o_max);
  a.qpos_pad = qpos_pad, a.qt_min = qt_min, a.qt_max = qt_max;
  a.do16 = reinterpret_cast<bf16*>(scratch + o_do);
  a.lse2 = reinterpret_cast<float*>(scratch + o_lse);
  a.delta = reinterpret_cast<float*>(scratch + o_delta);
  e = tile_bounds(Rows::kQueries, p.q_pos, nullptr, sh.nq, BR, n_qt, qt_min, qt_max, qpos_pad, s);
  if (DOCS && e == cudaSuccess) {
    // Document starts, padded with kNoKey: no tile minimum takes it, and it hides every key (as
    // the padded query's kNoQuery position already does).
    int64_t* dstart_pad = reinterpret_cast<int64_t*>(scratch + o_dpad);
    int64_t* dt_min = reinterpret_cast<int64_t*>(scratch + o_dmin);
    int64_t* dt_max = reinterpret_cast<int64_t*>(scratch + o_dmax);
    a.dstart_pad = dstart_pad, a.dt_min = dt_min, a.dt_max = dt_max;
    e = tile_bounds(Rows::kDocStarts, p.q_pos, p.q_doc_pos, sh.nq, BR, n_qt, dt_min, dt_max,
                    dstart_pad, s);
  }
  if (e == cudaSuccess) {
    const int64_t warps = nq_pad * sh.hq;
    TSP_LAUNCH(static_cast<unsigned>((warps + 7) / 8), 256, 0, s, bwd_prep_kernel<D>)(a);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(flash_backward_v2_kernel<D, BR, DOCS>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) {
    const dim3 grid(static_cast<unsigned>(sh.hq), static_cast<unsigned>((sh.nk + BC - 1) / BC));
    TSP_LAUNCH(grid, 32 * kBwdWarps, bytes, s, flash_backward_v2_kernel<D, BR, DOCS>)(a);
    e = cudaGetLastError();
  }
  return e;  // `held` goes back to the allocator's cache, after the queued kernels (scratch.h)
}

}  // namespace

bool flash_v2_supported(const Shape& sh, bool backward) {
  // A block's tile bitmask holds kMaskWords·32 tiles: the forward's of key tiles, the backward's
  // of query tiles. grid.x is the query heads, grid.y the forward's query tiles or the backward's
  // key tiles; both at most 65535.
  const int64_t max_tiles = int64_t{kMaskWords} * 32;
  if (!flash_supported(sh.d) || sh.hq > 65535) return false;
  if (!backward)
    return (sh.nk + kFwdBC - 1) / kFwdBC <= max_tiles && (sh.nq + kFwdBR - 1) / kFwdBR <= 65535;
  const int64_t br = sh.d == 64 ? bwd_br<64>() : bwd_br<128>();  // the backward's query tile
  return (sh.nq + br - 1) / br <= max_tiles && (sh.nk + kBwdBC - 1) / kBwdBC <= 65535;
}

cudaError_t flash_forward_v2(const Fwd& p, cudaStream_t s) {
  if (!p.bf16 || !flash_v2_supported(p.sh, false)) return cudaErrorInvalidValue;
  if (p.sh.nq == 0) return cudaSuccess;
  if (p.q_doc_pos) return p.sh.d == 64 ? forward_d<64, true>(p, s) : forward_d<128, true>(p, s);
  return p.sh.d == 64 ? forward_d<64, false>(p, s) : forward_d<128, false>(p, s);
}

cudaError_t flash_backward_v2(const Bwd& p, cudaStream_t s) {
  if (!p.bf16 || !flash_v2_supported(p.sh, true)) return cudaErrorInvalidValue;
  if (p.sh.nq == 0 || p.sh.nk == 0) return cudaSuccess;
  if (p.q_doc_pos) return p.sh.d == 64 ? backward_d<64, true>(p, s) : backward_d<128, true>(p, s);
  return p.sh.d == 64 ? backward_d<64, false>(p, s) : backward_d<128, false>(p, s);
}

}  // namespace tsp::cuda::attn
