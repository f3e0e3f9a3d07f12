// `tsp plan`: predicted memory, communication and throughput of every layout and factorization
// for a model, a workload and a hardware profile; then a recommendation. See docs/cost-model.md.
#include <algorithm>
#include <cstdio>
#include <filesystem>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "tsp/core/error.h"
#include "tsp/core/limits.h"
#include "tsp/plan/cost_model.h"
#include "tsp/plan/measure.h"

namespace tsp::cli {
namespace {

struct PlanOptions {
  std::string model = "7b";
  int64_t seq = 131072;
  int64_t batch = 1;
  int micro_batches = 1;
  int gpus = 8;
  int gpus_per_node = 0;  // 0: the profile's
  int degree = 0;
  std::string hw = "mi300x";
  bool prefill = false, decode = false, train = false;
  bool json = false;
  bool calibrate = false;
  std::string dtype = "bf16";  // compute dtype of our implementation's columns
  // ZeRO stage over the replicas (training): 1 = optimizer state sharded over R, as `tsp train`
  // does by default (docs/cost-model.md §4.5).
  int zero = 1;
  // Activation recomputation of the training rows: none | selective | full | auto (per row, the
  // fastest mode whose memory fits).
  std::string recompute = "auto";
  bool max_seq = false;  // the longest trainable sequence of each layout instead of the table
};

// The modes `--recompute` tries, cheapest in time first.
std::vector<plan::Recompute> recompute_modes(const std::string& arg) {
  using plan::Recompute;
  if (arg == "auto") return {Recompute::None, Recompute::Selective, Recompute::Full};
  return {plan::parse_recompute(arg)};
}

// One row of the table: the estimate with the mode `--recompute` chose, and (training) the
// memory without recomputation, to say when recomputation is what makes the row fit.
struct PlanRow {
  plan::Estimate est;
  double none_gb = 0;
};
PlanRow estimate_row(plan::Workload w, const plan::LayoutSpec& l, const plan::Hardware& hw,
                     const std::vector<plan::Recompute>& modes) {
  PlanRow r;
  if (w.mode != plan::Mode::Train) {
    r.est = plan::estimate(w, l, hw);
    r.none_gb = r.est.memory.total() / 1e9;
    return r;
  }
  bool have = false;
  for (plan::Recompute m : modes) {
    w.recompute = m;
    const plan::Estimate e = plan::estimate(w, l, hw);
    if (m == plan::Recompute::None) r.none_gb = e.memory.total() / 1e9;
    // the first mode that fits is the fastest (modes are ordered by cost); if none fits, the
    // last (the smallest) is shown
    if (!have || !r.est.fits) r.est = e;
    have = true;
    if (e.fits) break;
  }
  if (modes.front() != plan::Recompute::None) {
    w.recompute = plan::Recompute::None;
    r.none_gb = plan::estimate(w, l, hw).memory.total() / 1e9;
  }
  return r;
}

// Our implementation (include/tsp/plan/measure.h) for a training step of one layout: peak memory
// per rank by the model of what the code allocates, and the bytes a rank sends per step.
// The model of our implementation counts in 64-bit integers: a workload whose activations
// (rows × S × h × L, at a few bytes each) would not fit is left out (valid = false).
struct Ours {
  bool valid = false;
  double memory = 0;   // bytes per rank
  double traffic = 0;  // bytes sent per rank per step (all micro-batches)
};
// `recompute`: the row's mode (our layouts run all three).
Ours ours_of(const plan::Workload& w, const plan::LayoutSpec& l, DType dtype, plan::Recompute rc) {
  Ours o;
  const int64_t B = w.B * l.R;  // the whole job's rows (each replica takes B of them)
  try {
    checked_product({B, w.S, w.model.hidden_size + w.model.intermediate_size + w.model.vocab_size,
                     w.model.num_hidden_layers + 1, 64},
                    "plan: our implementation's bytes");
  } catch (const Error&) {
    return o;
  }
  o.valid = true;
  o.memory = plan::predict_local_memory(w.model, l, B, w.S, /*optimizer=*/true, dtype, rc).total();
  const plan::StepTraffic t = plan::predict_local_traffic(w.model, l, B, w.S, 0, dtype, rc);
  o.traffic =
      static_cast<double>(w.micro_batches) * static_cast<double>(t.forward.sent + t.backward.sent);
  return o;
}

LlamaConfig load_model(const std::string& arg) {
  namespace fs = std::filesystem;
  if (fs::is_directory(arg))
    return LlamaConfig::from_file((fs::path(arg) / "config.json").string());
  return llama_preset(arg);
}

// `--max-seq`: per layout, the longest sequence (tokens) it can train with the workload's batch on
// this cluster, and the recomputation mode that reaches it (auto: the mode with the longest S;
// ties go to the cheaper mode).
int run_max_seq(const PlanOptions& o, plan::Workload w, const plan::Hardware& hw,
                const std::vector<plan::LayoutSpec>& layouts) {
  using namespace tsp::plan;
  TSP_CHECK(w.mode == Mode::Train, "--max-seq is about training; drop --prefill / --decode");
  const std::vector<Recompute> modes = recompute_modes(o.recompute);
  std::vector<MaxSeq> best;
  for (const LayoutSpec& l : layouts) {
    MaxSeq b;
    for (Recompute m : modes) {
      w.recompute = m;
      MaxSeq r = max_seq(w, l, hw);
      if (b.S == 0 || r.S > b.S) b = r;
      if (b.S == 0) b.at.recompute = m;
    }
    best.push_back(b);
  }
  if (o.json) {
    nlohmann::json rows = nlohmann::json::array();
    for (const MaxSeq& m : best)
      rows.push_back(
          {{"label", m.layout.label()},
           {"name", m.layout.name},
           {"D", m.layout.D},
           {"R", m.layout.R},
           {"max_seq_tokens", m.S},
           {"seq_step_tokens", m.step},
           {"recompute", std::string(recompute_name(m.at.recompute))},
           {"memory_gb", m.S > 0 ? nlohmann::json(m.at.memory.total() / 1e9) : nlohmann::json()},
           {"tokens_per_s", m.S > 0 ? nlohmann::json(m.at.tokens_per_s) : nlohmann::json()}});
    nlohmann::json doc = {{"model", o.model},
                          {"batch", w.B},
                          {"gpus", o.gpus},
                          {"hardware", hw.name},
                          {"capacity_gb", hw.mem_capacity / 1e9},
                          {"zero", o.zero},
                          {"recompute_option", o.recompute},
                          {"max_seq", rows}};
    std::printf("%s\n", doc.dump(2).c_str());
    return 0;
  }
  std::printf(
      "# tsp plan --max-seq  model=%s  B=%lld sequences  gpus=%d  hw=%s (%.0f GB per GPU)  "
      "--recompute %s  --zero %d\n"
      "# the longest sequence each layout can train: S in tokens (a multiple of step_tokens, the "
      "zigzag granularity), memory per GPU in GB at that S, tokens/s of the whole job\n",
      o.model.c_str(), (long long)w.B, o.gpus, hw.name.c_str(), hw.mem_capacity / 1e9,
      o.recompute.c_str(), o.zero);
  std::printf("%-31s %14s %11s %9s %10s %12s\n", "#layout", "max_S_tokens", "step_tokens",
              "recompute", "memory_GB", "tokens/s");
  for (const MaxSeq& m : best) {
    if (m.S == 0)
      std::printf("%-31s %14s %11lld %9s %10s %12s\n", m.layout.label().c_str(), "none fits",
                  (long long)m.step, "-", "-", "-");
    else
      std::printf("%-31s %14lld %11lld %9s %10.2f %12.4g\n", m.layout.label().c_str(),
                  (long long)m.S, (long long)m.step,
                  std::string(recompute_name(m.at.recompute)).c_str(), m.at.memory.total() / 1e9,
                  m.at.tokens_per_s);
  }
  return 0;
}

int run_plan(const PlanOptions& o) {
  using namespace tsp::plan;
  TSP_CHECK(o.train + o.prefill + o.decode <= 1, "choose one of --train, --prefill, --decode");
  TSP_CHECK(o.dtype == "bf16" || o.dtype == "fp32",
            "--dtype must be bf16 or fp32 (the compute dtype of our implementation), got '{}'",
            o.dtype);
  const DType dtype = o.dtype == "bf16" ? DType::BF16 : DType::F32;
  Workload w;
  w.model = load_model(o.model);
  w.model.validate();
  w.B = o.batch;
  w.S = o.seq;
  w.micro_batches = o.micro_batches;
  w.mode = o.prefill ? Mode::Prefill : o.decode ? Mode::Decode : Mode::Train;
  TSP_CHECK(w.B >= 1 && w.S >= 1 && w.micro_batches >= 1,
            "--batch, --seq and --micro-batches must be positive");
  // The cost model multiplies B·S in 64-bit integers: refuse what would wrap around.
  checked_mul(w.B, w.S, "plan: --batch × --seq tokens");
  if (o.calibrate)
    TSP_CHECK(o.hw == "local", "--calibrate measures this machine: use it with --hw local");
  Hardware hw = o.calibrate ? calibrate_local() : hardware_profile(o.hw);
  if (o.gpus_per_node > 0) hw.gpus_per_node = o.gpus_per_node;
  TSP_CHECK(o.zero == 0 || o.zero == 1,
            "--zero must be 0 (every replica keeps the whole optimizer state of its shard) or 1 "
            "(optimizer state sharded over the replicas), got {}",
            o.zero);
  // ZeRO shards optimizer state: it applies to training steps only.
  const bool train = w.mode == Mode::Train;
  const int zero = train ? o.zero : 0;
  if (o.max_seq) w.S = 2 * static_cast<int64_t>(o.gpus);  // every zigzag split of the GPUs divides
  if (o.recompute != "auto") parse_recompute(o.recompute);  // a clear error for a wrong mode
  std::vector<LayoutSpec> layouts = enumerate_layouts(w, o.gpus, o.degree);
  TSP_CHECK(!layouts.empty(), "no layout divides this model and workload on {} GPUs", o.gpus);
  for (LayoutSpec& l : layouts) l.zero = zero;
  if (o.max_seq) return run_max_seq(o, w, hw, layouts);
  const std::vector<Recompute> modes = recompute_modes(o.recompute);
  std::vector<Estimate> all;
  std::vector<double> none_gb;
  for (const LayoutSpec& l : layouts) {
    const PlanRow r = estimate_row(w, l, hw, modes);
    all.push_back(r.est);
    none_gb.push_back(r.none_gb);
  }
  // Our implementation's own figures apply to training steps (what `tsp train` runs).
  const bool ours = w.mode == Mode::Train;
  std::vector<Ours> mine;
  if (ours)
    for (size_t i = 0; i < layouts.size(); ++i)
      mine.push_back(ours_of(w, layouts[i], dtype, all[i].recompute));
  std::string reason;
  const int best = recommend(all, &reason);
  // When the recommended row fits only thanks to recomputation, say so.
  std::string recompute_note;
  if (train && best >= 0 && all[best].recompute != Recompute::None &&
      none_gb[best] * 1e9 > hw.mem_capacity)
    recompute_note = fmt::format(
        "{} fits only with activation recomputation: --recompute {} ({:.1f} GB per GPU; without "
        "recomputation {:.1f} GB > {:.0f} GB)",
        all[best].layout.label(), recompute_name(all[best].recompute),
        all[best].memory.total() / 1e9, none_gb[best], hw.mem_capacity / 1e9);

  // How the recommendation changes with the other ZeRO stage (training with replicas only: at
  // R = 1 both stages are the same layout).
  const bool any_replicas =
      std::any_of(layouts.begin(), layouts.end(), [](const LayoutSpec& l) { return l.R > 1; });
  const bool compare_zero = train && any_replicas;
  std::vector<Estimate> other;
  int other_best = -1;
  if (compare_zero) {
    for (LayoutSpec l : layouts) {
      l.zero = 1 - zero;
      other.push_back(estimate_row(w, l, hw, modes).est);
    }
    other_best = recommend(other, nullptr);
  }

  const char* names[] = {"weights", "grads", "optimizer", "activations", "comm", "workspace"};
  if (o.json) {
    nlohmann::json doc;
    doc["model"] = o.model;
    doc["mode"] = std::string(mode_name(w.mode));
    doc["seq"] = w.S;
    doc["batch"] = w.B;
    doc["micro_batches"] = w.micro_batches;
    doc["gpus"] = o.gpus;
    doc["gpus_per_node"] = hw.gpus_per_node;
    doc["zero"] = zero;
    doc["recompute_option"] = train ? o.recompute : "none";
    doc["hardware"] = {{"name", hw.name},
                       {"peak_tflops", hw.peak_flops / 1e12},
                       {"gemm_eff", hw.gemm_eff},
                       {"attn_eff", hw.attn_eff},
                       {"capacity_gb", hw.mem_capacity / 1e9},
                       {"intra_gb_s", hw.intra.bw_bytes_per_s / 1e9},
                       {"inter_gb_s", hw.inter.bw_bytes_per_s / 1e9},
                       {"source", hw.source}};
    nlohmann::json rows = nlohmann::json::array();
    doc["implementation_dtype"] = o.dtype;
    for (size_t i = 0; i < all.size(); ++i) {
      const Estimate& e = all[i];
      nlohmann::json mem;
      for (int c = 0; c < kNumMemCategories; ++c) mem[names[c]] = e.memory.bytes[c] / 1e9;
      mem["total"] = e.memory.total() / 1e9;
      nlohmann::json row = {{"name", e.layout.name},
                            {"label", e.layout.label()},
                            {"D", e.layout.D},
                            {"T", e.layout.D / e.layout.token_shards()},
                            {"S", e.layout.token_shards()},
                            {"R", e.layout.R},
                            {"recompute", std::string(recompute_name(e.recompute))},
                            {"memory_gb_without_recompute", none_gb[i]},
                            {"memory_gb", mem},
                            {"fits", e.fits},
                            {"comm_bytes",
                             {{"intra_node", e.comm_intra_bytes},
                              {"inter_node", e.comm_inter_bytes},
                              {"replicas", e.comm_replica_bytes}}},
                            {"flops_per_gpu", e.flops},
                            {"compute_s", e.compute_s},
                            {"exposed_comm_s", e.exposed_comm_s},
                            {"step_s", e.step_s},
                            {"tokens_per_s", e.tokens_per_s}};
      if (ours && mine[i].valid)
        row["implementation"] = {{"dtype", o.dtype},
                                 {"memory_gb", mine[i].memory / 1e9},
                                 {"sent_gb_per_step", mine[i].traffic / 1e9}};
      rows.push_back(row);
    }
    doc["layouts"] = rows;
    doc["recommendation"] = best >= 0 ? nlohmann::json(all[best].layout.label()) : nlohmann::json();
    doc["reason"] = reason;
    doc["recompute_note"] = recompute_note;
    if (compare_zero) {
      nlohmann::json alt = {{"zero", 1 - zero}};
      if (other_best >= 0) {
        const Estimate& e = other[other_best];
        alt["recommendation"] = e.layout.label();
        alt["memory_gb"] = e.memory.total() / 1e9;
        alt["tokens_per_s"] = e.tokens_per_s;
      } else {
        alt["recommendation"] = nullptr;
      }
      doc["with_other_zero"] = alt;
    }
    std::printf("%s\n", doc.dump(2).c_str());
    return 0;
  }

  std::printf(
      "# tsp plan  model=%s (h=%lld L=%lld heads=%lld/%lld I=%lld V=%lld)  mode=%s  S=%lld tokens "
      "B=%lld sequences micro=%d  gpus=%d (%d per node)\n",
      o.model.c_str(), (long long)w.model.hidden_size, (long long)w.model.num_hidden_layers,
      (long long)w.model.num_attention_heads, (long long)w.model.num_key_value_heads,
      (long long)w.model.intermediate_size, (long long)w.model.vocab_size,
      std::string(mode_name(w.mode)).c_str(), (long long)w.S, (long long)w.B, w.micro_batches,
      o.gpus, hw.gpus_per_node);
  std::printf(
      "# hw=%s  %.1f TFLOP/s x eff %.2f (gemm) / %.2f (attn), %.0f GB; intra %.0f GB/s%s, "
      "inter %.0f GB/s\n#    %s\n",
      hw.name.c_str(), hw.peak_flops / 1e12, hw.gemm_eff, hw.attn_eff, hw.mem_capacity / 1e9,
      hw.intra.bw_bytes_per_s / 1e9, hw.intra.mesh ? " per link (mesh)" : "",
      hw.inter.bw_bytes_per_s / 1e9, hw.source.c_str());
  std::printf(
      "# the paper's mixed-precision stack (docs/cost-model.md §3-4): memory per GPU in GB, comm "
      "in GB received per GPU per step, times in s\n");
  if (train)
    std::printf(
        "# ZeRO-%d (--zero): %s; replica_GB = the part of intra_GB + inter_GB that crosses the R "
        "replicas\n",
        zero,
        zero == 1 ? "with R > 1 optimizer state / R; gradients reduce-scattered (overlapped), "
                    "weights all-gathered after the step (exposed)"
                  : "whole optimizer state per replica; gradients all-reduced (overlapped)");
  if (train)
    std::printf(
        "# recompute (--recompute %s): activation recomputation of each row (none | selective | "
        "full; auto: the fastest that fits); docs/cost-model.md §3.2\n",
        o.recompute.c_str());
  if (ours)
    std::printf(
        "# ours_*: our implementation in %s (fp32 master weights, gradients and AdamW moments; "
        "docs/cost-model.md §5) with the row's recomputation: peak GB per rank, GB sent per rank "
        "per step\n",
        o.dtype.c_str());
  std::printf("%-31s %-9s %10s %8s %8s %8s %8s %10s %8s %4s %10s %10s %10s %9s %9s %12s", "#layout",
              "recompute", "weights_GB", "grads_GB", "optim_GB", "activ_GB", "comm_GB",
              "wkspace_GB", "total_GB", "fits", "intra_GB", "inter_GB", "replica_GB", "exposed_s",
              "step_s", "tokens/s");
  if (ours) std::printf(" %8s %12s", "ours_GB", "ours_sent_GB");
  std::printf("\n");
  for (size_t i = 0; i < all.size(); ++i) {
    const Estimate& e = all[i];
    std::printf("%-31s %-9s", e.layout.label().c_str(),
                std::string(train ? recompute_name(e.recompute) : "-").c_str());
    const int widths[kNumMemCategories] = {10, 8, 8, 8, 8, 10};
    for (int c = 0; c < kNumMemCategories; ++c)
      std::printf(" %*.2f", widths[c], e.memory.bytes[c] / 1e9);
    std::printf(" %8.2f %4s %10.3f %10.3f %10.3f %9.4f %9.4f %12.4g", e.memory.total() / 1e9,
                e.fits ? "yes" : "no", e.comm_intra_bytes / 1e9, e.comm_inter_bytes / 1e9,
                e.comm_replica_bytes / 1e9, e.exposed_comm_s, e.step_s, e.tokens_per_s);
    if (ours && mine[i].valid)
      std::printf(" %8.2f %12.3f", mine[i].memory / 1e9, mine[i].traffic / 1e9);
    else if (ours)
      std::printf(" %8s %12s", "n/a", "n/a");
    std::printf("\n");
  }
  std::printf("recommendation: %s\n", reason.c_str());
  if (!recompute_note.empty()) std::printf("recomputation: %s\n", recompute_note.c_str());
  if (compare_zero) {
    if (other_best < 0) {
      std::printf("with --zero %d: no layout fits in GPU memory\n", 1 - zero);
    } else {
      const Estimate& e = other[other_best];
      const bool same = best >= 0 && e.layout.name == all[best].layout.name &&
                        e.layout.D == all[best].layout.D && e.layout.T == all[best].layout.T;
      std::printf("with --zero %d: %s, %.1f GB per GPU, %.4g tokens/s (%s)\n", 1 - zero,
                  e.layout.label().c_str(), e.memory.total() / 1e9, e.tokens_per_s,
                  best < 0 ? "fits where nothing does with this stage"
                  : same   ? "same layout"
                           : "a different layout");
    }
  }
  return 0;
}

const CommandRegistration kPlan{Command{
    "plan",
    "Predict memory per GPU, communication and tokens/s of every layout and factorization "
    "(closed-form cost model, docs/cost-model.md) and recommend one",
    /*needs_mpi=*/false, [](CLI::App& sub) {
      auto o = std::make_shared<PlanOptions>();
      sub.add_option("--model", o->model,
                     "model directory (with config.json) or preset: 7b, tiny, demo")
          ->capture_default_str();
      sub.add_option("--seq", o->seq, "sequence length S (decode: cached positions)")
          ->capture_default_str();
      sub.add_option("--batch", o->batch, "sequences per micro-batch per replica (B)")
          ->capture_default_str();
      sub.add_option("--micro-batches", o->micro_batches, "micro-batches per step (accumulation)")
          ->capture_default_str();
      sub.add_option("--gpus", o->gpus, "GPUs (ranks) in all: D x R")->capture_default_str();
      sub.add_option("--gpus-per-node", o->gpus_per_node, "GPUs per node (default: the profile's)");
      sub.add_option("--degree", o->degree, "only layouts with this group size D (0: all)")
          ->capture_default_str();
      sub.add_option("--hw", o->hw, "hardware profile: mi300x, h100, local")->capture_default_str();
      sub.add_flag("--train", o->train, "training step: forward + backward + optimizer (default)");
      sub.add_flag("--prefill", o->prefill, "inference prefill: forward, keeps the K/V cache");
      sub.add_flag("--decode", o->decode, "inference decode: one token per sequence");
      sub.add_flag("--json", o->json, "print one JSON document instead of the table");
      sub.add_option("--dtype", o->dtype,
                     "compute dtype of our implementation's columns (training): bf16 or fp32")
          ->capture_default_str();
      sub.add_option("--zero", o->zero,
                     "ZeRO stage over the R data-parallel replicas (training): 1 = each replica "
                     "owns 1/R of the fp32 master weights and AdamW moments, gradients are "
                     "reduce-scattered (overlapped with backward) and the updated weights "
                     "all-gathered after the step (exposed); 0 = every replica keeps the whole "
                     "optimizer state and gradients are all-reduced. Default 1, as `tsp train`. "
                     "The recommendation with the other stage is printed too")
          ->capture_default_str();
      sub.add_option("--recompute", o->recompute,
                     "activation recomputation of the training rows: none (keep every "
                     "activation), selective (recompute the normed inputs and the MLP's "
                     "gate/up/act), full (keep each layer's input, replay the layer in backward; "
                     "under tsp its weight shards travel again), auto (per row, the fastest mode "
                     "that fits; the table says which). docs/cost-model.md §3.2")
          ->capture_default_str();
      sub.add_flag("--max-seq", o->max_seq,
                   "instead of the table: the longest sequence (tokens) each layout can train "
                   "on --gpus GPUs of --hw with --batch and --recompute (auto: the mode that "
                   "reaches the longest), the memory per GPU there and the mode used");
      sub.add_flag("--calibrate", o->calibrate,
                   "with --hw local: measure GEMM rate and copy bandwidth first");
      return [o](Communicator*) { return run_plan(*o); };
    }}};

}  // namespace
}  // namespace tsp::cli
