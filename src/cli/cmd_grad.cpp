// `tsp grad`: one forward/backward of a model directory on the first B·(S+1) tokens of an llm.c
// token file, with any layout; rank 0 writes every parameter's full gradient (f32, Hugging Face
// names) and the mean loss (tensor "loss", shape [] = a scalar, f32; the exact double is also in
// the metadata) into one safetensors file, atomically. Compare two such files with `tsp compare`.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <memory>

#include "cli/command.h"
#include "tsp/comm/device_comm.h"
#include "tsp/core/error.h"
#include "tsp/core/limits.h"
#include "tsp/model/params.h"
#include "tsp/model/safetensors.h"
#include "tsp/model/tokens.h"
#include "tsp/parallel/layout.h"
#include "tsp/plan/measure.h"

namespace tsp::cli {
namespace {

struct GradOptions {
  std::string model, tokens, out;
  ParallelConfig parallel;
  int64_t batch = 0, seq = 0;
  int64_t doc_sep = -1;  // --doc-sep
  bool no_overlap = false;
  std::string recompute = "selective";  // --recompute
  ComputeOptions compute;
};

// The batch: the first B·(S+1) tokens of the file cut into B rows of S+1, checked against the
// model so a mistake is reported with the file and the fix, not deep inside a kernel.
Batch read_batch(const GradOptions& o, const LlamaConfig& c) {
  TSP_CHECK(o.batch >= 1 && o.seq >= 1, "grad: --batch and --seq must be positive (got {} and {})",
            o.batch, o.seq);
  TSP_CHECK(o.seq <= c.max_position_embeddings,
            "grad: --seq {} exceeds max_position_embeddings={} of the model in {}; use --seq <= {}",
            o.seq, c.max_position_embeddings, o.model, c.max_position_embeddings);
  const TokenFileInfo info = read_token_file_info(o.tokens);
  // Checked before the product is used: a huge --batch must not wrap into a negative count.
  const int64_t need = checked_mul(o.batch, checked_add(o.seq, 1, "grad: --seq + 1"),
                                   "grad: --batch × (--seq + 1) tokens");
  TSP_CHECK(info.num_tokens >= need,
            "grad: {} holds {} tokens, but --batch {} --seq {} needs B·(S+1) = {}; use a smaller "
            "batch or sequence, or a longer token file",
            o.tokens, info.num_tokens, o.batch, o.seq, need);
  Batch b;
  b.B = o.batch;
  b.S = o.seq;
  b.doc_sep = checked_doc_sep(o.doc_sep, c.vocab_size, "grad");
  b.tokens = read_tokens(o.tokens, 0, need);
  for (int64_t i = 0; i < need; ++i) {
    TSP_CHECK(b.tokens[i] < c.vocab_size,
              "grad: token id {} at position {} of {} is not below vocab_size={} of the model in "
              "{}; the token file was made for another vocabulary",
              b.tokens[i], i, o.tokens, c.vocab_size, o.model);
  }
  return b;
}

int run_grad(const GradOptions& o, Communicator& world) {
  // --out is written after the whole computation: check now that it can be.
  if (world.rank() == 0) check_output_path(o.out, "grad: --out");
  const ModelDir dir = open_model_arg(o.model, world);
  const Batch batch = read_batch(o, dir.config);
  ParallelConfig pc = o.parallel;
  pc.overlap = !o.no_overlap;
  pc.recompute = checked_recompute(o.recompute, "grad");
  pc.device = o.compute.parsed_device();
  pc.dtype = o.compute.parsed_dtype();
  std::unique_ptr<Layout> layout = make_layout(dir.config, pc, world);
  // The step's memory on this rank (the project's model of its own allocations, without AdamW
  // moments) before the weights are read: a batch too large for this machine is an error here.
  auto predict = [&](plan::Recompute mode) {
    try {
      return plan::predict_local_memory(dir.config, plan::layout_spec_of(*layout, world.size()),
                                        batch.B, batch.S, /*optimizer=*/false,
                                        layout->compute_dtype(), mode,
                                        plan::memory_target_of(pc.device))
          .total();
    } catch (const Error&) {
      return 0.0;  // a layout without a memory model: nothing to check against
    }
  };
  require_memory(
      static_cast<int64_t>(std::min(predict(pc.recompute), 9e18)),
      fmt::format("grad: --batch {} --seq {} (layout {}, {} ranks)", batch.B, batch.S, pc.layout,
                  world.size()),
      "use a smaller --batch or --seq, or more ranks" + recompute_hint(pc.recompute, predict),
      memory_pool(pc.device, world));
  layout->load(ModelDirWeights(dir));
  const double loss = layout->forward_backward(batch);

  // Rank 0 keeps every full gradient until the file is written (the writer needs them all).
  std::vector<Tensor> grads;
  std::vector<std::string> names;
  layout->gather(true, [&](const ParamSpec& s, TensorView t) {
    grads.push_back(Tensor::f32(s.shape, MemCategory::Grads));
    copy(t, grads.back());
    names.push_back(s.name);
  });
  if (world.rank() == 0) {
    Tensor loss_t = Tensor::f32({}, MemCategory::Workspace);
    loss_t.f32()[0] = static_cast<float>(loss);
    SafetensorsWriter w;
    for (size_t i = 0; i < grads.size(); ++i) w.add(names[i], grads[i]);
    w.add("loss", loss_t);
    w.set_metadata("loss", fmt::format("{:.17g}", loss));
    w.set_metadata("layout", pc.layout);
    w.set_metadata("dtype", std::string(dtype_name(pc.dtype)));
    w.set_metadata("world", std::to_string(world.size()));
    w.set_metadata("dp", std::to_string(pc.dp));
    w.set_metadata("tp", std::to_string(pc.tp));
    w.set_metadata("batch", fmt::format("{}x{}", batch.B, batch.S));
    w.set_metadata("recompute", o.recompute);
    w.write(o.out);
    std::printf("loss %.9f  layout %s  world %d (dp %d, tp %d)  B=%" PRId64 " S=%" PRId64
                "  recompute %s  wrote %s (%zu gradients + loss)\n",
                loss, pc.layout.c_str(), world.size(), pc.dp, pc.tp, batch.B, batch.S,
                o.recompute.c_str(), o.out.c_str(), grads.size());
  }
  world.barrier();  // the file exists when any rank returns
  return 0;
}

const CommandRegistration kGrad{Command{
    "grad",
    "One forward/backward on the first B·(S+1) tokens; rank 0 writes the loss and every "
    "parameter's full gradient (f32) to a safetensors file",
    /*needs_mpi=*/true, [](CLI::App& sub) {
      auto o = std::make_shared<GradOptions>();
      sub.add_option("--model", o->model, "model directory (config.json + model.safetensors)")
          ->required()
          ->check(CLI::ExistingDirectory);
      sub.add_option("--tokens", o->tokens, "llm.c token file")
          ->required()
          ->check(CLI::ExistingFile);
      sub.add_option("--layout", o->parallel.layout,
                     "parallel layout: single | tp | sp | tp-sp | tsp | fsdp-cp")
          ->capture_default_str();
      sub.add_option("--tp", o->parallel.tp, "T for tp-sp (Σ = D / T)")->capture_default_str();
      sub.add_option("--dp", o->parallel.dp, "data-parallel replicas R (D = world / R)")
          ->capture_default_str();
      sub.add_option("--batch", o->batch, "rows B")->required();
      sub.add_option("--seq", o->seq, "sequence length S")->required();
      sub.add_option("--out", o->out, "output safetensors file")->required();
      sub.add_option("--doc-sep", o->doc_sep, kDocSepHelp)->capture_default_str();
      sub.add_flag("--no-overlap", o->no_overlap, "blocking transfers (tsp: no prefetch)");
      sub.add_option("--recompute", o->recompute, kRecomputeHelp)->capture_default_str();
      o->compute.add_to(sub);
      return [o](Communicator* world) { return run_grad(*o, *world); };
    }}};

}  // namespace
}  // namespace tsp::cli
