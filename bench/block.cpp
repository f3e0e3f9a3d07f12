// One Llama block, forward + backward, on one rank with the block maths every layout uses
// (tsp/model/block.h, composed exactly as the single layout composes one layer), at the shapes of
// the PyTorch benchmark bench/torch_block.py. scripts/bench_vs_torch.sh runs both and prints the
// ratio.
//
//   bench_block [--h 1024] [--heads 16] [--kv-heads 16] [--ffn 2816] [--seq 1024] [--batch 1]
//               [--threads 2] [--repeats 5] [--json]
//
// FLOPs counted (the same formula in bench/torch_block.py, so the ratio of GFLOP/s equals the ratio
// of tokens/s): "model FLOPs" of one forward + backward,
//   GEMMs      6·N·P,  P = h·(hq·d) + 2·h·(hkv·d) + (hq·d)·h + 3·h·F  (fwd 2·N·P, bwd 4·N·P)
//   attention  7·B·S²·hq·d: causal halves of QKᵀ and PV forward (2·S²·d per head) and of the five
//              backward products (5·S²·d per head)
// Recomputation is not counted: our backward recomputes the MLP's gate/up (2·N·2·h·F more FLOPs
// really executed), PyTorch's autograd keeps them. Norms, RoPE, SwiGLU and softmax are O(N·h) and
// not counted on either side.
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
#include <vector>

#include <fmt/format.h>

#include "tsp/core/error.h"
#include "tsp/core/machine.h"
#include "tsp/core/tensor.h"
#include "tsp/model/block.h"
#include "tsp/model/config.h"
#include "tsp/ops/gemm.h"
#include "tsp/ops/ops.h"

namespace {
using namespace tsp;

struct Options {
  int64_t h = 1024, heads = 16, kv_heads = 0, ffn = 2816, seq = 1024, batch = 1;
  int threads = 2, repeats = 5;
  bool json = false;
};

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      TSP_CHECK(i + 1 < argc, "bench_block: {} needs a value", a);
      return argv[++i];
    };
    if (a == "--h")
      o.h = std::stoll(next());
    else if (a == "--heads")
      o.heads = std::stoll(next());
    else if (a == "--kv-heads")
      o.kv_heads = std::stoll(next());
    else if (a == "--ffn")
      o.ffn = std::stoll(next());
    else if (a == "--seq")
      o.seq = std::stoll(next());
    else if (a == "--batch")
      o.batch = std::stoll(next());
    else if (a == "--threads")
      o.threads = std::stoi(next());
    else if (a == "--repeats")
      o.repeats = std::stoi(next());
    else if (a == "--json")
      o.json = true;
    else if (a == "--help" || a == "-h") {
      std::printf(
          "bench_block [--h H] [--heads NH] [--kv-heads NKV] [--ffn F] [--seq S] [--batch B]\n"
          "            [--threads T] [--repeats R] [--json]\n"
          "One Llama block forward+backward (fp32) with tsp's block maths; prints GFLOP/s and\n"
          "tokens/s (median of R timed repeats after one warm-up).\n");
      std::exit(0);
    } else {
      TSP_FAIL("bench_block: unknown argument '{}' (try --help)", a);
    }
  }
  if (o.kv_heads == 0) o.kv_heads = o.heads;
  TSP_CHECK(o.h % o.heads == 0 && o.heads % o.kv_heads == 0,
            "bench_block: need heads | h and kv_heads | heads (got h={} heads={} kv_heads={})", o.h,
            o.heads, o.kv_heads);
  TSP_CHECK(o.repeats >= 1 && o.threads >= 1, "bench_block: --repeats and --threads must be >= 1");
  return o;
}

void fill_normal(Tensor& t, float std, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.f, std);
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(rng);
}

// The block's parameters and gradients, in the Hugging Face [out, in] layout.
struct BlockParams {
  Tensor norm1, wq, wk, wv, wo, norm2, wg, wu, wd;
  BlockParams(int64_t h, int64_t qw, int64_t kvw, int64_t F, MemCategory c)
      : norm1(Tensor::f32({h}, c)),
        wq(Tensor::f32({qw, h}, c)),
        wk(Tensor::f32({kvw, h}, c)),
        wv(Tensor::f32({kvw, h}, c)),
        wo(Tensor::f32({h, qw}, c)),
        norm2(Tensor::f32({h}, c)),
        wg(Tensor::f32({F, h}, c)),
        wu(Tensor::f32({F, h}, c)),
        wd(Tensor::f32({h, F}, c)) {}
  std::vector<Tensor*> all() { return {&norm1, &wq, &wk, &wv, &wo, &norm2, &wg, &wu, &wd}; }
};

}  // namespace

int main(int argc, char** argv) try {
  const Options o = parse(argc, argv);
  tsp::set_compute_threads(o.threads);

  LlamaConfig c;
  c.hidden_size = o.h;
  c.num_attention_heads = o.heads;
  c.num_key_value_heads = o.kv_heads;
  c.intermediate_size = o.ffn;
  const block::AttnDims ad = block::attn_dims(c);
  const int64_t B = o.batch, S = o.seq, n = B * S, h = o.h, F = o.ffn;
  const float eps = 1e-5f;

  std::mt19937 rng(1234);
  BlockParams w(h, ad.q_width(), ad.kv_width(), F, MemCategory::Weights);
  BlockParams g(h, ad.q_width(), ad.kv_width(), F, MemCategory::Grads);
  for (Tensor* t : w.all()) fill_normal(*t, 0.02f, rng);
  std::fill(w.norm1.f32(), w.norm1.f32() + h, 1.f);
  std::fill(w.norm2.f32(), w.norm2.f32() + h, 1.f);
  Tensor x_in = Tensor::f32({n, h}, MemCategory::Workspace);
  Tensor dy = Tensor::f32({n, h}, MemCategory::Workspace);
  fill_normal(x_in, 1.f, rng);
  fill_normal(dy, 1.f, rng);

  std::vector<int64_t> pos(S), tok_pos(n);
  std::iota(pos.begin(), pos.end(), 0);
  for (int64_t i = 0; i < n; ++i) tok_pos[i] = i % S;
  const block::AttnWeights aw{w.wq.f32(), w.wk.f32(), w.wv.f32(), w.wo.f32()};
  const block::AttnGrads ag{g.wq.f32(), g.wk.f32(), g.wv.f32(), g.wo.f32()};
  const block::MlpWeights mw{w.wg.f32(), w.wu.f32(), w.wd.f32(), F};
  const block::MlpGrads mg{g.wg.f32(), g.wu.f32(), g.wd.f32()};

  Tensor xn = Tensor::f32({n, h}, MemCategory::Workspace);
  Tensor y = Tensor::f32({n, h}, MemCategory::Workspace);
  Tensor dx = Tensor::f32({n, h}, MemCategory::Workspace);
  Tensor dxn = Tensor::f32({n, h}, MemCategory::Workspace);
  Tensor d_o = Tensor::f32({n, ad.hq, ad.d}, MemCategory::Workspace);
  Tensor dq = Tensor::f32({n, ad.hq, ad.d}, MemCategory::Workspace);
  Tensor dk = Tensor::f32({n, ad.hkv, ad.d}, MemCategory::Workspace);
  Tensor dv = Tensor::f32({n, ad.hkv, ad.d}, MemCategory::Workspace);
  block::LayerSaved s;
  s.allocate(n, h, ad.hq, ad.hkv, ad.d);

  // One forward + backward: the single layout's layer, y = block(x_in), then dx = ∂(dy·y)/∂x_in.
  auto step = [&] {
    // Forward.                                                   x [n, h] -> y [n, h]
    copy(x_in, s.x);
    rmsnorm_forward(s.x.f32(), w.norm1.f32(), xn.f32(), s.rstd1.f32(), n, h, eps);
    block::qkv_forward(ad, aw, xn.f32(), tok_pos.data(), n, s.q.f32(), s.k.f32(), s.v.f32());
    block::attention_forward(ad, B, S, S, s.q.f32(), s.k.f32(), s.v.f32(), pos.data(), pos.data(),
                             s.o.f32(), s.lse.f32());
    copy(s.x, s.x2);
    block::out_proj_forward(ad, w.wo.f32(), s.o.f32(), n, s.x2.f32());
    rmsnorm_forward(s.x2.f32(), w.norm2.f32(), xn.f32(), s.rstd2.f32(), n, h, eps);
    copy(s.x2, y);
    block::mlp_forward(mw, h, xn.f32(), n, y.f32());
    // Backward.                                                  dy [n, h] -> dx [n, h]
    copy(dy, dx);
    block::rmsnorm_apply(s.x2.f32(), w.norm2.f32(), s.rstd2.f32(), xn.f32(), n, h);
    dxn.zero();
    block::mlp_backward(mw, mg, h, xn.f32(), dx.f32(), n, dxn.f32());
    block::rmsnorm_backward_add(dxn.f32(), s.x2.f32(), w.norm2.f32(), s.rstd2.f32(), dx.f32(),
                                g.norm2.f32(), n, h);
    block::out_proj_backward(ad, w.wo.f32(), s.o.f32(), dx.f32(), n, d_o.f32(), g.wo.f32());
    dq.zero();
    dk.zero();
    dv.zero();
    block::attention_backward(ad, B, S, S, s.q.f32(), s.k.f32(), s.v.f32(), pos.data(), pos.data(),
                              s.o.f32(), s.lse.f32(), d_o.f32(), dq.f32(), dk.f32(), dv.f32());
    block::rmsnorm_apply(s.x.f32(), w.norm1.f32(), s.rstd1.f32(), xn.f32(), n, h);
    dxn.zero();
    block::qkv_backward(ad, aw, ag, xn.f32(), tok_pos.data(), n, dq.f32(), dk.f32(), dv.f32(),
                        dxn.f32());
    block::rmsnorm_backward_add(dxn.f32(), s.x.f32(), w.norm1.f32(), s.rstd1.f32(), dx.f32(),
                                g.norm1.f32(), n, h);
  };

  step();  // warm-up: oneDNN primitive creation, page faults
  std::vector<double> times;
  for (int r = 0; r < o.repeats; ++r) {
    const double t0 = now_s();
    step();
    times.push_back(now_s() - t0);
  }
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];

  // A result that is not finite would make the timing meaningless: say so in the row.
  bool finite = true;
  for (int64_t i = 0; i < n * h; ++i) finite = finite && std::isfinite(dx.f32()[i]);
  for (int64_t i = 0; i < n * h; ++i) finite = finite && std::isfinite(y.f32()[i]);

  const double P =
      static_cast<double>(h * ad.q_width() + 2 * h * ad.kv_width() + ad.q_width() * h + 3 * h * F);
  const double flops = 6.0 * n * P + 7.0 * B * S * S * ad.hq * ad.d;
  const double gflops = flops / med / 1e9, tok_s = n / med;
  if (o.json) {
    std::printf(
        "{\"impl\": \"tsp\", \"h\": %lld, \"heads\": %lld, \"kv_heads\": %lld, \"ffn\": %lld, "
        "\"seq\": %lld, \"batch\": %lld, \"threads\": %d, \"repeats\": %d, \"median_ms\": %.3f, "
        "\"min_ms\": %.3f, \"gflop\": %.4f, \"gflops\": %.2f, \"tokens_per_s\": %.1f, "
        "\"finite\": %s}\n",
        (long long)h, (long long)o.heads, (long long)o.kv_heads, (long long)F, (long long)S,
        (long long)B, o.threads, o.repeats, med * 1e3, times.front() * 1e3, flops / 1e9, gflops,
        tok_s, finite ? "true" : "false");
  } else {
    std::printf("# bench_block  machine=%s  threads=%d  repeats=%d  dtype=f32\n",
                tsp::cpu_description().c_str(), o.threads, o.repeats);
    std::printf("# %-5s %5s %6s %3s %5s %6s %5s %11s %9s %8s %9s %10s %3s\n", "impl", "h", "heads",
                "kv", "ffn", "seq", "batch", "median_ms", "min_ms", "GFLOP", "GFLOP/s", "tokens/s",
                "ok");
    std::printf("  %-5s %5lld %6lld %3lld %5lld %6lld %5lld %11.2f %9.2f %8.2f %9.2f %10.1f %3s\n",
                "tsp", (long long)h, (long long)o.heads, (long long)o.kv_heads, (long long)F,
                (long long)S, (long long)B, med * 1e3, times.front() * 1e3, flops / 1e9, gflops,
                tok_s, finite ? "yes" : "NO");
  }
  return finite ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_block: %s\n", e.what());
  return 1;
}
