// Llama parameter specs with Hugging Face names, counter-based random initialisation, and model
// directories (config.json + model.safetensors, or shards listed by model.safetensors.index.json).
#include "tsp/model/params.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "model/io_internal.h"
#include "tsp/core/error.h"

namespace tsp {

namespace fs = std::filesystem;

std::vector<ParamSpec> llama_param_specs(const LlamaConfig& c) {
  c.validate();
  const int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim(), kv = c.kv_dim();
  const int64_t I = c.intermediate_size, V = c.vocab_size;
  std::vector<ParamSpec> s;
  s.push_back({"model.embed_tokens.weight", ParamKind::Embedding, -1, {V, h}});
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    s.push_back({p + "input_layernorm.weight", ParamKind::InputNorm, i, {h}});
    s.push_back({p + "self_attn.q_proj.weight", ParamKind::Wq, i, {q, h}});
    s.push_back({p + "self_attn.k_proj.weight", ParamKind::Wk, i, {kv, h}});
    s.push_back({p + "self_attn.v_proj.weight", ParamKind::Wv, i, {kv, h}});
    s.push_back({p + "self_attn.o_proj.weight", ParamKind::Wo, i, {h, q}});
    s.push_back({p + "post_attention_layernorm.weight", ParamKind::PostNorm, i, {h}});
    s.push_back({p + "mlp.gate_proj.weight", ParamKind::Wgate, i, {I, h}});
    s.push_back({p + "mlp.up_proj.weight", ParamKind::Wup, i, {I, h}});
    s.push_back({p + "mlp.down_proj.weight", ParamKind::Wdown, i, {h, I}});
  }
  s.push_back({"model.norm.weight", ParamKind::FinalNorm, -1, {h}});
  if (!c.tie_word_embeddings) s.push_back({"lm_head.weight", ParamKind::LmHead, -1, {V, h}});
  for (ParamSpec& p : s) p.num_layers = static_cast<int>(c.num_hidden_layers);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Initialisation. Element i of a tensor is a pure function of (seed, name, i): no generator state
// runs through the tensor, so a rank can produce any rows (its shard) and get exactly the bits
// the whole tensor would have there. Normal samples come from Box-Muller on two uniforms drawn
// by splitmix64 from the counter of the element's pair (elements 2k and 2k+1 take the cosine and
// sine branches of the same pair). The maths runs in double and rounds once to float, so libm
// differences of an ulp in log/cos would almost never change a float's bits; with the same libm
// results are bit-identical.

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

// The two standard normal samples of Box-Muller pair `pair` of the stream `key`: elements 2·pair
// (cosine branch) and 2·pair + 1 (sine branch).
void normal_pair(uint64_t key, uint64_t pair, double* even, double* odd) {
  const uint64_t a = splitmix64(key ^ splitmix64(2 * pair));
  const uint64_t b = splitmix64(key ^ splitmix64(2 * pair + 1));
  const double u1 = static_cast<double>((a >> 11) + 1) * 0x1.0p-53;  // (0, 1]: log is finite
  const double u2 = static_cast<double>(b >> 11) * 0x1.0p-53;        // [0, 1)
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double theta = 2.0 * std::numbers::pi * u2;
  *even = r * std::cos(theta);
  *odd = r * std::sin(theta);
}

// Standard deviation of a parameter's init; 0 means "all ones" (norm weights).
double init_std(const ParamSpec& spec) {
  switch (spec.kind) {
    case ParamKind::InputNorm:
    case ParamKind::PostNorm:
    case ParamKind::FinalNorm:
      return 0.0;
    case ParamKind::Wo:
    case ParamKind::Wdown:
      // GPT-2: residual-branch output projections scaled by 1/sqrt(2L) so the residual stream's
      // variance does not grow with depth.
      TSP_CHECK(spec.num_layers > 0,
                "init {}: ParamSpec.num_layers is {}; build specs with llama_param_specs",
                spec.name, spec.num_layers);
      return 0.02 / std::sqrt(2.0 * spec.num_layers);
    default:
      return 0.02;
  }
}

}  // namespace

void init_param_rows(const ParamSpec& spec, uint64_t seed, int64_t row_begin, int64_t row_end,
                     TensorView dst) {
  TSP_CHECK(!spec.shape.empty(), "init {}: empty shape", spec.name);
  TSP_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= spec.shape[0],
            "init {}: rows [{}, {}) are outside shape {}", spec.name, row_begin, row_end,
            shape_str(spec.shape));
  Shape want = spec.shape;
  want[0] = row_end - row_begin;
  TSP_CHECK(dst.shape() == want, "init {}: rows [{}, {}) have shape {}, destination has {}",
            spec.name, row_begin, row_end, shape_str(want), shape_str(dst.shape()));
  TSP_CHECK(dst.dtype() == DType::F32 || dst.dtype() == DType::BF16,
            "init {}: destination must be f32 or bf16, not {}", spec.name, dtype_name(dst.dtype()));
  const double sigma = init_std(spec);
  const int64_t row_elems = spec.shape[0] ? shape_numel(spec.shape) / spec.shape[0] : 0;
  const int64_t first = row_begin * row_elems, n = dst.numel();
  const uint64_t key = splitmix64(seed ^ splitmix64(fnv1a(spec.name)));
  float* f = dst.dtype() == DType::F32 ? dst.f32() : nullptr;
  bf16* b = dst.dtype() == DType::BF16 ? dst.data_as<bf16>() : nullptr;
  auto store = [&](int64_t i, double z) {  // i: index into dst
    const float v = sigma == 0.0 ? 1.0f : static_cast<float>(sigma * z);
    if (f) {
      f[i] = v;
    } else {
      b[i] = bf16(v);
    }
  };
  // Loop over the Box-Muller pairs touching [first, first + n); a pair cut by the range's ends
  // stores only its element inside. Every element is independent, so threads cannot change bits.
  const int64_t pair_begin = first / 2, pair_end = (first + n + 1) / 2;
#pragma omp parallel for schedule(static) if (n > (1 << 16))
  for (int64_t p = pair_begin; p < pair_end; ++p) {
    double even = 1.0, odd = 1.0;
    if (sigma != 0.0) normal_pair(key, static_cast<uint64_t>(p), &even, &odd);
    if (2 * p >= first) store(2 * p - first, even);
    if (2 * p + 1 < first + n) store(2 * p + 1 - first, odd);
  }
}

void init_param(const ParamSpec& spec, uint64_t seed, TensorView dst) {
  TSP_CHECK(!spec.shape.empty(), "init {}: empty shape", spec.name);
  init_param_rows(spec, seed, 0, spec.shape[0], dst);
}

// ---------------------------------------------------------------------------------------------
// Non-finite values.

NonFinite find_non_finite(TensorView t) {
  check_host(t);  // a host scan (Backend::count_non_finite counts on a device)
  NonFinite r;
  const int64_t n = t.numel();
  // An IEEE value is NaN or ±Inf exactly when its exponent bits are all ones: a branch-free
  // count over the bits vectorises, and the first index is searched only when there is one.
  if (t.dtype() == DType::F32) {
    const uint32_t* u = static_cast<const uint32_t*>(t.data());
    int64_t bad = 0;  // a local accumulator, so the loop vectorises
    for (int64_t i = 0; i < n; ++i) bad += (u[i] & 0x7f800000u) == 0x7f800000u;
    r.count = bad;
    if (bad == 0) return r;
    for (r.first = 0; (u[r.first] & 0x7f800000u) != 0x7f800000u; ++r.first) {
    }
    std::memcpy(&r.value, &u[r.first], 4);
  } else if (t.dtype() == DType::BF16) {
    const uint16_t* u = static_cast<const uint16_t*>(t.data());
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad += (u[i] & 0x7f80u) == 0x7f80u;
    r.count = bad;
    if (bad == 0) return r;
    for (r.first = 0; (u[r.first] & 0x7f80u) != 0x7f80u; ++r.first) {
    }
    r.value = bf16::to_float(u[r.first]);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Model weights: one file, or shards with an index.

namespace {

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";

// "[3, 17]" for flat index 209 of shape [8, 64]: where a user would look in PyTorch.
std::string unravel(int64_t flat, const Shape& shape) {
  std::vector<int64_t> idx(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    idx[d] = shape[d] ? flat % shape[d] : 0;
    flat = shape[d] ? flat / shape[d] : 0;
  }
  return shape_str(idx);
}

}  // namespace

ModelWeights::ModelWeights(const std::string& dir) {
  const fs::path d(dir);
  const fs::path single = d / kSingleFile, index_path = d / kIndexFile;
  if (fs::exists(single) || !fs::exists(index_path)) {
    source_ = kSingleFile;
    files_.push_back(std::make_unique<SafetensorsReader>(single.string()));
    for (const SafetensorInfo& t : files_[0]->tensors()) where_[t.name] = files_[0].get();
    return;
  }
  sharded_ = true;
  source_ = kIndexFile;
  const std::string ip = index_path.string();

  std::ifstream in(ip, std::ios::binary);
  TSP_CHECK(in.good(), "cannot open {}", ip);
  std::stringstream text;
  text << in.rdbuf();
  TSP_CHECK(!in.bad(), "{}: read failed", ip);
  // Duplicate names in "weight_map" would otherwise be merged silently (the last one wins), so
  // the parser's key events are watched; depth 1 is the top-level object, 2 the weight map's.
  nlohmann::json j;
  std::string top_key, duplicate;
  std::set<std::string> seen;
  try {
    j = nlohmann::json::parse(
        text.str(), [&](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
          if (ev != nlohmann::json::parse_event_t::key) return true;
          if (depth == 1) top_key = parsed.get<std::string>();
          if (depth == 2 && top_key == "weight_map" &&
              !seen.insert(parsed.get<std::string>()).second && duplicate.empty()) {
            duplicate = parsed.get<std::string>();
          }
          return true;
        });
  } catch (const nlohmann::json::exception& e) {
    TSP_FAIL("{}: not valid JSON: {}", ip, e.what());
  }
  TSP_CHECK(duplicate.empty(),
            "{}: \"weight_map\" lists tensor \"{}\" twice; the index is damaged (save the model "
            "again, e.g. with save_pretrained)",
            ip, duplicate);
  const auto wm = j.is_object() ? j.find("weight_map") : j.end();
  TSP_CHECK(j.is_object() && wm != j.end() && wm->is_object(),
            "{}: needs a \"weight_map\" object mapping each tensor name to its shard file, as "
            "save_pretrained writes it",
            ip);
  TSP_CHECK(!wm->empty(), "{}: \"weight_map\" lists no tensors", ip);

  // Shard files in name order (model-00001-of-000NN first), with the tensors mapped to each.
  std::map<std::string, std::vector<std::string>> mapped;
  for (const auto& [name, file] : wm->items()) {
    TSP_CHECK(file.is_string(), "{}: \"weight_map\"[\"{}\"] must be a file name, got {}", ip, name,
              file.dump());
    const std::string f = file.get<std::string>();
    // Shards live next to the index: a path elsewhere would read files outside the model.
    TSP_CHECK(!f.empty() && f.find('/') == std::string::npos && f.find('\\') == std::string::npos &&
                  f != "." && f != "..",
              "{}: tensor \"{}\" is mapped to \"{}\", which is not a file name in {} (shards "
              "must lie next to the index)",
              ip, name, f, dir);
    mapped[f].push_back(name);
  }
  for (const auto& [f, names] : mapped) {
    const fs::path fp = d / f;
    TSP_CHECK(fs::is_regular_file(fp),
              "{}: maps {} tensors (\"{}\"{}) to {}, which is missing from {}; copy every shard "
              "the index lists",
              ip, names.size(), names[0], names.size() > 1 ? ", ..." : "", f, dir);
    files_.push_back(std::make_unique<SafetensorsReader>(fp.string()));
    const SafetensorsReader* r = files_.back().get();
    for (const std::string& name : names) {
      TSP_CHECK(r->find(name) != nullptr,
                "{}: maps tensor \"{}\" to {}, but that file holds no such tensor ({} tensors "
                "in it); the index and the shards come from different saves",
                ip, name, fp.string(), r->tensors().size());
      where_[name] = r;
    }
  }
  // Every tensor a shard holds must be the one the index maps there: a second copy elsewhere or
  // a tensor the index does not know would make the model's meaning depend on the reader.
  for (const auto& file : files_) {
    for (const SafetensorInfo& t : file->tensors()) {
      auto it = where_.find(t.name);
      TSP_CHECK(it != where_.end(),
                "{} holds tensor \"{}\", which {} does not list; the index and the shards come "
                "from different saves",
                file->path(), t.name, ip);
      TSP_CHECK(it->second == file.get(),
                "tensor \"{}\" is stored twice: in {} and in {} (the index maps it to the "
                "first); remove the stale shard or save the model again",
                t.name, it->second->path(), file->path());
    }
  }
}

ModelWeights::~ModelWeights() = default;

std::vector<const SafetensorInfo*> ModelWeights::tensors() const {
  std::vector<const SafetensorInfo*> all;
  for (const auto& f : files_) {
    for (const SafetensorInfo& t : f->tensors()) all.push_back(&t);
  }
  return all;
}

const SafetensorsReader* ModelWeights::file_of(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? nullptr : it->second;
}

const SafetensorInfo* ModelWeights::find(const std::string& name) const {
  const SafetensorsReader* f = file_of(name);
  return f ? f->find(name) : nullptr;
}

const std::map<std::string, std::string>& ModelWeights::metadata() const {
  return files_.front()->metadata();
}

void ModelWeights::read(const std::string& name, TensorView dst) const {
  const SafetensorInfo* info = find(name);
  TSP_CHECK(info != nullptr, "{}: no tensor named \"{}\"", source_, name);
  TSP_CHECK(dst.shape() == info->shape,
            "{}: tensor \"{}\" has shape {} but the destination has shape {}",
            file_of(name)->path(), name, shape_str(info->shape), shape_str(dst.shape()));
  read_rows(name, 0, info->shape.empty() ? 1 : info->shape[0],
            info->shape.empty() ? dst.reshape({1}) : dst);
}

void ModelWeights::read_rows(const std::string& name, int64_t row_begin, int64_t row_end,
                             TensorView dst) const {
  const SafetensorsReader* f = file_of(name);
  TSP_CHECK(f != nullptr, "{}: no tensor named \"{}\"", source_, name);
  f->read_rows(name, row_begin, row_end, dst);
  // Loaded weights must be finite: a NaN would otherwise give NaN gradients or garbage tokens
  // with exit 0. Checking the rows just read costs one pass over memory already in cache.
  const NonFinite bad = find_non_finite(dst);
  if (bad.count == 0) return;
  const Shape& shape = f->find(name)->shape;
  const int64_t row_elems = shape.empty() || shape[0] == 0 ? 1 : shape_numel(shape) / shape[0];
  const int64_t flat = row_begin * row_elems + bad.first;
  TSP_FAIL(
      "{}: tensor \"{}\" holds {} non-finite value{} (NaN or Inf) in rows [{}, {}); the first "
      "is {} at element {} {}: the weights are damaged (a diverged training run or a corrupt "
      "file); load an earlier checkpoint",
      f->path(), name, bad.count, bad.count == 1 ? "" : "s", row_begin, row_end, bad.value, flat,
      unravel(flat, shape.empty() ? Shape{1} : shape));
}

// ---------------------------------------------------------------------------------------------
// Model directories.

namespace {

// Fields that decide the tensors' meaning. Shapes alone cannot tell 4 heads of 16 from 8 of 8,
// nor whether lm_head is tied, so a save records its config in the safetensors metadata and a
// reader compares these with config.json (files written by other tools lack the key: skipped).
void check_same_structure(const std::string& dir, const std::string& weights, const LlamaConfig& a,
                          const LlamaConfig& b) {
  const std::string file = fs::path(weights).filename().string();
  auto same = [&](const char* key, int64_t x, int64_t y) {
    TSP_CHECK(x == y,
              "{}: config.json says {}={} but {} was saved with {}={}: the two files come from "
              "different saves (an interrupted save, or a copied config.json); save the model "
              "again",
              dir, key, x, file, key, y);
  };
  same("hidden_size", a.hidden_size, b.hidden_size);
  same("intermediate_size", a.intermediate_size, b.intermediate_size);
  same("num_attention_heads", a.num_attention_heads, b.num_attention_heads);
  same("num_key_value_heads", a.num_key_value_heads, b.num_key_value_heads);
  same("num_hidden_layers", a.num_hidden_layers, b.num_hidden_layers);
  same("vocab_size", a.vocab_size, b.vocab_size);
  same("tie_word_embeddings", a.tie_word_embeddings, b.tie_word_embeddings);
}

std::string first_few(const std::vector<std::string>& items, size_t n = 5) {
  std::string out;
  for (size_t i = 0; i < items.size() && i < n; ++i) out += (i ? ", " : "") + items[i];
  if (items.size() > n) out += fmt::format(" and {} more", items.size() - n);
  return out;
}

constexpr const char* kConfigMetadataKey = "tsp_config";

}  // namespace

ModelDir open_model_dir(const std::string& path) {
  TSP_CHECK(fs::is_directory(path),
            "model directory {} does not exist or is not a directory (write one with `tsp init "
            "--preset tiny --seed 1 --out {}`)",
            path, path);
  const fs::path dir(path);
  const fs::path config_path = dir / "config.json", weights_path = dir / kSingleFile;
  TSP_CHECK(fs::is_regular_file(config_path),
            "{}: no config.json; a model directory holds config.json and model.safetensors (or "
            "safetensors shards with model.safetensors.index.json), as Hugging Face's "
            "save_pretrained writes them",
            path);
  ModelDir m;
  m.path = path;
  m.config = LlamaConfig::from_file(config_path.string());
  try {
    m.config.validate();
  } catch (const Error& e) {
    TSP_FAIL("{}: {}", config_path.string(), e.message());
  }
  if (!fs::exists(weights_path) && !fs::exists(dir / kIndexFile)) {
    TSP_CHECK(
        !fs::exists(dir / "pytorch_model.bin") && !fs::exists(dir / "pytorch_model.bin.index.json"),
        "{}: only safetensors weights are supported, found pytorch_model.bin; convert it "
        "(e.g. save_pretrained(..., safe_serialization=True))",
        path);
    TSP_FAIL("{}: no model.safetensors (nor sharded weights with {}) next to config.json", path,
             kIndexFile);
  }
  m.weights = std::make_unique<ModelWeights>(path);
  const ModelWeights& w = *m.weights;

  for (const auto& file : w.files()) {
    auto it = file->metadata().find(kConfigMetadataKey);
    if (it == file->metadata().end()) continue;
    LlamaConfig saved;
    try {
      saved = LlamaConfig::from_json_string(it->second);
    } catch (const Error& e) {
      TSP_FAIL("{}: metadata \"{}\" is not a valid config: {}", file->path(), kConfigMetadataKey,
               e.message());
    }
    check_same_structure(path, file->path(), m.config, saved);
  }

  std::vector<std::string> missing, wrong_shape, wrong_dtype, extra;
  std::set<std::string> expected;
  for (const ParamSpec& spec : llama_param_specs(m.config)) {
    expected.insert(spec.name);
    const SafetensorInfo* info = w.find(spec.name);
    if (!info) {
      missing.push_back(spec.name);
    } else if (info->shape != spec.shape) {
      wrong_shape.push_back(fmt::format("{} (expected {}, found {})", spec.name,
                                        shape_str(spec.shape), shape_str(info->shape)));
    } else if (info->dtype != "F32" && info->dtype != "BF16" && info->dtype != "F16") {
      wrong_dtype.push_back(spec.name + " (" + info->dtype + ")");
    }
  }
  for (const SafetensorInfo* tp : w.tensors()) {
    const SafetensorInfo& t = *tp;
    if (expected.count(t.name)) continue;
    // Tolerated extras, both ignored exactly as transformers ignores them: a tied model's
    // lm_head (some exporters write the copy; with tying the embedding is used), and the
    // rotary inverse-frequency buffers old Llama checkpoints carry (recomputed from rope_theta).
    if (t.name == "lm_head.weight" && m.config.tie_word_embeddings) continue;
    if (t.name.ends_with(".rotary_emb.inv_freq")) continue;
    extra.push_back(t.name);
  }
  const std::string what = w.sharded() ? "the shards of " + w.source() : w.source();
  TSP_CHECK(missing.empty(),
            "{}: {} lack{} {} of the {} tensors config.json implies: {} (does config.json belong "
            "to these weights?)",
            path, what, w.sharded() ? "" : "s", missing.size(), expected.size(),
            first_few(missing));
  TSP_CHECK(wrong_shape.empty(), "{}: {} tensors have the wrong shape for config.json: {}", path,
            wrong_shape.size(), first_few(wrong_shape));
  TSP_CHECK(wrong_dtype.empty(), "{}: unsupported weight dtypes (F32, BF16 or F16 are read): {}",
            path, first_few(wrong_dtype));
  TSP_CHECK(extra.empty(),
            "{}: {} ha{} {} tensors config.json does not describe: {} (is num_hidden_layers or "
            "tie_word_embeddings right?)",
            path, what, w.sharded() ? "ve" : "s", extra.size(), first_few(extra));
  return m;
}

// Atomicity: each file is written under a temporary name, fsynced and renamed (io::AtomicFile),
// so neither file is ever torn. model.safetensors is published first and config.json second; a
// save killed between the two renames leaves the new weights next to the old config.json. That
// pair is always detected by open_model_dir when the structure changed: the weights carry their
// own config in the metadata and any structural difference (or a shape difference) is an error,
// while a re-save with the same structure is a consistent pair anyway (config.json's other
// fields, e.g. rope_theta, may be edited by hand and are not compared).
void save_model_dir(const std::string& path, const LlamaConfig& config,
                    const std::function<TensorView(const ParamSpec&)>& get) {
  config.validate();
  std::error_code ec;
  fs::create_directories(path, ec);
  TSP_CHECK(!ec && fs::is_directory(path), "cannot create model directory {}: {}", path,
            ec ? ec.message() : "a file of that name exists");
  const DType store = config.torch_dtype == "bfloat16" ? DType::BF16 : DType::F32;
  const std::vector<ParamSpec> specs = llama_param_specs(config);

  // The header is computed from the specs alone, so the data can be streamed tensor by tensor.
  std::vector<io::HeaderEntry> entries;
  for (const ParamSpec& s : specs) entries.push_back({s.name, store, s.shape});
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"},  // transformers refuses safetensors files without it
      {kConfigMetadataKey, config.to_json_string()}};
  const std::string header = io::safetensors_header(entries, metadata);

  const fs::path dir(path);
  io::AtomicFile weights((dir / "model.safetensors").string());
  weights.write(header.data(), header.size());
  for (const ParamSpec& s : specs) {
    const TensorView v = get(s);
    TSP_CHECK(v.shape() == s.shape, "save {}: parameter {} has shape {}, expected {}", path, s.name,
              shape_str(v.shape()), shape_str(s.shape));
    TSP_CHECK(v.dtype() == DType::F32 || v.dtype() == DType::BF16,
              "save {}: parameter {} is {}; expected f32 (or bf16)", path, s.name,
              dtype_name(v.dtype()));
    // A checkpoint of NaN/Inf weights would replace a good one with one nothing can use.
    const NonFinite bad = find_non_finite(v);
    TSP_CHECK(bad.count == 0,
              "save {}: parameter {} holds {} non-finite value{} (the first is {} at element {}); "
              "refusing to write it, the previous files in {} are unchanged",
              path, s.name, bad.count, bad.count == 1 ? "" : "s", bad.value, bad.first, path);
    weights.write_converted(v.data(), v.dtype(), store, v.numel());
  }
  weights.commit();

  const std::string text = config.to_json_string();
  io::AtomicFile cfg((dir / "config.json").string());
  cfg.write(text.data(), text.size());
  cfg.commit();
}

}  // namespace tsp
