#include "tsp/train/checkpoint.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <openssl/evp.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "tsp/core/limits.h"
#include "tsp/model/params.h"
#include "tsp/model/safetensors.h"

namespace tsp {

namespace fs = std::filesystem;

namespace {

constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kConfigFile = "config.json";
constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kExpAvgFile = "optimizer.exp_avg.safetensors";
constexpr const char* kExpAvgSqFile = "optimizer.exp_avg_sq.safetensors";
constexpr int kFormat = 2;  // trainer_state.json with "files" and its own "sha256"

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

// Every step checked: a full disk shows up in fwrite, fflush, fsync or (on network filesystems)
// only in fclose.
void write_text_file(const fs::path& p, const std::string& text) {
  std::FILE* f = std::fopen(p.c_str(), "wb");
  TSP_CHECK(f != nullptr, "cannot create {}: {}", p.string(), std::strerror(errno));
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() && std::fflush(f) == 0 &&
            ::fsync(::fileno(f)) == 0;
  int err = errno;
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    err = errno;
  }
  TSP_CHECK(ok, "writing {} failed: {} (disk full?)", p.string(), std::strerror(err));
}

std::string read_text_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  TSP_CHECK(in.good(), "cannot read {}: {}", p.string(), std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  TSP_CHECK(!in.bad(), "reading {} failed: {}", p.string(), std::strerror(errno));
  return ss.str();
}

// SHA-256 through OpenSSL's EVP interface (the one OpenSSL 3 keeps supported).
class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new()) {
    TSP_CHECK(ctx_ != nullptr && EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr) == 1,
              "OpenSSL: cannot initialise SHA-256");
  }
  ~Sha256() { EVP_MD_CTX_free(ctx_); }
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t n) {
    TSP_CHECK(EVP_DigestUpdate(ctx_, data, n) == 1, "OpenSSL: SHA-256 update failed");
  }
  std::string hex() {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    TSP_CHECK(EVP_DigestFinal_ex(ctx_, md, &n) == 1, "OpenSSL: SHA-256 final failed");
    std::string out;
    for (unsigned int i = 0; i < n; ++i) out += fmt::format("{:02x}", md[i]);
    return out;
  }

 private:
  EVP_MD_CTX* ctx_;
};

std::string sha256_of(const std::string& text) {
  Sha256 h;
  h.update(text.data(), text.size());
  return h.hex();
}

bool is_hex(const std::string& s, size_t n) {
  return s.size() == n && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

// Test hook for the kill-during-save test: TSP_TEST_PAUSE_IN_SAVE=<stage> makes world rank 0
// announce itself on stderr and sleep at that stage, so a test can kill -9 it there.
// Stages: "write" (half the files written into the temporary directory), "swap" (the previous
// checkpoint renamed to <dir>.old, the new one not yet in place). TSP_TEST_PAUSE_SECONDS sets
// the pause (default 120 s), so a test can also let the save go on (the lock test does), and the
// pause ends early once the file named by TSP_TEST_PAUSE_RELEASE exists (the lock test releases
// it when it has seen what it waited for, instead of sleeping out a fixed pause).
void maybe_pause(const char* stage) {
  const char* want = std::getenv("TSP_TEST_PAUSE_IN_SAVE");
  if (want == nullptr || std::strcmp(want, stage) != 0) return;
  const char* secs = std::getenv("TSP_TEST_PAUSE_SECONDS");
  const char* release = std::getenv("TSP_TEST_PAUSE_RELEASE");
  std::fprintf(stderr, "checkpoint: paused at stage %s, pid %d\n", stage,
               static_cast<int>(::getpid()));
  std::fflush(stderr);
  const auto end =
      std::chrono::steady_clock::now() + std::chrono::seconds(secs ? std::atoi(secs) : 120);
  while (std::chrono::steady_clock::now() < end) {
    if (release != nullptr && ::access(release, F_OK) == 0) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
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
  Backend& be = layout.backend();  // moments and gradients live on the layout's device
  for (size_t i = 0; i < shards.size(); ++i) {
    be.copy(second ? opt.exp_avg_sq(i) : opt.exp_avg(i), shards[i].grad);
  }
  layout.gather(true, out.sink());
}

// A WeightSource over one optimizer-moment file whose tensors carry the parameter names. Its
// metadata says which moment it holds and at which step: a swapped or stale file is refused even
// in a checkpoint without checksums.
class MomentSource : public WeightSource {
 public:
  MomentSource(const std::string& path, const LlamaConfig& config, const std::string& content,
               int64_t step)
      : reader_(path) {
    const auto& meta = reader_.metadata();
    const auto c = meta.find("content");
    TSP_CHECK(c == meta.end() || c->second == content,
              "{} holds \"{}\", not \"{}\": the optimizer files were swapped or replaced", path,
              c->second, content);
    const auto s = meta.find("step");
    TSP_CHECK(s == meta.end() || s->second == std::to_string(step),
              "{} was written at step {}, but the trainer state is at step {}: the file belongs "
              "to another checkpoint",
              path, s->second, step);
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

std::string fingerprint_of(const std::string& key) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a 64
  for (unsigned char ch : key) {
    h ^= ch;
    h *= 0x100000001b3ull;
  }
  return fmt::format("{:016x}", h);
}

std::string legacy_fingerprint_key(const LlamaConfig& c) {
  return fmt::format("h={} ffn={} nh={} nkv={} L={} V={} eps={:.17g} theta={:.17g} tie={}",
                     c.hidden_size, c.intermediate_size, c.num_attention_heads,
                     c.num_key_value_heads, c.num_hidden_layers, c.vocab_size, c.rms_norm_eps,
                     c.rope_theta, c.tie_word_embeddings ? 1 : 0);
}

// The directory a checkpoint path names, without a trailing slash ("ck/" and "ck" are one
// checkpoint, whose siblings are "ck.old", "ck.lock", "ck.tmp-<pid>").
fs::path normalized(const std::string& dir) {
  fs::path p = fs::path(dir).lexically_normal();
  if (p.has_relative_path() && p.filename().empty()) p = p.parent_path();
  return p;
}

fs::path parent_of(const fs::path& p) {
  return p.parent_path().empty() ? fs::path(".") : p.parent_path();
}

std::set<std::string>& held_locks() {
  static std::set<std::string> held;
  return held;
}

std::string lock_key(const std::string& dir) {
  std::error_code ec;
  const fs::path abs = fs::absolute(normalized(dir), ec);
  return (ec ? normalized(dir) : abs.lexically_normal()).string();
}

}  // namespace

FileDigest digest_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TSP_CHECK(fd >= 0, "cannot read {}: {}", path, std::strerror(errno));
  Sha256 h;
  FileDigest d;
  std::vector<char> buf(1 << 20);
  while (true) {
    const ssize_t got = ::read(fd, buf.data(), buf.size());
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int err = errno;
      ::close(fd);
      TSP_FAIL("reading {} failed: {}", path, std::strerror(err));
    }
    if (got == 0) break;
    h.update(buf.data(), static_cast<size_t>(got));
    d.bytes += got;
  }
  ::close(fd);
  d.sha256 = h.hex();
  return d;
}

std::string config_fingerprint(const LlamaConfig& c) {
  return fingerprint_of(legacy_fingerprint_key(c) +
                        fmt::format(" pos={}", c.max_position_embeddings));
}

std::string legacy_config_fingerprint(const LlamaConfig& c) {
  return fingerprint_of(legacy_fingerprint_key(c));
}

std::string config_differences(const LlamaConfig& there, const LlamaConfig& here) {
  std::vector<std::string> diffs;
  auto field = [&](const char* key, const auto& a, const auto& b) {
    if (a != b) diffs.push_back(fmt::format("{} {} there, {} here", key, a, b));
  };
  field("hidden_size", there.hidden_size, here.hidden_size);
  field("intermediate_size", there.intermediate_size, here.intermediate_size);
  field("num_attention_heads", there.num_attention_heads, here.num_attention_heads);
  field("num_key_value_heads", there.num_key_value_heads, here.num_key_value_heads);
  field("num_hidden_layers", there.num_hidden_layers, here.num_hidden_layers);
  field("vocab_size", there.vocab_size, here.vocab_size);
  field("rms_norm_eps", there.rms_norm_eps, here.rms_norm_eps);
  field("rope_theta", there.rope_theta, here.rope_theta);
  field("max_position_embeddings", there.max_position_embeddings, here.max_position_embeddings);
  field("tie_word_embeddings", there.tie_word_embeddings, here.tie_word_embeddings);
  return fmt::format("{}", fmt::join(diffs, "; "));
}

std::string TrainerState::to_json_string() const {
  nlohmann::ordered_json j;
  j["format"] = kFormat;
  j["step"] = step;
  j["samples"] = samples;
  j["seed"] = seed;
  j["batch"] = batch;
  j["seq"] = seq;
  j["accum"] = accum;
  j["doc_sep"] = doc_sep;
  j["config_hash"] = config_hash;
  j["layout"] = layout;
  j["tp"] = tp;
  j["dp"] = dp;
  j["world"] = world;
  j["last_loss"] = last_loss;
  j["last_val_loss"] = last_val_loss;
  nlohmann::ordered_json f = nlohmann::ordered_json::object();
  for (const auto& [name, d] : files) f[name] = {{"bytes", d.bytes}, {"sha256", d.sha256}};
  j["files"] = f;
  // The state's own checksum covers every key above (their compact dump, which a parse and dump
  // reproduces exactly): a damaged step or data position is caught like a damaged tensor file.
  j["sha256"] = sha256_of(j.dump());
  return j.dump(2) + "\n";
}

TrainerState TrainerState::from_json_string(const std::string& text, const std::string& where) {
  TrainerState s;
  int64_t tp = 0, dp = 0, world = 0;
  try {
    nlohmann::ordered_json j = nlohmann::ordered_json::parse(text);
    TSP_CHECK(j.is_object(), "{} is not a JSON object; the checkpoint is corrupt", where);
    const bool has_new_keys = j.contains("format") || j.contains("files") || j.contains("sha256");
    if (!has_new_keys) {
      s.format = 1;  // written by a tsp that recorded no checksums
    } else {
      TSP_CHECK(j.contains("format") && j.contains("files") && j.contains("sha256"),
                "{} lacks one of \"format\", \"files\", \"sha256\"; the checkpoint is corrupt",
                where);
      s.format = j.at("format").get<int>();
      TSP_CHECK(s.format == kFormat,
                "{} has format {}, which this tsp does not know (format {}); it was written by "
                "another version of tsp, or is corrupt",
                where, j.at("format").dump(), kFormat);
      const std::string recorded = j.at("sha256").get<std::string>();
      j.erase("sha256");
      TSP_CHECK(recorded == sha256_of(j.dump()),
                "{} does not match its own SHA-256: its content changed after it was written "
                "(damaged storage, an interrupted copy or a hand edit); the checkpoint cannot be "
                "trusted. Resume from an intact copy",
                where);
      for (const auto& [name, v] : j.at("files").items()) {
        FileDigest d{v.at("bytes").get<int64_t>(), v.at("sha256").get<std::string>()};
        TSP_CHECK(!name.empty() && name.find('/') == std::string::npos && name != "." &&
                      name != ".." && d.bytes >= 0 && is_hex(d.sha256, 64),
                  "{}: invalid entry \"{}\" in \"files\"; the checkpoint is corrupt", where, name);
        s.files[name] = d;
      }
      for (const char* need : {kConfigFile, kModelFile, kExpAvgFile, kExpAvgSqFile}) {
        TSP_CHECK(s.files.count(need), "{} records no checksum for {}; the checkpoint is corrupt",
                  where, need);
      }
    }
    s.step = j.at("step").get<int64_t>();
    s.samples = j.at("samples").get<int64_t>();
    s.seed = j.at("seed").get<uint64_t>();
    s.batch = j.at("batch").get<int64_t>();
    s.seq = j.at("seq").get<int64_t>();
    s.accum = j.at("accum").get<int64_t>();
    s.doc_sep = j.value("doc_sep", int64_t{-1});  // absent before documents: none
    s.config_hash = j.at("config_hash").get<std::string>();
    s.layout = j.at("layout").get<std::string>();
    tp = j.at("tp").get<int64_t>();
    dp = j.at("dp").get<int64_t>();
    world = j.at("world").get<int64_t>();
    s.last_loss = j.value("last_loss", 0.0);
    s.last_val_loss = j.value("last_val_loss", -1.0);
  } catch (const nlohmann::json::exception& e) {
    TSP_FAIL("{} is not a valid trainer state ({}); the checkpoint is corrupt", where, e.what());
  }
  // The values themselves (a state can be well-formed and still impossible).
  auto bad = [&](const std::string& what) {
    return fmt::format("{}: {}; the checkpoint is corrupt", where, what);
  };
  TSP_CHECK(s.step >= 0, "{}", bad(fmt::format("negative step {}", s.step)));
  TSP_CHECK(s.samples >= 0, "{}", bad(fmt::format("negative data position {}", s.samples)));
  // Every step consumes batch·accum >= 1 windows (a resumed run may change batch and accum, so
  // only this bound holds across runs).
  TSP_CHECK(s.samples >= s.step, "{}",
            bad(fmt::format("data position {} is below the step {} (every step reads at "
                            "least one window)",
                            s.samples, s.step)));
  TSP_CHECK(s.batch > 0 && s.seq > 0 && s.accum > 0, "{}",
            bad(fmt::format("batch {}, seq {}, accum {} (each must be positive)", s.batch, s.seq,
                            s.accum)));
  TSP_CHECK(s.doc_sep >= -1, "{}",
            bad(fmt::format("doc_sep {} is not a token id nor -1", s.doc_sep)));
  constexpr int64_t kMaxRanks = 1 << 24;
  TSP_CHECK(world >= 1 && world <= kMaxRanks && dp >= 1 && tp >= 1 && world % dp == 0 &&
                (world / dp) % tp == 0,
            "{}",
            bad(fmt::format("world {}, dp {}, tp {} do not describe a layout (dp must divide "
                            "world and tp world/dp)",
                            world, dp, tp)));
  s.tp = static_cast<int>(tp);
  s.dp = static_cast<int>(dp);
  s.world = static_cast<int>(world);
  TSP_CHECK(is_hex(s.config_hash, 16), "{}",
            bad(fmt::format("config_hash \"{}\" is not 16 hex digits", s.config_hash)));
  TSP_CHECK(std::isfinite(s.last_loss) && std::isfinite(s.last_val_loss), "{}",
            bad(fmt::format("non-finite last_loss {} or last_val_loss {}", s.last_loss,
                            s.last_val_loss)));
  return s;
}

std::string resolve_checkpoint(const std::string& dir) {
  const fs::path p(dir);
  if (is_complete(p)) return dir;
  const fs::path old = normalized(dir).string() + ".old";
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

bool verify_checkpoint_files(const std::string& dir, const std::vector<std::string>& only) {
  const fs::path state_path = fs::path(dir) / kStateFile;
  std::error_code ec;
  if (!fs::exists(state_path, ec)) return false;
  const TrainerState state = read_trainer_state(dir);
  if (state.format < kFormat) return false;
  std::vector<std::string> names = only;
  if (names.empty()) {
    for (const auto& [name, d] : state.files) names.push_back(name);
  }
  for (const std::string& name : names) {
    const auto it = state.files.find(name);
    TSP_CHECK(it != state.files.end(), "{} records no checksum for {}; the checkpoint is corrupt",
              state_path.string(), name);
    const fs::path p = fs::path(dir) / name;
    struct stat st {};
    TSP_CHECK(::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode),
              "{} is missing (or not a file), but {} records it: the checkpoint is incomplete",
              p.string(), kStateFile);
    // The size first: a truncated or extended file is found without reading it.
    TSP_CHECK(static_cast<int64_t>(st.st_size) == it->second.bytes,
              "{} has {} bytes, but {} records {}: the file was truncated, extended or replaced; "
              "the checkpoint cannot be trusted",
              p.string(), static_cast<int64_t>(st.st_size), kStateFile, it->second.bytes);
    const FileDigest got = digest_file(p.string());
    TSP_CHECK(got.sha256 == it->second.sha256,
              "{} does not match the SHA-256 recorded in {} (content changed after the checkpoint "
              "was written: damaged storage, an interrupted copy or an edit); the checkpoint "
              "cannot be trusted. Resume from an intact copy",
              p.string(), kStateFile);
  }
  return true;
}

CheckpointLock::CheckpointLock(const std::string& dir) : dir_(lock_key(dir)) {
  const fs::path d = normalized(dir);
  const fs::path parent = parent_of(d);
  std::error_code ec;
  fs::create_directories(parent, ec);
  TSP_CHECK(!ec,
            "--save {}: cannot create the directory {} ({}); choose a --save path under a "
            "writable directory",
            dir, parent.string(), ec.message());
  const std::string lock_path = d.string() + ".lock";
  fd_ = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  TSP_CHECK(fd_ >= 0,
            "--save {}: cannot create the lock file {} ({}); choose a --save path in a "
            "directory you can write",
            dir, lock_path, std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    std::string holder;
    if (err == EWOULDBLOCK) {
      char buf[512] = {};
      const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
      if (n > 0) holder = std::string(buf, static_cast<size_t>(n));
      while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    }
    ::close(fd_);
    fd_ = -1;
    TSP_CHECK(err != EWOULDBLOCK,
              "--save {} is in use by another training run ({}): two runs saving to one "
              "directory would replace each other's checkpoints. Wait for that run to end, or give "
              "this one another --save directory. (The lock is {}; the kernel releases it when "
              "that process exits, so a crashed run never leaves it held.)",
              dir, holder.empty() ? "a process that is just starting" : holder, lock_path);
    TSP_FAIL("--save {}: cannot lock {} ({}); use a --save directory on a local filesystem", dir,
             lock_path, std::strerror(err));
  }
  // Who holds it, for the message of a run that is refused. A failure here (a full disk) is
  // the first sign that checkpoints cannot be written.
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  const std::time_t now = std::time(nullptr);
  char when[64] = {};
  std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&now));
  const std::string info =
      fmt::format("pid {} on host {}, since {}\n", static_cast<int>(::getpid()), host, when);
  const bool wrote =
      ::ftruncate(fd_, 0) == 0 &&
      ::pwrite(fd_, info.data(), info.size(), 0) == static_cast<ssize_t>(info.size()) &&
      ::fsync(fd_) == 0;
  if (!wrote) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    TSP_FAIL("--save {}: cannot write the lock file {} ({}); is the disk full?", dir, lock_path,
             std::strerror(err));
  }
  held_locks().insert(dir_);
}

CheckpointLock::~CheckpointLock() {
  held_locks().erase(dir_);
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

bool CheckpointLock::held(const std::string& dir) {
  return held_locks().count(lock_key(dir)) > 0;
}

int64_t checkpoint_bytes(const LlamaConfig& config) {
  // Weights and two moments in fp32, plus headers and the small JSON files (generously).
  return checked_add(checked_product({3, config.num_parameters(), 4}, "checkpoint size"), 1 << 20,
                     "checkpoint size");
}

void check_checkpoint_target(const std::string& dir, int64_t bytes) {
  const fs::path d = normalized(dir);
  std::error_code ec;
  if (fs::exists(d, ec)) {
    TSP_CHECK(fs::is_directory(d, ec),
              "--save {} exists and is not a directory; choose another --save path", dir);
    // The save replaces what is there: refuse a directory that is not ours.
    TSP_CHECK(is_complete(d) || fs::is_empty(d, ec),
              "--save {}: the directory exists and is not a tsp checkpoint; choose another "
              "directory or remove it",
              dir);
  }
  struct statvfs vfs {};
  if (::statvfs(parent_of(d).c_str(), &vfs) == 0 && vfs.f_blocks > 0) {
    const double free_bytes = static_cast<double>(vfs.f_bavail) * static_cast<double>(vfs.f_frsize);
    TSP_CHECK(free_bytes >= static_cast<double>(bytes),
              "--save {}: a checkpoint of this model takes {}, but only {} is free there (the new "
              "checkpoint is written before the previous one is removed); free some space or "
              "choose another --save",
              dir, format_bytes(static_cast<double>(bytes)), format_bytes(free_bytes));
  }
}

std::string StateHealth::describe() const {
  std::vector<std::string> parts;
  if (weights) parts.push_back(fmt::format("{} non-finite weights", weights));
  if (exp_avg) parts.push_back(fmt::format("{} non-finite first-moment (exp_avg) values", exp_avg));
  if (exp_avg_sq) {
    parts.push_back(
        fmt::format("{} non-finite or negative second-moment (exp_avg_sq) values", exp_avg_sq));
  }
  return parts.empty() ? "all values finite" : fmt::format("{}", fmt::join(parts, ", "));
}

StateHealth check_state_health(const AdamW& opt, Layout& layout, Communicator& world) {
  const int group_rank = layout.group().rank(), replica_rank = layout.replicas().rank();
  Backend& be = layout.backend();
  // Under ZeRO-1 in fp32 the master parts counted here are this replica's blocks of the compute
  // slab, which the step's in-place all-gathers (ShardStore::sync_compute) may still be moving:
  // MPI reserves the whole receive buffer until completion (an algorithm may park other blocks in
  // ours on the way), so they are waited for first. Under bf16 the masters are a separate slab
  // and the gathers stay in flight for the next forward.
  if (layout.zero_stage() == 1 && layout.compute_dtype() == DType::F32) layout.wait_parameters();
  // Counted on the device into three scalars, read back once.
  Tensor counts = Tensor::zeros({3}, DType::I64, MemCategory::Workspace, be.device());
  const auto& shards = opt.shards();
  for (size_t i = 0; i < shards.size(); ++i) {
    // Each value once: a replicated copy is counted on the rank that counts it in norms.
    if (!counts_in_global_sum(shards[i], group_rank, replica_rank)) continue;
    be.count_non_finite(shards[i].value, counts.window(0, {1}));
    be.count_non_finite(opt.exp_avg(i), counts.window(1, {1}));
    be.count_non_finite(opt.exp_avg_sq(i), counts.window(2, {1}), /*also_negative=*/true);
  }
  std::array<int64_t, 3> mine{};
  be.download(counts.view(), mine.data());
  const std::vector<int64_t> all = world.gather_host(mine);  // control traffic, not data
  StateHealth h;
  for (int r = 0; r < world.size(); ++r) {
    h.weights += all[3 * r];
    h.exp_avg += all[3 * r + 1];
    h.exp_avg_sq += all[3 * r + 2];
  }
  return h;
}

LlamaConfig read_checkpoint_config(const std::string& dir) {
  return LlamaConfig::from_file((fs::path(dir) / kConfigFile).string());
}

TrainerState read_trainer_state(const std::string& dir) {
  const fs::path p = fs::path(dir) / kStateFile;
  return TrainerState::from_json_string(read_text_file(p), p.string());
}

void save_checkpoint(const std::string& dir, Layout& layout, const AdamW& opt,
                     const TrainerState& state, Communicator& world) {
  // Nothing non-finite is ever written (every rank agrees, so every rank stops here together).
  const StateHealth health = check_state_health(opt, layout, world);
  TSP_CHECK(health.ok(),
            "refusing to save checkpoint {} at step {}: the optimizer state has {}; the previous "
            "checkpoint is left as it was",
            dir, state.step, health.describe());

  const bool root = world.rank() == 0;
  const fs::path final_dir = normalized(dir);
  const fs::path parent = parent_of(final_dir);
  const fs::path tmp = final_dir.string() + ".tmp-" + std::to_string(::getpid());
  const fs::path old = final_dir.string() + ".old";
  std::optional<CheckpointLock> own_lock;  // when the caller does not hold the run's lock
  if (root) {
    if (!CheckpointLock::held(dir)) own_lock.emplace(dir);
    check_checkpoint_target(dir, 0);
    // Leftovers of saves killed earlier (any pid) are incomplete by construction; no other live
    // process writes here, since we hold the lock.
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
    // Sizes and checksums of what is on disk now (read back, so they describe the bytes a resume
    // will read), recorded in the state file, which goes last: its presence marks a complete
    // checkpoint.
    TrainerState st = state;
    st.format = kFormat;
    st.files.clear();
    for (const auto& e : fs::directory_iterator(tmp)) {
      fsync_path(e.path(), false);
      st.files[e.path().filename().string()] = digest_file(e.path().string());
    }
    write_text_file(tmp / kStateFile, st.to_json_string());
    fsync_path(tmp, true);
    std::error_code ec;
    if (fs::exists(final_dir, ec)) {
      // <dir> is complete (or empty), so an older <dir>.old is redundant.
      fs::remove_all(old);
      fs::rename(final_dir, old);
    }
    maybe_pause("swap");
    fs::rename(tmp, final_dir);
    fsync_path(parent, true);
    fs::remove_all(old);
  }
  world.barrier();  // every rank returns once the checkpoint is in place
}

TrainerState load_checkpoint(const std::string& dir, Layout& layout, AdamW& opt) {
  const LlamaConfig& config = layout.config();
  const LlamaConfig saved = read_checkpoint_config(dir);
  const std::string diff = config_differences(saved, config);
  TSP_CHECK(diff.empty(),
            "checkpoint {} is for another model than the one being trained ({}); resume with the "
            "checkpoint's own config (omit --model/--config)",
            dir, diff);
  const TrainerState state = read_trainer_state(dir);
  TSP_CHECK(state.config_hash == config_fingerprint(saved) ||
                state.config_hash == legacy_config_fingerprint(saved),
            "{}: trainer state config hash {} does not match its config.json ({}); the "
            "checkpoint is corrupt",
            dir, state.config_hash, config_fingerprint(saved));

  // Moments first, staged through the weights (Layout::load fills exactly this rank's shards),
  // then the weights themselves.
  const auto& shards = opt.shards();
  for (bool second : {false, true}) {
    const MomentSource src((fs::path(dir) / (second ? kExpAvgSqFile : kExpAvgFile)).string(),
                           config, second ? "AdamW exp_avg_sq" : "AdamW exp_avg", state.step);
    layout.load(src);
    for (size_t i = 0; i < shards.size(); ++i) {
      layout.backend().copy(shards[i].value, second ? opt.exp_avg_sq(i) : opt.exp_avg(i));
    }
  }
  const ModelDir model = open_model_dir(dir);
  layout.load(ModelDirWeights(model));
  layout.zero_grads();
  opt.set_step_count(state.step);
  return state;
}

}  // namespace tsp
