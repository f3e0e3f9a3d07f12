// Pieces shared by the inference engines (src/infer/*.cpp): this rank's weight shards, the K/V
// cache, the balanced zigzag split of a prompt of any length, the log-sum-exp merge of partial
// attention across ranks, and the logits of one position.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "parallel/layout_common.h"
#include "tsp/core/limits.h"
#include "tsp/infer/engine.h"
#include "tsp/model/block.h"

namespace tsp::infer {

// A padded key position nobody sees (attention: key j visible iff k_pos[j] <= q_pos[i]).
inline constexpr int64_t kNoPosition = std::numeric_limits<int64_t>::max();

// ---- Weights: this rank's shard of each parameter it holds, in MemCategory::Weights ------------
// Held in the compute dtype only: read as fp32 and rounded once (inference needs no master copy).
class WeightShards {
 public:
  WeightShards(const LlamaConfig& c, Backend& be, DType dtype);
  void hold(int param, ShardMap map);  // declare before load(); at most once per parameter
  void load(const WeightSource& src);  // allocates (once) and reads every declared shard
  TensorView w(int param) const;       // [shard shape] in the compute dtype; throws if not held
  Range range(int param) const;        // rows / columns of the full tensor held
  const ParamIndex& idx() const { return idx_; }
  const std::vector<ParamSpec>& specs() const { return specs_; }
  int64_t bytes() const;

 private:
  std::vector<ParamSpec> specs_;
  ParamIndex idx_;
  Backend& be_;
  DType dtype_;
  std::vector<ShardMap> maps_;
  std::vector<bool> held_;
  std::vector<Tensor> values_;
};

// ---- K/V cache: per layer [capacity, heads, d] keys and values (after RoPE) of the tokens this
// rank owns, in the compute dtype and MemCategory::Activations, with their global positions (on
// the host for bookkeeping, and as a device I64 [capacity] for the attention kernel). ----------
class KvCache {
 public:
  // Checks the K/V bytes against `pool` (the memory they live in, core/limits.h) first.
  void reset(Backend& be, int64_t layers, int64_t capacity, int64_t heads, int64_t d, DType dtype,
             const MemoryPool& pool);
  // Reserves the next slots for tokens at `pos` (in every layer); returns the first one's index.
  int64_t append(const std::vector<int64_t>& pos);
  // Keys / values of the cached tokens [size, heads, d], and of slots [slot, slot + n).
  TensorView k(int64_t layer) const { return k_[layer].slice(0, size()); }
  TensorView v(int64_t layer) const { return v_[layer].slice(0, size()); }
  TensorView k(int64_t layer, int64_t slot, int64_t n) const {
    return k_[layer].slice(slot, slot + n);
  }
  TensorView v(int64_t layer, int64_t slot, int64_t n) const {
    return v_[layer].slice(slot, slot + n);
  }
  // Copies heads [h0, h0 + hn) of n tokens, k_src / v_src [n, hn, d], into slots [slot, slot + n).
  void put(int64_t layer, int64_t slot, int64_t h0, TensorView k_src, TensorView v_src);
  TensorView positions() const { return pos_dev_.slice(0, size()); }  // I64 [size]
  int64_t size() const { return static_cast<int64_t>(pos_.size()); }
  int64_t capacity() const { return capacity_; }
  int64_t bytes() const;  // K and V allocated (= what the tracker sees under Activations)

 private:
  Backend* be_ = nullptr;
  std::vector<Tensor> k_, v_;
  std::vector<int64_t> pos_;
  Tensor pos_dev_;  // I64 [capacity], Workspace (bookkeeping, not K/V)
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
// q [n, hq, d] at q_pos I64 [n] against the cache (all heads): o [n, hq, d] (=), lse F32 [n, hq]
// (=). An empty cache contributes nothing (o = 0, lse = -inf), so the merge stays exact.
void attend_cache(Backend& be, const block::AttnDims& a, const KvCache& cache, int64_t layer,
                  TensorView q, TensorView q_pos, TensorView o, TensorView lse);

// Exact merge over the group: every rank contributes (o, lse) of its key set; on return every
// rank holds the attention over the union, merged in rank order (the same operations, so the
// same bits, everywhere). o travels in its dtype (an activation), lse in F32: two all-gathers of
// n·hq·d and n·hq elements. The merge runs on an F32 copy of o, rounded once at the end.
class GroupMerge {
 public:
  // Buffers for n queries of hq heads of dimension d (allocated once per prefill / decode).
  GroupMerge(Backend& be, Communicator& c, int64_t n, int64_t hq, int64_t d, DType dtype);
  void merge(TensorView o, TensorView lse);  // o [n, hq, d], lse F32 [n, hq]: (=) the union's

 private:
  Backend& be_;
  Communicator& c_;
  Tensor all_o_, all_lse_, acc_;  // [D, n, hq, d] (o's dtype), F32 [D, n, hq], F32 [n, hq, d]
};

// ---- Output head of one position ---------------------------------------------------------------
// xn [1, h] final-normed -> logits [V] on every rank, on the host (the step's one download):
// head [V/D, h] is this rank's vocabulary shard (rows [v0, v0 + V/D)), the shards' F32 logits are
// all-gathered (nothing moves when D = 1 or when the head is whole, `sharded` false).
std::vector<float> head_logits(Backend& be, Communicator& c, TensorView xn, TensorView head,
                               int64_t V, bool sharded);

// The base of every engine: the group communicator, the weights, the cache, and the checks.
class EngineBase : public Engine {
 public:
  std::string name() const override { return name_; }
  const LlamaConfig& config() const override { return config_; }
  int degree() const override { return D_; }
  Communicator& group() override { return *group_; }
  DType compute_dtype() const override { return dtype_; }
  void load(const WeightSource& src) override { w_.load(src); }
  int64_t cached_tokens() const override { return cache_.size(); }
  int64_t kv_cache_bytes() const override { return cache_.bytes(); }

 protected:
  // single: every rank on its own (a one-rank group); others: all ranks of world. Weights, the
  // residual stream and K/V in `dtype` (F32 or BF16) on `device`.
  EngineBase(std::string name, const LlamaConfig& config, Communicator& world, bool one_rank,
             DType dtype, Device device);
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
  Backend& be_;
  DType dtype_;
  std::unique_ptr<Communicator> group_;
  int D_ = 1, p_ = 0;
  WeightShards w_;
  KvCache cache_;
  MemoryPool memory_;    // where the cache lives (memory_pool of the device over world)
  int64_t seq_len_ = 0;  // positions used so far (prompt + decoded)
  int64_t max_len_ = 0;  // prompt + extra
  int64_t decoded_ = 0;  // decode() calls since prefill
};

}  // namespace tsp::infer
