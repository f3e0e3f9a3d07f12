// Causal attention forward/backward throughput (fast path), one row per (dtype, pass, S, heads,
// kv heads, head dim).
//   bench_attention [--repeats N] [--sizes 1024,4096] [--head-dims 64,128] [--dtype f32|bf16|both]
//                   [--device cpu|cuda[:N]] [--heads H --kv-heads HKV] [--json]
//                   [--flash v1|v2|cudnn|both|all] [--doc-len L] [--zigzag D]
// --flash (--device cuda): which version of the CUDA flash kernels to time (attention.h; default:
// the process's, TSP_CUDA_FLASH or v1); both: every row for v1, then for v2; all: v1, v2, then
// cudnn (cuDNN's fused attention for the calls it covers, v1 for the others: with --doc-len, v1
// throughout; left out, with a note on stderr, where cuDNN is unavailable) ("flash" in JSON).
// --device cuda: the GPU backend's attention (backend_for(Device::cuda(N)).attention_forward /
// _backward), defaults bf16, S = 4K..32K, 32 query / 8 kv heads, d = 128 (issue 10's shapes);
// ms are medians over repeats of a timed loop between backend.synchronize() calls, TFLOP/s with the
// FLOP count below (FlashAttention's and PyTorch's convention: backward = 2.5 × forward), and a
// fwd+bwd row (FLOPs 7·S²·d per head over the sum of both times). Sampled rows are checked against
// the CPU reference as on the CPU.
// bf16: q, k, v, o in bf16 (lse, dout and gradients fp32), the native AVX512_BF16 path where the
// CPU has it; the sampled rows are checked against the bf16 reference path.
// FLOPs counted: forward 2·S²·d per query head, backward 5·S²·d (the causal halves of the
// full-square 4·S²·d and 10·S²·d). %peak is against 116 GFLOP/s per compute thread (measured fp32
// FMA peak of one Zen 4 core, docs/platform-notes.md). Each row also checks a sample of 16 query
// rows against the scalar reference path (o for forward, dq for backward): max_err and ok.
// --doc-len L: packed documents of L tokens (the last one shorter), q_doc_pos = position mod L
// (docs/layouts.md, "Documents"): a query sees only the keys of its own document, and the kernels
// skip the key tiles no query of a tile can see. The FLOPs then count only what the documents
// need: S² becomes Σ len² over the documents, so the speed-up over --doc-len 0 (no documents)
// shows how much of the masked work is skipped (a time ratio S²/Σlen² means all of it).
// --zigzag D (--device cuda; not with --doc-len): one rank's call of the sequence-parallel layouts
// at degree D, as tsp makes it: the queries are the rank's two zigzag chunks (rank 0: chunks 0
// and 2D − 1 of S / 2D tokens), the keys all S tokens in the order the all-gather leaves them
// (every rank's two chunks in rank order). nq = S / D; the causal work is 1/D of the whole row's
// (chunks r and 2D − 1 − r together see S²/2D keys), and the FLOPs count that. The cuDNN path cuts
// such a call into pieces (one per query chunk, keys put in position order).
#include <time.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "ops/cpu/attention_internal.h"
#include "tsp/backend/backend.h"
#include "tsp/core/device.h"
#include "tsp/core/machine.h"
#include "tsp/core/tensor.h"
#include "tsp/ops/attention.h"
#include "tsp/ops/gemm.h"
#ifdef TSP_WITH_CUDA
#include "backend/cuda/attention.h"  // flash kernel version (--flash)
#endif

namespace {

constexpr double kPeakGflopsPerThread = 116.0;

// Wall and process CPU time. On a shared machine the CPU time is the load-insensitive figure
// (time the process was descheduled is not in it); the wall time is what a user waits.
struct Clock {
  std::chrono::steady_clock::time_point wall = std::chrono::steady_clock::now();
  double cpu = process_cpu_seconds();
  static double process_cpu_seconds() {
    timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
  }
  double wall_s() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - wall).count();
  }
  double cpu_s() const { return process_cpu_seconds() - cpu; }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

struct Row {
  const char* pass;
  int64_t S, H, Hkv, d;
  double ms, cpu_ms, max_err;
  bool ok;
  const char* dtype = "f32";
};

// Errors of the timed run against the reference on the sampled query rows idx (reference rows in
// sample order): max |o - o_ref| and max |dq - dq_ref| / max |dq_ref|.
struct SampledErrors {
  double o = 0, dq = 0;
};
template <class O, class ORef>
SampledErrors sampled_errors(const O& o, const ORef& o_ref, const std::vector<float>& dq,
                             const std::vector<float>& dq_ref, const std::vector<int64_t>& idx,
                             int64_t row) {
  SampledErrors err;
  double max_dq = 0;
  for (size_t s = 0; s < idx.size(); ++s)
    for (int64_t e = 0; e < row; ++e) {
      const int64_t i = idx[s] * row + e, r = static_cast<int64_t>(s) * row + e;
      err.o = std::max(err.o, double(std::abs(float(o[i]) - float(o_ref[r]))));
      err.dq = std::max(err.dq, double(std::abs(dq[i] - dq_ref[r])));
      max_dq = std::max(max_dq, double(std::abs(dq_ref[r])));
    }
  err.dq /= std::max(max_dq, 1e-30);
  return err;
}

// Packed documents of L tokens (L = 0: none): each token's position in its document, and the
// attention work's S² replaced by Σ len² over the documents.
std::vector<int64_t> doc_positions(int64_t S, int64_t L) {
  std::vector<int64_t> out;
  if (L > 0)
    for (int64_t i = 0; i < S; ++i) out.push_back(i % L);
  return out;
}
double squared_tokens(int64_t S, int64_t L) {
  if (L <= 0 || L >= S) return double(S) * S;
  const int64_t full = S / L, rest = S % L;
  return double(full) * L * L + double(rest) * rest;
}

std::vector<tsp::bf16> to_bf16(const std::vector<float>& x) {
  std::vector<tsp::bf16> out(x.size());
  tsp::convert_f32_to_bf16(x.data(), out.data(), static_cast<int64_t>(x.size()));
  return out;
}

// One configuration: times forward and backward, checks sampled rows against the reference.
void run_bf16(int64_t S, int64_t H, int64_t Hkv, int64_t d, int64_t doc_len, int repeats,
              std::vector<Row>& rows);

void run(int64_t S, int64_t H, int64_t Hkv, int64_t d, int64_t doc_len, int repeats,
         std::vector<Row>& rows) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto rnd = [&](int64_t n) {
    std::vector<float> x(n);
    for (float& e : x) e = u(rng);
    return x;
  };
  const std::vector<float> q = rnd(S * H * d), k = rnd(S * Hkv * d), v = rnd(S * Hkv * d),
                           dout = rnd(S * H * d);
  std::vector<int64_t> pos(S);
  std::iota(pos.begin(), pos.end(), 0);
  std::vector<float> o(S * H * d), lse(S * H), dq(S * H * d), dk(S * Hkv * d), dv(S * Hkv * d);

  tsp::AttentionBackwardParams p;
  p.n_q = p.n_k = S, p.n_heads = H, p.n_kv_heads = Hkv, p.head_dim = d;
  p.scale = 1.f / std::sqrt(static_cast<float>(d));
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.q_pos = pos.data(), p.k_pos = pos.data();
  p.o = o.data(), p.lse = lse.data(), p.dout = dout.data();
  p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  const std::vector<int64_t> doc_pos = doc_positions(S, doc_len);
  p.q_doc_pos = doc_pos.empty() ? nullptr : doc_pos.data();

  std::vector<double> t_fwd, t_bwd, c_fwd, c_bwd;
  for (int r = 0; r <= repeats; ++r) {  // r = 0 is a warm-up
    const Clock f;
    tsp::attention_forward(p);
    const double tf = f.wall_s(), cf = f.cpu_s();
    std::fill(dq.begin(), dq.end(), 0.f);
    std::fill(dk.begin(), dk.end(), 0.f);
    std::fill(dv.begin(), dv.end(), 0.f);
    const Clock b;
    tsp::attention_backward(p);
    const double tb = b.wall_s(), cb = b.cpu_s();
    if (r > 0) t_fwd.push_back(tf), t_bwd.push_back(tb), c_fwd.push_back(cf), c_bwd.push_back(cb);
  }

  // Sample 16 queries (positions explicit, so a subset is just a shorter query list) and run the
  // scalar reference on them against all keys: o, lse and dq rows must match the fast path.
  const int64_t ns = 16;
  std::vector<int64_t> idx(ns);
  for (int64_t i = 0; i < ns; ++i) idx[i] = (i * 9973 + 17) % S;
  std::vector<float> qs, dos, os, lses;
  std::vector<int64_t> ps, ds;
  for (int64_t i : idx) {
    qs.insert(qs.end(), q.begin() + i * H * d, q.begin() + (i + 1) * H * d);
    dos.insert(dos.end(), dout.begin() + i * H * d, dout.begin() + (i + 1) * H * d);
    ps.push_back(pos[i]);
    if (!doc_pos.empty()) ds.push_back(doc_pos[i]);
  }
  std::vector<float> o_ref(ns * H * d), lse_ref(ns * H), dq_ref(ns * H * d, 0.f),
      dk_ref(S * Hkv * d, 0.f), dv_ref(S * Hkv * d, 0.f);
  tsp::AttentionBackwardParams r = p;
  r.n_q = ns, r.q = qs.data(), r.q_pos = ps.data(), r.o = o_ref.data(), r.lse = lse_ref.data();
  r.dout = dos.data(), r.dq = dq_ref.data(), r.dk = dk_ref.data(), r.dv = dv_ref.data();
  r.q_doc_pos = ds.empty() ? nullptr : ds.data();
  tsp::attn::forward_reference(r);
  tsp::attn::backward_reference(r);
  const SampledErrors err = sampled_errors(o, o_ref, dq, dq_ref, idx, H * d);
  const double err_o = err.o, err_dq = err.dq;
  // Same tolerances as tests/ops/attention_test.cpp: 1e-5 absolute for o, 2e-5 relative for dq
  // (longer sums here: 4096 keys; the errors stay ~1e-6).
  rows.push_back(
      {"forward", S, H, Hkv, d, 1e3 * median(t_fwd), 1e3 * median(c_fwd), err_o, err_o <= 1e-5});
  rows.push_back(
      {"backward", S, H, Hkv, d, 1e3 * median(t_bwd), 1e3 * median(c_bwd), err_dq, err_dq <= 2e-5});
}

// The same with bf16 q, k, v, o. Checks: the sampled rows against the bf16 reference path (fp32
// reference on the widened inputs, o rounded once). The native path rounds P (and dO, dS in
// backward) to bf16: |Δo| <= 2^-8·(|o| + max|v|) <= 2^-7 here (inputs in (-1, 1)); for dq the
// bound is relative to Σ|terms| (tests/ops/attention_bf16_test.cpp checks it per element), so the
// bench's sanity threshold is 1e-2 of the largest dq of the sample.
void run_bf16(int64_t S, int64_t H, int64_t Hkv, int64_t d, int64_t doc_len, int repeats,
              std::vector<Row>& rows) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto rnd = [&](int64_t n) {
    std::vector<float> x(n);
    for (float& e : x) e = u(rng);
    return x;
  };
  const std::vector<tsp::bf16> q = to_bf16(rnd(S * H * d)), k = to_bf16(rnd(S * Hkv * d)),
                               v = to_bf16(rnd(S * Hkv * d));
  const std::vector<float> dout = rnd(S * H * d);
  std::vector<int64_t> pos(S);
  std::iota(pos.begin(), pos.end(), 0);
  std::vector<tsp::bf16> o(S * H * d);
  std::vector<float> lse(S * H), dq(S * H * d), dk(S * Hkv * d), dv(S * Hkv * d);

  tsp::AttentionBf16BackwardParams p;
  p.n_q = p.n_k = S, p.n_heads = H, p.n_kv_heads = Hkv, p.head_dim = d;
  p.scale = 1.f / std::sqrt(static_cast<float>(d));
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.q_pos = pos.data(), p.k_pos = pos.data();
  p.o = o.data(), p.lse = lse.data(), p.dout = dout.data();
  p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  const std::vector<int64_t> doc_pos = doc_positions(S, doc_len);
  p.q_doc_pos = doc_pos.empty() ? nullptr : doc_pos.data();

  std::vector<double> t_fwd, t_bwd, c_fwd, c_bwd;
  for (int r = 0; r <= repeats; ++r) {  // r = 0 is a warm-up
    const Clock f;
    tsp::attention_forward(p);
    const double tf = f.wall_s(), cf = f.cpu_s();
    std::fill(dq.begin(), dq.end(), 0.f);
    std::fill(dk.begin(), dk.end(), 0.f);
    std::fill(dv.begin(), dv.end(), 0.f);
    const Clock b;
    tsp::attention_backward(p);
    const double tb = b.wall_s(), cb = b.cpu_s();
    if (r > 0) t_fwd.push_back(tf), t_bwd.push_back(tb), c_fwd.push_back(cf), c_bwd.push_back(cb);
  }

  const int64_t ns = 16;
  std::vector<int64_t> idx(ns), ps, ds;
  for (int64_t i = 0; i < ns; ++i) idx[i] = (i * 9973 + 17) % S;
  std::vector<tsp::bf16> qs, os;
  std::vector<float> dos;
  for (int64_t i : idx) {
    qs.insert(qs.end(), q.begin() + i * H * d, q.begin() + (i + 1) * H * d);
    os.insert(os.end(), o.begin() + i * H * d, o.begin() + (i + 1) * H * d);
    dos.insert(dos.end(), dout.begin() + i * H * d, dout.begin() + (i + 1) * H * d);
    ps.push_back(pos[i]);
    if (!doc_pos.empty()) ds.push_back(doc_pos[i]);
  }
  std::vector<tsp::bf16> o_ref(ns * H * d);
  std::vector<float> lse_ref(ns * H), dq_ref(ns * H * d, 0.f), dk_ref(S * Hkv * d, 0.f),
      dv_ref(S * Hkv * d, 0.f);
  tsp::AttentionBf16BackwardParams r = p;
  r.n_q = ns, r.q = qs.data(), r.q_pos = ps.data(), r.o = o_ref.data(), r.lse = lse_ref.data();
  r.dout = dos.data(), r.dq = dq_ref.data(), r.dk = dk_ref.data(), r.dv = dv_ref.data();
  r.q_doc_pos = ds.empty() ? nullptr : ds.data();
  tsp::attn::forward_reference_bf16(r);
  r.o = os.data();  // backward from the o the fast path produced, as the timed backward did
  tsp::attn::backward_reference_bf16(r);
  const SampledErrors err = sampled_errors(o, o_ref, dq, dq_ref, idx, H * d);
  const double err_o = err.o, err_dq = err.dq;
  rows.push_back({"forward", S, H, Hkv, d, 1e3 * median(t_fwd), 1e3 * median(c_fwd), err_o,
                  err_o <= 0x1p-7, "bf16"});
  rows.push_back({"backward", S, H, Hkv, d, 1e3 * median(t_bwd), 1e3 * median(c_bwd), err_dq,
                  err_dq <= 1e-2, "bf16"});
}

// Deterministic inputs in (-1, 1), fast enough for 32K × 32 heads × 128 (a counter hash).
std::vector<float> hashed_uniform(int64_t n, uint64_t seed) {
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = (static_cast<uint64_t>(i) + seed * 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 31)) * 0x94D049BB133111EBull;
    x[i] = static_cast<float>((z >> 40) * 0x1p-24) * 2.f - 1.f;
  }
  return x;
}

struct DeviceRow {
  const char* pass;
  int64_t S, H, Hkv, d;
  double ms, max_err;
  bool ok;
  int inner;
};

// One configuration on a device backend: q, k, v, o in bf16 (or f32), lse, dout and the gradients
// fp32, positions 0..S-1 (or --zigzag's). Each timed repeat runs `inner` calls back to back between two
// synchronize() calls (inner chosen so a repeat lasts >= ~20 ms: the host-side sync costs tens of
// µs, which matters at S = 4K); the median over repeats, divided by inner, is the figure. The
// backward accumulates (+=) into dq, dk, dv, so repeated calls are what training does minus the
// zeroing. Afterwards one clean forward + backward is checked on 16 sampled query rows against
// the CPU reference (the tolerances of the CPU rows: o within 2^-7 absolute for bf16, dq within
// 1e-2 of the sample's largest |dq|).
void run_device(tsp::Backend& be, tsp::DType dt, int64_t S, int64_t H, int64_t Hkv, int64_t d,
                int64_t doc_len, int64_t zigzag, int repeats, std::vector<DeviceRow>& rows) {
  using tsp::Tensor, tsp::MemCategory;
  const tsp::Device dev = be.device();
  const bool bf = dt == tsp::DType::BF16;
  // Queries: all S, or with --zigzag one rank's nq = S / D (its two chunks).
  const int64_t nq = zigzag > 1 ? S / zigzag : S;
  std::vector<float> q = hashed_uniform(nq * H * d, 1), k = hashed_uniform(S * Hkv * d, 2),
                     v = hashed_uniform(S * Hkv * d, 3), dout = hashed_uniform(nq * H * d, 4);
  if (bf) {  // the values the device sees, so the reference sees the same
    for (auto* x : {&q, &k, &v}) {
      const std::vector<tsp::bf16> r = to_bf16(*x);
      for (size_t i = 0; i < r.size(); ++i) (*x)[i] = static_cast<float>(r[i]);
    }
  }
  std::vector<int64_t> pos(S);  // the keys'; the queries' are q_pos
  std::iota(pos.begin(), pos.end(), 0);
  if (zigzag > 1) {  // rank r's chunks r and 2D − 1 − r, in rank order
    const int64_t c = S / (2 * zigzag);
    for (int64_t j = 0; j < S; ++j) {
      const int64_t r = j / (2 * c), second = (j / c) % 2;
      pos[j] = (second ? 2 * zigzag - 1 - r : r) * c + j % c;
    }
  }
  const std::vector<int64_t> q_pos(pos.begin(), pos.begin() + nq);  // all, or rank 0's chunks
  constexpr MemCategory kW = MemCategory::Workspace;
  auto upload = [&](const std::vector<float>& host, std::vector<int64_t> shape, tsp::DType t) {
    Tensor f = Tensor::f32(shape, kW, dev);
    be.upload(host.data(), f.view());
    if (t == tsp::DType::F32) return f;
    Tensor c(shape, t, kW, dev);
    be.copy(f.view(), c.view());
    return c;
  };
  const Tensor tq = upload(q, {nq, H, d}, dt), tk = upload(k, {S, Hkv, d}, dt),
               tv = upload(v, {S, Hkv, d}, dt), tdo = upload(dout, {nq, H, d}, tsp::DType::F32);
  const Tensor tpos = be.device_copy(pos, kW), tqpos = be.device_copy(q_pos, kW);
  const std::vector<int64_t> doc_pos = doc_positions(S, doc_len);
  const Tensor tdoc = doc_pos.empty() ? Tensor() : be.device_copy(doc_pos, kW);
  Tensor to({nq, H, d}, dt, kW, dev), tlse = Tensor::f32({nq, H}, kW, dev);
  Tensor tdq = Tensor::f32({nq, H, d}, kW, dev), tdk = Tensor::f32({S, Hkv, d}, kW, dev),
         tdv = Tensor::f32({S, Hkv, d}, kW, dev);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  auto fwd = [&] {
    be.attention_forward(tq.view(), tk.view(), tv.view(), tqpos.view(), tpos.view(), tdoc.view(),
                         to.view(), tlse.view(), scale);
  };
  auto bwd = [&] {
    be.attention_backward(tq.view(), tk.view(), tv.view(), tqpos.view(), tpos.view(), tdoc.view(),
                          to.view(), tlse.view(), tdo.view(), tdq.view(), tdk.view(), tdv.view(),
                          scale);
  };
  auto timed = [&](auto&& f, int inner) {
    be.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < inner; ++i) f();
    be.synchronize();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / inner;
  };
  be.zero(tdq.view()), be.zero(tdk.view()), be.zero(tdv.view());
  // Warm-up (plans, allocator), then the inner counts from one untimed-in-the-figures call each.
  fwd(), bwd();
  const int inner_f = std::clamp(static_cast<int>(0.02 / std::max(timed(fwd, 1), 1e-6)), 1, 50);
  const int inner_b = std::clamp(static_cast<int>(0.02 / std::max(timed(bwd, 1), 1e-6)), 1, 50);
  std::vector<double> tf, tb;
  for (int r = 0; r < repeats; ++r) tf.push_back(timed(fwd, inner_f));
  for (int r = 0; r < repeats; ++r) tb.push_back(timed(bwd, inner_b));

  // Clean pass for the check.
  fwd();
  be.zero(tdq.view()), be.zero(tdk.view()), be.zero(tdv.view());
  bwd();
  std::vector<float> o_dev(nq * H * d), dq_dev(nq * H * d);
  {
    Tensor o32 = Tensor::f32({nq, H, d}, kW, dev);
    be.copy(to.view(), o32.view());
    be.download(o32.view(), o_dev.data());
    be.download(tdq.view(), dq_dev.data());
  }
  const int64_t ns = 16;
  std::vector<int64_t> idx(ns), ps, ds;
  for (int64_t i = 0; i < ns; ++i) idx[i] = (i * 9973 + 17) % nq;
  std::vector<float> qs, dos, os;
  for (int64_t i : idx) {
    qs.insert(qs.end(), q.begin() + i * H * d, q.begin() + (i + 1) * H * d);
    dos.insert(dos.end(), dout.begin() + i * H * d, dout.begin() + (i + 1) * H * d);
    os.insert(os.end(), o_dev.begin() + i * H * d, o_dev.begin() + (i + 1) * H * d);
    ps.push_back(q_pos[i]);
    if (!doc_pos.empty()) ds.push_back(doc_pos[i]);
  }
  // fp32 reference on the (bf16-valued) inputs: forward for o, then backward from the device's o.
  std::vector<float> o_ref(ns * H * d), lse_ref(ns * H), dq_ref(ns * H * d, 0.f),
      dk_ref(S * Hkv * d, 0.f), dv_ref(S * Hkv * d, 0.f);
  tsp::AttentionBackwardParams r;
  r.n_q = ns, r.n_k = S, r.n_heads = H, r.n_kv_heads = Hkv, r.head_dim = d, r.scale = scale;
  r.q = qs.data(), r.k = k.data(), r.v = v.data(), r.q_pos = ps.data(), r.k_pos = pos.data();
  r.o = o_ref.data(), r.lse = lse_ref.data(), r.dout = dos.data();
  r.dq = dq_ref.data(), r.dk = dk_ref.data(), r.dv = dv_ref.data();
  r.q_doc_pos = ds.empty() ? nullptr : ds.data();
  tsp::attn::forward_reference(r);
  r.o = os.data();
  tsp::attn::backward_reference(r);
  const SampledErrors err = sampled_errors(o_dev, o_ref, dq_dev, dq_ref, idx, H * d);
  const double err_o = err.o, err_dq = err.dq;
  const double tol_o = bf ? 0x1p-7 : 1e-4, tol_dq = bf ? 1e-2 : 1e-4;
  const double mf = 1e3 * median(tf), mb = 1e3 * median(tb);
  rows.push_back({"forward", S, H, Hkv, d, mf, err_o, err_o <= tol_o, inner_f});
  rows.push_back({"backward", S, H, Hkv, d, mb, err_dq, err_dq <= tol_dq, inner_b});
  rows.push_back({"fwd+bwd", S, H, Hkv, d, mf + mb, std::max(err_o, err_dq),
                  err_o <= tol_o && err_dq <= tol_dq, 0});
}

// --device cuda: prints the table (or JSON lines) of run_device.
int main_device(const std::string& device_name, const std::vector<int64_t>& sizes,
                const std::vector<int64_t>& head_dims, int64_t H, int64_t Hkv,
                const std::string& dtype, int64_t doc_len, int64_t zigzag, int repeats, bool json,
                const std::string& flash) {
  tsp::Backend& be = tsp::backend_for(tsp::parse_device(device_name));
  const std::string dev = be.device().str();
  if (!json) {
    fmt::print("# tsp bench_attention  git={}  device={}  backend={}  repeats={} (median)\n",
               tsp::git_revision(), dev, be.name(), repeats);
    fmt::print(
        "# causal, positions 0..S-1; FLOPs: forward 2*S^2*d*hq (4*S^2*d*hq / 2: QK^T and PV, causal "
        "half), backward 2.5x forward, fwd+bwd 7*S^2*d*hq\n");
    if (doc_len > 0)
      fmt::print(
          "# documents of {} tokens (q_doc_pos = position mod {}): S^2 above is the sum of "
          "their len^2\n",
          doc_len, doc_len);
    if (zigzag > 1)
      fmt::print(
          "# zigzag D={}: rank 0's S/D queries (chunks 0 and 2D-1) against all S keys in the "
          "all-gather's order; FLOPs and tok/s of that call (1/D of the row's)\n",
          zigzag);
    fmt::print("# {:>5} {:>8} {:>6} {:>5} {:>3} {:>4} {:>10} {:>8} {:>10} {:>9} {:>3}\n", "dtype",
               "pass", "S", "heads", "kv", "d", "ms", "TFLOP/s", "tok/s", "max_err", "ok");
  }
  std::vector<std::string> versions = {flash};
  if (flash == "both") versions = {"v1", "v2"};
  if (flash == "all") versions = {"v1", "v2", "cudnn"};
  for (const std::string& fv : versions)
    for (const std::string& dts : {std::string("f32"), std::string("bf16")}) {
      if (dtype != "both" && dtype != dts) continue;
      std::string fname = "-";
#ifdef TSP_WITH_CUDA
      if (fv == "cudnn" && flash == "all" && be.device().kind == tsp::DeviceKind::CUDA &&
          !tsp::cuda::cudnn_attention_unavailable().empty()) {
        fmt::print(stderr, "# cudnn rows left out: {}\n", tsp::cuda::cudnn_attention_unavailable());
        continue;
      }
      if (!fv.empty())
        tsp::cuda::set_flash_version(fv == "v1"   ? tsp::cuda::FlashVersion::V1
                                     : fv == "v2" ? tsp::cuda::FlashVersion::V2
                                                  : tsp::cuda::FlashVersion::Cudnn);
      if (be.device().kind == tsp::DeviceKind::CUDA)
        fname = tsp::cuda::flash_version_name(tsp::cuda::flash_version());
#endif
      if (!json) fmt::print("# flash kernels: {}\n", fname);
      const tsp::DType dt = dts == "bf16" ? tsp::DType::BF16 : tsp::DType::F32;
      for (int64_t S : sizes)
        for (int64_t d : head_dims) {
          std::vector<DeviceRow> rows;
          run_device(be, dt, S, H, Hkv, d, doc_len, zigzag, repeats, rows);
          for (const DeviceRow& r : rows) {
            const double per_head = r.pass[0] == 'f' && r.pass[1] == 'o' ? 2.0
                                    : r.pass[0] == 'b'                   ? 5.0
                                                                         : 7.0;
            const double share = zigzag > 1 ? 1.0 / zigzag : 1.0;  // of the row's work, tokens
            const double flops = per_head * squared_tokens(r.S, doc_len) * r.d * r.H * share;
            const double tflops = flops / (r.ms * 1e-3) / 1e12;
            const double tok_s = r.S * share / (r.ms * 1e-3);
            if (json)
              fmt::print(
                  "{{\"bench\":\"attention\",\"impl\":\"tsp\",\"flash\":\"{}\",\"device\":\"{}\","
                  "\"dtype\":\"{}\",\"doc_len\":{},\"zigzag\":{},"
                  "\"pass\":\"{}\",\"causal\":true,\"S\":{},\"heads\":{},\"kv_heads\":{},"
                  "\"head_dim\":{},\"ms\":{:.4f},\"inner\":{},\"tflops\":{:.2f},\"gflops\":{:.1f},"
                  "\"tokens_per_s\":{:.0f},\"max_err\":{:.3e},\"ok\":{}}}\n",
                  fname, dev, dts, doc_len, zigzag, r.pass, r.S, r.H, r.Hkv, r.d, r.ms, r.inner,
                  tflops, tflops * 1e3, tok_s, r.max_err, r.ok);
            else
              fmt::print(
                  "  {:>5} {:>8} {:>6} {:>5} {:>3} {:>4} {:>10.3f} {:>8.1f} {:>10.0f} {:>9.2e} {:>3}\n",
                  dts, r.pass, r.S, r.H, r.Hkv, r.d, r.ms, tflops, tok_s, r.max_err,
                  r.ok ? "yes" : "NO");
            std::fflush(stdout);
          }
        }
    }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int repeats = 5;
  bool json = false;
  std::vector<int64_t> sizes = {1024, 4096}, head_dims = {64};
  std::string dtype, device = "cpu", flash;
  int64_t heads = 0, kv_heads = 0;  // 0: the defaults of the device (CPU: 8 with 8 and 2 kv)
  int64_t doc_len = 0;              // --doc-len: packed documents of this many tokens (0: none)
  int64_t zigzag = 0;               // --zigzag: one rank's call at this degree (0: the whole row)
  bool sizes_given = false, dims_given = false;
  auto list = [](char* arg) {
    std::vector<int64_t> out;
    for (char* t = std::strtok(arg, ","); t; t = std::strtok(nullptr, ","))
      out.push_back(std::atoll(t));
    return out;
  };
  for (int a = 1; a < argc; ++a) {
    if (!std::strcmp(argv[a], "--json")) {
      json = true;
    } else if (!std::strcmp(argv[a], "--repeats") && a + 1 < argc) {
      repeats = std::max(1, std::atoi(argv[++a]));
    } else if (!std::strcmp(argv[a], "--sizes") && a + 1 < argc) {
      sizes = list(argv[++a]), sizes_given = true;
    } else if (!std::strcmp(argv[a], "--head-dims") && a + 1 < argc) {
      head_dims = list(argv[++a]), dims_given = true;
    } else if (!std::strcmp(argv[a], "--device") && a + 1 < argc) {
      device = argv[++a];
    } else if (!std::strcmp(argv[a], "--heads") && a + 1 < argc) {
      heads = std::atoll(argv[++a]);
    } else if (!std::strcmp(argv[a], "--kv-heads") && a + 1 < argc) {
      kv_heads = std::atoll(argv[++a]);
    } else if (!std::strcmp(argv[a], "--doc-len") && a + 1 < argc) {
      doc_len = std::atoll(argv[++a]);
    } else if (!std::strcmp(argv[a], "--zigzag") && a + 1 < argc) {
      zigzag = std::atoll(argv[++a]);
    } else if (!std::strcmp(argv[a], "--flash") && a + 1 < argc &&
               (!std::strcmp(argv[a + 1], "v1") || !std::strcmp(argv[a + 1], "v2") ||
                !std::strcmp(argv[a + 1], "cudnn") || !std::strcmp(argv[a + 1], "both") ||
                !std::strcmp(argv[a + 1], "all"))) {
      flash = argv[++a];
    } else if (!std::strcmp(argv[a], "--dtype") && a + 1 < argc &&
               (!std::strcmp(argv[a + 1], "f32") || !std::strcmp(argv[a + 1], "bf16") ||
                !std::strcmp(argv[a + 1], "both"))) {
      dtype = argv[++a];
    } else {
      std::fprintf(stderr,
                   "usage: %s [--repeats N] [--sizes 1024,4096] [--head-dims 64,128] "
                   "[--dtype f32|bf16|both] [--device cpu|cuda[:N]] [--heads H] [--kv-heads HKV] "
                   "[--json] [--flash v1|v2|cudnn|both|all] [--doc-len L] [--zigzag D]\n",
                   argv[0]);
      return 2;
    }
  }
  for (int64_t d : head_dims) {
    if (d < 1 || d > 1024) {
      std::fprintf(stderr, "bench_attention: head dim %lld must be in [1, 1024]\n", (long long)d);
      return 2;
    }
  }
  if (doc_len < 0) {
    std::fprintf(stderr, "bench_attention: --doc-len must be >= 0 tokens (0: no documents)\n");
    return 2;
  }
  if (zigzag < 0 || (zigzag > 1 && (doc_len > 0 || device == "cpu"))) {
    std::fprintf(stderr,
                 "bench_attention: --zigzag D needs D >= 1, --device cuda and no --doc-len\n");
    return 2;
  }
  if (heads < 0 || kv_heads < 0 || (heads && kv_heads && heads % kv_heads != 0)) {
    std::fprintf(stderr, "bench_attention: need --kv-heads dividing --heads\n");
    return 2;
  }
  if (device != "cpu") {
    try {
      if (!sizes_given) sizes = {4096, 8192, 16384, 32768};
      if (!dims_given) head_dims = {128};
      const int64_t H = heads ? heads : 32, Hkv = kv_heads ? kv_heads : (heads ? heads : 8);
      for (int64_t S : sizes)
        if (zigzag > 1 && S % (2 * zigzag) != 0) {
          std::fprintf(stderr,
                       "bench_attention: --zigzag %lld needs every size divisible by %lld\n",
                       (long long)zigzag, (long long)(2 * zigzag));
          return 2;
        }
      return main_device(device, sizes, head_dims, H, Hkv, dtype.empty() ? "bf16" : dtype, doc_len,
                         zigzag, repeats, json, flash);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_attention: %s\n", e.what());
      return 1;
    }
  }
  if (dtype.empty()) dtype = "f32";
  const int threads = tsp::compute_threads();
  const double peak = kPeakGflopsPerThread * threads;
  if (!json) {
    fmt::print(
        "# tsp bench_attention  git={}  machine={} ({} cores)  threads={}  dtype={}  "
        "peak={:.0f} GFLOP/s  repeats={} (median)\n",
        tsp::git_revision(), tsp::cpu_description(), std::thread::hardware_concurrency(), threads,
        dtype, peak, repeats);
    fmt::print(
        "# causal, positions 0..S-1; FLOPs: forward 2*S^2*d*heads, backward 5*S^2*d*heads\n");
    if (doc_len > 0)
      fmt::print(
          "# documents of {} tokens (q_doc_pos = position mod {}): S^2 above is the sum of "
          "their len^2\n",
          doc_len, doc_len);
    fmt::print(
        "# ms, tok/s, GFLOP/s, %peak: wall-clock medians; cpu_ms, cpu_GF/s: process CPU time "
        "(insensitive to other load on the machine)\n");
    fmt::print(
        "# {:>5} {:>8} {:>6} {:>5} {:>3} {:>4} {:>10} {:>10} {:>9} {:>8} {:>6} {:>9} {:>9} {:>3}\n",
        "dtype", "pass", "S", "heads", "kv", "d", "ms", "cpu_ms", "tok/s", "GFLOP/s", "%peak",
        "cpu_GF/s", "max_err", "ok");
  }
  for (int64_t S : sizes)
    for (int64_t d : head_dims)
      for (int64_t Hkv : heads ? std::vector<int64_t>{kv_heads ? kv_heads : heads}
                               : std::vector<int64_t>{8, 2}) {  // default: MHA, then GQA g = 4
        const int64_t H = heads ? heads : 8;
        std::vector<Row> rows;
        if (dtype != "bf16") run(S, H, Hkv, d, doc_len, repeats, rows);
        if (dtype != "f32") run_bf16(S, H, Hkv, d, doc_len, repeats, rows);
        for (const Row& r : rows) {
          const double flops =
              (r.pass[0] == 'f' ? 2.0 : 5.0) * squared_tokens(r.S, doc_len) * r.d * r.H;
          const double gflops = flops / (r.ms * 1e-3) / 1e9;
          const double tok_s = r.S / (r.ms * 1e-3);
          const double gflops_cpu = flops / (r.cpu_ms * 1e-3 / threads) / 1e9;
          if (json)
            fmt::print(
                "{{\"bench\":\"attention\",\"dtype\":\"{}\",\"doc_len\":{},\"pass\":\"{}\",\"S\":{},\"heads\":{},\"kv_heads\":{},"
                "\"head_dim\":{},\"threads\":{},\"ms\":{:.3f},\"cpu_ms\":{:.3f},"
                "\"tokens_per_s\":{:.1f},\"gflops\":{:.2f},\"pct_peak\":{:.1f},"
                "\"gflops_cpu\":{:.2f},\"max_err\":{:.3e},\"ok\":{}}}\n",
                r.dtype, doc_len, r.pass, r.S, r.H, r.Hkv, r.d, threads, r.ms, r.cpu_ms, tok_s,
                gflops, 100 * gflops / peak, gflops_cpu, r.max_err, r.ok);
          else
            fmt::print(
                "  {:>5} {:>8} {:>6} {:>5} {:>3} {:>4} {:>10.2f} {:>10.2f} {:>9.0f} {:>8.1f} {:>6.1f} "
                "{:>9.1f} {:>9.2e} {:>3}\n",
                r.dtype, r.pass, r.S, r.H, r.Hkv, r.d, r.ms, r.cpu_ms, tok_s, gflops,
                100 * gflops / peak, gflops_cpu, r.max_err, r.ok ? "yes" : "NO");
          std::fflush(stdout);
        }
      }
  return 0;
}
