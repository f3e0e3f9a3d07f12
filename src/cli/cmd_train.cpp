// `tsp train`: trains the Llama model with any layout on a text or llm.c token corpus.
//
//   mpiexec -n 4 tsp train --data data/kjv.txt --layout tsp --save out/kjv
//
// Every rank runs the same loop (the loss, the gradient norm and hence every decision are
// identical on all ranks, so they stop together); world rank 0 prints, writes the metrics and
// the checkpoint files. Each rank reads from the corpus only the tokens its layout reads
// (Layout::token_need: under tsp its replica's rows, its two zigzag chunks and their labels) and
// reports what it read per step.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "cli/command.h"
#include "parallel/registry.h"
#include "tsp/comm/device_comm.h"
#include "tsp/core/error.h"
#include "tsp/core/limits.h"
#include "tsp/model/params.h"
#include "tsp/parallel/layout.h"
#include "tsp/parallel/sharding.h"
#include "tsp/plan/measure.h"
#include "tsp/train/checkpoint.h"
#include "tsp/train/data.h"
#include "tsp/train/metrics.h"
#include "tsp/train/optimizer.h"
#include "tsp/train/schedule.h"

namespace tsp::cli {
namespace {

struct TrainOptions {
  std::string model_dir, config_path, preset = "demo", data;
  std::string layout = "tsp";
  int tp = 1, dp = 1;
  int zero = 1;  // ZeRO stage over the --dp replicas (no effect at --dp 1)
  bool no_overlap = false;
  std::string recompute = "selective";  // --recompute
  ComputeOptions compute;
  int64_t steps = 500, stop_at = -1, batch = 8, seq = 256, accum = 1, warmup = 50;
  double lr = 3e-3, min_lr_ratio = 0.1, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, wd = 0.1, clip = 1.0;
  uint64_t seed = 1337;
  int64_t val_every = 100, val_windows = 32;
  double val_fraction = 0.05;
  std::string metrics, save, resume;
  int64_t save_every = 0, log_every = 10;
  std::string progress = "auto";  // auto | bar | lines
  // Whether the user set these (on resume, unset ones come from the
  // checkpoint).
  bool seed_set = false, batch_set = false, seq_set = false, accum_set = false;
  int64_t doc_sep = -1;  // --doc-sep (packed documents); a resumed run keeps the checkpoint's
  bool doc_sep_set = false;
};

// Every rank's value of a count, in world-rank order (collective; control traffic, apart from the
// training step's data traffic).
std::vector<int64_t> all_gather_counts(Communicator& world, int64_t mine) {
  return world.gather_host(mine);
}

// Mean validation loss per counted token over the held-out windows (every rank gets the same
// value). Without documents every batch counts B·S labels, so the mean of the batches' means is
// the token mean; with documents the batches count different numbers, so every batch's loss sum
// is divided by the total count (Batch::loss_denominator), as the training step does.
double validate(Layout& layout, const DataLoader& loader, bool documents) {
  const int64_t n = loader.num_val_batches();
  if (n == 0) return -1;
  double sum = 0;
  if (documents && n > 1) {
    int64_t counted = 0;
    for (int64_t i = 0; i < n; ++i) counted += layout.counted_labels(loader.val_batch(i));
    for (int64_t i = 0; i < n; ++i) {
      Batch b = loader.val_batch(i);
      b.loss_denominator = counted;
      sum += layout.forward(b);
    }
    return sum;
  }
  for (int64_t i = 0; i < n; ++i) sum += layout.forward(loader.val_batch(i));
  return sum / static_cast<double>(n);
}

bool finite_in(double v, double lo, double hi) {
  return std::isfinite(v) && v >= lo && v <= hi;
}

// Every numeric option, before anything is read or built: a value that cannot mean anything is
// an error naming the option and what it accepts, never silently taken.
void validate_options(const TrainOptions& o) {
  TSP_CHECK(o.steps >= 1, "--steps must be at least 1, got {}", o.steps);
  TSP_CHECK(o.stop_at == -1 || o.stop_at >= 1,
            "--stop-at must be a step count >= 1 (or -1: run to --steps), got {}", o.stop_at);
  TSP_CHECK(o.batch >= 1, "--batch must be at least 1 row, got {}", o.batch);
  TSP_CHECK(o.seq >= 1, "--seq must be at least 1 token, got {}", o.seq);
  TSP_CHECK(o.accum >= 1, "--accum must be at least 1 micro-batch, got {}", o.accum);
  TSP_CHECK(o.warmup >= 0, "--warmup must be >= 0 steps (0: no warm-up), got {}", o.warmup);
  TSP_CHECK(o.tp >= 1, "--tp must be at least 1, got {}", o.tp);
  TSP_CHECK(o.dp >= 1, "--dp must be at least 1, got {}", o.dp);
  TSP_CHECK(o.zero == 0 || o.zero == 1,
            "--zero must be 0 (every replica keeps the whole optimizer state) or 1 (it is "
            "partitioned over the --dp replicas), got {}",
            o.zero);
  checked_recompute(o.recompute, "train");
  TSP_CHECK(std::isfinite(o.lr) && o.lr > 0, "--lr must be a positive number, got {}", o.lr);
  TSP_CHECK(finite_in(o.min_lr_ratio, 0, 1), "--min-lr-ratio must lie in [0, 1], got {}",
            o.min_lr_ratio);
  TSP_CHECK(finite_in(o.beta1, 0, 1) && o.beta1 < 1, "--beta1 must lie in [0, 1), got {}", o.beta1);
  TSP_CHECK(finite_in(o.beta2, 0, 1) && o.beta2 < 1, "--beta2 must lie in [0, 1), got {}", o.beta2);
  TSP_CHECK(std::isfinite(o.eps) && o.eps > 0, "--eps must be a positive number, got {}", o.eps);
  TSP_CHECK(std::isfinite(o.wd) && o.wd >= 0, "--wd must be >= 0, got {}", o.wd);
  TSP_CHECK(std::isfinite(o.clip) && o.clip >= 0,
            "--clip must be >= 0 (0 turns clipping off), got {}", o.clip);
  TSP_CHECK(o.val_every >= 0, "--val-every must be >= 0 steps (0: never), got {}", o.val_every);
  TSP_CHECK(o.val_windows >= 0, "--val-windows must be >= 0, got {}", o.val_windows);
  TSP_CHECK(finite_in(o.val_fraction, 0, 1) && o.val_fraction < 1,
            "--val-fraction must lie in [0, 1) (the held-out share of the corpus), got {}",
            o.val_fraction);
  TSP_CHECK(o.save_every >= 0, "--save-every must be >= 0 steps (0: only at the end), got {}",
            o.save_every);
  TSP_CHECK(o.save_every == 0 || !o.save.empty(),
            "--save-every {} needs --save DIR (where to write the checkpoints)", o.save_every);
  TSP_CHECK(o.log_every >= 1, "--log-every must be at least 1 step, got {}", o.log_every);
}

// The whole run's memory on this rank, predicted by the project's own model of its allocations
// (plan::predict_local_memory, which tests/plan and `tsp bench` compare with measurement), checked
// against this machine before anything is allocated: an impossible --batch or --seq fails here
// with a message instead of growing until the kernel kills the job. Every product of sizes is
// checked for overflow first.
void check_run_memory(const TrainOptions& o, const LlamaConfig& c, int world_size,
                      const MemoryPool& pool) {
  checked_product({o.batch, o.seq, o.accum}, "tokens per step (--batch × --seq × --accum)");
  checked_product({o.batch, o.seq + 1}, "tokens per micro-batch (--batch × (--seq + 1))");
  checked_product({o.steps, o.accum, o.batch},
                  "training windows of the run (--steps × --accum × --batch)");
  const int D = check_world(world_size, o.dp, o.tp);
  TSP_CHECK(o.batch % o.dp == 0, "--batch {} must be a multiple of --dp {}", o.batch, o.dp);
  if (find_layout(o.layout) == nullptr) return;  // make_layout names the layouts there are
  const std::string what = fmt::format("training with --batch {} --seq {} (layout {}, {} ranks)",
                                       o.batch, o.seq, o.layout, world_size);
  const std::string hint =
      "use a smaller --batch or --seq (--accum keeps the tokens per step), or more ranks";
  // A lower bound in checked arithmetic first: whatever the layout, a rank keeps for backward at
  // least the input of every layer (h floats) for each token it holds, and holds at least 1/D of
  // its replica's tokens. Passing it keeps the model's own arithmetic below within 64 bits.
  const int64_t tokens = checked_mul(o.batch / o.dp, o.seq, "tokens per replica");
  const int64_t floor_bytes = checked_product(
      {tokens / D + 1, c.num_hidden_layers, c.hidden_size, 4}, "activation memory per rank");
  require_memory(floor_bytes, what, hint, pool);
  // Likewise for the model: weights, gradients and two AdamW moments (16 bytes per parameter), at
  // least 1/D of them on each rank.
  require_memory(checked_mul(c.num_parameters() / D + 1, 16, "model state per rank"),
                 fmt::format("the model state (weights, gradients, AdamW moments) of {} "
                             "parameters over {} ranks",
                             c.num_parameters(), D),
                 "use a smaller model or more ranks (a larger layout degree)", pool);
  plan::LayoutSpec spec;
  spec.name = o.layout;
  spec.D = D;
  spec.R = o.dp;
  spec.T = o.layout == "tp" ? D : (o.layout == "tp-sp" ? o.tp : 1);
  spec.zero = o.zero;
  auto predict = [&](plan::Recompute mode) {
    return plan::predict_local_memory(c, spec, o.batch, o.seq, true, o.compute.parsed_dtype(), mode,
                                      plan::memory_target_of(o.compute.parsed_device()))
        .total();
  };
  const plan::Recompute mode = checked_recompute(o.recompute, "train");
  require_memory(static_cast<int64_t>(predict(mode)), what, hint + recompute_hint(mode, predict),
                 pool);
}

int run_train(TrainOptions o, Communicator& world) {
  const bool root = world.rank() == 0;
  auto say = [&](const std::string& line) {
    if (root) {
      std::fprintf(stdout, "%s\n", line.c_str());
      std::fflush(stdout);
    }
  };
  validate_options(o);

  // ---- The checkpoint directory: locked for the whole run (world rank 0 holds it) and checked
  // to be writable now, not at the first save, which may come after the whole run -------------
  std::optional<CheckpointLock> save_lock;
  if (root && !o.save.empty()) save_lock.emplace(o.save);

  // ---- Model configuration, checked against a checkpoint before anything is built ----------
  TSP_CHECK(o.model_dir.empty() || o.config_path.empty(),
            "give either --model DIR or --config FILE, not both");
  std::optional<ModelDir> model;
  std::optional<LlamaConfig> config;
  if (!o.model_dir.empty()) {
    // A checkpoint given as --model: its model files against their recorded checksums.
    model = open_model_arg(o.model_dir, world);
    config = model->config;
  } else if (!o.config_path.empty()) {
    config = LlamaConfig::from_file(o.config_path);
  }
  std::string resume_dir;
  std::optional<TrainerState> saved;
  if (!o.resume.empty()) {
    resume_dir = resolve_checkpoint(o.resume);
    if (!verify_on_rank0(world, resume_dir, {})) {
      say(fmt::format(
          "warning: {} was written by an older tsp that recorded no checksums; its files cannot "
          "be verified (the next save records them)",
          resume_dir));
    }
    const LlamaConfig ckpt_config = read_checkpoint_config(resume_dir);
    saved = read_trainer_state(resume_dir);
    if (config) {
      const std::string diff = config_differences(ckpt_config, *config);
      TSP_CHECK(diff.empty(),
                "--resume {}: the checkpoint holds another model than {} ({}); omit "
                "--model/--config to resume with the checkpoint's own",
                resume_dir, o.model_dir.empty() ? o.config_path : o.model_dir, diff);
    } else {
      config = ckpt_config;
    }
    TSP_CHECK(saved->step <= o.steps,
              "--resume {}: the checkpoint is at step {}, beyond --steps {} (the length of the "
              "schedule); give --steps {} or more to continue it",
              resume_dir, saved->step, o.steps, saved->step + 1);
    // Continue the same data stream unless told otherwise.
    if (!o.seed_set) o.seed = saved->seed;
    if (!o.batch_set) o.batch = saved->batch;
    if (!o.seq_set) o.seq = saved->seq;
    if (!o.accum_set) o.accum = saved->accum;
    if (!o.doc_sep_set) o.doc_sep = saved->doc_sep;
    if (o.doc_sep != saved->doc_sep)
      say(
          fmt::format("warning: resuming with --doc-sep {} instead of the checkpoint's {}: the "
                      "documents of the data change",
                      o.doc_sep, saved->doc_sep));
    if (o.seed != saved->seed || o.batch != saved->batch || o.seq != saved->seq ||
        o.accum != saved->accum) {
      say(fmt::format(
          "warning: resuming with seed/batch/seq/accum {}/{}/{}/{} instead of the "
          "checkpoint's {}/{}/{}/{}: training continues, but not exactly",
          o.seed, o.batch, o.seq, o.accum, saved->seed, saved->batch, saved->seq, saved->accum));
    }
  }
  const int64_t start_step = saved ? saved->step : 0;
  const int64_t stop = o.stop_at >= 0 ? std::min(o.stop_at, o.steps) : o.steps;
  TSP_CHECK(stop > start_step,
            "nothing to train: {} is at step {} and this run would stop at step {} (--steps {}{}); "
            "raise {} to train further",
            resume_dir, start_step, stop, o.steps,
            o.stop_at >= 0 ? fmt::format(", --stop-at {}", o.stop_at) : "",
            o.stop_at >= 0 && o.stop_at < o.steps ? "--stop-at" : "--steps");
  if (!config) config = llama_preset(o.preset);
  config->validate();
  TSP_CHECK(o.seq <= config->max_position_embeddings,
            "--seq {} exceeds the model's max_position_embeddings {}; use --seq <= {}", o.seq,
            config->max_position_embeddings, config->max_position_embeddings);
  // Checked against the memory the tensors will live in: this machine's, or the GPU's (shared by
  // the ranks that compute on it).
  check_run_memory(o, *config, world.size(), memory_pool(o.compute.parsed_device(), world));
  if (root && !o.save.empty()) {
    check_checkpoint_target(o.save, checkpoint_bytes(*config));
    std::string base = o.save;
    while (base.size() > 1 && base.back() == '/') base.pop_back();
    say(fmt::format("checkpoints go to {} ({}); this run holds {}.lock until it ends", base,
                    o.save_every > 0 ? fmt::format("every {} steps and at the end", o.save_every)
                                     : std::string("at the end"),
                    base));
  }

  // ---- Data ---------------------------------------------------------------------------------
  TSP_CHECK(!o.data.empty(), "--data FILE is required (text, or an llm.c token file)");
  auto corpus = std::make_shared<const Corpus>(o.data);
  // The vocabulary check scans a token file once, on rank 0 only.
  const int64_t need_vocab = world.broadcast_host(root ? corpus->min_vocab_size() : 0, 0);
  TSP_CHECK(need_vocab <= config->vocab_size,
            "{} holds token ids up to {}, but the model's vocabulary has {} entries; use a model "
            "with vocab_size >= {}",
            o.data, need_vocab - 1, config->vocab_size, need_vocab);
  DataOptions dopt;
  dopt.batch = o.batch;
  dopt.seq = o.seq;
  dopt.accum = o.accum;
  dopt.seed = o.seed;
  dopt.val_fraction = o.val_fraction;
  dopt.val_windows = o.val_windows;
  dopt.doc_sep = checked_doc_sep(o.doc_sep, config->vocab_size, "train");
  DataLoader loader(corpus, dopt);

  // ---- Layout, weights, optimizer -------------------------------------------------------------
  ParallelConfig par;
  par.layout = o.layout;
  par.tp = o.tp;
  par.dp = o.dp;
  par.zero = o.zero;
  par.overlap = !o.no_overlap;
  par.recompute = checked_recompute(o.recompute, "train");
  par.device = o.compute.parsed_device();
  par.dtype = o.compute.parsed_dtype();
  std::unique_ptr<Layout> layout = make_layout(*config, par, world);
  // Each rank reads only the tokens its layout reads: its replica's rows and, under sp, tp-sp,
  // tsp and fsdp-cp, its zigzag chunks and their labels (training and validation batches alike).
  const TokenNeed need = layout->token_need(o.batch, o.seq);
  loader.set_need(need);
  LrSchedule sched{o.lr, o.min_lr_ratio, o.warmup, o.steps};
  sched.validate();
  if (!resume_dir.empty()) {
    // Weights come from the checkpoint below.
  } else if (model) {
    layout->load(ModelDirWeights(*model));
  } else {
    layout->load(RandomWeights(o.seed));
  }
  AdamW opt(*layout, AdamWConfig{o.beta1, o.beta2, o.eps, o.wd});
  int64_t sample_base = 0;  // training windows consumed before start_step (the data position)
  double last_val = -1;
  // The newest checkpoint known to be good, for the messages of a run that stops.
  std::string good_dir;
  int64_t good_step = -1;
  if (!resume_dir.empty()) {
    const TrainerState st = load_checkpoint(resume_dir, *layout, opt);
    sample_base = st.samples;
    last_val = st.last_val_loss;
    good_dir = resume_dir;
    good_step = st.step;
    say(fmt::format("resumed from {} at step {} (written by layout {} at world {})", resume_dir,
                    st.step, st.layout, st.world));
  }
  {
    // What training starts from must be finite (a checkpoint written before checksums, or a
    // model directory, is not verified otherwise). Collective: every rank stops together.
    const StateHealth health = check_state_health(opt, *layout, world);
    TSP_CHECK(health.ok(), "{} holds {}; training cannot start from it",
              !resume_dir.empty() ? "checkpoint " + resume_dir
              : model             ? "model directory " + o.model_dir
                                  : std::string("the random initialisation"),
              health.describe());
  }

  const int64_t tokens_per_step = checked_product({o.batch, o.seq, o.accum}, "tokens per step");
  say(fmt::format(
      "tsp train: {} parameters (h={} L={} heads={}/{} ffn={} V={}), layout {} D={} R={}{} on "
      "{} ranks, {}, recompute {}",
      config->num_parameters(), config->hidden_size, config->num_hidden_layers,
      config->num_attention_heads, config->num_key_value_heads, config->intermediate_size,
      config->vocab_size, layout->name(), layout->group().size(), layout->replicas().size(),
      layout->zero_stage() == 1 ? " ZeRO-1" : "", world.size(), o.compute.describe(), o.recompute));
  say(fmt::format(
      "data {}: {} tokens ({}), {} for training, {} held out ({} windows); {} tokens per step "
      "(batch {} x seq {} x accum {}), steps {} -> {}",
      o.data, corpus->num_tokens(),
      corpus->format() == CorpusFormat::Text ? "text, byte tokens" : "llm.c tokens",
      loader.train_tokens(), loader.val_tokens(), loader.num_val_batches() * o.batch,
      tokens_per_step, o.batch, o.seq, o.accum, start_step, stop));
  {
    // What each rank reads of a micro-batch of B·(S+1) tokens (ranks differ: zigzag chunks that
    // touch share a label).
    const std::vector<int64_t> reads = all_gather_counts(world, need.tokens(o.batch, o.seq));
    const auto [lo, hi] = std::minmax_element(reads.begin(), reads.end());
    say(fmt::format("each rank reads {} of the {} tokens of a micro-batch ({})",
                    *lo == *hi ? fmt::format("{}", *hi) : fmt::format("{}-{}", *lo, *hi),
                    o.batch * (o.seq + 1),
                    need.input_ranges.empty() ? "its replica's rows"
                                              : "its replica's rows, zigzag chunks and labels"));
  }

  std::unique_ptr<MetricsWriter> metrics;
  if (root && !o.metrics.empty())
    metrics = std::make_unique<MetricsWriter>(o.metrics, saved ? start_step : -1);
  const bool bar = o.progress == "bar" || (o.progress == "auto" && Progress::stdout_is_tty());
  Progress progress(start_step, o.steps, o.log_every, bar);

  auto kept = [&] {
    return good_step >= 0
               ? fmt::format("the last good checkpoint is {} (step {})", good_dir, good_step)
               : std::string("no checkpoint was written");
  };
  auto state_at = [&](int64_t step, double loss) {
    TrainerState s;
    s.step = step;
    s.samples = checked_add(sample_base,
                            checked_product({step - start_step, o.accum, o.batch}, "data position"),
                            "data position");
    s.seed = o.seed;
    s.batch = o.batch;
    s.seq = o.seq;
    s.accum = o.accum;
    s.doc_sep = o.doc_sep;
    s.config_hash = config_fingerprint(*config);
    s.layout = layout->name();
    s.tp = o.tp;
    s.dp = o.dp;
    s.world = world.size();
    s.last_loss = loss;
    s.last_val_loss = last_val;
    return s;
  };
  auto save = [&](int64_t step, double loss) {
    const auto t0 = std::chrono::steady_clock::now();
    save_checkpoint(o.save, *layout, opt, state_at(step, loss), world);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (root)
      progress.note(fmt::format("saved checkpoint {} at step {} ({:.1f} s)", o.save, step, dt));
  };
  // A run that cannot go on: every rank gets here together (the values tested are identical on
  // every rank), rank 0 says why, and the exit code is 2.
  auto stop_training = [&](int64_t step, const std::string& why) {
    progress.finish();
    if (root) {
      std::fflush(stdout);
      std::fprintf(stderr,
                   "error: training stopped at step %lld: %s; %s. Try a lower --lr, or --clip.\n",
                   static_cast<long long>(step), why.c_str(), kept().c_str());
      std::fflush(stderr);
    }
    return 2;
  };

  // ---- The loop -------------------------------------------------------------------------------
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  double loss = 0;
  for (int64_t step = start_step; step < stop; ++step) {
    const auto t0 = clock::now();
    layout->zero_grads();
    const int64_t read_before = loader.tokens_read();
    auto micro_batch = [&](int64_t micro) {
      return loader.train_rows(sample_base + ((step - start_step) * o.accum + micro) * o.batch);
    };
    // The gradient summed over the micro-batches is scaled by accum_scale to the step's mean.
    double accum_scale = 1;
    if (o.doc_sep >= 0 && o.accum > 1) {
      // Documents: micro-batches count different numbers of labels (those after a separator are
      // not), so a mean of their means would weigh a token of one counting fewer more. Count all
      // of them first, then divide every micro-batch's loss sum by the step's total: the losses
      // and the accumulated gradients add up to the step's exact token mean and its gradient
      // (Batch::loss_denominator; docs/layouts.md, "Documents").
      std::vector<Batch> micros;
      int64_t counted = 0;
      for (int64_t micro = 0; micro < o.accum; ++micro) {
        micros.push_back(micro_batch(micro));
        counted += layout->counted_labels(micros.back());
      }
      loss = 0;
      for (Batch& b : micros) {
        b.loss_denominator = counted;
        loss += layout->forward_backward(b);
      }
    } else {
      // Every micro-batch counts B·S labels: the mean of the means is the token mean.
      double loss_sum = 0;
      for (int64_t micro = 0; micro < o.accum; ++micro)
        loss_sum += layout->forward_backward(micro_batch(micro));
      loss = loss_sum / static_cast<double>(o.accum);
      // Each micro-batch's gradient is that of its mean loss: 1/accum makes the sum a mean.
      accum_scale = 1.0 / static_cast<double>(o.accum);
    }
    const int64_t read_this_step = loader.tokens_read() - read_before;
    const double norm = global_grad_norm(opt.shards(), *layout, world, accum_scale);
    if (!std::isfinite(loss) || !std::isfinite(norm)) {
      // Loss and norm are identical on every rank, so every rank stops here together.
      return stop_training(step + 1, fmt::format("non-finite loss or gradient (loss {}, gradient "
                                                 "norm {}). Nothing was updated or saved at this "
                                                 "step",
                                                 loss, norm));
    }
    const double lr = sched.at(step);
    opt.step(lr, accum_scale * clip_factor(norm, o.clip));
    // A finite gradient can still overflow the update (a huge --lr): the weights and moments of
    // every rank are checked before anything can save them.
    const StateHealth health = check_state_health(opt, *layout, world);
    if (!health.ok()) {
      return stop_training(step + 1,
                           fmt::format("the update at learning rate {} left {} (loss {}, gradient "
                                       "norm {}). Nothing was saved at this step",
                                       lr, health.describe(), loss, norm));
    }
    const double step_s = std::chrono::duration<double>(clock::now() - t0).count();

    StepMetrics m;
    m.step = step + 1;
    m.loss = loss;
    m.lr = lr;
    m.grad_norm = norm;
    m.step_seconds = step_s;
    m.tokens_per_s = static_cast<double>(tokens_per_step) / step_s;
    m.elapsed_s = std::chrono::duration<double>(clock::now() - t_start).count();
    const bool last = step + 1 == stop;
    if (o.val_every > 0 && ((step + 1) % o.val_every == 0 || last)) {
      last_val = m.val_loss = validate(*layout, loader, o.doc_sep >= 0);
    }
    max_memory_peaks(world, m);
    {
      const std::vector<int64_t> reads = all_gather_counts(world, read_this_step);
      const auto [lo, hi] = std::minmax_element(reads.begin(), reads.end());
      m.tokens_read_min = *lo;
      m.tokens_read_max = *hi;
    }
    if (root) {
      if (metrics) {
        try {
          metrics->write(m);
        } catch (const Error& e) {
          // Rank 0 alone fails here; the job is aborted, and no save has begun.
          TSP_FAIL("{}; training stopped at step {}, {}", e.message(), m.step, kept());
        }
      }
      progress.update(m);
      if (m.val_loss >= 0) {
        progress.note(
            fmt::format("step {}: validation loss {:.4f} nats/token", m.step, m.val_loss));
      }
    }
    if (!o.save.empty() && (last || (o.save_every > 0 && (step + 1) % o.save_every == 0))) {
      save(step + 1, loss);
      good_dir = o.save;
      good_step = step + 1;
    }
  }
  progress.finish();
  if (root) {
    if (metrics) metrics->close();
    say(fmt::format("done: {} steps, final loss {:.4f}{}, {:.0f} s", stop - start_step, loss,
                    last_val >= 0 ? fmt::format(", validation loss {:.4f}", last_val) : "",
                    std::chrono::duration<double>(clock::now() - t_start).count()));
    say("peak memory per rank (rank 0): " + MemoryTracker::instance().report());
  }
  return 0;
}

const CommandRegistration registration{Command{
    "train",
    "Train a Llama model on a text or llm.c token file with any parallel "
    "layout",
    /*needs_mpi=*/true, [](CLI::App& sub) -> std::function<int(Communicator*)> {
      auto o = std::make_shared<TrainOptions>();
      auto* g_model = sub.add_option_group("model", "what to train (default: --preset demo)");
      g_model->add_option("--model", o->model_dir,
                          "Hugging Face model directory (config.json + "
                          "model.safetensors) to start from");
      g_model->add_option("--config", o->config_path,
                          "config.json of a model to initialise randomly (seeded by --seed)");
      g_model->add_option("--preset", o->preset, "named model shape: demo, tiny, 7b")
          ->capture_default_str();
      sub.add_option("--data", o->data,
                     "training corpus: text (byte tokens 0-255) or an llm.c token file")
          ->required();
      sub.add_option("--layout", o->layout, "parallel layout: single, tp, sp, tp-sp, tsp, fsdp-cp")
          ->capture_default_str();
      sub.add_option("--tp", o->tp, "tensor-parallel degree T inside the layout group (tp-sp)")
          ->capture_default_str();
      sub.add_option("--dp", o->dp, "data-parallel replicas R (layout degree D = world / R)")
          ->capture_default_str();
      sub.add_option("--zero", o->zero,
                     "ZeRO stage over the --dp replicas: 1 partitions the fp32 master weights and "
                     "AdamW moments over them (1/R each; gradients reduce-scattered, updated "
                     "weights all-gathered), 0 keeps a whole copy on every replica (gradients "
                     "all-reduced); no effect at --dp 1")
          ->capture_default_str();
      sub.add_flag("--no-overlap", o->no_overlap,
                   "blocking transfers instead of prefetching (tsp, fsdp-cp; ZeRO-1: the weight "
                   "all-gather waited for in the update)");
      sub.add_option("--recompute", o->recompute, kRecomputeHelp)->capture_default_str();
      o->compute.add_to(sub);
      sub.add_option("--steps", o->steps, "optimizer steps in total (the schedule ends here)")
          ->capture_default_str();
      sub.add_option("--stop-at", o->stop_at,
                     "stop (and save) once this many steps are done, keeping the schedule of "
                     "--steps (split a run into jobs; -1: run to --steps)")
          ->capture_default_str();
      auto* batch =
          sub.add_option("--batch", o->batch, "rows per micro-batch, all replicas together")
              ->capture_default_str();
      auto* seq = sub.add_option("--seq", o->seq, "tokens per row (sequence length S)")
                      ->capture_default_str();
      auto* accum =
          sub.add_option("--accum", o->accum, "micro-batches accumulated per optimizer step")
              ->capture_default_str();
      auto* doc_sep = sub.add_option("--doc-sep", o->doc_sep, kDocSepHelp)->capture_default_str();
      sub.add_option("--lr", o->lr, "peak learning rate")->capture_default_str();
      sub.add_option("--min-lr-ratio", o->min_lr_ratio, "cosine floor as a fraction of --lr")
          ->capture_default_str();
      sub.add_option("--warmup", o->warmup, "linear warm-up steps")->capture_default_str();
      sub.add_option("--beta1", o->beta1, "AdamW beta1")->capture_default_str();
      sub.add_option("--beta2", o->beta2, "AdamW beta2")->capture_default_str();
      sub.add_option("--eps", o->eps, "AdamW epsilon")->capture_default_str();
      sub.add_option("--wd", o->wd, "decoupled weight decay (matrices only, not norm gains)")
          ->capture_default_str();
      sub.add_option("--clip", o->clip, "clip the global gradient norm to this (0: off)")
          ->capture_default_str();
      auto* seed = sub.add_option("--seed", o->seed,
                                  "seed of the data windows and of a random initialisation")
                       ->capture_default_str();
      sub.add_option("--val-every", o->val_every,
                     "evaluate the held-out split every N steps (0: never)")
          ->capture_default_str();
      sub.add_option("--val-windows", o->val_windows,
                     "held-out windows evaluated (rounded up to whole batches)")
          ->capture_default_str();
      sub.add_option("--val-fraction", o->val_fraction,
                     "fraction of the corpus held out (its tail)")
          ->capture_default_str();
      sub.add_option("--metrics", o->metrics,
                     "write JSON lines, one per step (appended on --resume)");
      sub.add_option("--save", o->save,
                     "checkpoint directory (written atomically; at the end and "
                     "every --save-every)");
      sub.add_option("--save-every", o->save_every, "checkpoint every N steps (0: only at the end)")
          ->capture_default_str();
      sub.add_option("--resume", o->resume, "continue from this checkpoint directory");
      sub.add_option("--log-every", o->log_every,
                     "plain progress line every N steps when stdout is not a terminal")
          ->capture_default_str();
      sub.add_option(
             "--progress", o->progress,
             "progress display: bar (redrawn in place), lines (plain, every --log-every), or "
             "auto (bar when stdout is a terminal)")
          ->check(CLI::IsMember({"auto", "bar", "lines"}))
          ->capture_default_str();
      return [o, seed, batch, seq, accum, doc_sep](Communicator* world) {
        o->seed_set = seed->count() > 0;
        o->batch_set = batch->count() > 0;
        o->seq_set = seq->count() > 0;
        o->accum_set = accum->count() > 0;
        o->doc_sep_set = doc_sep->count() > 0;
        return run_train(*o, *world);
      };
    }}};

}  // namespace
}  // namespace tsp::cli
