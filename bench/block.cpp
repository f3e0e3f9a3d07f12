// One Llama block, forward + backward, on one rank with the block maths every layout uses
// (tsp/model/block.h, composed exactly as the single layout composes one layer), at the shapes of
// the PyTorch benchmark bench/torch_block.py. scripts/bench_vs_torch.sh runs both and prints the
// ratio.
//
//   bench_block [--h 1024] [--heads 16] [--kv-heads 16] [--ffn 2816] [--seq 1024] [--batch 1]
//               [--dtype bf16|fp32] [--threads 2] [--repeats 5] [--device cpu|cuda[:N]] [--json]
//               [--gemm-rate] [--profile] [--recompute selective|none]
//
// --device cuda: the same block on the GPU backend (timed between backend.synchronize() calls),
// and the model-FLOP utilisation (MFU): model TFLOP/s over the card's bf16 GEMM rate measured here
// with the backend's own linear_forward on 8192 × 8192 × 8192 (bf16 in and out; median of 10
// after 3 warm-ups). --gemm-rate also measures it on the CPU (at 2048³).
//
// --profile: after the timed repeats (whose numbers it leaves alone), one more step through a
// timing decorator of the backend (ProfilingBackend): every backend call's time (CUDA events around
// it on the compute stream; wall time on the CPU), summed per op and per op and shapes, with the
// share of the step and the time between calls (launch gaps, host work), and the GEMMs' TFLOP/s
// (2·m·n·k per product: how far each GEMM shape, e.g. the MLP's token chunks, is from the
// card's rate), and every op's least memory traffic (each tensor it reads or writes, once) in GB
// and over its time in GB/s (how far a memory-bound kernel is from the memory's bandwidth); totals
// for the GEMMs, attention and the other ops. Under --json on stderr.
//
// --dtype is the compute dtype (default: the backend's, default_compute_dtype: bf16 where bf16 is
// native). In bf16 the block runs as a layout runs it in mixed precision: the weights are bf16
// copies of fp32 masters (rounded once at set-up, as ShardStore::refresh_compute does), the
// residual stream and the saved activations are bf16, gradients and statistics fp32.
//
// FLOPs counted (the same formula in bench/torch_block.py, so the ratio of GFLOP/s equals the ratio
// of tokens/s): "model FLOPs" of one forward + backward,
//   GEMMs      6·N·P,  P = h·(hq·d) + 2·h·(hkv·d) + (hq·d)·h + 3·h·F  (fwd 2·N·P, bwd 4·N·P)
//   attention  7·B·S²·hq·d: causal halves of QKᵀ and PV forward (2·S²·d per head) and of the five
//              backward products (5·S²·d per head)
// Recomputation is not counted: under --recompute selective (the default, what the layouts do by
// default) our backward recomputes the MLP's gate/up (2·N·2·h·F more FLOPs really executed) and
// the two norms; PyTorch's autograd keeps them. --recompute none keeps them as autograd does (the
// normed inputs and the MLP's gate, up and act: LayerSaved::allocate_kept, as the layouts keep
// them under --recompute none), so both sides then execute the same GEMMs. Norms, RoPE, SwiGLU and softmax are O(N·h) and
// not counted on either side.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#ifdef TSP_WITH_CUDA
#include "backend/cuda/cuda_common.h"  // compute_stream: the profiler's events are ordered on it
#endif

#include "tsp/backend/backend.h"
#include "tsp/core/error.h"
#include "tsp/core/machine.h"
#include "tsp/core/tensor.h"
#include "tsp/model/block.h"
#include "tsp/model/config.h"
#include "tsp/ops/gemm.h"  // set_compute_threads

namespace {
using namespace tsp;

struct Options {
  int64_t h = 1024, heads = 16, kv_heads = 0, ffn = 2816, seq = 1024, batch = 1;
  int threads = 2, repeats = 5;
  std::string dtype;  // empty: default_compute_dtype of the backend
  std::string device = "cpu";
  bool json = false, gemm_rate = false, profile = false;
  bool keep = false;  // --recompute none: keep the normed inputs and the MLP activations
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
    else if (a == "--dtype")
      o.dtype = next();
    else if (a == "--threads")
      o.threads = std::stoi(next());
    else if (a == "--repeats")
      o.repeats = std::stoi(next());
    else if (a == "--json")
      o.json = true;
    else if (a == "--device")
      o.device = next();
    else if (a == "--gemm-rate")
      o.gemm_rate = true;
    else if (a == "--profile")
      o.profile = true;
    else if (a == "--recompute") {
      const std::string m = next();
      TSP_CHECK(m == "selective" || m == "none",
                "bench_block: --recompute {} is not selective or none (full replays a layout's "
                "layer, which one block on its own has not got)",
                m);
      o.keep = m == "none";
    } else if (a == "--help" || a == "-h") {
      std::printf(
          "bench_block [--h H] [--heads NH] [--kv-heads NKV] [--ffn F] [--seq S] [--batch B]\n"
          "            [--dtype bf16|fp32] [--threads T] [--repeats R] [--device cpu|cuda[:N]]\n"
          "            [--gemm-rate] [--json] [--profile] [--recompute selective|none]\n"
          "One Llama block forward+backward with tsp's block maths, in the compute dtype (default\n"
          "%s here: the backend's default); prints GFLOP/s and tokens/s (median of R timed\n"
          "repeats after one warm-up). --profile: after the timing, one more step with every\n"
          "backend call timed (CUDA events on a GPU), as a table per op and per op and shape.\n"
          "--recompute none: keep the normed inputs and the MLP's gate/up/act for the backward\n"
          "(as PyTorch's autograd does) instead of recomputing them (selective, the default).\n",
          std::string(dtype_name(default_compute_dtype(backend_for(Device::cpu())))).c_str());
      std::exit(0);
    } else {
      TSP_FAIL("bench_block: unknown argument '{}' (try --help)", a);
    }
  }
  if (o.kv_heads == 0) o.kv_heads = o.heads;
  TSP_CHECK(o.h >= 1 && o.heads >= 1 && o.kv_heads >= 1 && o.ffn >= 1 && o.seq >= 1 && o.batch >= 1,
            "bench_block: --h, --heads, --kv-heads, --ffn, --seq and --batch must be >= 1");
  TSP_CHECK(o.h % o.heads == 0 && o.heads % o.kv_heads == 0,
            "bench_block: need heads | h and kv_heads | heads (got h={} heads={} kv_heads={})", o.h,
            o.heads, o.kv_heads);
  TSP_CHECK(o.repeats >= 1 && o.threads >= 1, "bench_block: --repeats and --threads must be >= 1");
  return o;
}

// The block's tensors in the Hugging Face [out, in] layout, one dtype for all.
struct BlockParams {
  Tensor norm1, wq, wk, wv, wo, norm2, wg, wu, wd;
  BlockParams(int64_t h, int64_t qw, int64_t kvw, int64_t F, DType t, MemCategory c, Device dev)
      : norm1({h}, t, c, dev),
        wq({qw, h}, t, c, dev),
        wk({kvw, h}, t, c, dev),
        wv({kvw, h}, t, c, dev),
        wo({h, qw}, t, c, dev),
        norm2({h}, t, c, dev),
        wg({F, h}, t, c, dev),
        wu({F, h}, t, c, dev),
        wd({h, F}, t, c, dev) {}
  std::vector<Tensor*> all() { return {&norm1, &wq, &wk, &wv, &wo, &norm2, &wg, &wu, &wd}; }
};

// The backend's bf16 GEMM rate in TFLOP/s: y [n, n] = x [n, n] · wᵀ, median of 10 timed calls
// after 3 warm-ups (inputs N(0, 1) rounded to bf16: random data, as a model's).
double gemm_tflops(Backend& be, int64_t n) {
  const Device dev = be.device();
  Tensor x({n, n}, DType::BF16, MemCategory::Workspace, dev);
  Tensor w({n, n}, DType::BF16, MemCategory::Workspace, dev);
  Tensor y({n, n}, DType::BF16, MemCategory::Workspace, dev);
  {
    std::mt19937 rng(7);
    std::normal_distribution<float> dist(0.f, 1.f);
    std::vector<float> host(n * n);
    for (float& v : host) v = dist(rng);
    Tensor f = Tensor::f32({n, n}, MemCategory::Workspace, dev);
    be.upload(host.data(), f.view());
    be.copy(f.view(), x.view());
    be.copy(f.view(), w.view());
  }
  for (int i = 0; i < 3; ++i) be.linear_forward(x.view(), w.view(), y.view(), false);
  be.synchronize();
  std::vector<double> t;
  for (int i = 0; i < 10; ++i) {
    const double t0 = now_s();
    be.linear_forward(x.view(), w.view(), y.view(), false);
    be.synchronize();
    t.push_back(now_s() - t0);
  }
  std::sort(t.begin(), t.end());
  return 2.0 * n * n * n / t[t.size() / 2] / 1e12;
}

// N(0, std²) values into an F32 tensor on any device (one upload).
void fill_normal(Backend& be, Tensor& t, float std, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.f, std);
  std::vector<float> host(t.numel());
  for (float& x : host) x = dist(rng);
  be.upload(host.data(), t.view());
}

// ---- --profile: every backend call of one step timed --------------------------------------------
// A Backend that forwards each call to the real one and times it: on a CUDA device with a pair of
// events recorded on the compute stream around the call (the op's GPU time, read after a
// synchronize, without serialising the step), on the CPU with wall time (its ops are synchronous).
// The block code takes a Backend&, so the step runs unchanged on this decorator. Calls are keyed
// by op and by op plus the shapes of their first tensors, which tells the GEMMs of qkv, the MLP
// chunks and the projections apart.
class ProfilingBackend final : public Backend {
 public:
  explicit ProfilingBackend(Backend& inner) : inner_(inner) {}
  ~ProfilingBackend() override {
#ifdef TSP_WITH_CUDA
    for (Record& r : pool_)  // events exist only on a GPU (none touch CUDA on the CPU)
      if (r.start) {
        cudaEventDestroy(r.start);
        cudaEventDestroy(r.end);
      }
#endif
  }

  // Brackets a whole step (start() ... stop()) so the table can say what share the calls are of it
  // and how much time lies between them (launch gaps, host work: allocation, checks).
  void start() {
    used_ = 0;
    begin("(step)");  // record 0
  }
  void stop() {
    end(pool_[0]);
  }

  struct Row {
    std::string key;
    int calls = 0;
    double ms = 0;
    double flops = 0;  // the GEMMs' 2·m·n·k per product; 0 for other ops
    double bytes = 0;  // the least memory traffic of the calls (moved(): each tensor once)
  };
  // After stop(): waits for the device, then sums the calls per op (by_shape: per op and shapes).
  std::vector<Row> rows(bool by_shape, double* step_ms) {
    inner_.synchronize();
    std::map<std::string, Row> sum;
    for (size_t i = 1; i < used_; ++i) {  // record 0 is the step
      const Record& r = pool_[i];
      Row& row = sum[by_shape ? r.op + " " + r.shapes : r.op];
      row.key = by_shape ? r.op + " " + r.shapes : r.op;
      row.calls += 1;
      row.ms += elapsed_ms(r);
      row.flops += r.flops;
      row.bytes += r.bytes;
    }
    *step_ms = elapsed_ms(pool_[0]);
    std::vector<Row> out;
    for (auto& [k, row] : sum) out.push_back(row);
    std::sort(out.begin(), out.end(), [](const Row& a, const Row& b) { return a.ms > b.ms; });
    return out;
  }

  Device device() const override {
    return inner_.device();
  }
  std::string name() const override {
    return inner_.name();
  }
  bool native_bf16() const override {
    return inner_.native_bf16();
  }

  void zero(TensorView t) override {
    timed(
        "zero", {t}, [&] { inner_.zero(t); }, 0, moved({}, {t}));
  }
  void fill(TensorView t, float value) override {
    timed(
        "fill", {t}, [&] { inner_.fill(t, value); }, 0, moved({}, {t}));
  }
  void copy(TensorView src, TensorView dst) override {
    timed(
        "copy", {src, dst}, [&] { inner_.copy(src, dst); }, 0, moved({src}, {dst}));
  }
  void copy_2d(TensorView src, int64_t ss, TensorView dst, int64_t ds, int64_t rows,
               int64_t cols) override {
    timed(
        "copy_2d", {src, dst}, [&] { inner_.copy_2d(src, ss, dst, ds, rows, cols); }, 0,
        static_cast<double>(rows * cols) * (dtype_size(src.dtype()) + dtype_size(dst.dtype())));
  }
  void swap_leading_dims(TensorView src, TensorView dst) override {
    timed(
        "swap_leading_dims", {src}, [&] { inner_.swap_leading_dims(src, dst); }, 0,
        moved({src}, {dst}));
  }
  void upload(const void* host, TensorView dst) override {
    timed(
        "upload", {dst}, [&] { inner_.upload(host, dst); }, 0, moved({}, {dst}));
  }
  void download(TensorView src, void* host) override {
    timed(
        "download", {src}, [&] { inner_.download(src, host); }, 0, moved({src}, {}));
  }
  void synchronize() override {
    timed(
        "synchronize", {}, [&] { inner_.synchronize(); }, 0, 0);
  }

  void add(TensorView y, TensorView x) override {
    timed(
        "add", {y, x}, [&] { inner_.add(y, x); }, 0, moved({y, x}, {y}));
  }
  void scale(TensorView y, float f) override {
    timed(
        "scale", {y}, [&] { inner_.scale(y, f); }, 0, moved({y}, {y}));
  }
  void sum_squares(TensorView x, TensorView out) override {
    timed(
        "sum_squares", {x}, [&] { inner_.sum_squares(x, out); }, 0, moved({x}, {out}));
  }
  void count_non_finite(TensorView x, TensorView out, bool also_negative) override {
    timed(
        "count_non_finite", {x}, [&] { inner_.count_non_finite(x, out, also_negative); }, 0,
        moved({x}, {out}));
  }

  void linear_forward(TensorView x, TensorView w, TensorView y, bool accumulate) override {
    timed(
        accumulate ? "linear_forward (+=)" : "linear_forward", {x, w, y},
        [&] { inner_.linear_forward(x, w, y, accumulate); }, gemm_flops(x, w, 1),
        moved({x, w, accumulate ? y : TensorView{}}, {y}));
  }
  void linear_backward(TensorView dy, TensorView x, TensorView w, TensorView dx,
                       TensorView dw) override {
    // dx = dy·W and dW = dyᵀ·x: one product each, for the ones asked for.
    timed(
        "linear_backward", {dy, x, w}, [&] { inner_.linear_backward(dy, x, w, dx, dw); },
        gemm_flops(x, w, !dx.empty() + !dw.empty()),
        moved({dy, dx.empty() ? TensorView{} : w, dx, dw.empty() ? TensorView{} : x, dw},
              {dx, dw}));
  }

  void rmsnorm_forward(TensorView x, TensorView w, TensorView y, TensorView rstd,
                       float eps) override {
    timed(
        "rmsnorm_forward", {x, y}, [&] { inner_.rmsnorm_forward(x, w, y, rstd, eps); }, 0,
        moved({x, w}, {y, rstd}));
  }
  void rmsnorm_apply(TensorView x, TensorView w, TensorView rstd, TensorView y) override {
    timed(
        "rmsnorm_apply", {x, y}, [&] { inner_.rmsnorm_apply(x, w, rstd, y); }, 0,
        moved({x, w, rstd}, {y}));
  }
  void rmsnorm_backward(TensorView dy, TensorView x, TensorView w, TensorView rstd, TensorView dx,
                        TensorView dw) override {
    timed(
        "rmsnorm_backward", {dy, x}, [&] { inner_.rmsnorm_backward(dy, x, w, rstd, dx, dw); }, 0,
        moved({dy, x, w, rstd, dw}, {dx, dw}));
  }
  void rope_forward(TensorView x, TensorView pos, float theta) override {
    timed(
        "rope_forward", {x}, [&] { inner_.rope_forward(x, pos, theta); }, 0, moved({x, pos}, {x}));
  }
  void rope_backward(TensorView dx, TensorView pos, float theta) override {
    timed(
        "rope_backward", {dx}, [&] { inner_.rope_backward(dx, pos, theta); }, 0,
        moved({dx, pos}, {dx}));
  }
  void swiglu_forward(TensorView g, TensorView u, TensorView a) override {
    timed(
        "swiglu_forward", {g, a}, [&] { inner_.swiglu_forward(g, u, a); }, 0, moved({g, u}, {a}));
  }
  void swiglu_backward(TensorView da, TensorView g, TensorView u, TensorView dg,
                       TensorView du) override {
    timed(
        "swiglu_backward", {da}, [&] { inner_.swiglu_backward(da, g, u, dg, du); }, 0,
        moved({da, g, u}, {dg, du}));
  }
  void embedding_forward(TensorView ids, TensorView table, TensorView out, int64_t v0) override {
    timed(
        "embedding_forward", {table, out}, [&] { inner_.embedding_forward(ids, table, out, v0); },
        0, moved({ids}, {out}) + rows_of(table, out));
  }
  void embedding_backward(TensorView ids, TensorView dout, TensorView dtable, int64_t v0) override {
    timed(
        "embedding_backward", {dout, dtable},
        [&] { inner_.embedding_backward(ids, dout, dtable, v0); }, 0,
        moved({ids, dout}, {}) + 2 * rows_of(dtable, dout));
  }
  void cross_entropy(TensorView logits, TensorView labels, TensorView dlogits, float grad_scale,
                     TensorView loss, int32_t ignore_index) override {
    timed(
        "cross_entropy", {logits},
        [&] { inner_.cross_entropy(logits, labels, dlogits, grad_scale, loss, ignore_index); }, 0,
        moved({logits, labels}, {dlogits, loss}));
  }
  void online_softmax_update(TensorView logits, TensorView labels, TensorView row_max,
                             TensorView row_sum, TensorView target, int64_t v0) override {
    timed(
        "online_softmax_update", {logits},
        [&] { inner_.online_softmax_update(logits, labels, row_max, row_sum, target, v0); }, 0,
        moved({logits, labels, row_max, row_sum, target}, {row_max, row_sum, target}));
  }
  void online_softmax_merge(TensorView max_a, TensorView sum_a, TensorView max_b,
                            TensorView sum_b) override {
    timed(
        "online_softmax_merge", {max_a},
        [&] { inner_.online_softmax_merge(max_a, sum_a, max_b, sum_b); }, 0,
        moved({max_a, sum_a, max_b, sum_b}, {max_a, sum_a}));
  }
  void online_softmax_backward(TensorView logits, TensorView labels, TensorView row_max,
                               TensorView row_sum, TensorView dlogits, int64_t v0, float grad_scale,
                               int32_t ignore_index) override {
    timed(
        "online_softmax_backward", {logits},
        [&] {
          inner_.online_softmax_backward(logits, labels, row_max, row_sum, dlogits, v0, grad_scale,
                                         ignore_index);
        },
        0, moved({logits, labels, row_max, row_sum}, {dlogits}));
  }
  void online_softmax_loss(TensorView row_max, TensorView row_sum, TensorView target,
                           TensorView labels, TensorView loss, int32_t ignore_index) override {
    timed(
        "online_softmax_loss", {row_max},
        [&] { inner_.online_softmax_loss(row_max, row_sum, target, labels, loss, ignore_index); },
        0, moved({row_max, row_sum, target, labels}, {loss}));
  }
  void attention_forward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                         TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                         float scale) override {
    timed(
        "attention_forward", {q, k},
        [&] { inner_.attention_forward(q, k, v, q_pos, k_pos, q_doc_pos, o, lse, scale); }, 0,
        moved({q, k, v, q_pos, k_pos, q_doc_pos}, {o, lse}));
  }
  void attention_backward(TensorView q, TensorView k, TensorView v, TensorView q_pos,
                          TensorView k_pos, TensorView q_doc_pos, TensorView o, TensorView lse,
                          TensorView dout, TensorView dq, TensorView dk, TensorView dv,
                          float scale) override {
    timed(
        "attention_backward", {q, k},
        [&] {
          inner_.attention_backward(q, k, v, q_pos, k_pos, q_doc_pos, o, lse, dout, dq, dk, dv,
                                    scale);
        },
        0, moved({q, k, v, q_pos, k_pos, q_doc_pos, o, lse, dout, dq, dk, dv}, {dq, dk, dv}));
  }
  void attention_merge(TensorView o_a, TensorView lse_a, TensorView o_b,
                       TensorView lse_b) override {
    timed(
        "attention_merge", {o_a}, [&] { inner_.attention_merge(o_a, lse_a, o_b, lse_b); }, 0,
        moved({o_a, lse_a, o_b, lse_b}, {o_a, lse_a}));
  }
  void adamw(TensorView w, TensorView grad, TensorView m, TensorView v,
             const AdamWStep& step) override {
    timed(
        "adamw", {w}, [&] { inner_.adamw(w, grad, m, v, step); }, 0,
        moved({w, grad, m, v}, {w, m, v}));
  }

 private:
  struct Record {
    std::string op, shapes;
#ifdef TSP_WITH_CUDA
    cudaEvent_t start = nullptr, end = nullptr;
#endif
    double t0 = 0, t1 = 0;  // wall seconds (CPU)
    double flops = 0, bytes = 0;
  };

  // The least memory traffic of a call: every tensor it reads, read once, and every tensor it
  // writes, written once (a tensor it updates, such as an accumulated output, is in both lists;
  // empty views count nothing). Above it lies what a kernel re-reads (GEMM operand tiles, the K/V
  // that each query tile of attention visits), so for a memory-bound op bytes / time is the
  // bandwidth it reaches, to compare with the card's.
  static double moved(std::initializer_list<TensorView> read,
                      std::initializer_list<TensorView> written) {
    double b = 0;
    for (const TensorView& v : read) b += static_cast<double>(v.nbytes());
    for (const TensorView& v : written) b += static_cast<double>(v.nbytes());
    return b;
  }
  // The rows of `table` that a lookup of `out`'s rows touches (one table row per output row).
  static double rows_of(const TensorView& table, const TensorView& out) {
    return static_cast<double>(out.numel()) * static_cast<double>(dtype_size(table.dtype()));
  }

  // `products` GEMMs of the linear layer x [.., k] · w [n, k]ᵀ: 2·m·n·k each, m = x's rows.
  static double gemm_flops(const TensorView& x, const TensorView& w, int products) {
    const double k = static_cast<double>(w.dim(1)), n = static_cast<double>(w.dim(0));
    const double m = static_cast<double>(x.numel()) / k;
    return 2.0 * m * n * k * products;
  }

  bool on_gpu() const {
    return !inner_.device().is_cpu();
  }

  // "bf16[512,4096] f32[14336,4096]": the dtypes and shapes that tell calls of one op apart.
  static std::string shapes_of(std::initializer_list<TensorView> views) {
    std::string s;
    for (const TensorView& v : views) {
      if (!s.empty()) s += ' ';
      s += std::string(dtype_name(v.dtype())) + shape_str(v.shape());
    }
    return s;
  }

  // The next record of the pool (events created once and reused by later steps), started.
  Record& begin(const char* op, std::string shapes = {}) {
    if (used_ == pool_.size()) {
      pool_.emplace_back();
#ifdef TSP_WITH_CUDA
      if (on_gpu()) {
        TSP_CUDA_CHECK(cudaEventCreate(&pool_.back().start));
        TSP_CUDA_CHECK(cudaEventCreate(&pool_.back().end));
      }
#endif
    }
    Record& r = pool_[used_++];
    r.op = op;
    r.shapes = std::move(shapes);
#ifdef TSP_WITH_CUDA
    if (on_gpu()) {
      TSP_CUDA_CHECK(cudaEventRecord(r.start, cuda::compute_stream(inner_.device().index)));
      return r;
    }
#endif
    r.t0 = now_s();
    return r;
  }
  void end(Record& r) {
#ifdef TSP_WITH_CUDA
    if (on_gpu()) {
      TSP_CUDA_CHECK(cudaEventRecord(r.end, cuda::compute_stream(inner_.device().index)));
      return;
    }
#endif
    r.t1 = now_s();
  }
  double elapsed_ms(const Record& r) const {
#ifdef TSP_WITH_CUDA
    if (on_gpu()) {
      float ms = 0;
      TSP_CUDA_CHECK(cudaEventElapsedTime(&ms, r.start, r.end));
      return ms;
    }
#endif
    return (r.t1 - r.t0) * 1e3;
  }

  // Pool indices, not references, across the call: the call itself may not add records (the
  // inner backend is not this one), but begin() of a nested call would grow the pool.
  template <class F>
  void timed(const char* op, std::initializer_list<TensorView> views, F&& call, double flops,
             double bytes) {
    const size_t i = used_;
    begin(op, shapes_of(views));
    call();
    end(pool_[i]);
    pool_[i].flops = flops;
    pool_[i].bytes = bytes;
  }

  Backend& inner_;
  std::vector<Record> pool_;
  size_t used_ = 0;
};

// The profile tables: per op, then per op and shapes (the 30 largest), in ms and % of the step.
void print_profile(ProfilingBackend& prof, FILE* out) {
  for (const bool by_shape : {false, true}) {
    double step_ms = 0;
    const std::vector<ProfilingBackend::Row> rows = prof.rows(by_shape, &step_ms);
    double sum = 0;
    for (const auto& r : rows) sum += r.ms;
    std::fprintf(out, "# profile %s: one forward+backward, %.3f ms (%s)\n",
                 by_shape ? "per op and shapes (30 largest)" : "per op", step_ms,
                 prof.device().is_cpu() ? "wall time" : "CUDA events on the compute stream");
    std::fprintf(out, "  %-*s %6s %10s %7s %9s %9s %8s\n", by_shape ? 72 : 24, "op", "calls",
                 "total_ms", "%step", "TFLOP/s", "GB", "GB/s");
    int shown = 0;
    for (const auto& r : rows) {
      if (by_shape && ++shown > 30) break;
      // The GEMMs' rate (2·m·n·k per product over the op's time), to compare with the card's;
      // every op's least traffic (moved()) over its time, to compare with the memory's bandwidth.
      const std::string rate =
          r.flops > 0 && r.ms > 0 ? fmt::format("{:.1f}", r.flops / (r.ms * 1e-3) / 1e12) : "";
      const std::string bandwidth =
          r.bytes > 0 && r.ms > 0 ? fmt::format("{:.0f}", r.bytes / (r.ms * 1e-3) / 1e9) : "";
      std::fprintf(out, "  %-*s %6d %10.3f %6.1f%% %9s %9.3f %8s\n", by_shape ? 72 : 24,
                   r.key.c_str(), r.calls, r.ms, step_ms > 0 ? 100 * r.ms / step_ms : 0.0,
                   rate.c_str(), r.bytes / 1e9, bandwidth.c_str());
    }
    if (by_shape) continue;
    // Totals: every op, the time between them, the GEMMs, attention (compute-bound, timed in its
    // own table by bench_attention), and the other ops: the memory-bound ones, whose least
    // traffic over their time is the bandwidth they reach.
    double gemm_ms = 0, gemm_flops = 0, attention_ms = 0, other_ms = 0, other_bytes = 0;
    for (const auto& r : rows) {
      if (r.flops > 0) {
        gemm_ms += r.ms;
        gemm_flops += r.flops;
      } else if (r.key == "attention_forward" || r.key == "attention_backward") {
        attention_ms += r.ms;
      } else {
        other_ms += r.ms;
        other_bytes += r.bytes;
      }
    }
    const auto share = [&](double ms) { return step_ms > 0 ? 100 * ms / step_ms : 0.0; };
    std::fprintf(out, "  %-24s %6s %10.3f %6.1f%%\n", "(all ops)", "", sum, share(sum));
    std::fprintf(out, "  %-24s %6s %10.3f %6.1f%%\n", "(between ops)", "", step_ms - sum,
                 share(step_ms - sum));
    std::fprintf(out, "  %-24s %6s %10.3f %6.1f%% %9.1f\n", "(GEMMs)", "", gemm_ms, share(gemm_ms),
                 gemm_ms > 0 ? gemm_flops / (gemm_ms * 1e-3) / 1e12 : 0.0);
    std::fprintf(out, "  %-24s %6s %10.3f %6.1f%%\n", "(attention)", "", attention_ms,
                 share(attention_ms));
    std::fprintf(out, "  %-24s %6s %10.3f %6.1f%% %9s %9.3f %8.0f\n", "(other ops)", "", other_ms,
                 share(other_ms), "", other_bytes / 1e9,
                 other_ms > 0 ? other_bytes / (other_ms * 1e-3) / 1e9 : 0.0);
  }
}

}  // namespace

int main(int argc, char** argv) try {
  const Options o = parse(argc, argv);
  tsp::set_compute_threads(o.threads);
  Backend& be = backend_for(parse_device(o.device));
  const Device dev = be.device();
  const DType act = o.dtype.empty() ? default_compute_dtype(be) : parse_compute_dtype(o.dtype);

  LlamaConfig c;
  c.hidden_size = o.h;
  c.num_attention_heads = o.heads;
  c.num_key_value_heads = o.kv_heads;
  c.intermediate_size = o.ffn;
  const block::AttnDims ad = block::attn_dims(c);
  const int64_t B = o.batch, S = o.seq, n = B * S, h = o.h, F = o.ffn;
  const float eps = 1e-5f;
  const int64_t qw = ad.q_width(), kvw = ad.kv_width();

  // fp32 master weights (norm weights 1, the rest N(0, 0.02²)), their compute-dtype copy rounded
  // once (the same tensors under fp32, as ShardStore::compute), fp32 gradients zeroed once.
  std::mt19937 rng(1234);
  BlockParams master(h, qw, kvw, F, DType::F32, MemCategory::Weights, dev);
  for (Tensor* t : master.all()) fill_normal(be, *t, 0.02f, rng);
  be.fill(master.norm1.view(), 1.f);
  be.fill(master.norm2.view(), 1.f);
  std::optional<BlockParams> rounded;
  if (act != DType::F32) {
    rounded.emplace(h, qw, kvw, F, act, MemCategory::Weights, dev);
    const std::vector<Tensor*> from = master.all(), to = rounded->all();
    for (size_t i = 0; i < from.size(); ++i) be.copy(from[i]->view(), to[i]->view());
  }
  BlockParams& w = rounded ? *rounded : master;
  BlockParams g(h, qw, kvw, F, DType::F32, MemCategory::Grads, dev);
  for (Tensor* t : g.all()) be.zero(t->view());

  // The block input (a residual stream, compute dtype) and the gradient of its output (F32).
  Tensor x_in({n, h}, act, MemCategory::Workspace, dev);
  {
    Tensor x32 = Tensor::f32({n, h}, MemCategory::Workspace, dev);
    fill_normal(be, x32, 1.f, rng);
    be.copy(x32.view(), x_in.view());
  }
  Tensor dy = Tensor::f32({n, h}, MemCategory::Workspace, dev);
  fill_normal(be, dy, 1.f, rng);

  // Positions as the single layout has them (take_tokens with one part): every row 0..S-1.
  std::vector<int64_t> pos(S), tok_pos_host(n);
  std::iota(pos.begin(), pos.end(), int64_t{0});
  for (int64_t i = 0; i < n; ++i) tok_pos_host[i] = i % S;
  const Tensor q_pos = be.device_copy(pos, MemCategory::Workspace);
  const Tensor tok_pos = be.device_copy(tok_pos_host, MemCategory::Workspace);

  const block::AttnWeights aw{w.wq.view(), w.wk.view(), w.wv.view(), w.wo.view()};
  const block::AttnGrads ag{g.wq.view(), g.wk.view(), g.wv.view(), g.wo.view()};
  const block::MlpWeights mw{w.wg.view(), w.wu.view(), w.wd.view()};
  const block::MlpGrads mg{g.wg.view(), g.wu.view(), g.wd.view()};

  constexpr MemCategory kWork = MemCategory::Workspace;
  Tensor x({n, h}, act, kWork, dev);   // residual stream: block output
  Tensor xn({n, h}, act, kWork, dev);  // normed input of a sub-block
  Tensor dx = Tensor::f32({n, h}, kWork, dev);
  Tensor dxn = Tensor::f32({n, h}, kWork, dev);
  Tensor d_o = Tensor::f32({n, ad.hq, ad.d}, kWork, dev);
  Tensor dq = Tensor::f32({n, ad.hq, ad.d}, kWork, dev);
  Tensor dk = Tensor::f32({n, ad.hkv, ad.d}, kWork, dev);
  Tensor dv = Tensor::f32({n, ad.hkv, ad.d}, kWork, dev);
  block::LayerSaved s;
  s.allocate(n, h, ad.hq, ad.hkv, ad.d, act, dev);
  if (o.keep) s.allocate_kept(n, h, /*slices=*/1, F, act, dev);
  // The normed inputs: kept (--recompute none) or one buffer recomputed in backward.
  const TensorView xn1 = o.keep ? s.xn1.view() : xn.view();
  const TensorView xn2 = o.keep ? s.xn2.view() : xn.view();

  // One forward + backward: the layer recipe (LayoutCommon::layer_forward / layer_backward) with
  // the single layout's attention and MLP, y = block(x_in), then dx = ∂(dy·y)/∂x_in.
  auto step = [&](Backend& b) {
    // Forward.                                                   x [n, h] -> y = x [n, h]
    b.copy(x_in.view(), s.x.view());
    b.rmsnorm_forward(s.x.view(), w.norm1.view(), xn1, s.rstd1.view(), eps);
    b.copy(s.x.view(), s.x2.view());  // x2 = x + attention(norm1(x))·Woᵀ
    block::qkv_forward(b, ad, aw, xn1, tok_pos.view(), s.q.view(), s.k.view(), s.v.view());
    block::attention_forward(b, ad, B, s.q.view(), s.k.view(), s.v.view(), q_pos.view(),
                             q_pos.view(), s.o.view(), s.lse.view());
    block::out_proj_forward(b, w.wo.view(), s.o.view(), s.x2.view());
    b.rmsnorm_forward(s.x2.view(), w.norm2.view(), xn2, s.rstd2.view(), eps);
    b.copy(s.x2.view(), x.view());  // x = x2 + mlp(norm2(x2))
    block::mlp_forward(b, mw, xn2, x.view(), s.mlp());
    // Backward.                                                  dy [n, h] -> dx [n, h]
    b.copy(dy.view(), dx.view());
    if (!o.keep) b.rmsnorm_apply(s.x2.view(), w.norm2.view(), s.rstd2.view(), xn2);
    b.zero(dxn.view());
    block::mlp_backward(b, mw, mg, xn2, dx.view(), dxn.view(), s.mlp());
    block::rmsnorm_backward_add(b, dxn.view(), s.x2.view(), w.norm2.view(), s.rstd2.view(),
                                dx.view(), g.norm2.view());
    if (!o.keep) b.rmsnorm_apply(s.x.view(), w.norm1.view(), s.rstd1.view(), xn1);
    b.zero(dxn.view());
    b.zero(dq.view());
    b.zero(dk.view());
    b.zero(dv.view());
    block::out_proj_backward(b, w.wo.view(), s.o.view(), dx.view(), d_o.view(), g.wo.view());
    block::attention_backward(b, ad, B, s.q.view(), s.k.view(), s.v.view(), q_pos.view(),
                              q_pos.view(), s.o.view(), s.lse.view(), d_o.view(), dq.view(),
                              dk.view(), dv.view());
    block::qkv_backward(b, ad, aw, ag, xn1, tok_pos.view(), dq.view(), dk.view(), dv.view(),
                        dxn.view());
    block::rmsnorm_backward_add(b, dxn.view(), s.x.view(), w.norm1.view(), s.rstd1.view(),
                                dx.view(), g.norm1.view());
  };

  step(be);  // warm-up: oneDNN primitive creation, page faults
  be.synchronize();
  std::vector<double> times;
  for (int r = 0; r < o.repeats; ++r) {
    const double t0 = now_s();
    step(be);
    be.synchronize();
    times.push_back(now_s() - t0);
  }
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];

  // --profile: one more step through the timing decorator, after the timed ones (so they are as
  // without it). Its tables go to stderr under --json, to keep stdout one JSON line.
  std::optional<ProfilingBackend> prof;
  if (o.profile) {
    prof.emplace(be);
    prof->start();
    step(*prof);
    prof->stop();
  }

  // A result that is not finite would make the timing meaningless: say so in the row.
  Tensor bad = Tensor::zeros({1}, DType::I64, kWork, dev);
  be.count_non_finite(dx.view(), bad.view());
  be.count_non_finite(x.view(), bad.view());
  const bool finite = be.host_i64(bad.view()) == 0;

  const double P = static_cast<double>(h * qw + 2 * h * kvw + qw * h + 3 * h * F);
  const double flops = 6.0 * n * P + 7.0 * B * S * S * ad.hq * ad.d;
  const double gflops = flops / med / 1e9, tok_s = n / med;
  const std::string dt(dtype_name(act));
  // MFU against the bf16 GEMM rate, measured after the block's timing (its buffers stay
  // allocated: the GEMM's 3 × 8192² bf16 add 0.4 GB).
  double gemm = 0;
  if (!dev.is_cpu() || o.gemm_rate) gemm = gemm_tflops(be, dev.is_cpu() ? 2048 : 8192);
  const double mfu = gemm > 0 ? gflops / 1e3 / gemm : 0;
  if (o.json) {
    std::printf(
        "{\"impl\": \"tsp\", \"device\": \"%s\", \"dtype\": \"%s\", \"h\": %lld, "
        "\"heads\": %lld, \"kv_heads\": %lld, "
        "\"ffn\": %lld, \"seq\": %lld, \"batch\": %lld, \"threads\": %d, \"repeats\": %d, "
        "\"median_ms\": %.3f, \"min_ms\": %.3f, \"gflop\": %.4f, \"gflops\": %.2f, "
        "\"tokens_per_s\": %.1f, \"gemm_tflops\": %.1f, \"mfu\": %.4f, \"recompute\": \"%s\", "
        "\"finite\": %s}\n",
        dev.str().c_str(), dt.c_str(), (long long)h, (long long)o.heads, (long long)o.kv_heads,
        (long long)F, (long long)S, (long long)B, o.threads, o.repeats, med * 1e3,
        times.front() * 1e3, flops / 1e9, gflops, tok_s, gemm, mfu, o.keep ? "none" : "selective",
        finite ? "true" : "false");
  } else {
    std::printf(
        "# bench_block  machine=%s  device=%s  backend=%s  threads=%d  repeats=%d  dtype=%s  "
        "recompute=%s\n",
        tsp::cpu_description().c_str(), dev.str().c_str(), be.name().c_str(), o.threads, o.repeats,
        dt.c_str(), o.keep ? "none" : "selective");
    if (gemm > 0)
      std::printf(
          "# bf16 GEMM rate (linear_forward, %d^3): %.1f TFLOP/s; MFU = model TFLOP/s / it\n",
          dev.is_cpu() ? 2048 : 8192, gemm);
    std::printf("# %-5s %5s %6s %3s %5s %6s %5s %11s %9s %8s %9s %10s %3s\n", "impl", "h", "heads",
                "kv", "ffn", "seq", "batch", "median_ms", "min_ms", "GFLOP", "GFLOP/s", "tokens/s",
                "ok");
    std::printf("  %-5s %5lld %6lld %3lld %5lld %6lld %5lld %11.2f %9.2f %8.2f %9.2f %10.1f %3s\n",
                "tsp", (long long)h, (long long)o.heads, (long long)o.kv_heads, (long long)F,
                (long long)S, (long long)B, med * 1e3, times.front() * 1e3, flops / 1e9, gflops,
                tok_s, finite ? "yes" : "NO");
    if (gemm > 0) std::printf("  model %.1f TFLOP/s, MFU %.1f%%\n", gflops / 1e3, 100 * mfu);
  }
  if (prof) print_profile(*prof, o.json ? stderr : stdout);
  return finite ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_block: %s\n", e.what());
  return 1;
}
