// Pieces shared by the inference engines (src/infer/*.cpp): this rank's weight shards, the K/V
// cache, the balanced zigzag split of a prompt of any length, the log-sum-exp merge of partial
// attention across ranks, and the logits of one position.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "parallel/layout_common.h"
#include "tsp/infer/engine.h"
#include "tsp/model/block.h"

namespace tsp::infer {

// A padded key position nobody sees (attention: key j visible iff k_pos[j] <= q_pos[i]).
inline constexpr int64_t kNoPosition = std::numeric_limits<int64_t>::max();

// ---- Weights: this rank's shard of each parameter it holds, in MemCategory::Weights ------------
class WeightShards {
 public:
  explicit WeightShards(const LlamaConfig& c);
  void hold(int param, ShardMap map);  // declare before load(); at most once per parameter
  void load(const WeightSource& src);  // allocates and reads every declared shard
  float* w(int param) const;           // throws if not held
  Range range(int param) const;        // rows / columns of the full tensor held
  const ParamIndex& idx() const { return idx_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  int64_t bytes() const;

 private:
  std::vector<ParamSpec> specs_;
  ParamIndex idx_;
  std::vector<ShardMap> maps_;
  std::vector<bool> held_;
  std::vector<Tensor> values_;
};

// ---- K/V cache: per layer [capacity, heads, d] keys and values (after RoPE) of the tokens this
// rank owns, in MemCategory::Activations, with their global positions. -----------------------
class KvCache {
 public:
  void reset(int64_t layers, int64_t capacity, int64_t heads, int64_t d);
  // Reserves the next slot for a token at `pos` (in every layer); returns its index.
  int64_t append(int64_t pos);
  float* k(int64_t layer, int64_t slot = 0) { return k_[layer].f32() + slot * heads_ * d_; }
  float* v(int64_t layer, int64_t slot = 0) { return v_[layer].f32() + slot * heads_ * d_; }
  // Copies heads [h0, h0 + hn) of n tokens, src [n, hn, d], into slots [slot, slot + n).
  void put(int64_t layer, int64_t slot, int64_t h0, int64_t hn, int64_t n, const float* k_src,
           const float* v_src);
  const int64_t* positions() const { return pos_.data(); }
  int64_t size() const { return static_cast<int64_t>(pos_.size()); }
  int64_t capacity() const { return capacity_; }
  int64_t bytes() const;  // allocated (= what the memory tracker sees)

 private:
  std::vector<Tensor> k_, v_;
  std::vector<int64_t> pos_;
  int64_t capacity_ = 0, heads_ = 0, d_ = 0;
};

// ---- Balanced zigzag split of a prompt of P tokens over D ranks --------------------------------
// Chunk boundaries b_i = i·P/(2D) (floor), rank p holds chunks p and 2D-1-p: the training map
// (zigzag_positions) whenever 2D divides P, and within two tokens of balanced otherwise. Ranks
// compute on n_max rows (their tokens, then zero padding) so the K/V all-gather has equal counts;
// padding keys sit at kNoPosition, so no query ever sees them.
struct PromptSplit {
  std::vector<int64_t> pos;           // [n_local] global positions of this rank's tokens
  int64_t n_max = 0;                  // the largest n_local over the ranks
  std::vector<int64_t> q_pos;         // [n_max] pos, then 0 for padding rows (RoPE of zeros)
  std::vector<int64_t> gathered_pos;  // [D·n_max] key positions of the all-gathered K/V
  int last_owner = 0;                 // rank holding position P-1
  int64_t last_local = 0;             // its index there
  int64_t n_local() const { return static_cast<int64_t>(pos.size()); }
};
PromptSplit split_prompt(int64_t P, int D, int p);

// Decode tokens appended after the prompt go round-robin: token j (0-based) to rank j mod D.
inline int decode_owner(int64_t j, int D) {
  return static_cast<int>(j % D);
}
// How many of the first `extra` decode tokens rank p receives.
inline int64_t decode_share(int64_t extra, int D, int p) {
  return extra / D + (p < extra % D ? 1 : 0);
}

// ---- Attention of new queries against this rank's cache, merged over the group ----------------
// q [n, hq, d] at q_pos against the cache (all heads): o [n, hq, d], lse [n, hq] (=). An empty
// cache contributes nothing (o = 0, lse = -inf), so the merge stays exact.
void attend_cache(const block::AttnDims& a, KvCache& cache, int64_t layer, const float* q,
                  const int64_t* q_pos, int64_t n, float* o, float* lse);
// Exact merge over the group: every rank contributes (o, lse) of its key set; on return every
// rank holds the attention over the union (merged in rank order, so identical everywhere).
// One all-gather of n·hq·(d+1) floats per rank.
void merge_over_group(Communicator& c, float* o, float* lse, int64_t n, int64_t hq, int64_t d);

// ---- Output head of one position ---------------------------------------------------------------
// xn [h] final-normed -> logits [V] on every rank: head [V/D, h] is this rank's vocabulary shard
// (rows [v0, v0 + V/D)), the shards' logits are all-gathered (nothing moves when D = 1 or when the
// head is whole, `sharded` false).
std::vector<float> head_logits(Communicator& c, const float* xn, const float* head, int64_t h,
                               int64_t V, bool sharded);

// The base of every engine: the group communicator, the weights, the cache, and the checks.
class EngineBase : public Engine {
 public:
  std::string name() const override { return name_; }
  const LlamaConfig& config() const override { return config_; }
  int degree() const override { return D_; }
  Communicator& group() override { return *group_; }
  void load(const WeightSource& src) override { w_.load(src); }
  int64_t cached_tokens() const override { return cache_.size(); }
  int64_t kv_cache_bytes() const override { return cache_.bytes(); }

 protected:
  // single: every rank on its own (a one-rank group); others: all ranks of world.
  EngineBase(std::string name, const LlamaConfig& config, Communicator& world, bool one_rank);
  // Checks prompt / positions against the model before a prefill; remembers the sequence length.
  void begin(const std::vector<int32_t>& prompt, int64_t extra);
  // The position of the next decode token (and that the cache has room for it).
  int64_t next_decode_position();
  // Tensor-parallel shards of layer weights (head group p, FFN slice p, norms whole).
  void hold_layer_shards();
  void hold_whole(int param) { w_.hold(param, ShardMap::whole()); }
  block::AttnWeights attn_weights(int layer) const;
  block::MlpWeights mlp_weights(int layer) const;
  const ParamIndex::Layer& P(int layer) const { return w_.idx().layers[layer]; }
  int head_param() const;  // lm_head, or the embedding when tied

  std::string name_;
  LlamaConfig config_;
  std::unique_ptr<Communicator> group_;
  int D_ = 1, p_ = 0;
  WeightShards w_;
  KvCache cache_;
  int64_t seq_len_ = 0;  // positions used so far (prompt + decoded)
  int64_t max_len_ = 0;  // prompt + extra
  int64_t decoded_ = 0;  // decode() calls since prefill
};

std::unique_ptr<Engine> make_tensor_parallel_engine(const LlamaConfig& c, Communicator& world,
                                                    bool single);
std::unique_ptr<Engine> make_sp_engine(const LlamaConfig& c, Communicator& world);
std::unique_ptr<Engine> make_tsp_engine(const LlamaConfig& c, Communicator& world);

}  // namespace tsp::infer
