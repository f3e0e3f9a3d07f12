#include "infer/common.h"

#include <algorithm>
#include <cassert>
#include <cstring>

#include "tsp/core/limits.h"
#include "tsp/ops/attention.h"
#include "tsp/ops/ops.h"

namespace tsp::infer {

// ---- WeightShards ------------------------------------------------------------------------------

WeightShards::WeightShards(const LlamaConfig& c)
    : specs_(llama_param_specs(c)),
      idx_(specs_),
      maps_(specs_.size()),
      held_(specs_.size(), false),
      values_(specs_.size()) {}

void WeightShards::hold(int param, ShardMap map) {
  TSP_CHECK(param >= 0 && param < static_cast<int>(specs_.size()), "no parameter {}", param);
  TSP_CHECK(!held_[param], "parameter {} declared twice", specs_[param].name);
  held_[param] = true;
  maps_[param] = map;
}

void WeightShards::load(const WeightSource& src) {
  for (size_t i = 0; i < specs_.size(); ++i) {
    if (!held_[i]) continue;
    if (values_[i].empty())
      values_[i] = Tensor::f32(maps_[i].shard_shape(specs_[i].shape), MemCategory::Weights);
    load_shard(src, specs_[i], maps_[i], values_[i]);
  }
}

float* WeightShards::w(int param) const {
  TSP_CHECK(param >= 0 && param < static_cast<int>(specs_.size()) && held_[param] &&
                !values_[param].empty(),
            "inference engine: parameter {} is not held or not loaded (call load() first)",
            param >= 0 && param < static_cast<int>(specs_.size()) ? specs_[param].name : "?");
  return values_[param].f32();
}

Range WeightShards::range(int param) const {
  return maps_.at(param).range(specs_[param].shape);
}

int64_t WeightShards::bytes() const {
  int64_t b = 0;
  for (const Tensor& t : values_) b += static_cast<int64_t>(t.nbytes());
  return b;
}

// ---- KvCache -----------------------------------------------------------------------------------

void KvCache::reset(int64_t layers, int64_t capacity, int64_t heads, int64_t d) {
  // K and V of every layer, f32: checked before anything is allocated (capacity grows with
  // --max-new).
  require_memory(checked_product({2, layers, capacity, heads, d, 4}, "generate: K/V cache bytes"),
                 fmt::format("generate: a K/V cache of {} positions", capacity),
                 "use a smaller --max-new or a shorter prompt, or more ranks (sp, tsp)");
  k_.clear();
  v_.clear();
  pos_.clear();
  pos_.reserve(capacity);
  capacity_ = capacity;
  heads_ = heads;
  d_ = d;
  for (int64_t l = 0; l < layers; ++l) {
    k_.push_back(Tensor::f32({capacity, heads, d}, MemCategory::Activations));
    v_.push_back(Tensor::f32({capacity, heads, d}, MemCategory::Activations));
  }
}

int64_t KvCache::append(int64_t pos) {
  TSP_CHECK(size() < capacity_,
            "K/V cache full ({} tokens reserved by prefill); decode() was called more often than "
            "the `extra` passed to prefill()",
            capacity_);
  pos_.push_back(pos);
  return size() - 1;
}

void KvCache::put(int64_t layer, int64_t slot, int64_t h0, int64_t hn, int64_t n,
                  const float* k_src, const float* v_src) {
  assert(slot + n <= capacity_ && h0 + hn <= heads_);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(k(layer, slot + i) + h0 * d_, k_src + i * hn * d_, sizeof(float) * hn * d_);
    std::memcpy(v(layer, slot + i) + h0 * d_, v_src + i * hn * d_, sizeof(float) * hn * d_);
  }
}

int64_t KvCache::bytes() const {
  int64_t b = 0;
  for (size_t l = 0; l < k_.size(); ++l) b += k_[l].nbytes() + v_[l].nbytes();
  return b;
}

// ---- Prompt split ------------------------------------------------------------------------------

PromptSplit split_prompt(int64_t P, int D, int p) {
  TSP_CHECK(P >= 1 && D >= 1 && p >= 0 && p < D, "split_prompt: P={} D={} p={}", P, D, p);
  auto bound = [&](int64_t i) { return i * P / (2 * D); };
  auto chunks_of = [&](int r) {
    std::vector<int64_t> pos;
    for (int64_t c : {static_cast<int64_t>(r), static_cast<int64_t>(2 * D - 1 - r)})
      for (int64_t t = bound(c); t < bound(c + 1); ++t) pos.push_back(t);
    return pos;
  };
  PromptSplit s;
  s.pos = chunks_of(p);
  std::vector<std::vector<int64_t>> all(D);
  for (int r = 0; r < D; ++r) {
    all[r] = chunks_of(r);
    s.n_max = std::max<int64_t>(s.n_max, static_cast<int64_t>(all[r].size()));
  }
  s.q_pos.assign(s.n_max, 0);
  std::copy(s.pos.begin(), s.pos.end(), s.q_pos.begin());
  s.gathered_pos.assign(D * s.n_max, kNoPosition);
  for (int r = 0; r < D; ++r)
    for (size_t i = 0; i < all[r].size(); ++i) {
      s.gathered_pos[r * s.n_max + i] = all[r][i];
      if (all[r][i] == P - 1) {
        s.last_owner = r;
        s.last_local = static_cast<int64_t>(i);
      }
    }
  return s;
}

// ---- Attention against the cache, merge over the group ----------------------------------------

void attend_cache(const block::AttnDims& a, KvCache& cache, int64_t layer, const float* q,
                  const int64_t* q_pos, int64_t n, float* o, float* lse) {
  if (cache.size() == 0) {  // no key here: the neutral element of the merge
    std::fill(o, o + n * a.hq * a.d, 0.f);
    std::fill(lse, lse + n * a.hq, -std::numeric_limits<float>::infinity());
    return;
  }
  block::attention_forward(a, 1, n, cache.size(), q, cache.k(layer), cache.v(layer), q_pos,
                           cache.positions(), o, lse);
}

void merge_over_group(Communicator& c, float* o, float* lse, int64_t n, int64_t hq, int64_t d) {
  const int D = c.size();
  if (D == 1) return;
  const int64_t no = n * hq * d, nl = n * hq, blk = no + nl;
  Tensor mine = Tensor::f32({blk}, MemCategory::Comm);
  Tensor all = Tensor::f32({D, blk}, MemCategory::Comm);
  std::memcpy(mine.f32(), o, sizeof(float) * no);
  std::memcpy(mine.f32() + no, lse, sizeof(float) * nl);
  c.all_gather(mine.data(), all.data(), blk, DType::F32);
  // Rank order on every rank: the same floating-point operations, the same bits everywhere.
  std::memcpy(o, all.f32(), sizeof(float) * no);
  std::memcpy(lse, all.f32() + no, sizeof(float) * nl);
  for (int r = 1; r < D; ++r) {
    const float* part = all.f32() + r * blk;
    attention_merge(o, lse, part, part + no, n, hq, d);
  }
}

// ---- Output head -------------------------------------------------------------------------------

std::vector<float> head_logits(Communicator& c, const float* xn, const float* head, int64_t h,
                               int64_t V, bool sharded) {
  std::vector<float> logits(V);
  if (!sharded || c.size() == 1) {
    linear_forward(xn, head, logits.data(), 1, h, V);
    return logits;
  }
  const int64_t Vs = V / c.size();
  std::vector<float> mine(Vs);
  linear_forward(xn, head, mine.data(), 1, h, Vs);
  c.all_gather(mine.data(), logits.data(), Vs, DType::F32);  // shards in vocabulary order
  return logits;
}

// ---- EngineBase --------------------------------------------------------------------------------

EngineBase::EngineBase(std::string name, const LlamaConfig& config, Communicator& world,
                       bool one_rank)
    : name_(std::move(name)), config_(config), w_(config) {
  config_.validate();
  group_ = world.split(one_rank ? world.rank() : 0, world.rank());
  D_ = group_->size();
  p_ = group_->rank();
}

void EngineBase::begin(const std::vector<int32_t>& prompt, int64_t extra) {
  validate_request(config_, prompt, extra + 1);
  group_->check_same(static_cast<int64_t>(prompt.size()), "prompt length");
  group_->check_same(extra, "decode steps");
  seq_len_ = static_cast<int64_t>(prompt.size());
  max_len_ = seq_len_ + extra;
  decoded_ = 0;
}

int64_t EngineBase::next_decode_position() {
  TSP_CHECK(seq_len_ > 0, "{} engine: decode() before prefill()", name_);
  TSP_CHECK(seq_len_ < max_len_,
            "{} engine: decode() beyond the {} positions reserved by prefill (prompt + extra)",
            name_, max_len_);
  return seq_len_;
}

void EngineBase::hold_layer_shards() {
  const ParamIndex& I = w_.idx();
  for (const ParamIndex::Layer& l : I.layers) {
    hold_whole(l.input_norm);
    hold_whole(l.post_norm);
    for (int prm : {l.wq, l.wk, l.wv, l.wg, l.wu}) w_.hold(prm, ShardMap::rows(D_, p_));
    for (int prm : {l.wo, l.wd}) w_.hold(prm, ShardMap::cols(D_, p_));
  }
  hold_whole(I.final_norm);
}

block::AttnWeights EngineBase::attn_weights(int layer) const {
  const ParamIndex::Layer& l = P(layer);
  return {w_.w(l.wq), w_.w(l.wk), w_.w(l.wv), w_.w(l.wo)};
}

block::MlpWeights EngineBase::mlp_weights(int layer) const {
  const ParamIndex::Layer& l = P(layer);
  return {w_.w(l.wg), w_.w(l.wu), w_.w(l.wd), w_.range(l.wg).size()};
}

int EngineBase::head_param() const {
  return config_.tie_word_embeddings ? w_.idx().embed : w_.idx().lm_head;
}

}  // namespace tsp::infer
