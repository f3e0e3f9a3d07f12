// Inference (`tsp generate`, docs/inference.md): one engine per layout family, each keeping a K/V
// cache of the tokens it owns, and a generation loop shared by all of them.
//
//   single  whole model, whole cache on every rank (each rank an independent replica)
//   tp      Megatron: head group p and FFN slice p; cache of head group p for every token;
//           two all-reduces of the new tokens' activations per layer
//   sp      replicated weights, prompt zigzag-sharded, K/V all-gathered in prefill; each rank
//           caches its own tokens (all heads); decode merges the ranks' partial attention (lse)
//   tsp     prefill = the tsp forward (attention shards broadcast per round, K/V all-gather per
//           head group, MLP ring, vocabulary ring); each rank caches its own tokens (all heads).
//           Decode is weight-stationary: rank p applies head group p, FFN slice p and vocabulary
//           shard p to the new token's activations; partial attention over each rank's cache is
//           merged exactly with log-sum-exp weights; no weight moves during decode.
// Under sp and tsp new tokens' K/V go to ranks round-robin, so the cache stays balanced (1/D).
//
// Every engine registers itself with its layout's name (parallel/registry.h), and computes in a
// compute dtype: F32, or BF16 with the weights rounded once at load (no fp32 master copy is
// needed for inference), bf16 activations and K/V (in flight and in the cache), and fp32
// attention statistics, log-sum-exp merges, reductions of partial outputs and logits
// (docs/inference.md, "Precision").
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tsp/comm/communicator.h"
#include "tsp/core/device.h"
#include "tsp/core/tensor.h"
#include "tsp/infer/sampling.h"
#include "tsp/model/config.h"
#include "tsp/parallel/layout.h"

namespace tsp::infer {

class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string name() const = 0;
  virtual const LlamaConfig& config() const = 0;
  virtual int degree() const = 0;                  // D, ranks of the engine's group
  virtual DType compute_dtype() const = 0;         // F32 or BF16
  virtual Communicator& group() = 0;               // the D ranks that serve one sequence
  virtual void load(const WeightSource& src) = 0;  // this rank's shards only

  // Starts a sequence: reserves this rank's share of the cache for the prompt and `extra` later
  // decode() calls, runs the prompt, and returns the logits of its last position [V], identical
  // on every rank of the group. Collective over the group.
  virtual std::vector<float> prefill(const std::vector<int32_t>& prompt, int64_t extra) = 0;
  // Feeds one token at the next position; returns its logits [V] (identical on every rank).
  virtual std::vector<float> decode(int32_t token) = 0;

  virtual int64_t cached_tokens() const = 0;   // tokens whose K/V this rank holds
  virtual int64_t kv_cache_bytes() const = 0;  // bytes this rank allocated for its K/V cache
};

// The layouts with a registered engine, for messages: "single, sp, tp, tsp".
std::string supported_layouts();
// Builds the engine registered for `layout` over all ranks of `world` (single: every rank on its
// own), computing in `dtype` (F32 or BF16) on `device`. Throws tsp::Error for a layout without an
// engine (listing the supported ones), another dtype, or a model that does not split over
// world.size() ranks. `world` must outlive the engine.
std::unique_ptr<Engine> make_engine(const LlamaConfig& config, const std::string& layout,
                                    Communicator& world, DType dtype = DType::F32,
                                    Device device = Device::cpu());

// Throws tsp::Error when the prompt is empty, holds an id outside the vocabulary, or when
// prompt + max_new positions exceed max_position_embeddings; max_new must be >= 1.
void validate_request(const LlamaConfig& config, const std::vector<int32_t>& prompt,
                      int64_t max_new);

struct GenerateOptions {
  int64_t max_new = 16;
  SamplingParams sampling;
  // Called on every rank with each new token as soon as it is chosen (streaming).
  std::function<void(int32_t)> on_token;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // the generated ids (max_new of them)
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t prompt_tokens = 0, decode_steps = 0;  // decode_steps = max_new - 1 decode() calls
  int64_t kv_cache_bytes = 0;                   // this rank, at the end
  CommStats prefill_comm, decode_comm;          // this rank, on the engine's group
  double prefill_tokens_per_s() const;
  double decode_tokens_per_s() const;
};

// Prefill, then max_new - 1 decode steps. Each token is chosen on group rank 0 (sample_token)
// and broadcast, so every rank continues with the same token whatever rounding the layout has.
GenerateResult generate(Engine& engine, const std::vector<int32_t>& prompt,
                        const GenerateOptions& options);

}  // namespace tsp::infer
