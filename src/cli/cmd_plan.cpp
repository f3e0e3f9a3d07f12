// `tsp plan`: predicted memory, communication and throughput of every layout and factorization
// for a model, a workload and a hardware profile; then a recommendation. See docs/cost-model.md.
#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "tsp/core/error.h"
#include "tsp/core/limits.h"
#include "tsp/plan/cost_model.h"

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
};

LlamaConfig load_model(const std::string& arg) {
  namespace fs = std::filesystem;
  if (fs::is_directory(arg))
    return LlamaConfig::from_file((fs::path(arg) / "config.json").string());
  return llama_preset(arg);
}

int run_plan(const PlanOptions& o) {
  using namespace tsp::plan;
  TSP_CHECK(o.train + o.prefill + o.decode <= 1, "choose one of --train, --prefill, --decode");
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
  const std::vector<LayoutSpec> layouts = enumerate_layouts(w, o.gpus, o.degree);
  TSP_CHECK(!layouts.empty(), "no layout divides this model and workload on {} GPUs", o.gpus);
  std::vector<Estimate> all;
  for (const LayoutSpec& l : layouts) all.push_back(estimate(w, l, hw));
  std::string reason;
  const int best = recommend(all, &reason);

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
    doc["hardware"] = {{"name", hw.name},
                       {"peak_tflops", hw.peak_flops / 1e12},
                       {"gemm_eff", hw.gemm_eff},
                       {"attn_eff", hw.attn_eff},
                       {"capacity_gb", hw.mem_capacity / 1e9},
                       {"intra_gb_s", hw.intra.bw_bytes_per_s / 1e9},
                       {"inter_gb_s", hw.inter.bw_bytes_per_s / 1e9},
                       {"source", hw.source}};
    nlohmann::json rows = nlohmann::json::array();
    for (const Estimate& e : all) {
      nlohmann::json mem;
      for (int c = 0; c < kNumMemCategories; ++c) mem[names[c]] = e.memory.bytes[c] / 1e9;
      mem["total"] = e.memory.total() / 1e9;
      rows.push_back(
          {{"name", e.layout.name},
           {"label", e.layout.label()},
           {"D", e.layout.D},
           {"T", e.layout.name == "tp-sp" ? e.layout.T : (e.layout.name == "tp" ? e.layout.D : 1)},
           {"S", e.layout.name == "tp-sp" ? e.layout.D / e.layout.T : e.layout.token_shards()},
           {"R", e.layout.R},
           {"memory_gb", mem},
           {"fits", e.fits},
           {"comm_bytes", {{"intra_node", e.comm_intra_bytes}, {"inter_node", e.comm_inter_bytes}}},
           {"flops_per_gpu", e.flops},
           {"compute_s", e.compute_s},
           {"exposed_comm_s", e.exposed_comm_s},
           {"step_s", e.step_s},
           {"tokens_per_s", e.tokens_per_s}});
    }
    doc["layouts"] = rows;
    doc["recommendation"] = best >= 0 ? nlohmann::json(all[best].layout.label()) : nlohmann::json();
    doc["reason"] = reason;
    std::printf("%s\n", doc.dump(2).c_str());
    return 0;
  }

  std::printf(
      "# tsp plan  model=%s (h=%lld L=%lld heads=%lld/%lld I=%lld V=%lld)  mode=%s  S=%lld "
      "B=%lld micro=%d  gpus=%d (%d per node)\n",
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
  std::printf("# memory per GPU in GB; comm in GB per GPU per step (received); step in s\n");
  std::printf("%-24s %8s %8s %8s %8s %8s %8s %8s %4s %10s %10s %9s %9s %12s\n", "#layout",
              "weights", "grads", "optim", "activ", "comm", "wkspace", "total_GB", "fits",
              "intra_GB", "inter_GB", "exposed_s", "step_s", "tokens/s");
  for (const Estimate& e : all) {
    std::printf("%-24s", e.layout.label().c_str());
    for (int c = 0; c < kNumMemCategories; ++c) std::printf(" %8.2f", e.memory.bytes[c] / 1e9);
    std::printf(" %8.2f %4s %10.3f %10.3f %9.4f %9.4f %12.4g\n", e.memory.total() / 1e9,
                e.fits ? "yes" : "no", e.comm_intra_bytes / 1e9, e.comm_inter_bytes / 1e9,
                e.exposed_comm_s, e.step_s, e.tokens_per_s);
  }
  std::printf("recommendation: %s\n", reason.c_str());
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
      sub.add_flag("--calibrate", o->calibrate,
                   "with --hw local: measure GEMM rate and copy bandwidth first");
      return [o](Communicator*) { return run_plan(*o); };
    }}};

}  // namespace
}  // namespace tsp::cli
