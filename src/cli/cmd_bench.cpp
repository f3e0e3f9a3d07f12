// `tsp bench`: every requested layout on the same model and tokens in one MPI job, one after the
// other with fresh state, at each sequence length; a fixed-column table (or JSON lines) of memory
// per rank by category, communication per step (forward / backward), step time, tokens/s, time
// blocked in communication, the loss difference against `single`, and the local predictions of
// include/tsp/plan/measure.h (memory) and the cost model (time) next to the measurements.
//
// How each figure is taken (docs/benchmarks.md):
//  - memory: MemoryTracker peaks reset once the layout, its weights and the AdamW moments exist
//    (the previous layout freed), then one training step (forward_backward + AdamW); the bytes
//    by category at the moment the total peaked, for the rank with the largest peak.
//  - communication: the Layout interface has no split point inside forward_backward(), so the
//    forward is one forward() call (loss only) and the backward is forward_backward() minus it
//    (plan::measure_call_traffic: world + group + replica communicators). MB received per rank,
//    averaged over ranks.
//  - step time: median over --repeats of (barrier, forward_backward, AdamW step at lr 0, so every
//    repeat sees the same weights), the slowest rank of each repeat; blocked time is
//    CommStats::blocked_seconds of the same steps, averaged over ranks.
//  - single runs on world rank 0 alone (a one-rank communicator): the whole model on one rank is
//    the reference the loss difference is taken against.
#include <unistd.h>
#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "parallel/registry.h"
#include "tsp/comm/device_comm.h"
#include "tsp/core/error.h"
#include "tsp/core/limits.h"
#include "tsp/core/machine.h"
#include "tsp/core/memory.h"
#include "tsp/model/params.h"
#include "tsp/model/tokens.h"
#include "tsp/ops/gemm.h"
#include "tsp/parallel/layout.h"
#include "tsp/plan/cost_model.h"
#include "tsp/plan/measure.h"
#include "tsp/train/optimizer.h"

namespace tsp::cli {
namespace {

struct BenchOptions {
  std::string model, config_file, tokens;
  std::string layouts = "single,tp,sp,tp-sp,tsp,fsdp-cp";
  std::string seqs = "256";
  int64_t batch = 1;
  int dp = 1;
  int zero = 1;  // ZeRO stage over the --dp replicas (tsp train's default)
  int tp = 0;    // T for tp-sp; 0: the largest divisor of D not above sqrt(D)
  int repeats = 3;
  int64_t doc_sep = -1;  // --doc-sep
  uint64_t seed = 1234;
  bool json = false;
  bool no_overlap = false;
  std::string recompute = "selective";  // comma-separated --recompute modes, each a set of rows
  double mem_limit_mb = 0;              // --mem-limit: the longest-sequence search instead
  int64_t seq_step = 256;               // --seq-step: its granularity
  ComputeOptions compute;
};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// The batch: B rows of S+1 tokens, from --tokens (its first B·(S+1)) or drawn uniformly from the
// vocabulary with --seed. Identical on every rank.
Batch make_batch(const BenchOptions& o, const LlamaConfig& c, int64_t S) {
  Batch b;
  b.B = o.batch;
  b.S = S;
  // Checked before anything is allocated: every rank holds the B·(S+1) ids of the batch.
  const int64_t need = checked_mul(o.batch, checked_add(S, 1, "bench: --seq + 1"),
                                   "bench: --batch × (--seq + 1) tokens");
  require_memory(checked_mul(need, 4, "bench: bytes of the batch"),
                 fmt::format("bench: a batch of --batch {} × (--seq {} + 1) tokens", o.batch, S),
                 "use a smaller --batch or --seq");
  if (!o.tokens.empty()) {
    const TokenFileInfo info = read_token_file_info(o.tokens);
    TSP_CHECK(info.num_tokens >= need,
              "bench: {} holds {} tokens, --batch {} --seq {} needs {}; use a shorter --seq",
              o.tokens, info.num_tokens, o.batch, S, need);
    b.tokens = read_tokens(o.tokens, 0, need);
    for (int64_t i = 0; i < need; ++i)
      TSP_CHECK(b.tokens[i] < c.vocab_size,
                "bench: token id {} in {} is not below vocab_size={}; the file was made for "
                "another vocabulary",
                b.tokens[i], o.tokens, c.vocab_size);
  } else {
    std::mt19937_64 rng(o.seed);
    std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(c.vocab_size - 1));
    b.tokens.resize(need);
    for (int32_t& t : b.tokens) t = id(rng);
  }
  b.doc_sep = checked_doc_sep(o.doc_sep, c.vocab_size, "bench");
  return b;
}

int default_tp(int D) {
  int best = 1;
  for (int t = 1; t * t <= D; ++t)
    if (D % t == 0) best = t;
  return best;
}

struct BenchRow {
  std::string layout, degrees, status;  // status: "ok", or why the layout did not run
  std::string recompute = "selective";  // --recompute of the row
  int D = 1, T = 1, R = 1, zero = 0;
  int64_t S = 0;
  MemorySnapshot mem;          // of the rank with the largest peak
  plan::MemoryBreakdown pred;  // predicted, same rank
  bool have_pred = false;
  double fwd_mb = 0, bwd_mb = 0, upd_mb = 0;  // received per rank, averaged over ranks
  double step_ms = 0, tokens_s = 0, blocked_ms = 0, pred_step_ms = -1;
  double loss = 0, loss_diff = 0;
  bool have_ref = false;
};

// The table's figures are agreed over the ranks with the control API (CommStats::control), so
// they never enter the data traffic the table reports.
double mean_over(Communicator& c, double v) {
  return c.sum_host(v) / c.size();
}

// Runs one layout on `comm` (the world, or rank 0 alone for single). Collective over comm.
BenchRow run_layout(const BenchOptions& o, const LlamaConfig& c, const WeightSource& weights,
                    const std::string& name, const Batch& batch, plan::Recompute recompute,
                    Communicator& comm) {
  BenchRow row;
  row.layout = name;
  row.S = batch.S;
  row.recompute = std::string(plan::recompute_name(recompute));
  ParallelConfig pc;
  pc.layout = name;
  pc.recompute = recompute;
  pc.dp = name == "single" ? 1 : o.dp;
  pc.zero = o.zero;
  pc.overlap = !o.no_overlap;
  pc.device = o.compute.parsed_device();
  pc.dtype = o.compute.parsed_dtype();
  const int D = comm.size() / pc.dp;
  if (name == "tp-sp") pc.tp = o.tp > 0 ? o.tp : default_tp(D);
  std::unique_ptr<Layout> layout = make_layout(c, pc, comm);
  {
    // The step's memory on this rank (the model of our allocations the table reports next to the
    // measurement), before the weights are read: a row too large for the memory its tensors live
    // in (this machine's, or the GPU's, shared by the ranks that use it) is skipped with the reason
    // instead of exhausting it. The smallest share of the job decides, so every rank skips the row
    // alike (a rank skipping alone would leave the others hanging).
    const MemoryPool pool = memory_pool(pc.device, comm);
    const int64_t share = comm.agree_min(pool.bytes / std::max(1, pool.ranks));
    double predicted = 0;
    try {
      predicted = plan::predict_local_memory(c, plan::layout_spec_of(*layout, comm.size()), batch.B,
                                             batch.S, /*optimizer=*/true, layout->compute_dtype(),
                                             recompute, plan::memory_target_of(pc.device))
                      .total();
    } catch (const Error&) {
      predicted = 0;  // no local model of this layout
    }
    TSP_CHECK(
        predicted <= static_cast<double>(share),
        "bench: layout {} at --batch {} --seq {} needs {} per rank, more than the {} per rank "
        "that {} has for its {} rank{} (the smallest share of the job); use a smaller "
        "--batch or --seq, or more ranks",
        name, batch.B, batch.S, format_bytes(predicted), format_bytes(static_cast<double>(share)),
        pool.place, pool.ranks, pool.ranks == 1 ? "" : "s");
  }
  layout->load(weights);
  AdamW opt(*layout, AdamWConfig{});
  plan::LayoutSpec spec = plan::layout_spec_of(*layout, comm.size());
  row.D = spec.D;
  row.T = spec.T;
  row.R = spec.R;
  row.zero = spec.zero;
  row.degrees = name == "tp-sp" ? fmt::format("T={} S={}", spec.T, spec.D / spec.T)
                                : fmt::format("D={}", spec.D);
  if (spec.R > 1) row.degrees += fmt::format(" R={}", spec.R);
  if (spec.zero == 1 && spec.R > 1) row.degrees += " Z1";

  // Memory: peaks of one training step from here (weights, grads and moments are allocated).
  MemoryTracker::instance().reset_peaks();
  comm.barrier();
  const CommStats fwd = plan::measure_call_traffic(*layout, comm, [&] { layout->forward(batch); });
  layout->zero_grads();
  const CommStats fb = plan::measure_call_traffic(
      *layout, comm, [&] { row.loss = layout->forward_backward(batch); });
  // The update: under ZeRO-1 the replicas all-gather the updated weights (Layout::
  // parameters_updated), counted apart from the step's forward and backward traffic.
  const CommStats upd = plan::measure_call_traffic(*layout, comm, [&] { opt.step(0.0, 1.0); });
  const MemorySnapshot mine = MemoryTracker::instance().snapshot();
  // The rank with the largest peak (the lowest such rank) reports its breakdown: every rank's
  // snapshot gathered (control traffic), the same choice made on every rank.
  constexpr int kSnap = 2 * kNumMemCategories + 1;
  std::array<int64_t, kSnap> snap{};
  for (int i = 0; i < kNumMemCategories; ++i)
    snap[i] = mine.at_peak[i], snap[kNumMemCategories + i] = mine.peak[i];
  snap[2 * kNumMemCategories] = mine.peak_total;
  const std::vector<int64_t> all = comm.gather_host(snap);
  int owner = 0;
  for (int r = 1; r < comm.size(); ++r)
    if (all[r * kSnap + 2 * kNumMemCategories] > all[owner * kSnap + 2 * kNumMemCategories])
      owner = r;
  const int64_t* best = &all[static_cast<size_t>(owner) * kSnap];
  for (int i = 0; i < kNumMemCategories; ++i)
    row.mem.at_peak[i] = best[i], row.mem.peak[i] = best[kNumMemCategories + i];
  row.mem.peak_total = best[2 * kNumMemCategories];
  try {
    // The model of the backend the row ran on (its transients differ: docs/cost-model.md).
    row.pred = plan::predict_local_memory(c, spec, batch.B, batch.S, /*optimizer=*/true,
                                          layout->compute_dtype(), recompute,
                                          plan::memory_target_of(pc.device));
    row.have_pred = true;
  } catch (const Error&) {
    row.have_pred = false;  // no local model of this layout: the column says "-"
  }
  row.fwd_mb = mean_over(comm, static_cast<double>(fwd.total_received())) / 1e6;
  row.bwd_mb =
      mean_over(comm, static_cast<double>(fb.total_received() - fwd.total_received())) / 1e6;
  row.upd_mb = mean_over(comm, static_cast<double>(upd.total_received())) / 1e6;

  // Timing.
  std::vector<double> times, blocked;
  for (int r = 0; r < o.repeats; ++r) {
    layout->zero_grads();
    comm.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    const CommStats st =
        plan::measure_call_traffic(*layout, comm, [&] { layout->forward_backward(batch); });
    opt.step(0.0, 1.0);
    // The update is queued on a GPU (forward_backward ended at the loss download): the step
    // ends when it has run. A no-op on the CPU.
    layout->backend().synchronize();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    times.push_back(comm.max_host(dt));
    blocked.push_back(mean_over(comm, st.blocked_seconds));
  }
  std::sort(times.begin(), times.end());
  std::sort(blocked.begin(), blocked.end());
  row.step_ms = times[times.size() / 2] * 1e3;
  row.blocked_ms = blocked[blocked.size() / 2] * 1e3;
  row.tokens_s = static_cast<double>(batch.B * batch.S) / (row.step_ms / 1e3);

  // Predicted step time (cost model, local hardware profile): reported, never gated.
  try {
    plan::Workload w;
    w.model = c;
    w.B = batch.B / spec.R;
    w.S = batch.S;
    w.recompute = recompute;
    row.pred_step_ms = plan::estimate(w, spec, plan::hardware_profile("local")).step_s * 1e3;
  } catch (const Error&) {
    row.pred_step_ms = -1;
  }
  row.status = "ok";
  return row;
}

void print_header(const BenchOptions& o, const LlamaConfig& c, int world) {
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  std::printf(
      "# tsp bench  git=%s  machine=%s (%ld cores, host %s)  world=%d  threads/rank=%d\n"
      "# model h=%lld L=%lld heads=%lld/%lld ffn=%lld V=%lld  B=%lld  repeats=%d  overlap=%s  %s\n"
      "# peak_MB: max over ranks; weights..workspace: that rank's MB by category at its peak;\n"
      "# pred_MB/err%%: src/plan/measure.cpp's model of this implementation; comm MB received per\n"
      "# rank per step (fwd = forward(), bwd = forward_backward() - forward(), upd = the optimizer\n"
      "# step's weight all-gather under ZeRO-1); step_ms median (forward, backward and update);\n"
      "# blocked_ms in wait()/blocking calls; pred_ms: cost model, --hw local; dloss vs single;\n"
      "# recompute: the row's --recompute (none: every activation kept; selective: the normed\n"
      "# inputs and MLP gate/up/act recomputed; full: each layer's input only, its forward\n"
      "# replayed in the backward)\n",
      tsp::git_revision().c_str(), tsp::cpu_description().c_str(), sysconf(_SC_NPROCESSORS_ONLN),
      host, world, compute_threads(), (long long)c.hidden_size, (long long)c.num_hidden_layers,
      (long long)c.num_attention_heads, (long long)c.num_key_value_heads,
      (long long)c.intermediate_size, (long long)c.vocab_size, (long long)o.batch, o.repeats,
      o.no_overlap ? "off" : "on", o.compute.describe().c_str());
  std::printf(
      "#%-7s %-12s %6s %-9s %9s %8s %7s %7s %7s %7s %7s %8s %6s %8s %8s %8s %9s %10s %9s %8s "
      "%10s\n",
      "layout", "degrees", "S", "recompute", "peak_MB", "weights", "grads", "optim", "activ",
      "comm", "wkspace", "pred_MB", "err%", "fwd_MB", "bwd_MB", "upd_MB", "step_ms", "tokens/s",
      "blocked", "pred_ms", "dloss");
}

void print_row(const BenchRow& r) {
  if (r.status != "ok") {
    std::printf(" %-7s %-12s %6lld %-9s  skipped: %s\n", r.layout.c_str(), "-", (long long)r.S,
                r.recompute.c_str(), r.status.c_str());
    return;
  }
  std::printf(" %-7s %-12s %6lld %-9s %9.2f", r.layout.c_str(), r.degrees.c_str(), (long long)r.S,
              r.recompute.c_str(), to_mb(r.mem.peak_total));
  for (int i = 0; i < kNumMemCategories; ++i) std::printf(" %7.2f", to_mb(r.mem.at_peak[i]));
  if (r.have_pred)
    std::printf(" %8.2f %+6.1f", r.pred.total() / 1e6,
                100.0 * (static_cast<double>(r.mem.peak_total) - r.pred.total()) / r.pred.total());
  else
    std::printf(" %8s %6s", "-", "-");
  std::printf(" %8.3f %8.3f %8.3f %9.2f %10.1f %9.2f", r.fwd_mb, r.bwd_mb, r.upd_mb, r.step_ms,
              r.tokens_s, r.blocked_ms);
  if (r.pred_step_ms >= 0)
    std::printf(" %8.2f", r.pred_step_ms);
  else
    std::printf(" %8s", "-");
  if (r.have_ref)
    std::printf(" %+10.2e\n", r.loss_diff);
  else
    std::printf(" %10s\n", "-");
}

nlohmann::json row_json(const BenchRow& r, const LlamaConfig& c, int world,
                        const std::string& dtype) {
  nlohmann::json j;
  j["dtype"] = dtype;
  j["layout"] = r.layout;
  j["S"] = r.S;
  j["recompute"] = r.recompute;
  j["world"] = world;
  j["model"] = {{"h", c.hidden_size},
                {"L", c.num_hidden_layers},
                {"heads", c.num_attention_heads},
                {"kv_heads", c.num_key_value_heads},
                {"ffn", c.intermediate_size},
                {"vocab", c.vocab_size}};
  j["status"] = r.status;
  if (r.status != "ok") return j;
  j["degrees"] = r.degrees;
  j["D"] = r.D;
  j["T"] = r.T;
  j["R"] = r.R;
  j["zero"] = r.zero;
  j["peak_mb"] = to_mb(r.mem.peak_total);
  nlohmann::json at, pk, pr;
  for (int i = 0; i < kNumMemCategories; ++i) {
    const std::string n(mem_category_name(static_cast<MemCategory>(i)));
    at[n] = to_mb(r.mem.at_peak[i]);
    pk[n] = to_mb(r.mem.peak[i]);
    if (r.have_pred) pr[n] = r.pred.bytes[i] / 1e6;
  }
  j["at_peak_mb"] = at;
  j["category_peak_mb"] = pk;
  if (r.have_pred) {
    pr["total"] = r.pred.total() / 1e6;
    j["predicted_mb"] = pr;
  }
  j["comm_mb"] = {{"forward", r.fwd_mb}, {"backward", r.bwd_mb}, {"update", r.upd_mb}};
  j["step_ms"] = r.step_ms;
  j["tokens_per_s"] = r.tokens_s;
  j["blocked_ms"] = r.blocked_ms;
  if (r.pred_step_ms >= 0) j["predicted_step_ms"] = r.pred_step_ms;
  j["loss"] = r.loss;
  if (r.have_ref) j["loss_diff"] = r.loss_diff;
  return j;
}

// ---- --mem-limit: the longest sequence each layout trains within a memory cap -------------------
//
// For each layout and recomputation mode: the predicted longest S (a multiple of --seq-step) whose
// step predict_local_memory keeps within the cap, by bisection (memory grows with S); then the
// measured one: a real training step (forward_backward + AdamW, run_layout) at that S, and the
// next multiples up while the largest rank's measured peak stays within the cap, or down until it
// does. The cap is checked after each step, on the measured peak, agreed over the ranks (a rank
// stopping alone would leave the others in a collective): nothing is enforced at allocation time.
struct Longest {
  std::string layout, recompute, degrees, status = "ok";
  int64_t pred_S = 0, meas_S = 0, tried_above = 0;
  double pred_mb = 0, meas_mb = 0, above_mb = 0;  // at pred_S, at meas_S, at the first S above
};

Longest longest_sequence(const BenchOptions& o, const LlamaConfig& c, const WeightSource& weights,
                         const std::string& name, plan::Recompute mode, Communicator& comm) {
  Longest r;
  r.layout = name;
  r.recompute = std::string(plan::recompute_name(mode));
  const double cap = o.mem_limit_mb * 1e6;
  const int64_t step = o.seq_step, max_S = c.max_position_embeddings / step * step;
  TSP_CHECK(max_S >= step,
            "bench: --seq-step {} exceeds the model's max_position_embeddings {}; use a smaller "
            "--seq-step or a model with longer positions",
            step, c.max_position_embeddings);
  // The layout's spec (its degrees do not depend on S), from a layout built once.
  plan::LayoutSpec spec;
  {
    ParallelConfig pc;
    pc.layout = name;
    pc.recompute = mode;
    pc.dp = name == "single" ? 1 : o.dp;
    pc.zero = o.zero;
    pc.dtype = o.compute.parsed_dtype();
    pc.device = o.compute.parsed_device();
    if (name == "tp-sp") pc.tp = o.tp > 0 ? o.tp : default_tp(comm.size() / pc.dp);
    std::unique_ptr<Layout> layout = make_layout(c, pc, comm);
    spec = plan::layout_spec_of(*layout, comm.size());
  }
  r.degrees = name == "tp-sp" ? fmt::format("T={} S={}", spec.T, spec.D / spec.T)
                              : fmt::format("D={}", spec.D);
  if (spec.R > 1) r.degrees += fmt::format(" R={}", spec.R);
  auto predicted = [&](int64_t S) {
    return plan::predict_local_memory(c, spec, o.batch, S, true, o.compute.parsed_dtype(), mode,
                                      plan::memory_target_of(o.compute.parsed_device()))
        .total();
  };
  int64_t lo = 0, hi = max_S / step + 1;  // multiples of step: lo fits (0: none yet), hi does not
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    (predicted(mid * step) <= cap ? lo : hi) = mid;
  }
  TSP_CHECK(lo > 0,
            "bench: layout {} does not fit within --mem-limit {} MB even at --seq-step {} "
            "(predicted {:.2f} MB); raise the cap or lower the step",
            name, o.mem_limit_mb, step, predicted(step) / 1e6);
  r.pred_S = lo * step;
  r.pred_mb = predicted(r.pred_S) / 1e6;

  // Measured: one step at S, the largest rank's peak against the cap.
  auto peak_at = [&](int64_t S) {
    BenchOptions one = o;
    one.repeats = 1;
    const Batch batch = make_batch(one, c, S);
    return static_cast<double>(run_layout(one, c, weights, name, batch, mode, comm).mem.peak_total);
  };
  int64_t S = r.pred_S;
  double peak = peak_at(S);
  if (peak <= cap) {
    // Up while the next multiple still fits (the model is exact, so this is one more step).
    for (;;) {
      const int64_t next = S + step;
      if (next > max_S) break;
      const double p = peak_at(next);
      if (p > cap) {
        r.tried_above = next;
        r.above_mb = p / 1e6;
        break;
      }
      S = next, peak = p;
    }
  } else {
    r.tried_above = S;
    r.above_mb = peak / 1e6;
    while (S > step && peak > cap) {
      S -= step;
      peak = peak_at(S);
    }
    TSP_CHECK(peak <= cap, "bench: layout {} exceeds --mem-limit {} MB even at --seq-step {}", name,
              o.mem_limit_mb, step);
  }
  r.meas_S = S;
  r.meas_mb = peak / 1e6;
  return r;
}

int run_longest(const BenchOptions& o, const LlamaConfig& c, const WeightSource& weights,
                const std::vector<std::string>& layouts, const std::vector<plan::Recompute>& modes,
                Communicator& world) {
  TSP_CHECK(std::isfinite(o.mem_limit_mb) && o.mem_limit_mb > 0,
            "bench: --mem-limit must be a positive number of MB, got {}", o.mem_limit_mb);
  TSP_CHECK(o.seq_step >= 1, "bench: --seq-step must be at least 1 token, got {}", o.seq_step);
  std::unique_ptr<Communicator> solo = world.split(world.rank() == 0 ? 0 : 1, world.rank());
  const bool print = world.rank() == 0;
  if (print && !o.json)
    std::printf(
        "# tsp bench --mem-limit %.1f MB: the longest S (multiple of %lld) each layout trains with "
        "peak memory per rank within the cap; world=%d B=%lld %s\n"
        "# pred_S: predict_local_memory's longest S (pred_MB there); meas_S: the longest S whose "
        "measured step (forward_backward + AdamW) stayed within the cap (meas_MB: its peak, the "
        "largest rank); above: the first S tried beyond it and its measured peak\n"
        "#%-7s %-9s %-10s %8s %8s %8s %8s %8s %9s\n",
        o.mem_limit_mb, (long long)o.seq_step, world.size(), (long long)o.batch,
        o.compute.describe().c_str(), "layout", "recompute", "degrees", "pred_S", "pred_MB",
        "meas_S", "meas_MB", "above_S", "above_MB");
  for (const plan::Recompute mode : modes)
    for (const std::string& name : layouts) {
      Longest r;
      r.layout = name;
      r.recompute = std::string(plan::recompute_name(mode));
      auto attempt = [&](Communicator& comm) {
        try {
          r = longest_sequence(o, c, weights, name, mode, comm);
        } catch (const Error& e) {
          r.status = e.what();
        }
      };
      if (name == "single") {  // rank 0 alone, as in the table
        if (world.rank() == 0) attempt(*solo);
        world.barrier();
      } else {
        attempt(world);
      }
      if (!print) continue;
      if (o.json) {
        nlohmann::json j;
        j["layout"] = r.layout;
        j["recompute"] = r.recompute;
        j["status"] = r.status;
        j["mem_limit_mb"] = o.mem_limit_mb;
        if (r.status == "ok") {
          j["degrees"] = r.degrees;
          j["predicted_max_seq"] = r.pred_S;
          j["predicted_mb"] = r.pred_mb;
          j["measured_max_seq"] = r.meas_S;
          j["measured_mb"] = r.meas_mb;
          if (r.tried_above > 0) j["above"] = {{"seq", r.tried_above}, {"measured_mb", r.above_mb}};
        }
        std::printf("%s\n", j.dump().c_str());
      } else if (r.status != "ok") {
        std::printf(" %-7s %-9s skipped: %s\n", r.layout.c_str(), r.recompute.c_str(),
                    r.status.c_str());
      } else {
        std::printf(" %-7s %-9s %-10s %8lld %8.2f %8lld %8.2f", r.layout.c_str(),
                    r.recompute.c_str(), r.degrees.c_str(), (long long)r.pred_S, r.pred_mb,
                    (long long)r.meas_S, r.meas_mb);
        if (r.tried_above > 0)
          std::printf(" %8lld %9.2f\n", (long long)r.tried_above, r.above_mb);
        else
          std::printf(" %8s %9s\n", "-", "-");
      }
      std::fflush(stdout);
    }
  return 0;
}

int run_bench(const BenchOptions& o, Communicator& world) {
  TSP_CHECK(o.model.empty() != o.config_file.empty(),
            "bench: give exactly one of --model DIR (weights from model.safetensors) or --config "
            "FILE (config.json; random weights from --seed)");
  TSP_CHECK(o.batch >= 1, "bench: --batch must be at least 1 row, got {}", o.batch);
  TSP_CHECK(o.repeats >= 1, "bench: --repeats must be at least 1, got {}", o.repeats);
  TSP_CHECK(o.dp >= 1, "bench: --dp must be at least 1, got {}", o.dp);
  TSP_CHECK(o.zero == 0 || o.zero == 1, "bench: --zero must be 0 or 1, got {}", o.zero);
  TSP_CHECK(o.tp >= 0, "bench: --tp must be >= 0 (0: the largest divisor of D <= sqrt(D)), got {}",
            o.tp);
  std::unique_ptr<ModelDir> dir;
  LlamaConfig c;
  if (!o.model.empty()) {
    dir = std::make_unique<ModelDir>(open_model_arg(o.model, world));
    c = dir->config;
  } else {
    c = LlamaConfig::from_file(o.config_file);
  }
  c.validate();
  std::unique_ptr<WeightSource> weights;
  if (dir)
    weights = std::make_unique<ModelDirWeights>(*dir);
  else
    weights = std::make_unique<RandomWeights>(o.seed);

  const std::vector<std::string> layouts = split_list(o.layouts);
  std::vector<int64_t> seqs;
  for (const std::string& s : split_list(o.seqs)) {
    int64_t v = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    TSP_CHECK(ec == std::errc() && end == s.data() + s.size() && v >= 1,
              "bench: --seq \"{}\": \"{}\" is not a positive integer; give comma-separated "
              "sequence lengths such as 256,1024",
              o.seqs, s);
    seqs.push_back(v);
  }
  std::vector<plan::Recompute> modes;
  for (const std::string& m : split_list(o.recompute))
    modes.push_back(checked_recompute(m, "bench"));
  TSP_CHECK(!layouts.empty() && !seqs.empty() && !modes.empty(),
            "bench: --layouts, --seq and --recompute need at least one value");
  if (o.mem_limit_mb != 0) return run_longest(o, c, *weights, layouts, modes, world);
  // single runs on world rank 0 alone: the whole model on one rank.
  std::unique_ptr<Communicator> solo = world.split(world.rank() == 0 ? 0 : 1, world.rank());

  const bool print = world.rank() == 0;
  if (print && !o.json) print_header(o, c, world.size());
  for (int64_t S : seqs) {
    const Batch batch = make_batch(o, c, S);
    double ref_loss = 0;  // single's, the first mode that runs it (every mode: the same loss)
    bool have_ref = false;
    for (const plan::Recompute mode : modes)
      for (const std::string& name : layouts) {
        BenchRow row;
        row.layout = name;
        row.S = S;
        row.recompute = std::string(plan::recompute_name(mode));
        if (!find_layout(name)) {
          row.status = fmt::format("layout '{}' is not available in this build (registered: {})",
                                   name, layout_names_str());
        } else {
          // Configuration errors (degrees that do not divide heads, FFN, vocabulary, zigzag
          // chunks, S beyond max_position_embeddings) are raised identically on every rank of the
          // communicator running the layout, before any collective: skip the row.
          auto skipped = [&](const Error& e) {
            BenchRow r;
            r.layout = name;
            r.S = S;
            r.recompute = std::string(plan::recompute_name(mode));
            r.status = e.what();
            return r;
          };
          if (name == "single") {
            // Only rank 0 runs it; the others must meet it at the barrier whatever happens there.
            if (world.rank() == 0) {
              try {
                row = run_layout(o, c, *weights, name, batch, mode, *solo);
              } catch (const Error& e) {
                row = skipped(e);
              }
            }
            world.barrier();
          } else {
            try {
              row = run_layout(o, c, *weights, name, batch, mode, world);
            } catch (const Error& e) {
              row = skipped(e);
            }
          }
        }
        if (name == "single" && row.status == "ok" && !have_ref)
          ref_loss = row.loss, have_ref = true;
        if (have_ref && row.status == "ok") {
          row.have_ref = true;
          row.loss_diff = row.loss - ref_loss;
        }
        if (print) {
          if (o.json)
            std::printf("%s\n", row_json(row, c, world.size(),
                                         std::string(dtype_name(o.compute.parsed_dtype())))
                                    .dump()
                                    .c_str());
          else
            print_row(row);
          std::fflush(stdout);
        }
      }
  }
  return 0;
}

const CommandRegistration kBench{Command{
    "bench",
    "Run layouts side by side on the same model and tokens: memory per rank by category, "
    "communication per step, step time, tokens/s, blocked time, loss difference vs single",
    /*needs_mpi=*/true, [](CLI::App& sub) {
      auto o = std::make_shared<BenchOptions>();
      sub.add_option("--model", o->model, "model directory (config.json + model.safetensors)")
          ->check(CLI::ExistingDirectory);
      sub.add_option("--config", o->config_file, "config.json only: random weights from --seed")
          ->check(CLI::ExistingFile);
      sub.add_option("--layouts", o->layouts, "comma-separated layouts to run")
          ->capture_default_str();
      sub.add_option("--seq", o->seqs, "comma-separated sequence lengths S")->capture_default_str();
      sub.add_option("--batch", o->batch, "rows B per step (whole job)")->capture_default_str();
      sub.add_option("--dp", o->dp, "data-parallel replicas R for every layout but single")
          ->capture_default_str();
      sub.add_option("--zero", o->zero,
                     "ZeRO stage over the --dp replicas: 1 partitions master weights and AdamW "
                     "moments over them, 0 keeps whole copies (as tsp train --zero)")
          ->capture_default_str();
      sub.add_option("--tp", o->tp, "T for tp-sp (0: largest divisor of D <= sqrt(D))")
          ->capture_default_str();
      sub.add_option("--repeats", o->repeats, "timed steps per row (median reported)")
          ->capture_default_str();
      sub.add_option("--tokens", o->tokens, "llm.c token file (default: random tokens from --seed)")
          ->check(CLI::ExistingFile);
      sub.add_option("--seed", o->seed, "seed of random weights and tokens")
          ->capture_default_str()
          ->check(kNotNegative);  // a negative one would wrap around
      sub.add_option("--doc-sep", o->doc_sep, kDocSepHelp)->capture_default_str();
      sub.add_flag("--json", o->json, "one JSON object per row instead of the table");
      sub.add_flag("--no-overlap", o->no_overlap,
                   "blocking transfers (tsp, fsdp-cp: no prefetch; ZeRO-1: the weight all-gather "
                   "waited for in the update)");
      sub.add_option("--recompute", o->recompute,
                     std::string(kRecomputeHelp) +
                         "; comma-separated modes (e.g. selective,full) run every layout in each")
          ->capture_default_str();
      sub.add_option("--mem-limit", o->mem_limit_mb,
                     "instead of the table: the longest sequence (a multiple of --seq-step) each "
                     "layout and --recompute mode trains with a peak per rank within this many MB, "
                     "predicted and measured (a real step at each S tried); --seq is ignored")
          ->check(CLI::PositiveNumber);
      sub.add_option("--seq-step", o->seq_step,
                     "granularity of the --mem-limit search, tokens (a multiple of 2·D for the "
                     "zigzag layouts)")
          ->capture_default_str();
      o->compute.add_to(sub);
      return [o](Communicator* world) { return run_bench(*o, *world); };
    }}};

}  // namespace
}  // namespace tsp::cli
