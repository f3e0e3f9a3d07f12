// Llama-style decoder configuration, read from and written to Hugging Face config.json keys.
#pragma once

#include <cstdint>
#include <string>

namespace tsp {

struct LlamaConfig {
  int64_t hidden_size = 256;        // h
  int64_t intermediate_size = 688;  // FFN width (F·h)
  int64_t num_attention_heads = 4;  // n_h
  int64_t num_key_value_heads = 4;  // n_kv (GQA when < n_h)
  int64_t num_hidden_layers = 2;    // L
  int64_t vocab_size = 256;         // V
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  std::string torch_dtype =
      "float32";  // storage dtype of model.safetensors ("float32" | "bfloat16")

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  int64_t gqa_group() const { return num_attention_heads / num_key_value_heads; }  // g
  int64_t kv_dim() const { return num_key_value_heads * head_dim(); }
  // Number of parameters (embedding, blocks, final norm, LM head unless tied). Every product is
  // checked: throws tsp::Error naming the keys when it does not fit in 64 bits.
  int64_t num_parameters() const;

  // Throws tsp::Error naming the offending key when the configuration is impossible
  // (non-positive sizes, h not divisible by n_h, n_h not divisible by n_kv, odd head_dim,
  // vocab_size beyond 32-bit ids, a parameter count or its f32 bytes beyond 64 bits).
  void validate() const;

  static LlamaConfig from_json_string(const std::string& text);  // unknown keys are ignored
  static LlamaConfig from_file(const std::string& path);         // clear error if missing/malformed
  std::string to_json_string() const;  // with "architectures", "model_type"
};

// Preset shapes by name for the planner and examples: "7b" (the paper's model: h=4096, L=32,
// 32 q / 32 kv heads, SwiGLU 4h = 16384, V=32000, bf16), "tiny" (tests), "demo" (the training
// demo).
LlamaConfig llama_preset(const std::string& name);

}  // namespace tsp
