#include "tsp/train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "tsp/model/params.h"
#include "tsp/model/safetensors.h"

namespace tsp {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kExpAvgFile = "optimizer.exp_avg.safetensors";
constexpr const char* kExpAvgSqFile = "optimizer.exp_avg_sq.safetensors";

bool is_complete(const fs::path& dir) {
  std::error_code ec;
  return fs::is_regular_file(dir / kStateFile, ec);
}

void fsync_path(const fs::path& p, bool directory) {
  const int fd = ::open(p.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  TSP_CHECK(fd >= 0, "cannot open {} to sync it: {}", p.string(), std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  TSP_CHECK(rc == 0, "fsync of {} failed: {}", p.string(), std::strerror(err));
}

void write_text_file(const fs::path& p, const std::string& text) {
  std::FILE* f = std::fopen(p.c_str(), "wb");
  TSP_CHECK(f != nullptr, "cannot create {}: {}", p.string(), std::strerror(errno));
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() &&
                  std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  const int err = errno;
  std::fclose(f);
  TSP_CHECK(ok, "writing {} failed: {}", p.string(), std::strerror(err));
}

std::string read_text_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  TSP_CHECK(in.good(), "cannot read {}: {}", p.string(), std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Test hook for the kill-during-save test: TSP_TEST_PAUSE_IN_SAVE=<stage> makes world rank 0
// announce itself on stderr and sleep at that stage, so a test can kill -9 it there.
// Stages: "write" (half the files written into the temporary directory), "swap" (the previous
// checkpoint renamed to <dir>.old, the new one not yet in place).
void maybe_pause(const char* stage) {
  const char* want = std::getenv("TSP_TEST_PAUSE_IN_SAVE");
  if (want == nullptr || std::strcmp(want, stage) != 0) return;
  std::fprintf(stderr, "checkpoint: paused at stage %s, pid %d\n", stage,
               static_cast<int>(::getpid()));
  std::fflush(stderr);
  std::this_thread::sleep_for(std::chrono::seconds(120));
}

// Full tensors arriving from Layout::gather on world rank 0, kept in canonical order.
struct Gathered {
  std::map<std::string, Tensor> tensors;
  std::function<void(const ParamSpec&, TensorView)> sink() {
    return [this](const ParamSpec& spec, TensorView full) {
      Tensor t(full.shape(), DType::F32, MemCategory::Workspace);
      copy(full, t.view());
      tensors[spec.name] = std::move(t);
    };
  }
  TensorView at(const std::string& name) const {
    auto it = tensors.find(name);
    TSP_CHECK(it != tensors.end(), "checkpoint: the layout did not gather {}", name);
    return it->second.view();
  }
};

// Gathers one moment of every shard to world rank 0. Layout::gather moves values or gradients;
// the moments travel through the gradient buffers (same shapes and sharding as the weights), which
// carry nothing needed any more between an update and the next zero_grads.
void gather_moment(Layout& layout, const AdamW& opt, bool second, Gathered& out) {
  const auto& shards = opt.shards();
  for (size_t i = 0; i < shards.size(); ++i) {
    copy(second ? opt.exp_avg_sq(i) : opt.exp_avg(i), shards[i].grad);
  }
  layout.gather(true, out.sink());
}

// A WeightSource over one safetensors file whose tensors carry the parameter names.
class SafetensorsSource : public WeightSource {
 public:
  SafetensorsSource(const std::string& path, const LlamaConfig& config) : reader_(path) {
    for (const ParamSpec& spec : llama_param_specs(config)) {
      const SafetensorInfo* info = reader_.find(spec.name);
      TSP_CHECK(info != nullptr,
                "{} has no tensor {}: the checkpoint is incomplete or for another model", path,
                spec.name);
      TSP_CHECK(info->shape == spec.shape, "{}: {} has shape {}, the model expects {}", path,
                spec.name, shape_str(info->shape), shape_str(spec.shape));
    }
  }
  void read_rows(const ParamSpec& spec, int64_t r0, int64_t r1, TensorView dst) const override {
    reader_.read_rows(spec.name, r0, r1, dst);
  }

 private:
  SafetensorsReader reader_;
};

}  // namespace

std::string config_fingerprint(const LlamaConfig& c) {
  const std::string key = fmt::format(
      "h={} ffn={} nh={} nkv={} L={} V={} eps={:.17g} theta={:.17g} tie={}", c.hidden_size,
      c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers,
      c.vocab_size, c.rms_norm_eps, c.rope_theta, c.tie_word_embeddings ? 1 : 0);
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a 64
  for (unsigned char ch : key) {
    h ^= ch;
    h *= 0x100000001b3ull;
  }
  return fmt::format("{:016x}", h);
}

std::string TrainerState::to_json_string() const {
  nlohmann::ordered_json j;
  j["step"] = step;
  j["samples"] = samples;
  j["seed"] = seed;
  j["batch"] = batch;
  j["seq"] = seq;
  j["accum"] = accum;
  j["config_hash"] = config_hash;
  j["layout"] = layout;
  j["tp"] = tp;
  j["dp"] = dp;
  j["world"] = world;
  j["last_loss"] = last_loss;
  j["last_val_loss"] = last_val_loss;
  return j.dump(2) + "\n";
}

TrainerState TrainerState::from_json_string(const std::string& text, const std::string& where) {
  TrainerState s;
  try {
    const nlohmann::json j = nlohmann::json::parse(text);
    s.step = j.at("step").get<int64_t>();
    s.samples = j.at("samples").get<int64_t>();
    s.seed = j.at("seed").get<uint64_t>();
    s.batch = j.at("batch").get<int64_t>();
    s.seq = j.at("seq").get<int64_t>();
    s.accum = j.at("accum").get<int64_t>();
    s.config_hash = j.at("config_hash").get<std::string>();
    s.layout = j.at("layout").get<std::string>();
    s.tp = j.at("tp").get<int>();
    s.dp = j.at("dp").get<int>();
    s.world = j.at("world").get<int>();
    s.last_loss = j.value("last_loss", 0.0);
    s.last_val_loss = j.value("last_val_loss", -1.0);
  } catch (const nlohmann::json::exception& e) {
    TSP_FAIL("{} is not a valid trainer state ({}); the checkpoint is corrupt", where, e.what());
  }
  TSP_CHECK(s.step >= 0 && s.samples >= 0, "{}: negative step or data position", where);
  return s;
}

std::string resolve_checkpoint(const std::string& dir) {
  const fs::path p(dir);
  if (is_complete(p)) return dir;
  const fs::path old = dir + ".old";
  if (is_complete(old)) return old.string();
  std::error_code ec;
  if (fs::exists(p, ec)) {
    TSP_FAIL(
        "{} is not a complete checkpoint (no {}); resume from a directory written by "
        "`tsp train --save`",
        dir, kStateFile);
  }
  TSP_FAIL("no checkpoint at {} (nor {}.old)", dir, dir);
}

LlamaConfig read_checkpoint_config(const std::string& dir) {
  return LlamaConfig::from_file((fs::path(dir) / "config.json").string());
}

TrainerState read_trainer_state(const std::string& dir) {
  const fs::path p = fs::path(dir) / kStateFile;
  return TrainerState::from_json_string(read_text_file(p), p.string());
}

void save_checkpoint(const std::string& dir, Layout& layout, const AdamW& opt,
                     const TrainerState& state, Communicator& world) {
  const bool root = world.rank() == 0;
  const fs::path final_dir(dir);
  const fs::path tmp = dir + ".tmp-" + std::to_string(::getpid());
  const fs::path old = dir + ".old";
  if (root) {
    std::error_code ec;
    // Refuse to replace a directory that is not ours: the swap below deletes what was there.
    if (fs::exists(final_dir, ec) && !is_complete(final_dir) && !fs::is_empty(final_dir, ec)) {
      TSP_FAIL(
          "--save {}: the directory exists and is not a tsp checkpoint; choose another "
          "directory or remove it",
          dir);
    }
    // Leftovers of saves killed earlier (any pid) are incomplete by construction.
    const fs::path parent =
        final_dir.parent_path().empty() ? fs::path(".") : final_dir.parent_path();
    fs::create_directories(parent);
    const std::string stale_prefix = final_dir.filename().string() + ".tmp-";
    for (const auto& e : fs::directory_iterator(parent)) {
      if (e.path().filename().string().rfind(stale_prefix, 0) == 0) fs::remove_all(e.path());
    }
    fs::create_directories(tmp);
  }

  LlamaConfig config = layout.config();
  config.torch_dtype = "float32";  // exact weights: resuming continues bit for bit
  {
    Gathered weights;
    layout.gather(false, weights.sink());
    if (root) {
      save_model_dir(tmp.string(), config,
                     [&](const ParamSpec& spec) { return weights.at(spec.name); });
    }
  }
  if (root) maybe_pause("write");
  const std::vector<ParamSpec> specs = llama_param_specs(config);
  for (bool second : {false, true}) {
    Gathered moment;
    gather_moment(layout, opt, second, moment);
    if (root) {
      SafetensorsWriter w;
      for (const ParamSpec& spec : specs) w.add(spec.name, moment.at(spec.name));
      w.set_metadata("format", "pt");
      w.set_metadata("content", second ? "AdamW exp_avg_sq" : "AdamW exp_avg");
      w.set_metadata("step", std::to_string(opt.step_count()));
      w.write((tmp / (second ? kExpAvgSqFile : kExpAvgFile)).string());
    }
  }
  layout.zero_grads();  // the staging leaves no stale values behind

  if (root) {
    // The state file goes last: its presence marks a complete checkpoint.
    for (const auto& e : fs::directory_iterator(tmp)) fsync_path(e.path(), false);
    write_text_file(tmp / kStateFile, state.to_json_string());
    fsync_path(tmp, true);
    std::error_code ec;
    if (fs::exists(final_dir, ec)) {
      // <dir> is complete (or empty), so an older <dir>.old is redundant.
      fs::remove_all(old);
      fs::rename(final_dir, old);
    }
    maybe_pause("swap");
    fs::rename(tmp, final_dir);
    fsync_path(final_dir.parent_path().empty() ? fs::path(".") : final_dir.parent_path(), true);
    fs::remove_all(old);
  }
  world.barrier();  // every rank returns once the checkpoint is in place
}

TrainerState load_checkpoint(const std::string& dir, Layout& layout, AdamW& opt) {
  const LlamaConfig& config = layout.config();
  const LlamaConfig saved = read_checkpoint_config(dir);
  const std::string want = config_fingerprint(config), have = config_fingerprint(saved);
  TSP_CHECK(want == have,
            "checkpoint {} is for another model (h={} L={} heads={}/{} ffn={} V={}) than the one "
            "being trained (h={} L={} heads={}/{} ffn={} V={}); resume with the checkpoint's own "
            "config (omit --model/--config)",
            dir, saved.hidden_size, saved.num_hidden_layers, saved.num_attention_heads,
            saved.num_key_value_heads, saved.intermediate_size, saved.vocab_size,
            config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size, config.vocab_size);
  const TrainerState state = read_trainer_state(dir);
  TSP_CHECK(state.config_hash == want,
            "{}: trainer state config hash {} does not match its config.json ({})", dir,
            state.config_hash, want);

  // Moments first, staged through the weights (Layout::load fills exactly this rank's shards),
  // then the weights themselves.
  const auto& shards = opt.shards();
  for (bool second : {false, true}) {
    const SafetensorsSource src((fs::path(dir) / (second ? kExpAvgSqFile : kExpAvgFile)).string(),
                                config);
    layout.load(src);
    for (size_t i = 0; i < shards.size(); ++i) {
      copy(shards[i].value, second ? opt.exp_avg_sq(i) : opt.exp_avg(i));
    }
  }
  const ModelDir model = open_model_dir(dir);
  layout.load(ModelDirWeights(model));
  layout.zero_grads();
  opt.set_step_count(state.step);
  return state;
}

}  // namespace tsp
