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
#include <vector>

#include <fmt/format.h>

#include "cli/command.h"
#include "tsp/core/error.h"
#include "tsp/model/params.h"
#include "tsp/parallel/layout.h"
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
  bool no_overlap = false;
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
};

// Every rank's value of a count, in world-rank order (collective).
std::vector<int64_t> all_gather_counts(Communicator& world, int64_t mine) {
  std::vector<int64_t> all(world.size());
  world.all_gather(&mine, all.data(), 1, DType::I64);
  return all;
}

// Mean validation loss over the held-out windows (every rank gets the same
// value).
double validate(Layout& layout, const DataLoader& loader) {
  const int64_t n = loader.num_val_batches();
  if (n == 0) return -1;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += layout.forward(loader.val_batch(i));
  return sum / static_cast<double>(n);
}

int run_train(TrainOptions o, Communicator& world) {
  const bool root = world.rank() == 0;
  auto say = [&](const std::string& line) {
    if (root) {
      std::fprintf(stdout, "%s\n", line.c_str());
      std::fflush(stdout);
    }
  };

  // ---- Model configuration, checked against a checkpoint before anything is
  // built ----------
  TSP_CHECK(o.model_dir.empty() || o.config_path.empty(),
            "give either --model DIR or --config FILE, not both");
  std::optional<ModelDir> model;
  std::optional<LlamaConfig> config;
  if (!o.model_dir.empty()) {
    model = open_model_dir(o.model_dir);
    config = model->config;
  } else if (!o.config_path.empty()) {
    config = LlamaConfig::from_file(o.config_path);
  }
  std::string resume_dir;
  std::optional<TrainerState> saved;
  if (!o.resume.empty()) {
    resume_dir = resolve_checkpoint(o.resume);
    const LlamaConfig ckpt_config = read_checkpoint_config(resume_dir);
    saved = read_trainer_state(resume_dir);
    if (config) {
      TSP_CHECK(config_fingerprint(*config) == config_fingerprint(ckpt_config),
                "--resume {}: the checkpoint holds another model than {} (h={} "
                "L={} V={} there, "
                "h={} L={} V={} here); omit --model/--config to resume with "
                "the checkpoint's own",
                resume_dir, o.model_dir.empty() ? o.config_path : o.model_dir,
                ckpt_config.hidden_size, ckpt_config.num_hidden_layers, ckpt_config.vocab_size,
                config->hidden_size, config->num_hidden_layers, config->vocab_size);
    } else {
      config = ckpt_config;
    }
    // Continue the same data stream unless told otherwise.
    if (!o.seed_set) o.seed = saved->seed;
    if (!o.batch_set) o.batch = saved->batch;
    if (!o.seq_set) o.seq = saved->seq;
    if (!o.accum_set) o.accum = saved->accum;
    if (o.seed != saved->seed || o.batch != saved->batch || o.seq != saved->seq ||
        o.accum != saved->accum) {
      say(fmt::format(
          "warning: resuming with seed/batch/seq/accum {}/{}/{}/{} instead of "
          "the "
          "checkpoint's {}/{}/{}/{}: training continues, but not exactly",
          o.seed, o.batch, o.seq, o.accum, saved->seed, saved->batch, saved->seq, saved->accum));
    }
  }
  if (!config) config = llama_preset(o.preset);
  config->validate();
  TSP_CHECK(o.seq <= config->max_position_embeddings,
            "--seq {} exceeds the model's max_position_embeddings {}; use "
            "--seq <= {}",
            o.seq, config->max_position_embeddings, config->max_position_embeddings);

  // ---- Data
  // --------------------------------------------------------------------------------
  TSP_CHECK(!o.data.empty(), "--data FILE is required (text, or an llm.c token file)");
  auto corpus = std::make_shared<const Corpus>(o.data);
  // The vocabulary check scans a token file once, on rank 0 only.
  int64_t need_vocab = root ? corpus->min_vocab_size() : 0;
  world.broadcast(&need_vocab, 1, DType::I64, 0);
  TSP_CHECK(need_vocab <= config->vocab_size,
            "{} holds token ids up to {}, but the model's vocabulary has {} "
            "entries; use a model "
            "with vocab_size >= {}",
            o.data, need_vocab - 1, config->vocab_size, need_vocab);
  DataOptions dopt;
  dopt.batch = o.batch;
  dopt.seq = o.seq;
  dopt.accum = o.accum;
  dopt.seed = o.seed;
  dopt.val_fraction = o.val_fraction;
  dopt.val_windows = o.val_windows;
  DataLoader loader(corpus, dopt);

  // ---- Layout, weights, optimizer
  // ----------------------------------------------------------
  ParallelConfig par;
  par.layout = o.layout;
  par.tp = o.tp;
  par.dp = o.dp;
  par.overlap = !o.no_overlap;
  std::unique_ptr<Layout> layout = make_layout(*config, par, world);
  // Each rank reads only the tokens its layout reads: its replica's rows and, under sp, tp-sp,
  // tsp and fsdp-cp, its zigzag chunks and their labels (training and validation batches alike).
  const TokenNeed need = layout->token_need(o.batch, o.seq);
  loader.set_need(need);
  LrSchedule sched{o.lr, o.min_lr_ratio, o.warmup, o.steps};
  sched.validate();
  TSP_CHECK(o.clip >= 0, "--clip must be >= 0 (0 turns clipping off), got {}", o.clip);
  TSP_CHECK(o.batch % o.dp == 0, "--batch {} must be a multiple of --dp {}", o.batch, o.dp);
  if (!resume_dir.empty()) {
    // Weights come from the checkpoint below.
  } else if (model) {
    layout->load(ModelDirWeights(*model));
  } else {
    layout->load(RandomWeights(o.seed));
  }
  AdamW opt(layout->parameters(), AdamWConfig{o.beta1, o.beta2, o.eps, o.wd});
  int64_t start_step = 0;
  int64_t sample_base = 0;  // training windows consumed before start_step (the data position)
  double last_val = -1;
  if (!resume_dir.empty()) {
    const TrainerState st = load_checkpoint(resume_dir, *layout, opt);
    start_step = st.step;
    sample_base = st.samples;
    last_val = st.last_val_loss;
    say(fmt::format("resumed from {} at step {} (written by layout {} at world {})", resume_dir,
                    st.step, st.layout, st.world));
  }
  const int64_t stop = o.stop_at >= 0 ? std::min(o.stop_at, o.steps) : o.steps;

  const int64_t tokens_per_step = o.batch * o.seq * o.accum;
  say(
      fmt::format("tsp train: {} parameters (h={} L={} heads={}/{} ffn={} "
                  "V={}), layout {} D={} "
                  "R={} on {} ranks",
                  config->num_parameters(), config->hidden_size, config->num_hidden_layers,
                  config->num_attention_heads, config->num_key_value_heads,
                  config->intermediate_size, config->vocab_size, layout->name(),
                  layout->group().size(), layout->replicas().size(), world.size()));
  say(
      fmt::format("data {}: {} tokens ({}), {} for training, {} held out ({} "
                  "windows); {} tokens "
                  "per step (batch {} x seq {} x accum {}), steps {} -> {}",
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

  auto state_at = [&](int64_t step, double loss) {
    TrainerState s;
    s.step = step;
    s.samples = sample_base + (step - start_step) * o.accum * o.batch;
    s.seed = o.seed;
    s.batch = o.batch;
    s.seq = o.seq;
    s.accum = o.accum;
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

  // ---- The loop
  // --------------------------------------------------------------------------
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  int64_t last_saved = o.resume.empty() ? -1 : start_step;
  double loss = 0;
  for (int64_t step = start_step; step < stop; ++step) {
    const auto t0 = clock::now();
    layout->zero_grads();
    double loss_sum = 0;
    const int64_t read_before = loader.tokens_read();
    for (int64_t micro = 0; micro < o.accum; ++micro) {
      loss_sum += layout->forward_backward(
          loader.train_rows(sample_base + ((step - start_step) * o.accum + micro) * o.batch));
    }
    loss = loss_sum / static_cast<double>(o.accum);
    const int64_t read_this_step = loader.tokens_read() - read_before;
    // Each micro-batch's gradient is that of its mean loss: 1/accum makes the
    // sum a mean.
    const double accum_scale = 1.0 / static_cast<double>(o.accum);
    const double norm = global_grad_norm(opt.shards(), *layout, world, accum_scale);
    if (!std::isfinite(loss) || !std::isfinite(norm)) {
      // Loss and norm are identical on every rank, so every rank stops here
      // together.
      progress.finish();
      if (root) {
        const std::string kept = last_saved >= 0
                                     ? fmt::format("the last good checkpoint is {} (step {})",
                                                   o.save.empty() ? o.resume : o.save, last_saved)
                                     : std::string("no checkpoint was written");
        std::fprintf(stderr,
                     "error: training stopped at step %lld: non-finite loss or gradient (loss %g, "
                     "gradient norm %g). Nothing was updated or saved at this step; %s. Try a "
                     "lower --lr, or --clip.\n",
                     static_cast<long long>(step + 1), loss, norm, kept.c_str());
      }
      return 2;
    }
    const double lr = sched.at(step);
    opt.step(lr, accum_scale * clip_factor(norm, o.clip));
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
      last_val = m.val_loss = validate(*layout, loader);
    }
    max_memory_peaks(world, m);
    {
      const std::vector<int64_t> reads = all_gather_counts(world, read_this_step);
      const auto [lo, hi] = std::minmax_element(reads.begin(), reads.end());
      m.tokens_read_min = *lo;
      m.tokens_read_max = *hi;
    }
    if (root) {
      if (metrics) metrics->write(m);
      progress.update(m);
      if (m.val_loss >= 0) {
        progress.note(
            fmt::format("step {}: validation loss {:.4f} nats/token", m.step, m.val_loss));
      }
    }
    if (!o.save.empty() && (last || (o.save_every > 0 && (step + 1) % o.save_every == 0))) {
      save(step + 1, loss);
      last_saved = step + 1;
    }
  }
  progress.finish();
  if (root) {
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
      sub.add_flag("--no-overlap", o->no_overlap, "tsp: blocking transfers instead of prefetching");
      sub.add_option("--steps", o->steps, "optimizer steps in total (the schedule ends here)")
          ->capture_default_str();
      sub.add_option("--stop-at", o->stop_at,
                     "stop (and save) once this many steps are done, keeping "
                     "the schedule of --steps "
                     "(split a run into jobs; -1: run to --steps)")
          ->capture_default_str();
      auto* batch =
          sub.add_option("--batch", o->batch, "rows per micro-batch, all replicas together")
              ->capture_default_str();
      auto* seq = sub.add_option("--seq", o->seq, "tokens per row (sequence length S)")
                      ->capture_default_str();
      auto* accum =
          sub.add_option("--accum", o->accum, "micro-batches accumulated per optimizer step")
              ->capture_default_str();
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
      return [o, seed, batch, seq, accum](Communicator* world) {
        o->seed_set = seed->count() > 0;
        o->batch_set = batch->count() > 0;
        o->seq_set = seq->count() > 0;
        o->accum_set = accum->count() > 0;
        return run_train(*o, *world);
      };
    }}};

}  // namespace
}  // namespace tsp::cli
