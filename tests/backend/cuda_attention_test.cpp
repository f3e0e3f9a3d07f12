// CUDA attention (src/backend/cuda/attention.h):
//   1. the reference kernels against a host fp64 implementation written here (F32 and BF16, any
//      d, GQA, positions causal / offset / zigzag / shuffled / a query that sees no key / packed
//      documents);
//   2. the flash kernels (BF16, d 64 and 128; both versions, v1 and v2) against the reference
//      kernels on the same inputs, with and without packed documents (several per call, spanning
//      tiles, boundaries on tile edges, one-token documents, zigzag / shuffled / offset positions,
//      queries that see no key), within bounds derived per element from the extra bf16 roundings
//      of the flash path; and key tiles hidden by the document bound holding NaN, which only
//      skipped tiles leave out of the results;
//   2b. the cuDNN path (TSP_CUDA_FLASH=cudnn: calls whose positions form runs, cut into pieces)
//      against the reference kernels, forward and backward (accumulating onto non-zero
//      gradients), with bounds derived from its bf16 roundings; that covered calls run on cuDNN
//      and the others (documents, q0 < k0, small nq, too many runs) do not and still give the
//      reference's result; the backward of one key chunk from merged statistics; and its run
//      finder (our kernel) against the host;
//   3. the LSE merge against the host.
// Without a CUDA device every test is skipped (GTEST_SKIP "no CUDA device"). The same file also
// builds as emulated_cuda_attention_test: these kernels on the CPU under the CUDA emulation
// (tests/cuda_emulation/README.md; kEmulated below), every test but the cuDNN library's.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_cudnn_pieces.h"
#include "backend/cuda/attention_kernels.h"
#include "backend/cuda/cuda_common.h"
#include "tsp/core/bf16.h"

namespace tsp::cuda {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (tsp::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- device buffers ---------------------------------------------------------------------------

struct Buf {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Buf(size_t n) : bytes(std::max<size_t>(n, 16)) { TSP_CUDA_CHECK(cudaMalloc(&p, bytes)); }
  ~Buf() { cudaFree(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

// A device tensor holding `host` (floats stored as `dt`: F32 or BF16, or I64 values).
struct Dev {
  Buf buf;
  TensorView view;
  Dev(const std::vector<float>& host, Shape shape, DType dt)
      : buf(host.size() * (dt == DType::BF16 ? 2 : 4)) {
    view = TensorView(buf.p, std::move(shape), dt, Device::cuda(0));
    set(host);
  }
  explicit Dev(const std::vector<int64_t>& host) : buf(host.size() * 8) {
    TSP_CUDA_CHECK(cudaMemcpy(buf.p, host.data(), host.size() * 8, cudaMemcpyHostToDevice));
    view = TensorView(buf.p, {static_cast<int64_t>(host.size())}, DType::I64, Device::cuda(0));
  }
  // Overwrites the contents with `host` (as the constructor stores it).
  void set(const std::vector<float>& host) {
    TSP_CHECK(host.size() == static_cast<size_t>(view.numel()), "Dev::set: {} values for {}",
              host.size(), view.numel());
    if (view.dtype() == DType::BF16) {
      std::vector<uint16_t> b(host.size());
      for (size_t i = 0; i < host.size(); ++i) b[i] = bf16::from_float(host[i]);
      TSP_CUDA_CHECK(cudaMemcpy(buf.p, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
    } else {
      TSP_CUDA_CHECK(cudaMemcpy(buf.p, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
    }
  }
  std::vector<float> get() const {
    TSP_CUDA_CHECK(cudaDeviceSynchronize());
    const size_t n = view.numel();
    std::vector<float> out(n);
    if (view.dtype() == DType::BF16) {
      std::vector<uint16_t> b(n);
      TSP_CUDA_CHECK(cudaMemcpy(b.data(), buf.p, n * 2, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < n; ++i) out[i] = bf16::to_float(b[i]);
    } else {
      TSP_CUDA_CHECK(cudaMemcpy(out.data(), buf.p, n * 4, cudaMemcpyDeviceToHost));
    }
    return out;
  }
};

// ---- problems ---------------------------------------------------------------------------------

enum class Pos {
  Causal,
  Offset,
  Zigzag,
  Shuffled,
  Blind,
  Documents,
  // Documents with other positions and lengths (make() describes each):
  DocsLong,
  DocsTileEdge,
  DocsZigzag,
  DocsShuffled,
  DocsOffset,
  // Contiguous runs for the cuDNN path (make() describes each):
  Prefix,
  Past,
  Before,
  // Several runs, the sequence-parallel layouts' (the cuDNN path cuts them into pieces):
  GatheredChunks,
  RoundChunks
};
const char* pos_name(Pos p) {
  switch (p) {
    case Pos::Causal:
      return "causal";
    case Pos::Offset:
      return "offset";
    case Pos::Zigzag:
      return "zigzag";
    case Pos::Shuffled:
      return "shuffled";
    case Pos::Blind:
      return "blind";
    case Pos::Documents:
      return "documents";
    case Pos::DocsLong:
      return "docs-long";
    case Pos::DocsTileEdge:
      return "docs-tile-edge";
    case Pos::DocsZigzag:
      return "docs-zigzag";
    case Pos::DocsShuffled:
      return "docs-shuffled";
    case Pos::DocsOffset:
      return "docs-offset";
    case Pos::Prefix:
      return "prefix";
    case Pos::Past:
      return "past";
    case Pos::Before:
      return "before";
    case Pos::GatheredChunks:
      return "gathered-chunks";
    case Pos::RoundChunks:
      return "round-chunks";
  }
  return "?";
}

struct Case {
  int64_t nq, nk;
  int hq, hkv, d;
  Pos pos;
  std::string str() const {
    std::ostringstream s;
    s << "nq=" << nq << " nk=" << nk << " hq=" << hq << " hkv=" << hkv << " d=" << d
      << " pos=" << pos_name(pos);
    return s.str();
  }
};

struct Problem {
  Case c;
  float scale;
  std::vector<float> q, k, v, dout, dq0, dk0, dv0;  // dq0.. : the gradients' prior contents (+=)
  std::vector<int64_t> q_pos, k_pos;
  std::vector<int64_t> q_doc_pos;  // empty: no documents
};

// Packed documents over every position of the problem: a document begins at the lowest position
// and wherever begins(x) holds; q_doc_pos[i] = q_pos[i] - (the start of the document holding it).
template <class Begins>
void set_documents(Problem& p, Begins begins) {
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  for (const auto* v : {&p.q_pos, &p.k_pos})
    for (int64_t x : *v) lo = std::min(lo, x), hi = std::max(hi, x);
  std::vector<int64_t> start(hi - lo + 1);
  for (int64_t x = lo, s0 = lo; x <= hi; ++x) {
    if (x > lo && begins(x)) s0 = x;
    start[x - lo] = s0;
  }
  p.q_doc_pos.resize(p.q_pos.size());
  for (size_t i = 0; i < p.q_pos.size(); ++i) p.q_doc_pos[i] = p.q_pos[i] - start[p.q_pos[i] - lo];
}

// Random document lengths: 1 with probability 1/4 (one-token documents), else 1 to max_len.
template <class Rng>
std::vector<bool> random_begins(int64_t n_positions, int64_t max_len, Rng& rng) {
  std::vector<bool> b(n_positions, false);
  std::uniform_int_distribution<int64_t> len(1, max_len);
  std::uniform_int_distribution<int> one(0, 3);
  for (int64_t x = 0; x < n_positions; x += one(rng) == 0 ? 1 : len(rng)) b[x] = true;
  return b;
}

// Positions: Causal (queries are the last nq of the keys' range, earlier ones may see nothing),
// Offset (all queries after all keys), Zigzag (two contiguous ranges on each side, like a zigzag
// chunk pair), Shuffled (causal positions in random order), Blind (causal, but query 0 is before
// every key and sees none), Documents (causal, in packed documents of random lengths 1 to 40: each
// query also has its position in its document, q_doc_pos). With documents as well:
//   DocsLong      causal; documents of 1 to 300 positions (spanning tiles), a quarter one-token;
//   DocsTileEdge  causal (use nq = nk: query and key tiles start at the same positions); documents
//                 begin at every multiple of 64 (an edge of the 32- and 64-row tiles, and of
//                 the 128-row tiles at multiples of 128), at multiples of 32
//                 in [256, 384) (edges of 32-query tiles), at 96·m + 33 and at 128·m + 127 (a
//                 one-token document ending on a tile edge), at 200·m + 150 and + 151 (one-token);
//   DocsZigzag    the zigzag layouts' order: keys are four chunks of nk/4 positions stored in the
//                 order 0, 3, 1, 2 (a gather of two ranks' chunk pairs); queries the first nq/2
//                 positions of chunk 0 and of chunk 3 (use nq <= nk/2); documents 1 to 100;
//   DocsShuffled  causal positions in random order, documents 1 to 60;
//   DocsOffset    queries after all keys (as Offset), documents of 1 to 120 over all positions:
//                 queries whose document starts after the last key see none (lse -inf, o = 0).
// Contiguous runs (the cuDNN path's cases; Causal and Offset are runs too):
//   Prefix        a later query chunk against a key prefix that ends before the last query:
//                 k_pos = j, q_pos = nk/2 + i (q0 = nk/2 > k0 = 0; use nq > nk/2 so nk < q0 + nq);
//   Past          keys extending past the last query: k_pos = 5 + j, q_pos = 20 + i (use nk > nq
//                 + 15: the keys from 20 + nq on are seen by no query);
//   Before        queries starting before the keys: k_pos = 50 + j, q_pos = i (q0 < k0: the first
//                 50 queries see no key).
// Zigzag chunks of 4 ranks, c = nk / 8 positions each (rank r holds chunks r and 7 − r):
//   GatheredChunks  rank 1's queries (chunks 1 and 6; use nq = 2c) against every rank's chunks in
//                   rank order (K/V all-gathered: chunks 0, 7, 1, 6, 2, 5, 3, 4);
//   RoundChunks     rank 2's queries (chunks 2 and 5; use nq = nk = 2c, then c = nk / 2) against
//                   rank 1's chunks (1 and 6: a K/V round).
Problem make(const Case& c, bool bf16_inputs, uint32_t seed) {
  Problem p;
  p.c = c;
  p.scale = static_cast<float>(1.0 / std::sqrt(c.d));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  auto fill = [&](std::vector<float>& x, int64_t n, bool round) {
    x.resize(n);
    for (auto& e : x) e = round ? static_cast<float>(bf16(U(rng))) : U(rng);
  };
  fill(p.q, c.nq * c.hq * c.d, bf16_inputs);
  fill(p.k, c.nk * c.hkv * c.d, bf16_inputs);
  fill(p.v, c.nk * c.hkv * c.d, bf16_inputs);
  fill(p.dout, c.nq * c.hq * c.d, false);
  fill(p.dq0, c.nq * c.hq * c.d, false);
  fill(p.dk0, c.nk * c.hkv * c.d, false);
  fill(p.dv0, c.nk * c.hkv * c.d, false);
  p.q_pos.resize(c.nq);
  p.k_pos.resize(c.nk);
  for (int64_t j = 0; j < c.nk; ++j) p.k_pos[j] = j;
  for (int64_t i = 0; i < c.nq; ++i) p.q_pos[i] = c.nk - c.nq + i;
  if (c.pos == Pos::Offset)
    for (int64_t i = 0; i < c.nq; ++i) p.q_pos[i] = c.nk + 7 + i;
  if (c.pos == Pos::Zigzag) {
    for (int64_t j = 0; j < c.nk; ++j) p.k_pos[j] = j < c.nk / 2 ? j : 1000 + j;
    for (int64_t i = 0; i < c.nq; ++i) p.q_pos[i] = i < c.nq / 2 ? 3 * i : 1000 + c.nk / 2 + i;
  }
  if (c.pos == Pos::Shuffled) {
    std::shuffle(p.k_pos.begin(), p.k_pos.end(), rng);
    std::shuffle(p.q_pos.begin(), p.q_pos.end(), rng);
  }
  if (c.pos == Pos::Blind) p.q_pos[0] = -1;
  if (c.pos == Pos::Documents) {
    // doc_start[x] for every position x in [0, nk): documents of 1 to 40 positions.
    std::vector<int64_t> start(std::max<int64_t>(c.nk, 1));
    std::uniform_int_distribution<int64_t> len(1, 40);
    for (int64_t x = 0, s0 = 0, next = len(rng); x < c.nk; ++x) {
      if (x == next) s0 = x, next = x + len(rng);
      start[x] = s0;
    }
    p.q_doc_pos.resize(c.nq);
    for (int64_t i = 0; i < c.nq; ++i) {
      const int64_t x = p.q_pos[i];
      p.q_doc_pos[i] = x < 0 ? 0 : x - start[x];
    }
  }
  if (c.pos == Pos::DocsLong || c.pos == Pos::DocsShuffled) {
    if (c.pos == Pos::DocsShuffled) {
      std::shuffle(p.k_pos.begin(), p.k_pos.end(), rng);
      std::shuffle(p.q_pos.begin(), p.q_pos.end(), rng);
    }
    const std::vector<bool> b = random_begins(c.nk, c.pos == Pos::DocsLong ? 300 : 60, rng);
    set_documents(p, [&](int64_t x) { return b[x]; });
  }
  if (c.pos == Pos::DocsTileEdge)
    set_documents(p, [](int64_t x) {
      return x % 64 == 0 || (x >= 256 && x < 384 && x % 32 == 0) || x % 96 == 33 ||
             x % 128 == 127 || x % 200 == 150 || x % 200 == 151;
    });
  if (c.pos == Pos::DocsZigzag) {
    const int64_t ch = c.nk / 4;
    TSP_CHECK(c.nk % 4 == 0 && c.nq % 2 == 0 && c.nq / 2 <= ch, "DocsZigzag: bad case {}", c.str());
    const int64_t order[4] = {0, 3, 1, 2};
    for (int64_t j = 0; j < c.nk; ++j) p.k_pos[j] = order[j / ch] * ch + j % ch;
    for (int64_t i = 0; i < c.nq; ++i) p.q_pos[i] = i < c.nq / 2 ? i : 3 * ch + (i - c.nq / 2);
    const std::vector<bool> b = random_begins(c.nk, 100, rng);
    set_documents(p, [&](int64_t x) { return b[x]; });
  }
  if (c.pos == Pos::Prefix)
    for (int64_t i = 0; i < c.nq; ++i) p.q_pos[i] = c.nk / 2 + i;
  if (c.pos == Pos::Past) {
    for (int64_t j = 0; j < c.nk; ++j) p.k_pos[j] = 5 + j;
    for (int64_t i = 0; i < c.nq; ++i) p.q_pos[i] = 20 + i;
  }
  if (c.pos == Pos::GatheredChunks) {
    const int64_t ch = c.nk / 8;
    const int order[8] = {0, 7, 1, 6, 2, 5, 3, 4};
    for (int64_t j = 0; j < c.nk; ++j) p.k_pos[j] = order[j / ch] * ch + j % ch;
    for (int64_t i = 0; i < c.nq; ++i) p.q_pos[i] = (i < ch ? 1 : 6) * ch + i % ch;
  }
  if (c.pos == Pos::RoundChunks) {
    const int64_t ch = c.nk / 2;
    for (int64_t j = 0; j < c.nk; ++j) p.k_pos[j] = (j < ch ? 1 : 6) * ch + j % ch;
    for (int64_t i = 0; i < c.nq; ++i) p.q_pos[i] = (i < ch ? 2 : 5) * ch + i % ch;
  }
  if (c.pos == Pos::Before) {
    for (int64_t j = 0; j < c.nk; ++j) p.k_pos[j] = 50 + j;
    for (int64_t i = 0; i < c.nq; ++i) p.q_pos[i] = i;
  }
  if (c.pos == Pos::DocsOffset) {
    for (int64_t i = 0; i < c.nq; ++i) p.q_pos[i] = c.nk + 7 + i;
    const std::vector<bool> b = random_begins(c.nk + 7 + c.nq, 120, rng);
    set_documents(p, [&](int64_t x) { return b[x]; });
  }
  return p;
}

// ---- host fp64 attention (the CPU reference's maths) ------------------------------------------

struct HostOut {
  std::vector<double> o, lse, dq, dk, dv;
  // Per-element error scales of the flash path's bf16 roundings (see FlashBackward).
  std::vector<double> bq, bk, bv;
  // The cuDNN path's extra term: D = rowsum(dO∘O) from the bf16-rounded dout (see
  // CudnnBackwardMatchesReference).
  std::vector<double> cq, ck;
  // Σ of the absolute values of each dk element's terms |scale·dS·q| (each dv element's, Σ P·|dout|,
  // is bv / 2u): a bound on the sum of the parts that several cuDNN pieces add (each rounded).
  std::vector<double> ak;
};

// o_in: the o the backward reads (the device's stored o). Gradients include the prior contents.
HostOut host_attention(const Problem& p, const std::vector<float>* o_in) {
  const Case& c = p.c;
  const int64_t d = c.d, G = c.hq / c.hkv;
  HostOut r;
  r.o.assign(c.nq * c.hq * d, 0.0);
  r.lse.assign(c.nq * c.hq, -kInf);
  r.dq.assign(p.dq0.begin(), p.dq0.end());
  r.dk.assign(p.dk0.begin(), p.dk0.end());
  r.dv.assign(p.dv0.begin(), p.dv0.end());
  r.bq.assign(r.dq.size(), 0.0);
  r.bk.assign(r.dk.size(), 0.0);
  r.bv.assign(r.dv.size(), 0.0);
  r.cq.assign(r.dq.size(), 0.0);
  r.ck.assign(r.dk.size(), 0.0);
  r.ak.assign(r.dk.size(), 0.0);
  // bf16 unit roundoff: 8 significant bits, so rounding to nearest errs by at most half an ulp,
  // 2^-8 relative (2^-9 is half an ulp only just below a power of two).
  const double u = std::ldexp(1.0, -8);
  std::vector<double> s(c.nk);
  for (int64_t i = 0; i < c.nq; ++i) {
    for (int64_t h = 0; h < c.hq; ++h) {
      const float* qi = &p.q[(i * c.hq + h) * d];
      const int64_t hk = h / G;
      double m = -kInf;
      for (int64_t j = 0; j < c.nk; ++j) {
        s[j] = -kInf;
        if (p.k_pos[j] > p.q_pos[i]) continue;
        if (!p.q_doc_pos.empty() && p.k_pos[j] < p.q_pos[i] - p.q_doc_pos[i]) continue;
        const float* kj = &p.k[(j * c.hkv + hk) * d];
        double dot = 0;
        for (int64_t e = 0; e < d; ++e) dot += double(qi[e]) * kj[e];
        s[j] = p.scale * dot;
        m = std::max(m, s[j]);
      }
      if (m == -kInf) continue;  // sees no key: o = 0, lse = -inf, no gradient
      double l = 0;
      for (int64_t j = 0; j < c.nk; ++j)
        if (s[j] != -kInf) l += std::exp(s[j] - m);
      const double lse = m + std::log(l);
      r.lse[i * c.hq + h] = lse;
      double* oi = &r.o[(i * c.hq + h) * d];
      for (int64_t j = 0; j < c.nk; ++j) {
        if (s[j] == -kInf) continue;
        const double P = std::exp(s[j] - lse);
        const float* vj = &p.v[(j * c.hkv + hk) * d];
        for (int64_t e = 0; e < d; ++e) oi[e] += P * vj[e];
      }
      if (!o_in) continue;
      // Backward from the stored o.
      const float* doi = &p.dout[(i * c.hq + h) * d];
      const float* os = &(*o_in)[(i * c.hq + h) * d];
      double D = 0, Dabs = 0;
      for (int64_t e = 0; e < d; ++e) {
        D += double(doi[e]) * os[e];
        Dabs += std::abs(double(doi[e]) * os[e]);
      }
      for (int64_t j = 0; j < c.nk; ++j) {
        if (s[j] == -kInf) continue;
        const float* kj = &p.k[(j * c.hkv + hk) * d];
        const float* vj = &p.v[(j * c.hkv + hk) * d];
        const double P = std::exp(s[j] - lse);
        double dP = 0, dPabs = 0;
        for (int64_t e = 0; e < d; ++e) {
          dP += double(doi[e]) * vj[e];
          dPabs += std::abs(double(doi[e]) * vj[e]);
        }
        const double dS = P * (dP - D);
        // The flash path's dS error: dout rounded to bf16 inside dP (u·Σ|dout·v|), P rounded...
        // not in dS (fp32), dS itself rounded to bf16 for dK and dQ (u·|dS|).
        const double e_dS = P * u * dPabs + u * std::abs(dS);
        const int64_t qo = (i * c.hq + h) * d, ko = (j * c.hkv + hk) * d;
        for (int64_t e = 0; e < d; ++e) {
          r.dv[ko + e] += P * doi[e];
          r.dk[ko + e] += p.scale * dS * qi[e];
          r.ak[ko + e] += std::abs(p.scale * dS * qi[e]);
          r.dq[qo + e] += p.scale * dS * kj[e];
          // dV: P and dout each rounded to bf16 (2u relative per term).
          r.bv[ko + e] += 2 * u * P * std::abs(doi[e]);
          r.bk[ko + e] += p.scale * e_dS * std::abs(qi[e]);
          r.bq[qo + e] += p.scale * e_dS * std::abs(kj[e]);
          // cuDNN's D reads dout rounded to bf16: |ΔD| <= u·Σ|dout·o|, |ΔdS| <= P·|ΔD|.
          r.ck[ko + e] += p.scale * P * u * Dabs * std::abs(qi[e]);
          r.cq[qo + e] += p.scale * P * u * Dabs * std::abs(kj[e]);
        }
      }
    }
  }
  return r;
}

// ---- comparison -------------------------------------------------------------------------------

// Every |got[i] - want[i]| <= tol(i); else a failure naming the worst element (by excess over its
// tolerance), the max abs and rel errors and the count of bad elements.
template <class W, class Tol>
void expect_close(const std::vector<float>& got, const W& want, Tol tol, const std::string& what,
                  const Case& c) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double max_abs = 0, max_rel = 0, worst_excess = -1;
  int64_t worst = -1, bad = 0, first_bad = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i];
    bool ok;
    double err;
    if (std::isinf(w) || std::isinf(g)) {
      ok = g == w;
      err = ok ? 0 : kInf;
    } else {
      err = std::abs(g - w);
      ok = err <= tol(i) && std::isfinite(g);
    }
    if (!std::isnan(err)) max_abs = std::max(max_abs, err);
    if (w != 0 && std::isfinite(err)) max_rel = std::max(max_rel, err / std::abs(w));
    if (!ok) {
      ++bad;
      if (first_bad < 0) first_bad = static_cast<int64_t>(i);
      const double excess = std::isfinite(err) ? err - tol(i) : kInf;
      if (excess > worst_excess || worst < 0)
        worst_excess = excess, worst = static_cast<int64_t>(i);
    }
  }
  if (bad) {
    ADD_FAILURE() << what << " [" << c.str() << "]: " << bad << " of " << got.size()
                  << " elements out of tolerance; max abs err " << max_abs << ", max rel err "
                  << max_rel << "; worst at flat index " << worst << ": got " << got[worst]
                  << ", want " << want[worst] << ", tol " << tol(worst) << "; first bad index "
                  << first_bad;
  }
}

double max_abs(const std::vector<float>& x) {
  double m = 0;
  for (float e : x) m = std::max(m, double(std::abs(e)));
  return m;
}

// Device tensors of a problem, with q/k/v/o in `dt`.
struct DevProblem {
  Dev q, k, v, qp, kp, o, lse, dout, dq, dk, dv;
  std::unique_ptr<Dev> qd;  // q_doc_pos, with documents only
  TensorView doc_view() const { return qd ? qd->view : TensorView(); }
  DevProblem(const Problem& p, DType dt)
      : q(p.q, {p.c.nq, p.c.hq, p.c.d}, dt),
        k(p.k, {p.c.nk, p.c.hkv, p.c.d}, dt),
        v(p.v, {p.c.nk, p.c.hkv, p.c.d}, dt),
        qp(p.q_pos),
        kp(p.k_pos),
        o(std::vector<float>(p.q.size(), std::nanf("")), {p.c.nq, p.c.hq, p.c.d}, dt),
        lse(std::vector<float>(p.c.nq * p.c.hq, std::nanf("")), {p.c.nq, p.c.hq}, DType::F32),
        dout(p.dout, {p.c.nq, p.c.hq, p.c.d}, DType::F32),
        dq(p.dq0, {p.c.nq, p.c.hq, p.c.d}, DType::F32),
        dk(p.dk0, {p.c.nk, p.c.hkv, p.c.d}, DType::F32),
        dv(p.dv0, {p.c.nk, p.c.hkv, p.c.d}, DType::F32) {
    if (!p.q_doc_pos.empty()) qd = std::make_unique<Dev>(p.q_doc_pos);
  }
};

using FwdFn = void (*)(TensorView, TensorView, TensorView, TensorView, TensorView, TensorView,
                       TensorView, TensorView, float, cudaStream_t);
using BwdFn = void (*)(TensorView, TensorView, TensorView, TensorView, TensorView, TensorView,
                       TensorView, TensorView, TensorView, TensorView, TensorView, TensorView,
                       float, cudaStream_t);

void run_fwd(FwdFn f, DevProblem& dp, const Problem& p) {
  f(dp.q.view, dp.k.view, dp.v.view, dp.qp.view, dp.kp.view, dp.doc_view(), dp.o.view, dp.lse.view,
    p.scale, nullptr);
  TSP_CUDA_CHECK(cudaDeviceSynchronize());
}
void run_bwd(BwdFn f, DevProblem& dp, const Problem& p) {
  f(dp.q.view, dp.k.view, dp.v.view, dp.qp.view, dp.kp.view, dp.doc_view(), dp.o.view, dp.lse.view,
    dp.dout.view, dp.dq.view, dp.dk.view, dp.dv.view, p.scale, nullptr);
  TSP_CUDA_CHECK(cudaDeviceSynchronize());
}

// A backward from the same forward on both paths: the reference's bf16 o and its lse into `fast`.
void copy_forward(const DevProblem& ref, DevProblem& fast, const Case& c) {
  TSP_CUDA_CHECK(
      cudaMemcpy(fast.o.buf.p, ref.o.buf.p, c.nq * c.hq * c.d * 2, cudaMemcpyDeviceToDevice));
  TSP_CUDA_CHECK(
      cudaMemcpy(fast.lse.buf.p, ref.lse.buf.p, c.nq * c.hq * 4, cudaMemcpyDeviceToDevice));
}

// Under the CUDA emulation (tests/cuda_emulation/README.md: these kernels run on the CPU, about
// 1 µs per warp-wide instruction, in the CPU-only CI) the case lists keep every kind of case at
// sizes the CPU gets through in seconds; on a GPU they are as written.
#ifdef TSP_CUDA_EMULATION
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

std::vector<Case> small_cases() {
  std::vector<Case> cs;
  // 70 under emulation: still past one 64-row tile and an odd remainder.
  const int64_t ns[] = {1, 5, 64, kEmulated ? 70 : 130};
  const int heads[][2] = {{4, 4}, {8, 2}, {8, 1}};
  const Pos ps[] = {Pos::Causal,   Pos::Offset, Pos::Zigzag,
                    Pos::Shuffled, Pos::Blind,  Pos::Documents};
  int i = 0;
  for (int d : {8, 64, 128})
    for (int64_t nq : ns)
      for (int64_t nk : ns) {
        // A rotating choice of heads and positions keeps the count small but covers each.
        const auto& hh = heads[i % 3];
        cs.push_back({nq, nk, hh[0], hh[1], d, ps[i % 6]});
        ++i;
      }
  cs.push_back({7, 9, 2, 1, 200, Pos::Causal});  // a head dim past 128 (reference only)
  return cs;
}

// ---- 1. reference kernels against the host ------------------------------------------------

// F32. The host is fp64; the device fp32 with fp32 statistics. With inputs in [-1, 1]:
// |s| <= scale·Σ|q k| <= sqrt(d), its fp32 error <= d·2^-24·sqrt(d) <= 2e-5 (d = 128) in the worst
// case; e^{s} turns that into a relative error of the weights, so o (a convex combination of
// |v| <= 1) and lse are within ~4e-5 absolute (+ K·2^-24 from the K-term sums). Bound: 1e-4.
// Gradients are sums of up to nq·G (or nk) such terms of size <= scale·|dS|: 1e-4·(1 + |ref|).
TEST(CudaAttention, ReferenceF32MatchesHost) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = 1;
  for (const Case& c : small_cases()) {
    const Problem p = make(c, false, seed++);
    DevProblem dp(p, DType::F32);
    run_fwd(reference::attention_forward, dp, p);
    const std::vector<float> o = dp.o.get();
    const HostOut h = host_attention(p, &o);
    expect_close(
        o, h.o, [&](size_t i) { return 1e-4; }, "reference f32 o", c);
    expect_close(
        dp.lse.get(), h.lse, [&](size_t i) { return 1e-4 * (1 + std::abs(h.lse[i])); },
        "reference f32 lse", c);
    run_bwd(reference::attention_backward, dp, p);
    expect_close(
        dp.dq.get(), h.dq, [&](size_t i) { return 1e-4 * (1 + std::abs(h.dq[i])); },
        "reference f32 dq", c);
    expect_close(
        dp.dk.get(), h.dk, [&](size_t i) { return 1e-4 * (1 + std::abs(h.dk[i])); },
        "reference f32 dk", c);
    expect_close(
        dp.dv.get(), h.dv, [&](size_t i) { return 1e-4 * (1 + std::abs(h.dv[i])); },
        "reference f32 dv", c);
    if (HasFailure()) return;
  }
}

// BF16 inputs (the host sees the same rounded values): o is the fp32 result rounded once to bf16,
// |err| <= 2^-8·|o| (half an ulp: bf16 keeps 8 significant bits) + the fp32 bound above. The backward reads the stored bf16 o,
// as the host does, so the gradients keep the fp32 bound.
TEST(CudaAttention, ReferenceBf16MatchesHost) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = 100;
  for (const Case& c : small_cases()) {
    const Problem p = make(c, true, seed++);
    DevProblem dp(p, DType::BF16);
    run_fwd(reference::attention_forward, dp, p);
    const std::vector<float> o = dp.o.get();
    const HostOut h = host_attention(p, &o);
    expect_close(
        o, h.o, [&](size_t i) { return std::ldexp(std::abs(h.o[i]), -8) + 1e-4; },
        "reference bf16 o", c);
    expect_close(
        dp.lse.get(), h.lse, [&](size_t i) { return 1e-4 * (1 + std::abs(h.lse[i])); },
        "reference bf16 lse", c);
    run_bwd(reference::attention_backward, dp, p);
    expect_close(
        dp.dq.get(), h.dq, [&](size_t i) { return 1e-4 * (1 + std::abs(h.dq[i])); },
        "reference bf16 dq", c);
    expect_close(
        dp.dk.get(), h.dk, [&](size_t i) { return 1e-4 * (1 + std::abs(h.dk[i])); },
        "reference bf16 dk", c);
    expect_close(
        dp.dv.get(), h.dv, [&](size_t i) { return 1e-4 * (1 + std::abs(h.dv[i])); },
        "reference bf16 dv", c);
    if (HasFailure()) return;
  }
}

// Empty sides: nq = 0 does nothing; nk = 0 gives o = 0 and lse = -inf, and a backward that adds
// nothing.
TEST(CudaAttention, NoKeys) {
  SKIP_WITHOUT_GPU();
  for (DType dt : {DType::F32, DType::BF16}) {
    const Case c{3, 0, 4, 2, 64, Pos::Causal};
    const Problem p = make(c, true, 7);
    DevProblem dp(p, dt);
    run_fwd(attention_forward, dp, p);
    expect_close(
        dp.o.get(), std::vector<double>(p.q.size(), 0.0), [](size_t) { return 0.0; },
        "o with no keys", c);
    expect_close(
        dp.lse.get(), std::vector<double>(c.nq * c.hq, -kInf), [](size_t) { return 0.0; },
        "lse with no keys", c);
    run_bwd(attention_backward, dp, p);
    expect_close(
        dp.dq.get(), p.dq0, [](size_t) { return 0.0; }, "dq with no keys", c);
  }
}

// ---- 2. flash kernels against the reference kernels --------------------------------------------

// Emulation-sized flash cases (kEmulated): the kinds of flash_cases() below at fewer heads and
// rows. The tile bitmasks still span words: 33 key tiles of 64 (nk = 2080, few queries: v2's
// forward) and 35 query tiles of 32 (nq = 1100 against 16 keys before them: v2's backward).
std::vector<Case> emulated_flash_cases() {
  std::vector<Case> cs;
  for (int d : {64, 128}) {
    cs.push_back({1, 1, 4, 4, d, Pos::Causal});
    cs.push_back({63, 63, 4, 1, d, Pos::Causal});
    cs.push_back({65, 65, 4, 1, d, Pos::Blind});
    cs.push_back({130, 130, 2, 2, d, Pos::Zigzag});
    cs.push_back({100, 200, 2, 1, d, Pos::Shuffled});
    cs.push_back({64, 200, 2, 1, d, Pos::Offset});
    cs.push_back({128, 128, 2, 1, d, Pos::Causal});  // multiples of every tile
    cs.push_back({20, 2080, 1, 1, d, Pos::Causal});
    cs.push_back({1100, 16, 1, 1, d, Pos::Offset});
    cs.push_back({160, 160, 2, 1, d, Pos::Documents});
    cs.push_back({300, 300, 1, 1, d, Pos::DocsLong});
    cs.push_back({400, 400, 1, 1, d, Pos::DocsTileEdge});
    cs.push_back({128, 256, 2, 1, d, Pos::DocsZigzag});
    cs.push_back({100, 200, 2, 1, d, Pos::DocsShuffled});
    cs.push_back({100, 200, 2, 2, d, Pos::DocsOffset});
  }
  return cs;
}

std::vector<Case> flash_cases() {
  if (kEmulated) return emulated_flash_cases();
  std::vector<Case> cs;
  for (int d : {64, 128}) {
    cs.push_back({1, 1, 4, 4, d, Pos::Causal});
    cs.push_back({63, 63, 8, 2, d, Pos::Causal});
    cs.push_back({65, 65, 8, 1, d, Pos::Blind});
    cs.push_back({200, 200, 4, 4, d, Pos::Zigzag});
    cs.push_back({130, 300, 8, 2, d, Pos::Shuffled});
    cs.push_back({64, 200, 4, 2, d, Pos::Offset});
    cs.push_back({256, 256, 4, 1, d, Pos::Causal});  // multiples of every tile
    cs.push_back({1000, 1000, 4, 2, d, Pos::Causal});
    // Over 32 key tiles of 64 / query tiles of 32: v2's tile bitmasks span several words.
    cs.push_back({600, 2200, 2, 1, d, Pos::Causal});
    cs.push_back({1100, 1100, 2, 2, d, Pos::Zigzag});
    cs.push_back({300, 300, 4, 2, d, Pos::Documents});
  }
  // Packed documents (make() describes the layouts), GQA groups of 4, 4 and 2, 1 and 2.
  for (int d : {64, 128}) {
    cs.push_back({700, 700, 8, 2, d, Pos::DocsLong});
    cs.push_back({512, 512, 4, 1, d, Pos::DocsTileEdge});
    cs.push_back({256, 512, 4, 2, d, Pos::DocsZigzag});
    cs.push_back({130, 300, 8, 2, d, Pos::DocsShuffled});
    cs.push_back({200, 300, 4, 4, d, Pos::DocsOffset});
  }
  return cs;
}

// The flash tests, once per kernel version (v1, v2; attention.h): CudaFlash.<test>/v1 and /v2,
// each selecting its version for the test and restoring the one in force after it. Separate
// tests, so a GPU run can take each version in a process of its own (scripts/gpu_check.sh does:
// a kernel fault poisons the CUDA context of the process, and the other version's results must
// survive it).
class CudaFlash : public ::testing::TestWithParam<FlashVersion> {
 protected:
  void SetUp() override {
    before_ = flash_version();
    set_flash_version(GetParam());
  }
  void TearDown() override { set_flash_version(before_); }

 private:
  FlashVersion before_ = FlashVersion::V1;
};
INSTANTIATE_TEST_SUITE_P(, CudaFlash, ::testing::Values(FlashVersion::V1, FlashVersion::V2),
                         [](const ::testing::TestParamInfo<FlashVersion>& i) {
                           return std::string(flash_version_name(i.param));
                         });

// The version switch itself (host only: runs without a GPU).
TEST(CudaAttention, FlashVersionSelection) {
  const FlashVersion before = flash_version();
  set_flash_version(FlashVersion::V1);
  EXPECT_EQ(flash_version(), FlashVersion::V1);
  set_flash_version(FlashVersion::V2);
  EXPECT_EQ(flash_version(), FlashVersion::V2);
  set_flash_version(FlashVersion::Cudnn);
  EXPECT_EQ(flash_version(), FlashVersion::Cudnn);
  EXPECT_STREQ(flash_version_name(FlashVersion::V1), "v1");
  EXPECT_STREQ(flash_version_name(FlashVersion::V2), "v2");
  EXPECT_STREQ(flash_version_name(FlashVersion::Cudnn), "cudnn");
  set_flash_version(before);
}

// Forward bound (both paths read the same bf16 q, k, v): the flash path rounds P to bf16 before
// P·V, an error <= 2^-9·Σ_j P_j|v_j| <= 2^-9·max|v|; both round o once (<= 2^-9·|o| each). Scores
// and statistics are fp32 in both (ex2.approx: ~2^-22 relative). So
//   |o_flash − o_ref| <= 2^-8·|o_ref| + 2^-9·max|v| + 1e-4  (1e-4: the fp32 terms, as above);
//   |lse_flash − lse_ref| <= 1e-4·(1 + |lse|).
// `vmax` is max|v| over the keys the queries can see.
void expect_forward_close(const std::vector<float>& o, const std::vector<float>& lse,
                          const std::vector<float>& o_ref, const std::vector<float>& lse_ref,
                          double vmax, const std::string& what, const Case& c) {
  expect_close(
      o, o_ref,
      [&](size_t i) { return std::ldexp(std::abs(o_ref[i]), -8) + std::ldexp(vmax, -9) + 1e-4; },
      what + " o vs reference", c);
  expect_close(
      lse, lse_ref, [&](size_t i) { return 1e-4 * (1 + std::abs(lse_ref[i])); },
      what + " lse vs reference", c);
}

// The reference kernels' results on one problem (BF16), computed once per process: the flash
// tests run once per version (/v1, /v2) on the same problems (the forward and backward tests on
// the same ones too: kFlashSeed), and what the reference returns does not depend on the version.
// (Under the emulation, where every kernel is slow, that is time saved.) Keyed by the
// problem's seed and case.
struct ReferenceRun {
  std::vector<float> o, lse;      // forward
  std::vector<float> dq, dk, dv;  // backward from that o and lse (once asked for)
};
const ReferenceRun& reference_run(const Problem& p, uint32_t seed, bool with_backward) {
  static std::map<std::string, ReferenceRun> runs;
  auto [it, fresh] = runs.try_emplace(std::to_string(seed) + " " + p.c.str());
  ReferenceRun& r = it->second;
  if (fresh) {
    DevProblem ref(p, DType::BF16);
    run_fwd(reference::attention_forward, ref, p);
    r.o = ref.o.get();
    r.lse = ref.lse.get();
  }
  if (with_backward && r.dq.empty()) {
    DevProblem ref(p, DType::BF16);
    ref.o.set(r.o);  // bf16 values read back from bf16: the forward's o exactly
    ref.lse.set(r.lse);
    run_bwd(reference::attention_backward, ref, p);
    r.dq = ref.dq.get();
    r.dk = ref.dk.get();
    r.dv = ref.dv.get();
  }
  return r;
}
constexpr uint32_t kFlashSeed = 200;  // the first flash case's; one more per case

TEST_P(CudaFlash, ForwardMatchesReference) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = kFlashSeed;
  for (const Case& c : flash_cases()) {
    const Problem p = make(c, true, seed);
    ASSERT_TRUE(attention_flash_supported(DType::BF16, c.d));
    const ReferenceRun& ref = reference_run(p, seed++, false);
    DevProblem fast(p, DType::BF16);
    run_fwd(attention_forward, fast, p);
    expect_forward_close(fast.o.get(), fast.lse.get(), ref.o, ref.lse, max_abs(p.v), "flash", c);
    if (HasFailure()) return;
  }
}

// Backward bound, per element, computed by the host (HostOut::bq, bk, bv) from the flash path's
// roundings with u = 2^-8 (bf16's unit roundoff): dout -> bf16 (u) inside dP = dout·v and dV = Pᵀ·dout; P -> bf16 (u)
// in dV; dS -> bf16 (u) in dK and dQ. Thus e_dS = P·u·Σ|dout·v| + u·|dS| and
//   |ΔdV| <= Σ 2u·P·|dout|,  |ΔdK| <= scale·Σ e_dS·|q|,  |ΔdQ| <= scale·Σ e_dS·|k|.
// Tolerance: that bound + 1e-4·(1 + |ref|) (second-order terms and the fp32 differences of the
// two paths, as in the reference tests). Both paths start from the reference's
// o and lse.
// The flash path's dq, dk, dv against the reference kernels' within the bounds derived above
// (HostOut::bq, bk, bv + 1e-4·(1 + |ref|)); `where` ends the messages.
void expect_flash_backward_close(DevProblem& fast, const std::vector<float>& dq,
                                 const std::vector<float>& dk, const std::vector<float>& dv,
                                 const HostOut& h, const std::string& where, const Case& c) {
  expect_close(
      fast.dq.get(), dq, [&](size_t i) { return h.bq[i] + 1e-4 * (1 + std::abs(dq[i])); },
      "flash dq vs reference" + where, c);
  expect_close(
      fast.dk.get(), dk, [&](size_t i) { return h.bk[i] + 1e-4 * (1 + std::abs(dk[i])); },
      "flash dk vs reference" + where, c);
  expect_close(
      fast.dv.get(), dv, [&](size_t i) { return h.bv[i] + 1e-4 * (1 + std::abs(dv[i])); },
      "flash dv vs reference" + where, c);
}

TEST_P(CudaFlash, BackwardMatchesReference) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = kFlashSeed;
  for (const Case& c : flash_cases()) {
    const Problem p = make(c, true, seed);
    const ReferenceRun& ref = reference_run(p, seed++, true);
    DevProblem fast(p, DType::BF16);
    fast.o.set(ref.o);  // the backward starts from the reference's forward
    fast.lse.set(ref.lse);
    run_bwd(attention_backward, fast, p);
    const HostOut h = host_attention(p, &ref.o);
    expect_flash_backward_close(fast, ref.dq, ref.dk, ref.dv, h, "", c);
    // And the reference itself against the host (fp32 bound), so the chain reaches fp64.
    expect_close(
        ref.dk, h.dk, [&](size_t i) { return 1e-4 * (1 + std::abs(h.dk[i])); },
        "reference dk vs host", c);
    if (HasFailure()) return;
  }
}

// Key tiles that the document bound hides from every query are skipped, not computed and masked:
// queries at [128, 256) in documents that all start at or after 128 (starts 128, 160, 161 (a
// one-token document), 192, 224, 250: on tile edges of 32, 64 and 128 rows), keys at [0, 256)
// whose first 128 (the first two key tiles of 64, the first of 128) hold NaN in k and v. A tile
// that was computed and masked would still multiply 0·NaN into o and the gradients. So: o, lse,
// dq, dk, dv within the bounds above of the reference (which never reads a key it does not see),
// every value finite (expect_close rejects NaN), dk and dv of the NaN keys untouched (bit for
// bit their prior contents), and o and lse equal, bit for bit, to the flash forward over the
// keys [128, 256) alone (the same tiles in the same order). GQA 8 on 2, d = 64 and 128.
TEST_P(CudaFlash, SkipsKeyTilesHiddenByDocuments) {
  SKIP_WITHOUT_GPU();
  for (int d : {64, 128}) {
    const Case c{128, 256, 8, 2, d, Pos::Causal};  // q_pos = 128 + i, k_pos = j
    Problem p = make(c, true, 400 + d);
    set_documents(p, [](int64_t x) {
      return x == 128 || x == 160 || x == 161 || x == 192 || x == 224 || x == 250;
    });
    const int64_t hidden = 128 * c.hkv * c.d;  // elements of the keys [0, 128) in k, v, dk, dv
    for (int64_t e = 0; e < hidden; ++e) p.k[e] = p.v[e] = std::numeric_limits<float>::quiet_NaN();
    Problem alone = p;  // the keys [128, 256) only
    alone.c.nk = 128;
    alone.k.erase(alone.k.begin(), alone.k.begin() + hidden);
    alone.v.erase(alone.v.begin(), alone.v.begin() + hidden);
    alone.dk0.erase(alone.dk0.begin(), alone.dk0.begin() + hidden);
    alone.dv0.erase(alone.dv0.begin(), alone.dv0.begin() + hidden);
    alone.k_pos.erase(alone.k_pos.begin(), alone.k_pos.begin() + 128);
    SCOPED_TRACE("d=" + std::to_string(d));
    DevProblem ref(p, DType::BF16), fast(p, DType::BF16), fast_alone(alone, DType::BF16);
    run_fwd(reference::attention_forward, ref, p);
    run_fwd(attention_forward, fast, p);
    run_fwd(attention_forward, fast_alone, alone);
    const std::vector<float> o_ref = ref.o.get(), lse_ref = ref.lse.get();
    const std::vector<float> o = fast.o.get(), lse = fast.lse.get();
    // max|v| over the keys the queries see (the NaN keys are not among them).
    const double vmax = max_abs(alone.v);
    expect_forward_close(o, lse, o_ref, lse_ref, vmax, "flash (NaN keys hidden by documents)", c);
    expect_close(
        o, fast_alone.o.get(), [](size_t) { return 0.0; }, "flash o vs the visible keys alone", c);
    expect_close(
        lse, fast_alone.lse.get(), [](size_t) { return 0.0; },
        "flash lse vs the visible keys alone", c);

    // Backward from the reference's o and lse on both paths (as CudaFlash.BackwardMatchesReference).
    copy_forward(ref, fast, c);
    run_bwd(reference::attention_backward, ref, p);
    run_bwd(attention_backward, fast, p);
    const HostOut h = host_attention(p, &o_ref);
    const std::vector<float> dq = ref.dq.get(), dk = ref.dk.get(), dv = ref.dv.get();
    const std::vector<float> dk_fast = fast.dk.get(), dv_fast = fast.dv.get();
    expect_close(
        fast.dq.get(), dq, [&](size_t i) { return h.bq[i] + 1e-4 * (1 + std::abs(dq[i])); },
        "flash dq vs reference, NaN keys hidden by documents", c);
    expect_close(
        dk_fast, dk, [&](size_t i) { return h.bk[i] + 1e-4 * (1 + std::abs(dk[i])); },
        "flash dk vs reference, NaN keys hidden by documents", c);
    expect_close(
        dv_fast, dv, [&](size_t i) { return h.bv[i] + 1e-4 * (1 + std::abs(dv[i])); },
        "flash dv vs reference, NaN keys hidden by documents", c);
    for (int64_t e = 0; e < hidden; ++e) {
      ASSERT_EQ(dk_fast[e], p.dk0[e]) << "dk of a hidden key changed, element " << e;
      ASSERT_EQ(dv_fast[e], p.dv0[e]) << "dv of a hidden key changed, element " << e;
    }
    if (HasFailure()) return;
  }
}

// v2's per-block tile bitmasks hold 256 words of 32 tiles: the forward's, 8192 key tiles of 64;
// the backward's, 8192 query tiles of 32. Shapes up to there run on v2, one row more falls back
// to v1 (attention.cpp) in that direction only; so do head dims other than 64 and 128. Host only:
// runs without a GPU.
TEST(CudaAttention, FlashV2TileLimit) {
  for (int d : {64, 128}) {
    attn::Shape sh;
    sh.hq = 4, sh.hkv = 2, sh.d = d;
    sh.nq = 8192 * 32, sh.nk = 8192 * 64;
    EXPECT_TRUE(attn::flash_v2_supported(sh, false)) << "d=" << d;
    EXPECT_TRUE(attn::flash_v2_supported(sh, true)) << "d=" << d;
    sh.nk += 1;  // 8193 key tiles: the forward's limit, not the backward's
    EXPECT_FALSE(attn::flash_v2_supported(sh, false)) << "d=" << d;
    EXPECT_TRUE(attn::flash_v2_supported(sh, true)) << "d=" << d;
    sh.nk -= 1, sh.nq += 1;  // 8193 query tiles: the backward's limit, not the forward's
    EXPECT_TRUE(attn::flash_v2_supported(sh, false)) << "d=" << d;
    EXPECT_FALSE(attn::flash_v2_supported(sh, true)) << "d=" << d;
  }
  attn::Shape sh;
  sh.nq = sh.nk = 100, sh.hq = sh.hkv = 1, sh.d = 96;
  EXPECT_FALSE(attn::flash_v2_supported(sh, false));
  EXPECT_FALSE(attn::flash_v2_supported(sh, true));
}

// At the bitmask limit (FlashV2TileLimit): every word of the masks in use.
//   Forward: 8192 key tiles of 64, the last one padded (nk = 8192·64 − 5), 64 causal queries at
//   the end that see every key: every tile needed, the last word's last bit included.
//   Backward: 8192 query tiles of 32, the last one padded (nq = 8192·32 − 3), 128 keys at
//   positions [0, 128) that only the last 128 queries see (Causal: q_pos = nk − nq + i < 0
//   before them): a key block's next needed tile lies 255 words past the first.
// Bounds as in ForwardMatchesReference and BackwardMatchesReference.
TEST_P(CudaFlash, AtTheTileBitmaskLimit) {
  SKIP_WITHOUT_GPU();
  {
    const Case c{64, 8192 * 64 - 5, 1, 1, 64, Pos::Causal};
    const Problem p = make(c, true, 500);
    DevProblem ref(p, DType::BF16), fast(p, DType::BF16);
    run_fwd(reference::attention_forward, ref, p);
    run_fwd(attention_forward, fast, p);
    expect_forward_close(fast.o.get(), fast.lse.get(), ref.o.get(), ref.lse.get(), max_abs(p.v),
                         "flash at 8192 key tiles", c);
    if (HasFailure()) return;
  }
  const Case c{8192 * 32 - 3, 128, 1, 1, 64, Pos::Causal};
  const Problem p = make(c, true, 501);
  DevProblem ref(p, DType::BF16), fast(p, DType::BF16);
  run_fwd(reference::attention_forward, ref, p);
  run_fwd(attention_forward, fast, p);
  const std::vector<float> o = ref.o.get();
  expect_forward_close(fast.o.get(), fast.lse.get(), o, ref.lse.get(), max_abs(p.v),
                       "flash at 8192 query tiles", c);
  copy_forward(ref, fast, c);
  run_bwd(reference::attention_backward, ref, p);
  run_bwd(attention_backward, fast, p);
  expect_flash_backward_close(fast, ref.dq.get(), ref.dk.get(), ref.dv.get(), host_attention(p, &o),
                              " at 8192 query tiles", c);
}

// ---- 2b. the cuDNN path against the reference kernels --------------------------------------

// Runs body with the cuDNN path selected (set_flash_version(Cudnn)), then restores the version in
// force. Skipped in a build without the path; a build WITH it fails when libcudnn.so.9 does not
// load (the GPU check must run these tests, not skip them).
#define SKIP_WITHOUT_CUDNN()                                                                     \
  SKIP_WITHOUT_GPU();                                                                            \
  if (!cudnn_attention_built()) GTEST_SKIP() << "this build has no cuDNN path (TSP_WITH_CUDNN)"; \
  ASSERT_EQ(cudnn_attention_unavailable(), "")

template <class F>
void with_cudnn(F body) {
  const FlashVersion before = flash_version();
  set_flash_version(FlashVersion::Cudnn);
  SCOPED_TRACE("flash version cudnn");
  body();
  set_flash_version(before);
}

// Cases the path covers (contiguous runs from q0 >= k0, nq >= 64): from 0 (nq = nk), a later
// query chunk after a key prefix (q0 > k0, nk > nq, nk < q0 + nq), keys past the last query (nk'
// < nk), queries after every key (no mask); GQA 32/8, 8/2 and MHA; d 64 and 128.
std::vector<Case> cudnn_covered_cases() {
  std::vector<Case> cs;
  for (int d : {64, 128}) {
    cs.push_back({64, 64, 4, 4, d, Pos::Causal});      // from 0, MHA, the smallest nq covered
    cs.push_back({256, 256, 32, 8, d, Pos::Causal});   // from 0, GQA 32/8
    cs.push_back({200, 300, 8, 2, d, Pos::Prefix});    // q0 = 150, nk = 300 < q0 + nq = 350
    cs.push_back({130, 700, 32, 8, d, Pos::Causal});   // q0 = 570 = nk - nq: the band's bound
    cs.push_back({100, 300, 4, 4, d, Pos::Past});      // nk' = 115 of 300
    cs.push_back({96, 200, 8, 2, d, Pos::Offset});     // after every key: no mask
    cs.push_back({1000, 1000, 4, 2, d, Pos::Causal});  // several tiles of every size
    // Several runs: 2 band pieces against K/V gathered in rank order (c = 64), and 2 unmasked
    // pieces against a round's chunks (c = 80, keys already in position order).
    cs.push_back({128, 512, 32, 8, d, Pos::GatheredChunks});
    cs.push_back({160, 160, 8, 2, d, Pos::RoundChunks});
  }
  return cs;
}

// The cuDNN calls a covered case takes: the pieces of its runs (attention_cudnn_pieces.h, checked
// against brute force on the CPU by attention_cudnn_pieces_test).
int64_t cudnn_pieces(const Problem& p) {
  namespace cudnn = attn::cudnn;
  const cudnn::PiecePlan plan = cudnn::plan_pieces(cudnn::runs_of(p.q_pos.data(), p.c.nq),
                                                   cudnn::runs_of(p.k_pos.data(), p.c.nk));
  return plan.covered ? static_cast<int64_t>(plan.pieces.size()) : 0;
}

// Cases it must NOT take (they give the reference's result through the flash path): more runs
// than the run finder holds (shuffled; zigzag, whose first queries are runs of one), a query
// before every key (blind, before), documents, and nq below 64.
std::vector<Case> cudnn_uncovered_cases() {
  std::vector<Case> cs;
  for (int d : {64, 128}) {
    cs.push_back({130, 300, 8, 2, d, Pos::Shuffled});
    cs.push_back({200, 200, 4, 4, d, Pos::Zigzag});
    cs.push_back({65, 65, 8, 1, d, Pos::Blind});
    cs.push_back({300, 300, 4, 2, d, Pos::Documents});
    cs.push_back({128, 128, 8, 2, d, Pos::Before});
    cs.push_back({63, 63, 8, 2, d, Pos::Causal});
  }
  return cs;
}

// The case lists against the positions' cut (host only: runs without a GPU). Every covered case
// has pieces; the uncovered ones have none, except those the shape rules refuse before the
// positions are looked at (documents, nq below 64).
TEST(CudaAttention, CudnnCaseListsMatchTheirPieces) {
  uint32_t seed = 0;
  for (const Case& c : cudnn_covered_cases())
    EXPECT_GT(cudnn_pieces(make(c, true, seed++)), 0) << c.str();
  for (const Case& c : cudnn_uncovered_cases()) {
    if (c.pos != Pos::Documents && c.nq >= attn::cudnn::kMinQueries) {
      EXPECT_EQ(cudnn_pieces(make(c, true, seed++)), 0) << c.str();
    }
  }
  EXPECT_EQ(cudnn_pieces(make({128, 512, 32, 8, 128, Pos::GatheredChunks}, true, 1)), 2);
  EXPECT_EQ(cudnn_pieces(make({160, 160, 8, 2, 128, Pos::RoundChunks}, true, 1)), 2);
}

// The cuDNN path's run finder (cudnn_find_runs, attention_cudnn_kernels.cu: our kernel, no cuDNN
// needed) against the host's runs_of, per side: the count of runs, and with at most kMaxRuns of
// them the runs rebuilt from the starts the device found (in any order) exactly. Positions of
// every problem kind above, 300 random run patterns (1 to 100 runs, up to 3000 rows: several
// blocks, warps whose lanes hold starts of several runs), positions around INT64_MAX (a run may
// end there; INT64_MIN after it starts a new one), and one side past the grid's 4096 blocks of 256
// threads, which the grid-stride loop must cover.
TEST(CudaAttention, CudnnRunFinderMatchesHost) {
  SKIP_WITHOUT_GPU();
  std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> calls;
  uint32_t seed = 700;
  for (Pos pos : {Pos::Causal, Pos::Offset, Pos::Zigzag, Pos::Shuffled, Pos::Blind, Pos::Prefix,
                  Pos::Past, Pos::Before, Pos::GatheredChunks, Pos::RoundChunks}) {
    const Problem p = make({160, 320, 1, 1, 8, pos}, false, seed++);
    calls.push_back({p.q_pos, p.k_pos});
  }
  std::mt19937 rng(seed);
  auto random_runs = [&] {
    const int runs = std::uniform_int_distribution<int>(1, 100)(rng);
    std::uniform_int_distribution<int64_t> len(1, 60), start(-1000000, 1000000);
    std::vector<int64_t> pos;
    for (int r = 0; r < runs; ++r) {
      const int64_t n = len(rng), s0 = start(rng);
      for (int64_t i = 0; i < n; ++i) pos.push_back(s0 + i);
    }
    return pos;
  };
  for (int i = 0; i < 300; ++i) calls.push_back({random_runs(), random_runs()});
  const int64_t top = std::numeric_limits<int64_t>::max(),
                bottom = std::numeric_limits<int64_t>::min();
  calls.push_back({{top - 2, top - 1, top, bottom, bottom + 1}, {5, top - 1, top, bottom}});
  std::vector<int64_t> long_side(4096 * 256 + 100);
  for (size_t i = 0; i < long_side.size(); ++i)
    long_side[i] = static_cast<int64_t>(i) + (i >= long_side.size() - 40 ? 7 : 0);  // 2 runs
  calls.push_back({{3, 4, 9}, long_side});

  using attn::cudnn::PosRun;
  auto check_side = [](int32_t count, const int64_t* rows, const int64_t* starts,
                       const std::vector<int64_t>& pos, const char* side, size_t call) {
    const std::vector<PosRun> want = attn::cudnn::runs_of(pos.data(), std::ssize(pos));
    EXPECT_EQ(count, static_cast<int32_t>(want.size())) << side << " runs, call " << call;
    if (count != static_cast<int32_t>(want.size()) || want.size() > attn::kMaxPositionRuns) return;
    std::vector<PosRun> found;
    for (int32_t r = 0; r < count; ++r) found.push_back({rows[r], 0, starts[r]});
    EXPECT_TRUE(attn::cudnn::runs_from_starts(found, std::ssize(pos)) == want)
        << side << " runs, call " << call;
  };
  Buf out(sizeof(attn::PositionRuns));
  for (size_t i = 0; i < calls.size(); ++i) {
    const auto& [q, k] = calls[i];
    const Dev qd(q), kd(k);
    TSP_CUDA_CHECK(attn::cudnn_find_runs(static_cast<const int64_t*>(qd.view.data()), std::ssize(q),
                                         static_cast<const int64_t*>(kd.view.data()), std::ssize(k),
                                         static_cast<attn::PositionRuns*>(out.p), nullptr));
    attn::PositionRuns r;
    TSP_CUDA_CHECK(cudaMemcpy(&r, out.p, sizeof(r), cudaMemcpyDeviceToHost));
    check_side(r.q_count, r.q_row, r.q_pos, q, "query", i);
    check_side(r.k_count, r.k_row, r.k_pos, k, "key", i);
    if (HasFailure()) return;
  }
}

// Forward: the flash bound (CudaFlash.ForwardMatchesReference): cuDNN's fused kernels also round P to
// bf16 before P·V and o once to bf16, with fp32 scores and statistics:
//   |o − o_ref| <= 2^-8·|o_ref| + 2^-9·max|v| + 1e-4,  |lse − lse_ref| <= 1e-4·(1 + |lse|).
// Covered calls must run on cuDNN (cudnn_attention_calls grows by their pieces: one cuDNN call
// each, disjoint query rows, so o and lse are each written once), the others must not.
TEST(CudaAttention, CudnnForwardMatchesReference) {
  SKIP_WITHOUT_CUDNN();
  with_cudnn([&] {
    uint32_t seed = 500;
    for (bool covered : {true, false}) {
      for (const Case& c : covered ? cudnn_covered_cases() : cudnn_uncovered_cases()) {
        const Problem p = make(c, true, seed++);
        DevProblem ref(p, DType::BF16), fast(p, DType::BF16);
        run_fwd(reference::attention_forward, ref, p);
        const int64_t calls = cudnn_attention_calls(), pieces = cudnn_pieces(p);
        EXPECT_EQ(pieces > 0, covered) << c.str();
        run_fwd(attention_forward, fast, p);
        EXPECT_EQ(cudnn_attention_calls() - calls, pieces)
            << (covered ? "a covered call did not run on cuDNN: "
                        : "an uncovered call ran on cuDNN: ")
            << c.str();
        expect_forward_close(fast.o.get(), fast.lse.get(), ref.o.get(), ref.lse.get(), max_abs(p.v),
                             "cudnn", c);
        if (HasFailure()) return;
      }
    }
  });
}

// Backward from the reference's o and lse on both paths. cuDNN's roundings: those of the flash
// path (HostOut::bq, bk, bv: dout, P and dS to bf16 in the products), plus
//   * D = rowsum(dO∘O) from dout rounded to bf16 (the flash path reads fp32 dout there):
//     |ΔD| <= u·Σ|dout·o|, so |ΔdS| <= P·u·Σ|dout·o| more (HostOut::cq, ck);
//   * this call's dq, dk, dv written in bf16, then added to the prior contents: the call's part
//     (ref − prior) rounded once, <= 2^-8·|ref − prior|; with several pieces (several runs) a key
//     seen by more than one gets one rounded part from each, <= 2^-8·Σ|terms| (a query row lies
//     in one piece: dq as before);
//   * with GQA (hq > hkv) cuDNN's backward first computes each query head's dK, dV part in the
//     io dtype, bf16 (frontend 1.32, CompositeSDPABackwardNode: dK_fullhead, dV_fullhead [b, hq,
//     s_kv, d] take Q's data type), then sums the G parts of a kv head into its bf16 dK, dV: per
//     piece a rounding of each head's part (<= 2^-8·Σ_h|part_h| <= 2^-8·Σ|terms|) and one of
//     their sum (<= 2^-8·|Σ_h part_h| <= 2^-8·Σ|terms|): twice the several-pieces bound for dk, dv.
// Tolerance: those + 1e-4·(1 + |ref|), as the flash tests. Keys no query sees (Past: past the
// last query, left out of the cuDNN call) keep their dk, dv bit for bit.
// The bound on the rounding of this call's dk, dv parts to bf16 (the list above), for element i of
// reference value ref and prior contents prior: once per call; with several pieces once per piece
// (r·Σ|terms|: HostOut::ak for dk; for dv Σ P·|dout| = bv / 2u, so r·Σ = bv / 2); with GQA twice
// that (each query head's part, then their sum).
struct PartRounding {
  bool several, gqa;
  PartRounding(int64_t pieces, const Case& c)
      : several(pieces > 1 || c.hq != c.hkv), gqa(c.hq != c.hkv) {}
  static constexpr double r = 0x1p-8;  // bf16's unit roundoff
  double dk(const HostOut& h, size_t i, double ref, double prior) const {
    return several ? (gqa ? 2 : 1) * r * h.ak[i] : r * std::abs(ref - prior);
  }
  double dv(const HostOut& h, size_t i, double ref, double prior) const {
    return several ? (gqa ? 2 : 1) * h.bv[i] / 2 : r * std::abs(ref - prior);
  }
};

TEST(CudaAttention, CudnnBackwardMatchesReference) {
  SKIP_WITHOUT_CUDNN();
  with_cudnn([&] {
    uint32_t seed = 600;
    for (bool covered : {true, false}) {
      for (const Case& c : covered ? cudnn_covered_cases() : cudnn_uncovered_cases()) {
        const Problem p = make(c, true, seed++);
        DevProblem ref(p, DType::BF16), fast(p, DType::BF16);
        run_fwd(reference::attention_forward, ref, p);
        const std::vector<float> o = ref.o.get();
        copy_forward(ref, fast, c);
        run_bwd(reference::attention_backward, ref, p);
        const int64_t calls = cudnn_attention_calls(), pieces = cudnn_pieces(p);
        EXPECT_EQ(pieces > 0, covered) << c.str();
        run_bwd(attention_backward, fast, p);
        EXPECT_EQ(cudnn_attention_calls() - calls, pieces)
            << (covered ? "a covered call did not run on cuDNN: "
                        : "an uncovered call ran on cuDNN: ")
            << c.str();
        const HostOut h = host_attention(p, &o);
        const std::vector<float> dq = ref.dq.get(), dk = ref.dk.get(), dv = ref.dv.get();
        const std::vector<float> dk_fast = fast.dk.get(), dv_fast = fast.dv.get();
        const double r = std::ldexp(1.0, -8);
        expect_close(
            fast.dq.get(), dq,
            [&](size_t i) {
              return h.bq[i] + h.cq[i] + r * std::abs(dq[i] - p.dq0[i]) +
                     1e-4 * (1 + std::abs(dq[i]));
            },
            "cudnn dq vs reference", c);
        const PartRounding part(pieces, c);
        expect_close(
            dk_fast, dk,
            [&](size_t i) {
              return h.bk[i] + h.ck[i] + part.dk(h, i, dk[i], p.dk0[i]) +
                     1e-4 * (1 + std::abs(dk[i]));
            },
            "cudnn dk vs reference", c);
        expect_close(
            dv_fast, dv,
            [&](size_t i) {
              return h.bv[i] + part.dv(h, i, dv[i], p.dv0[i]) + 1e-4 * (1 + std::abs(dv[i]));
            },
            "cudnn dv vs reference", c);
        if (c.pos == Pos::Past) {
          // Keys at 5 + j > 20 + nq - 1 (j >= nq + 15) are seen by no query.
          for (int64_t e = (c.nq + 15) * c.hkv * c.d; e < c.nk * c.hkv * c.d; ++e) {
            ASSERT_EQ(dk_fast[e], p.dk0[e]) << "dk of a key no query sees changed, element " << e;
            ASSERT_EQ(dv_fast[e], p.dv0[e]) << "dv of a key no query sees changed, element " << e;
          }
        }
        if (HasFailure()) return;
      }
    }
  });
}

// Merged statistics: a backward over one chunk of keys receives the FINAL o and lse (merged over
// every chunk) and must give that chunk's part of the gradients (cuDNN computes P = exp(scale·s −
// lse) and D = rowsum(dO∘O) from what it is given). Queries [0, 512) against keys [0, 512): the
// reference forward over all keys gives o, lse; the backward over the key chunk [0, 256) (covered:
// k0 = 0 = q0, nk' = 256) on both paths, from those o, lse. Bounds as above.
TEST(CudaAttention, CudnnBackwardOfAKeyChunkWithMergedStatistics) {
  SKIP_WITHOUT_CUDNN();
  with_cudnn([&] {
    for (int d : {64, 128}) {
      const Case c{512, 512, 8, 2, d, Pos::Causal};
      const Problem whole = make(c, true, 700 + d);
      Problem chunk = whole;  // keys [0, 256)
      chunk.c.nk = 256;
      const int64_t kept = 256 * c.hkv * c.d;
      chunk.k.resize(kept), chunk.v.resize(kept), chunk.dk0.resize(kept), chunk.dv0.resize(kept);
      chunk.k_pos.resize(256);
      DevProblem all(whole, DType::BF16), ref(chunk, DType::BF16), fast(chunk, DType::BF16);
      run_fwd(reference::attention_forward, all, whole);
      const std::vector<float> o = all.o.get();
      for (DevProblem* dp : {&ref, &fast}) {
        TSP_CUDA_CHECK(
            cudaMemcpy(dp->o.buf.p, all.o.buf.p, o.size() * 2, cudaMemcpyDeviceToDevice));
        TSP_CUDA_CHECK(
            cudaMemcpy(dp->lse.buf.p, all.lse.buf.p, c.nq * c.hq * 4, cudaMemcpyDeviceToDevice));
      }
      run_bwd(reference::attention_backward, ref, chunk);
      const int64_t calls = cudnn_attention_calls();
      run_bwd(attention_backward, fast, chunk);
      EXPECT_EQ(cudnn_attention_calls() - calls, 1) << "the chunk's backward did not run on cuDNN";
      // The host bound of the chunk: host_attention over the chunk's keys, but P from the merged
      // lse — host_attention computes its own lse over the chunk, whose P are larger (lse_chunk <=
      // lse_all), so its per-element bounds are upper bounds for this call.
      const HostOut h = host_attention(chunk, &o);
      const std::vector<float> dq = ref.dq.get(), dk = ref.dk.get(), dv = ref.dv.get();
      const double r = std::ldexp(1.0, -8);
      expect_close(
          fast.dq.get(), dq,
          [&](size_t i) {
            return h.bq[i] + h.cq[i] + r * std::abs(dq[i] - chunk.dq0[i]) +
                   1e-4 * (1 + std::abs(dq[i]));
          },
          "cudnn dq of a key chunk vs reference", c);
      const PartRounding part(1, c);  // one piece; GQA (8 query heads on 2)
      expect_close(
          fast.dk.get(), dk,
          [&](size_t i) {
            return h.bk[i] + h.ck[i] + part.dk(h, i, dk[i], chunk.dk0[i]) +
                   1e-4 * (1 + std::abs(dk[i]));
          },
          "cudnn dk of a key chunk vs reference", c);
      expect_close(
          fast.dv.get(), dv,
          [&](size_t i) {
            return h.bv[i] + part.dv(h, i, dv[i], chunk.dv0[i]) + 1e-4 * (1 + std::abs(dv[i]));
          },
          "cudnn dv of a key chunk vs reference", c);
      if (HasFailure()) return;
    }
  });
}

// ---- 3. merge ---------------------------------------------------------------------------------

// Two halves of the keys attended separately and merged equal the whole (fp32: 1e-4 as above;
// bf16 o: each partial o and the merged o are rounded once more, 2^-8·|o| + 2^-9·max|v|); and the
// merge with an empty side is exact.
TEST(CudaAttention, MergeOfTwoKeyHalvesEqualsWhole) {
  SKIP_WITHOUT_GPU();
  for (DType dt : {DType::F32, DType::BF16}) {
    const Case c{70, 90, 8, 2, 64, Pos::Blind};
    const Problem p = make(c, dt == DType::BF16, 11);
    Problem pa = p, pb = p;  // keys [0, 45) and [45, 90)
    pa.c.nk = pb.c.nk = 45;
    const int64_t half = 45 * c.hkv * c.d;
    pa.k.assign(p.k.begin(), p.k.begin() + half);
    pa.v.assign(p.v.begin(), p.v.begin() + half);
    pb.k.assign(p.k.begin() + half, p.k.end());
    pb.v.assign(p.v.begin() + half, p.v.end());
    pa.k_pos.assign(p.k_pos.begin(), p.k_pos.begin() + 45);
    pb.k_pos.assign(p.k_pos.begin() + 45, p.k_pos.end());
    pa.dk0.resize(half), pa.dv0.resize(half), pb.dk0.resize(half), pb.dv0.resize(half);
    DevProblem da(pa, dt), db(pb, dt);
    run_fwd(attention_forward, da, pa);
    run_fwd(attention_forward, db, pb);
    attention_merge(da.o.view, da.lse.view, db.o.view, db.lse.view, nullptr);
    const HostOut h = host_attention(p, nullptr);
    const double tol_o = dt == DType::BF16 ? std::ldexp(1.0, -9) : 0.0;
    expect_close(
        da.o.get(), h.o, [&](size_t i) { return 4 * tol_o * std::abs(h.o[i]) + tol_o + 1e-4; },
        std::string("merged o ") + dtype_name(dt).data(), c);
    expect_close(
        da.lse.get(), h.lse, [&](size_t i) { return 1e-4 * (1 + std::abs(h.lse[i])); },
        std::string("merged lse ") + dtype_name(dt).data(), c);
    // Merging with an empty side (lse = -inf, o NaN: never read) keeps o_a bit for bit.
    const std::vector<float> before = da.o.get(), lse_before = da.lse.get();
    Dev o_nan(std::vector<float>(p.q.size(), std::nanf("")), {c.nq, c.hq, c.d}, dt);
    Dev lse_empty(std::vector<float>(c.nq * c.hq, -INFINITY), {c.nq, c.hq}, DType::F32);
    attention_merge(da.o.view, da.lse.view, o_nan.view, lse_empty.view, nullptr);
    expect_close(
        da.o.get(), before, [](size_t) { return 0.0; }, "merge with an empty side", c);
    expect_close(
        da.lse.get(), lse_before, [](size_t) { return 0.0; }, "lse merge with empty", c);
  }
}

}  // namespace
}  // namespace tsp::cuda
