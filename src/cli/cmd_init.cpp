// `tsp init` (a random-weight model directory), `tsp encode` (text -> llm.c token file with the
// byte-level tokenizer) and `tsp inspect` (summary of a safetensors or token file). None needs MPI.
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>
#include <memory>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "tsp/core/error.h"
#include "tsp/core/limits.h"
#include "tsp/core/tensor.h"
#include "tsp/model/config.h"
#include "tsp/model/params.h"
#include "tsp/model/safetensors.h"
#include "tsp/model/tokens.h"

namespace tsp::cli {
namespace {

// ------------------------------------------------------------------------------------ init

struct InitOptions {
  std::string config_file, preset, out, dtype;
  std::vector<std::string> sets;
  uint64_t seed = 1;
};

// --set key=value on top of the config's JSON. The value is parsed as JSON when it can be (so
// numbers and booleans keep their type) and taken as a string otherwise. Keys must be ones
// config.json carries: a typo would otherwise be ignored silently.
LlamaConfig apply_sets(const LlamaConfig& base, const std::vector<std::string>& sets) {
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(base.to_json_string());
  for (const std::string& s : sets) {
    const size_t eq = s.find('=');
    TSP_CHECK(eq != std::string::npos && eq > 0, "--set \"{}\": expected key=value", s);
    const std::string key = s.substr(0, eq), value = s.substr(eq + 1);
    if (!j.contains(key) || key == "architectures" || key == "model_type") {
      std::string keys;
      for (auto& [k, v] : j.items()) {
        if (k != "architectures" && k != "model_type") keys += (keys.empty() ? "" : ", ") + k;
      }
      TSP_FAIL("--set: unknown config key \"{}\"; known keys: {}", key, keys);
    }
    nlohmann::ordered_json v = nlohmann::ordered_json::parse(value, nullptr, false);
    j[key] = v.is_discarded() ? nlohmann::ordered_json(value) : v;
  }
  return LlamaConfig::from_json_string(j.dump());
}

// Before writing anything: the one f32 parameter init holds at a time must fit in memory, and
// model.safetensors must fit on the disk of --out, so an impossible size is an error up front,
// never a half-written directory.
void check_init_fits(const LlamaConfig& c, const std::string& out) {
  const int64_t elem_bytes = c.torch_dtype == "bfloat16" ? 2 : 4;
  int64_t file_bytes = 0;
  const ParamSpec* largest = nullptr;
  const std::vector<ParamSpec> specs = llama_param_specs(c);
  for (const ParamSpec& s : specs) {
    if (!largest || shape_numel(s.shape) > shape_numel(largest->shape)) largest = &s;
    file_bytes += shape_numel(s.shape) * elem_bytes;  // no overflow: validate() bounded 4·params
  }
  require_memory(
      checked_mul(shape_numel(largest->shape), 4, "init: bytes of one parameter"),
      fmt::format("init: parameter {} {} in float32", largest->name, shape_str(largest->shape)),
      "use smaller sizes (--set) or a smaller --preset");
  // The nearest existing directory at or above --out tells which filesystem receives the file.
  std::filesystem::path dir = std::filesystem::absolute(out);
  std::error_code ec;
  while (!std::filesystem::is_directory(dir, ec) && dir.has_parent_path() &&
         dir != dir.parent_path())
    dir = dir.parent_path();
  const std::filesystem::space_info space = std::filesystem::space(dir, ec);
  if (!ec) {
    TSP_CHECK(static_cast<uintmax_t>(file_bytes) <= space.available,
              "init: model.safetensors would take {}, more than the {} free on {}; use smaller "
              "sizes (--set) or another --out",
              format_bytes(static_cast<double>(file_bytes)),
              format_bytes(static_cast<double>(space.available)), dir.string());
  }
}

int run_init(const InitOptions& o) {
  TSP_CHECK(o.config_file.empty() != o.preset.empty(),
            "init: give exactly one of --config FILE or --preset NAME (tiny, demo, 7b)");
  LlamaConfig c = o.preset.empty() ? LlamaConfig::from_file(o.config_file) : llama_preset(o.preset);
  c = apply_sets(c, o.sets);
  if (!o.dtype.empty()) c.torch_dtype = o.dtype;
  c.validate();  // sizes whose products overflow are refused here, naming the keys
  check_init_fits(c, o.out);

  const auto t0 = std::chrono::steady_clock::now();
  Tensor buf;  // one parameter in memory at a time
  save_model_dir(o.out, c, [&](const ParamSpec& s) {
    buf = Tensor(s.shape, DType::F32, MemCategory::Weights);
    init_param(s, o.seed, buf);
    return buf.view();
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t n = c.num_parameters();
  const double mb = static_cast<double>(n) * (c.torch_dtype == "bfloat16" ? 2 : 4) / 1e6;
  std::printf("wrote %s: h=%" PRId64 " L=%" PRId64 " heads=%" PRId64 "/%" PRId64 " I=%" PRId64
              " V=%" PRId64 ", %" PRId64 " parameters (%.1f MB %s), seed %" PRIu64 ", %.2f s\n",
              o.out.c_str(), c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
              c.num_key_value_heads, c.intermediate_size, c.vocab_size, n, mb,
              c.torch_dtype.c_str(), o.seed, secs);
  return 0;
}

const CommandRegistration kInit{Command{
    "init",
    "Write a model directory (config.json + model.safetensors, Hugging Face layout) with "
    "deterministic random weights: projections N(0, 0.02), o_proj/down_proj scaled by 1/sqrt(2L), "
    "norms 1",
    /*needs_mpi=*/false, [](CLI::App& sub) {
      auto o = std::make_shared<InitOptions>();
      auto* cfg = sub.add_option("--config", o->config_file,
                                 "base configuration: a Hugging Face config.json")
                      ->check(CLI::ExistingFile);
      auto* preset = sub.add_option("--preset", o->preset, "base configuration by name")
                         ->check(CLI::IsMember({"tiny", "demo", "7b"}));
      cfg->excludes(preset);
      sub.add_option("--set", o->sets,
                     "override a config.json key, repeatable; the value is JSON "
                     "(e.g. --set num_hidden_layers=8 --set tie_word_embeddings=true)");
      sub.add_option("--seed", o->seed, "random seed (weights depend only on seed and name)")
          ->capture_default_str()
          ->check(kNotNegative);  // a negative one would wrap around
      sub.add_option("--out", o->out, "output directory (created; existing files replaced)")
          ->required();
      sub.add_option("--dtype", o->dtype,
                     "storage dtype of model.safetensors (default: the config's torch_dtype)")
          ->check(CLI::IsMember({"float32", "bfloat16"}));
      return [o](Communicator*) { return run_init(*o); };
    }}};

// ---------------------------------------------------------------------------------- encode

struct EncodeOptions {
  std::string text_file, out;
  bool from_stdin = false, uint32 = false;
};

int run_encode(const EncodeOptions& o) {
  TSP_CHECK(o.text_file.empty() != !o.from_stdin,
            "encode: give exactly one of --text FILE or --stdin");
  std::string text;
  if (o.from_stdin) {
    text.assign(std::istreambuf_iterator<char>(std::cin), {});
  } else {
    // Sizes first: one id per byte, and an llm.c header counts tokens in an int32.
    std::error_code ec;
    const auto bytes = static_cast<int64_t>(std::filesystem::file_size(o.text_file, ec));
    TSP_CHECK(!ec, "encode: cannot read the size of {}: {}", o.text_file, ec.message());
    TSP_CHECK(bytes <= std::numeric_limits<int32_t>::max(),
              "encode: {} has {} bytes, more than the 2^31 - 1 tokens an llm.c token file can "
              "count; split it into smaller files",
              o.text_file, bytes);
    require_memory(checked_mul(bytes, 5, "encode: bytes of the text and its ids"),
                   fmt::format("encode: {} (its bytes and their int32 ids)", o.text_file),
                   "split the text into smaller files");
    std::ifstream in(o.text_file, std::ios::binary);
    TSP_CHECK(in.good(), "encode: cannot open {}", o.text_file);
    text.assign(std::istreambuf_iterator<char>(in), {});
    TSP_CHECK(!in.bad(), "encode: error reading {}", o.text_file);
  }
  // Byte-level tokenizer: token id = byte value (0-255), so vocab_size 256 covers any text.
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  write_token_file(o.out, ids, o.uint32);
  std::printf("wrote %s: %zu tokens (byte-level, ids 0-255), %s ids, %.3f MB\n", o.out.c_str(),
              ids.size(), o.uint32 ? "uint32" : "uint16",
              (1024.0 + static_cast<double>(ids.size()) * (o.uint32 ? 4 : 2)) / 1e6);
  return 0;
}

const CommandRegistration kEncode{Command{
    "encode",
    "Encode a text as byte-level token ids (0-255) into an llm.c token file (1024-byte header, "
    "then uint16 ids; --uint32 for 4-byte ids)",
    /*needs_mpi=*/false, [](CLI::App& sub) {
      auto o = std::make_shared<EncodeOptions>();
      auto* text = sub.add_option("--text", o->text_file, "input text file (bytes, any encoding)")
                       ->check(CLI::ExistingFile);
      auto* in = sub.add_flag("--stdin", o->from_stdin, "read the text from standard input");
      text->excludes(in);
      sub.add_option("--out", o->out, "output token file (.bin)")->required();
      sub.add_flag("--uint32", o->uint32,
                   "write 4-byte ids (magic 20240801, version 7) instead of 2-byte ones (magic "
                   "20240520, version 1)");
      return [o](Communicator*) { return run_encode(*o); };
    }}};

// --------------------------------------------------------------------------------- inspect

struct InspectOptions {
  std::string file;
  bool checksums = false;
};

int inspect_tokens(const std::string& path) {
  const TokenFileInfo info = read_token_file_info(path);
  std::printf("%s: llm.c token file, magic %d version %d, %s ids, %" PRId64 " tokens (%.3f MB)\n",
              path.c_str(), info.magic, info.version,
              info.bytes_per_token == 2 ? "uint16" : "uint32", info.num_tokens,
              static_cast<double>(info.num_tokens * info.bytes_per_token) / 1e6);
  const auto head = read_tokens(path, 0, std::min<int64_t>(info.num_tokens, 16));
  std::printf("first ids:");
  for (int32_t id : head) std::printf(" %d", id);
  std::printf("\n");
  return 0;
}

// One line per tensor that tests can compare with scripts/check_safetensors.py: sums in double
// of the values as f32 (floats) or exact int64 (integers), in file order.
void print_checksum(const SafetensorsReader& r, const SafetensorInfo& t) {
  double sum = 0, sum_abs = 0, sum_sq = 0;
  if (t.dtype == "F32" || t.dtype == "BF16" || t.dtype == "F16") {
    Tensor v(t.shape, DType::F32, MemCategory::Workspace);
    r.read(t.name, v);
    for (int64_t i = 0; i < v.numel(); ++i) {
      const double x = v.f32()[i];
      sum += x;
      sum_abs += std::fabs(x);
      sum_sq += x * x;
    }
  } else if (t.dtype == "I32" || t.dtype == "I64") {
    const DType dt = t.dtype == "I32" ? DType::I32 : DType::I64;
    Tensor v(t.shape, dt, MemCategory::Workspace);
    r.read(t.name, v);
    for (int64_t i = 0; i < v.numel(); ++i) {
      const double x = dt == DType::I32 ? v.data_as<int32_t>()[i] : v.data_as<int64_t>()[i];
      sum += x;
      sum_abs += std::fabs(x);
      sum_sq += x * x;
    }
  } else {
    return;  // other dtypes are listed but not read
  }
  std::printf("checksum\t%s\t%s\t%s\t%.17g\t%.17g\t%.17g\n", t.name.c_str(), t.dtype.c_str(),
              shape_str(t.shape).c_str(), sum, sum_abs, sum_sq);
}

int inspect_safetensors(const std::string& path, bool checksums) {
  SafetensorsReader r(path);
  int64_t total_bytes = 0, total_elems = 0;
  for (const auto& t : r.tensors()) {
    total_bytes += t.end - t.begin;
    total_elems += shape_numel(t.shape);
  }
  std::printf("# %s: safetensors, %zu tensors, %" PRId64 " elements, %.3f MB\n", path.c_str(),
              r.tensors().size(), total_elems, static_cast<double>(total_bytes) / 1e6);
  for (const auto& [k, v] : r.metadata()) {
    const std::string first_line = v.substr(0, v.find('\n'));
    std::printf("# metadata %s = %s%s\n", k.c_str(), first_line.c_str(),
                first_line.size() < v.size() ? " ..." : "");
  }
  std::printf("%-52s %-5s %-16s %10s\n", "#name", "dtype", "shape", "MB");
  for (const auto& t : r.tensors()) {
    std::printf("%-52s %-5s %-16s %10.3f\n", t.name.c_str(), t.dtype.c_str(),
                shape_str(t.shape).c_str(), static_cast<double>(t.end - t.begin) / 1e6);
  }
  if (checksums) {
    for (const auto& t : r.tensors()) print_checksum(r, t);
  }
  return 0;
}

int run_inspect(const InspectOptions& o) {
  // Token files start with one of llm.c's magic numbers; everything else is tried as safetensors
  // (whose first 8 bytes are a header size, far from these values for any real header).
  std::ifstream in(o.file, std::ios::binary);
  TSP_CHECK(in.good(), "inspect: cannot open {}", o.file);
  int32_t magic = 0;
  in.read(reinterpret_cast<char*>(&magic), 4);
  if (in.gcount() == 4 && (magic == 20240520 || magic == 20240801)) return inspect_tokens(o.file);
  // A token file with a damaged magic number (llm.c's header layout, or llm.c's .bin name) is
  // reported as such by the token reader, not as a corrupt safetensors header.
  if (std::filesystem::path(o.file).extension() == ".bin" || has_llmc_layout(o.file))
    return inspect_tokens(o.file);
  return inspect_safetensors(o.file, o.checksums);
}

const CommandRegistration kInspect{Command{
    "inspect",
    "Summarise a safetensors file (tensor names, dtypes, shapes, MB = 10^6 bytes) or an llm.c "
    "token file (version, id width, token count)",
    /*needs_mpi=*/false, [](CLI::App& sub) {
      auto o = std::make_shared<InspectOptions>();
      sub.add_option("file", o->file, "a .safetensors or llm.c token (.bin) file")
          ->required()
          ->check(CLI::ExistingFile);
      sub.add_flag("--checksums", o->checksums,
                   "also print per-tensor sum, sum of |x| and sum of x^2 (in double) as "
                   "tab-separated 'checksum' lines");
      return [o](Communicator*) { return run_inspect(*o); };
    }}};

}  // namespace
}  // namespace tsp::cli
