// The Llama parameter set with Hugging Face names, and model directories (config.json +
// model.safetensors, or safetensors shards with model.safetensors.index.json) as Hugging Face
// writes them.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
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

// The weights of a model directory, in one file or sharded as Hugging Face saves large models:
// model.safetensors, or model.safetensors.index.json whose "weight_map" names the shard file of
// every tensor ({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors", ...}}).
// Opening validates the index against the shards (every listed file exists and holds the
// tensors mapped to it, no tensor is stored twice or left out of the index) with errors naming
// the file. Reads go to the tensor's shard and check every value read is finite: a NaN or Inf
// weight is reported with the file, the tensor and the element instead of flowing into a run.
class ModelWeights {
 public:
  // Opens model.safetensors in dir if present (as transformers, it takes precedence over an
  // index), else model.safetensors.index.json and its shards.
  explicit ModelWeights(const std::string& dir);
  ~ModelWeights();
  bool sharded() const { return sharded_; }
  // "model.safetensors" or "model.safetensors.index.json": for messages.
  const std::string& source() const { return source_; }
  const std::vector<std::unique_ptr<SafetensorsReader>>& files() const { return files_; }
  // Every tensor of every file, in file order.
  std::vector<const SafetensorInfo*> tensors() const;
  const SafetensorInfo* find(const std::string& name) const;  // nullptr when absent
  // The file holding a tensor (nullptr when absent).
  const SafetensorsReader* file_of(const std::string& name) const;
  // Metadata of the first file (shards written together carry the same).
  const std::map<std::string, std::string>& metadata() const;
  // As SafetensorsReader::read / read_rows, into F32 or BF16, then every value is checked finite.
  void read(const std::string& name, TensorView dst) const;
  void read_rows(const std::string& name, int64_t row_begin, int64_t row_end, TensorView dst) const;

 private:
  bool sharded_ = false;
  std::string source_;
  std::vector<std::unique_ptr<SafetensorsReader>> files_;
  std::map<std::string, const SafetensorsReader*> where_;
};

// The non-finite values (NaN, ±Inf) of an F32 or BF16 tensor: how many, and the first one's
// flat index and value. One pass; integer tensors have none.
struct NonFinite {
  int64_t count = 0;
  int64_t first = -1;
  float value = 0;
};
NonFinite find_non_finite(TensorView t);

// A Hugging Face model directory opened for reading: config.json parsed and validated, the
// weights opened (one file or shards), and every expected tensor checked present with the right
// shape (errors name the directory, the tensor, expected and found shapes, and what to do).
struct ModelDir {
  std::string path;
  LlamaConfig config;
  std::unique_ptr<ModelWeights> weights;
};
ModelDir open_model_dir(const std::string& path);

// Writes config.json and model.safetensors (tensors in canonical order, dtype per
// config.torch_dtype) atomically into path (created if needed: temporary files, then rename).
// get(spec) returns the full f32 tensor of each parameter, called once per parameter in canonical
// order; the returned view only needs to live until the next call (one tensor in memory at a time).
// A parameter holding NaN or Inf is refused by name before anything replaces the old files.
void save_model_dir(const std::string& path, const LlamaConfig& config,
                    const std::function<TensorView(const ParamSpec&)>& get);

}  // namespace tsp
