// The pieces of a trustworthy checkpoint, without training: SHA-256 of files, the self-checksummed
// trainer state and its value checks, the config fingerprint (max_position_embeddings included,
// old fingerprints still known), the differing-keys message, file verification and the run lock.
// End to end (damaged files, concurrent runs, divergence): tests/train/checkpoint_trust_test.sh.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "test_util.h"
#include "tsp/train/checkpoint.h"

namespace tsp {
namespace {

namespace fs = std::filesystem;
using test::error_of;

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("tsp_checkpoint_test_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

void write(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

TrainerState sample_state() {
  TrainerState s;
  s.step = 4;
  s.samples = 16;
  s.seed = 1337;
  s.batch = 4;
  s.seq = 32;
  s.accum = 1;
  s.config_hash = config_fingerprint(llama_preset("tiny"));
  s.layout = "tsp";
  s.tp = 1;
  s.dp = 2;
  s.world = 4;
  s.last_loss = 4.686798242465925;
  s.last_val_loss = -1;
  const std::string sum(64, 'a');
  for (const char* f : {"config.json", "model.safetensors", "optimizer.exp_avg.safetensors",
                        "optimizer.exp_avg_sq.safetensors"}) {
    s.files[f] = FileDigest{100, sum};
  }
  return s;
}

TEST(Checkpoint, DigestIsSha256) {
  TempDir d;
  write(d.path / "abc", "abc");
  const FileDigest got = digest_file((d.path / "abc").string());
  EXPECT_EQ(got.bytes, 3);
  // FIPS 180-2, appendix B.1
  EXPECT_EQ(got.sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_NE(error_of([&] { digest_file((d.path / "missing").string()); }).find("cannot read"),
            std::string::npos);
}

TEST(Checkpoint, TrainerStateRoundTripsAndChecksItself) {
  const TrainerState s = sample_state();
  const std::string text = s.to_json_string();
  const TrainerState back = TrainerState::from_json_string(text, "ts.json");
  EXPECT_EQ(back.format, 2);
  EXPECT_EQ(back.step, s.step);
  EXPECT_EQ(back.samples, s.samples);
  EXPECT_EQ(back.last_loss, s.last_loss);  // bit for bit through JSON
  EXPECT_EQ(back.files, s.files);
  // One changed value: the state's own checksum no longer matches.
  std::string edited = text;
  edited.replace(edited.find("\"step\": 4"), 9, "\"step\": 5");
  EXPECT_NE(error_of([&] {
              TrainerState::from_json_string(edited, "ts.json");
            }).find("ts.json does not match its own SHA-256"),
            std::string::npos);
}

TEST(Checkpoint, TrainerStateValuesAreChecked) {
  auto error_for = [](TrainerState s) {
    return error_of([&] { TrainerState::from_json_string(s.to_json_string(), "ts.json"); });
  };
  TrainerState s = sample_state();
  s.step = 9000;
  EXPECT_NE(error_for(s).find("data position 16 is below the step 9000"), std::string::npos);
  s = sample_state();
  s.accum = 0;
  EXPECT_NE(error_for(s).find("accum 0 (each must be positive)"), std::string::npos);
  s = sample_state();
  s.dp = 3;
  EXPECT_NE(error_for(s).find("world 4, dp 3, tp 1 do not describe a layout"), std::string::npos);
  s = sample_state();
  s.step = -1;
  EXPECT_NE(error_for(s).find("negative step -1"), std::string::npos);
  s = sample_state();
  s.files.erase("optimizer.exp_avg.safetensors");
  EXPECT_NE(error_for(s).find("records no checksum for optimizer.exp_avg.safetensors"),
            std::string::npos);
}

TEST(Checkpoint, StateWithoutChecksumsIsFormatOne) {
  const std::string legacy =
      R"({"step": 4, "samples": 16, "seed": 1, "batch": 4, "seq": 32, "accum": 1,
          "config_hash": "682a72bbf8c46c31", "layout": "single", "tp": 1, "dp": 1, "world": 1,
          "last_loss": 4.5, "last_val_loss": -1.0})";
  const TrainerState s = TrainerState::from_json_string(legacy, "old.json");
  EXPECT_EQ(s.format, 1);
  EXPECT_TRUE(s.files.empty());
  // Half of the new keys is damage, not an old format.
  const std::string half = legacy.substr(0, legacy.size() - 1) + R"(, "format": 2})";
  EXPECT_NE(error_of([&] {
              TrainerState::from_json_string(half, "x.json");
            }).find("lacks one of \"format\", \"files\", \"sha256\""),
            std::string::npos);
}

TEST(Checkpoint, FingerprintCoversMaxPositionEmbeddings) {
  const LlamaConfig a = llama_preset("tiny");
  LlamaConfig b = a;
  b.max_position_embeddings *= 2;
  EXPECT_NE(config_fingerprint(a), config_fingerprint(b));
  // The fingerprint older trainer states carry ignores it (and is still accepted on resume).
  EXPECT_EQ(legacy_config_fingerprint(a), legacy_config_fingerprint(b));
  EXPECT_NE(legacy_config_fingerprint(a), config_fingerprint(a));
  EXPECT_EQ(config_differences(a, b),
            fmt::format("max_position_embeddings {} there, {} here", a.max_position_embeddings,
                        b.max_position_embeddings));
  LlamaConfig c = a;
  c.hidden_size = 128;
  c.vocab_size = 512;
  EXPECT_EQ(config_differences(a, c),
            fmt::format("hidden_size {} there, 128 here; vocab_size {} there, 512 here",
                        a.hidden_size, a.vocab_size));
  EXPECT_EQ(config_differences(a, a), "");
}

TEST(Checkpoint, VerifyNamesTheDamagedFile) {
  TempDir d;
  const fs::path ck = d.path / "ck";
  fs::create_directories(ck);
  TrainerState s = sample_state();
  s.files.clear();
  for (const char* f : {"config.json", "model.safetensors", "optimizer.exp_avg.safetensors",
                        "optimizer.exp_avg_sq.safetensors"}) {
    write(ck / f, std::string("content of ") + f);
    s.files[f] = digest_file((ck / f).string());
  }
  write(ck / "trainer_state.json", s.to_json_string());
  EXPECT_TRUE(verify_checkpoint_files(ck.string()));
  write(ck / "model.safetensors", "content of model.safetensorZ");  // same size
  EXPECT_NE(error_of([&] {
              verify_checkpoint_files(ck.string());
            }).find("model.safetensors does not match the SHA-256"),
            std::string::npos);
  // A reader of other files only is not stopped by it.
  EXPECT_TRUE(verify_checkpoint_files(ck.string(), {"config.json"}));
  write(ck / "config.json", "short");
  EXPECT_NE(error_of([&] {
              verify_checkpoint_files(ck.string(), {"config.json"});
            }).find("config.json has 5 bytes"),
            std::string::npos);
  // A plain model directory has nothing to verify.
  EXPECT_FALSE(verify_checkpoint_files(d.path.string()));
}

TEST(Checkpoint, LockIsExclusiveAndReleased) {
  TempDir d;
  const std::string dir = (d.path / "ck").string();
  {
    CheckpointLock first(dir);
    EXPECT_TRUE(CheckpointLock::held(dir));
    EXPECT_TRUE(CheckpointLock::held(dir + "/"));  // one directory, however it is spelled
    // A second holder (another open file description, as another process would have) is refused
    // with the first one's identity.
    const std::string e = error_of([&] { CheckpointLock second(dir); });
    EXPECT_NE(e.find("is in use by another training run (pid " + std::to_string(::getpid())),
              std::string::npos)
        << e;
  }
  EXPECT_FALSE(CheckpointLock::held(dir));
  EXPECT_NO_THROW(CheckpointLock again(dir));
  // Under a regular file nothing can be created: refused at once.
  write(d.path / "file", "x");
  EXPECT_NE(error_of([&] {
              CheckpointLock bad((d.path / "file" / "ck").string());
            }).find("cannot create the directory"),
            std::string::npos);
}

}  // namespace
}  // namespace tsp
