// LlamaConfig <-> Hugging Face config.json. Missing optional keys take the defaults of
// transformers' LlamaConfig; keys that would change the maths in a way this project does not
// implement (rope_scaling, biases, another activation, a head_dim other than h / n_h) are
// rejected instead of silently ignored, so a model is never run with the wrong equations.
#include "tsp/model/config.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "tsp/core/error.h"
#include "tsp/core/limits.h"

namespace tsp {

namespace {

using nlohmann::json;

int64_t get_int(const json& j, const char* key) {
  auto it = j.find(key);
  TSP_CHECK(it != j.end(), "config.json: required key \"{}\" is missing", key);
  TSP_CHECK(it->is_number_integer(), "config.json: \"{}\" must be an integer, got {}", key,
            it->dump());
  return it->get<int64_t>();
}

int64_t get_int_or(const json& j, const char* key, int64_t fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  TSP_CHECK(it->is_number_integer(), "config.json: \"{}\" must be an integer, got {}", key,
            it->dump());
  return it->get<int64_t>();
}

double get_double_or(const json& j, const char* key, double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  TSP_CHECK(it->is_number(), "config.json: \"{}\" must be a number, got {}", key, it->dump());
  return it->get<double>();
}

bool get_bool_or(const json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  TSP_CHECK(it->is_boolean(), "config.json: \"{}\" must be true or false, got {}", key, it->dump());
  return it->get<bool>();
}

}  // namespace

int64_t LlamaConfig::num_parameters() const {
  // Every product is checked: a size typed by hand (--set intermediate_size=2^58) must be an
  // error naming the keys, never a wrapped-around count that looks plausible.
  const int64_t h = hidden_size, d = head_dim();
  const int64_t q = checked_product(
      {h, num_attention_heads, d}, "config: hidden_size × num_attention_heads × head_dim (q_proj)");
  const int64_t kv =
      checked_product({h, num_key_value_heads, d, 2},
                      "config: hidden_size × num_key_value_heads × head_dim (k_proj, v_proj)");
  const int64_t o = q;  // o_proj has q_proj's shape, transposed
  const int64_t mlp = checked_product(
      {intermediate_size, h, 3}, "config: intermediate_size × hidden_size (gate, up, down_proj)");
  const char* what = "config: parameters per layer";
  const int64_t block =
      checked_add(checked_add(checked_add(q, kv, what), o, what), checked_add(mlp, 2 * h, what),
                  what);  // + two RMSNorm weights
  const int64_t embed =
      checked_mul(vocab_size, h, "config: vocab_size × hidden_size (embed_tokens, lm_head)");
  const char* total = "config: number of parameters (num_hidden_layers × per-layer + embeddings)";
  int64_t n = checked_mul(num_hidden_layers, block, total);
  n = checked_add(n, embed, total);
  n = checked_add(n, h, total);  // final norm
  if (!tie_word_embeddings) n = checked_add(n, embed, total);
  return n;
}

void LlamaConfig::validate() const {
  auto positive = [](int64_t v, const char* key) {
    TSP_CHECK(v > 0, "config: {} must be positive, got {}", key, v);
  };
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(num_attention_heads, "num_attention_heads");
  positive(num_key_value_heads, "num_key_value_heads");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(vocab_size, "vocab_size");
  positive(max_position_embeddings, "max_position_embeddings");
  TSP_CHECK(hidden_size % num_attention_heads == 0,
            "config: hidden_size={} is not divisible by num_attention_heads={}; pick heads that "
            "divide the hidden size",
            hidden_size, num_attention_heads);
  TSP_CHECK(num_attention_heads % num_key_value_heads == 0,
            "config: num_attention_heads={} is not divisible by num_key_value_heads={}; GQA needs "
            "a whole number of query heads per key/value head",
            num_attention_heads, num_key_value_heads);
  TSP_CHECK(head_dim() % 2 == 0,
            "config: head_dim = hidden_size / num_attention_heads = {} is odd; RoPE rotates pairs "
            "of dimensions, so it must be even",
            head_dim());
  TSP_CHECK(std::isfinite(rms_norm_eps) && rms_norm_eps > 0,
            "config: rms_norm_eps must be a positive finite number, got {}", rms_norm_eps);
  TSP_CHECK(std::isfinite(rope_theta) && rope_theta > 0,
            "config: rope_theta must be a positive finite number, got {}", rope_theta);
  // Every layer is a set of objects (parameter specs, shards, caches): a count beyond any real
  // model (Llama 3 405B has 126) is a typo that would otherwise exhaust memory before any check.
  constexpr int64_t kMaxLayers = int64_t{1} << 16;
  TSP_CHECK(num_hidden_layers <= kMaxLayers,
            "config: num_hidden_layers={} is beyond the supported {}; check the value",
            num_hidden_layers, kMaxLayers);
  // Token ids are int32 everywhere (batches, token files, sampling).
  TSP_CHECK(vocab_size <= int64_t{1} << 31,
            "config: vocab_size={} exceeds the 2^31 ids a 32-bit token id can name", vocab_size);
  // Sizes whose products overflow (the parameter count, or its bytes in f32, beyond 64 bits)
  // cannot be allocated, written or read back: refuse them here, naming the keys (checked_*).
  checked_mul(num_parameters(), 4, "config: bytes of the parameters in float32");
  TSP_CHECK(torch_dtype == "float32" || torch_dtype == "bfloat16",
            "config: torch_dtype \"{}\" is not supported; use \"float32\" or \"bfloat16\"",
            torch_dtype);
}

LlamaConfig LlamaConfig::from_json_string(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    // Not only parse_error: a number beyond double's range (1e400) is an out_of_range.
    TSP_FAIL("config.json is not valid JSON: {}", e.what());
  }
  TSP_CHECK(j.is_object(), "config.json must hold a JSON object, got {}", j.type_name());

  // Reject what would change the model's equations (unknown keys are otherwise ignored).
  if (auto it = j.find("model_type"); it != j.end() && it->is_string()) {
    TSP_CHECK(*it == "llama", "config.json: model_type \"{}\" is not supported (only \"llama\")",
              it->get<std::string>());
  }
  if (auto it = j.find("hidden_act"); it != j.end() && !it->is_null()) {
    TSP_CHECK(it->is_string() && *it == "silu",
              "config.json: hidden_act {} is not supported (only \"silu\", i.e. SwiGLU)",
              it->dump());
  }
  if (auto it = j.find("rope_scaling"); it != j.end()) {
    TSP_CHECK(it->is_null(), "config.json: rope_scaling {} is not supported; only plain RoPE",
              it->dump());
  }
  TSP_CHECK(!get_bool_or(j, "attention_bias", false),
            "config.json: attention_bias=true is not supported (projections have no bias)");
  TSP_CHECK(!get_bool_or(j, "mlp_bias", false),
            "config.json: mlp_bias=true is not supported (projections have no bias)");

  LlamaConfig c;
  c.hidden_size = get_int(j, "hidden_size");
  c.intermediate_size = get_int(j, "intermediate_size");
  c.num_attention_heads = get_int(j, "num_attention_heads");
  c.num_hidden_layers = get_int(j, "num_hidden_layers");
  c.vocab_size = get_int(j, "vocab_size");
  // Defaults of transformers' LlamaConfig.
  c.num_key_value_heads = get_int_or(j, "num_key_value_heads", c.num_attention_heads);
  c.rms_norm_eps = get_double_or(j, "rms_norm_eps", 1e-6);
  c.rope_theta = get_double_or(j, "rope_theta", 10000.0);
  c.max_position_embeddings = get_int_or(j, "max_position_embeddings", 2048);
  c.tie_word_embeddings = get_bool_or(j, "tie_word_embeddings", false);
  c.torch_dtype = "float32";
  // transformers >= 4.56 writes "dtype"; older versions "torch_dtype".
  for (const char* key : {"dtype", "torch_dtype"}) {
    if (auto it = j.find(key); it != j.end() && !it->is_null()) {
      TSP_CHECK(it->is_string(), "config.json: \"{}\" must be a string, got {}", key, it->dump());
      c.torch_dtype = it->get<std::string>();
    }
  }
  if (auto it = j.find("head_dim"); it != j.end() && !it->is_null()) {
    TSP_CHECK(it->is_number_integer() && c.num_attention_heads > 0 &&
                  it->get<int64_t>() * c.num_attention_heads == c.hidden_size,
              "config.json: head_dim={} differs from hidden_size / num_attention_heads = {} / {}; "
              "a separate head_dim is not supported",
              it->dump(), c.hidden_size, c.num_attention_heads);
  }
  return c;
}

LlamaConfig LlamaConfig::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TSP_CHECK(in.good(), "cannot open config file {}: {}", path, std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  TSP_CHECK(!in.bad(), "error reading config file {}", path);
  try {
    return from_json_string(ss.str());
  } catch (const Error& e) {
    TSP_FAIL("{}: {}", path, e.message());
  }
}

std::string LlamaConfig::to_json_string() const {
  nlohmann::ordered_json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["hidden_act"] = "silu";
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["num_hidden_layers"] = num_hidden_layers;
  j["vocab_size"] = vocab_size;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  j["rope_scaling"] = nullptr;
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["initializer_range"] = 0.02;  // the std init_param uses for projections
  j["torch_dtype"] = torch_dtype;
  return j.dump(2) + "\n";
}

LlamaConfig llama_preset(const std::string& name) {
  LlamaConfig c;
  if (name == "7b") {
    // The paper's model: Llama-2-7B shape with a 4h SwiGLU MLP (≈8.85B parameters untied).
    c.hidden_size = 4096;
    c.num_hidden_layers = 32;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 32;
    c.intermediate_size = 16384;
    c.vocab_size = 32000;
    c.max_position_embeddings = 131072;  // the paper's 128K-token context
    c.rms_norm_eps = 1e-5;
    c.torch_dtype = "bfloat16";
  } else if (name == "tiny") {
    // Unit tests: GQA (g = 2), every dimension small; D in {1, 2} divides n_kv.
    c.hidden_size = 64;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.intermediate_size = 160;
    c.vocab_size = 256;
    c.max_position_embeddings = 512;
  } else if (name == "demo") {
    // Training demo: every sharded dimension (heads, kv heads, FFN width 704 = 8·88, vocab) is
    // divisible by 8, so all layouts run at D in {1, 2, 4, 8}. head_dim = 32.
    c.hidden_size = 256;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 8;
    c.intermediate_size = 704;
    c.vocab_size = 256;
    c.max_position_embeddings = 1024;
  } else {
    TSP_FAIL("unknown model preset \"{}\"; use one of 7b, tiny, demo", name);
  }
  c.validate();
  return c;
}

}  // namespace tsp
