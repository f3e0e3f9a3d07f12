// The Llama parameter set with Hugging Face names, and model directories (config.json +
// model.safetensors) as Hugging Face writes them.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tsp/core/tensor.h"
#include "tsp/model/config.h"
#include "tsp/model/safetensors.h"

namespace tsp {

enum class ParamKind {
  Embedding,
  InputNorm,
  Wq,
  Wk,
  Wv,
  Wo,
  PostNorm,
  Wgate,
  Wup,
  Wdown,
  FinalNorm,
  LmHead
};

struct ParamSpec {
  std::string name;  // "model.layers.3.self_attn.q_proj.weight"
  ParamKind kind;
  int layer = -1;  // -1 for embedding, final norm, LM head
  Shape shape;     // [out, in] for projections, [h] for norms, [V, h] for embedding / LM head
  // L of the model (set by llama_param_specs): init scales o_proj and down_proj by 1/sqrt(2L).
  int num_layers = 0;
};

// Every parameter in canonical order: embed_tokens, per layer (input_layernorm, q, k, v, o,
// post_attention_layernorm, gate, up, down), norm, lm_head (absent when tied).
std::vector<ParamSpec> llama_param_specs(const LlamaConfig& c);

// Deterministic random initialisation (seeded; identical on every machine): projections
// N(0, 0.02) (o_proj and down_proj scaled by 1/sqrt(2L) as in GPT-2), norms 1. The value of a
// tensor depends only on (seed, name, element index), so any rank can generate any shard.
void init_param(const ParamSpec& spec, uint64_t seed, TensorView dst);
// Rows [row_begin, row_end) of init_param's tensor, without generating the rest.
void init_param_rows(const ParamSpec& spec, uint64_t seed, int64_t row_begin, int64_t row_end,
                     TensorView dst);

// A Hugging Face model directory opened for reading: config.json parsed and validated,
// model.safetensors opened, and every expected tensor checked present with the right shape
// (errors name the directory, the tensor, expected and found shapes, and what to do).
struct ModelDir {
  std::string path;
  LlamaConfig config;
  std::unique_ptr<SafetensorsReader> weights;
};
ModelDir open_model_dir(const std::string& path);

// Writes config.json and model.safetensors (tensors in canonical order, dtype per
// config.torch_dtype) atomically into path (created if needed: temporary files, then rename).
// get(spec) returns the full f32 tensor of each parameter, called once per parameter in canonical
// order; the returned view only needs to live until the next call (one tensor in memory at a time).
void save_model_dir(const std::string& path, const LlamaConfig& config,
                    const std::function<TensorView(const ParamSpec&)>& get);

}  // namespace tsp
