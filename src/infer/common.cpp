#include "infer/common.h"

#include <algorithm>

#include "tsp/comm/device_comm.h"
#include "tsp/core/limits.h"

namespace tsp::infer {

// ---- WeightShards ------------------------------------------------------------------------------

WeightShards::WeightShards(const LlamaConfig& c, Backend& be, DType dtype)
    : specs_(llama_param_specs(c)),
      idx_(specs_),
      be_(be),
      dtype_(dtype),
      maps_(specs_.size()),
      held_(specs_.size(), false),
      values_(specs_.size()) {
  TSP_CHECK(dtype == DType::F32 || dtype == DType::BF16,
            "inference engine: the compute dtype must be f32 or bf16, not {}", dtype_name(dtype));
}

void WeightShards::hold(int param, ShardMap map) {
  TSP_CHECK(param >= 0 && param < static_cast<int>(specs_.size()), "no parameter {}", param);
  TSP_CHECK(!held_[param], "parameter {} declared twice", specs_[param].name);
  held_[param] = true;
  maps_[param] = map;
}

void WeightShards::load(const WeightSource& src) {
  const Device dev = be_.device();
  for (size_t i = 0; i < specs_.size(); ++i) {
    if (!held_[i]) continue;
    const Shape shape = maps_[i].shard_shape(specs_[i].shape);
    if (values_[i].empty()) values_[i] = Tensor(shape, dtype_, MemCategory::Weights, dev);
    if (dtype_ == DType::F32 && dev.is_cpu()) {  // read in place
      load_shard(src, specs_[i], maps_[i], values_[i].view());
      continue;
    }
    // Sources give fp32 on the host: read there, move to the device, round once to the dtype.
    Tensor host = Tensor::f32(shape, MemCategory::Workspace);
    load_shard(src, specs_[i], maps_[i], host.view());
    if (dev.is_cpu()) {
      be_.copy(host.view(), values_[i].view());
    } else if (dtype_ == DType::F32) {  // fp32 on a device: one upload
      be_.upload(host.data(), values_[i].view());
    } else {  // bf16 on a device: upload fp32, round there (the same rounding as on the CPU)
      Tensor staged = Tensor::f32(shape, MemCategory::Workspace, dev);
      be_.upload(host.data(), staged.view());
      be_.copy(staged.view(), values_[i].view());
    }
  }
}

TensorView WeightShards::w(int param) const {
  TSP_CHECK(param >= 0 && param < static_cast<int>(specs_.size()) && held_[param] &&
                !values_[param].empty(),
            "inference engine: parameter {} is not held or not loaded (call load() first)",
            param >= 0 && param < static_cast<int>(specs_.size()) ? specs_[param].name : "?");
  return values_[param].view();
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

void KvCache::reset(Backend& be, int64_t layers, int64_t capacity, int64_t heads, int64_t d,
                    DType dtype, const MemoryPool& pool) {
  // K and V of every layer: checked before anything is allocated (capacity grows with --max-new).
  require_memory(
      checked_product({2, layers, capacity, heads, d, static_cast<int64_t>(dtype_size(dtype))},
                      "generate: K/V cache bytes"),
      fmt::format("generate: a K/V cache of {} positions", capacity),
      "use a smaller --max-new or a shorter prompt, or more ranks (sp, tsp)", pool);
  be_ = &be;
  k_.clear();
  v_.clear();
  pos_.clear();
  pos_.reserve(capacity);
  capacity_ = capacity;
  heads_ = heads;
  d_ = d;
  const Device dev = be.device();
  for (int64_t l = 0; l < layers; ++l) {
    k_.push_back(Tensor({capacity, heads, d}, dtype, MemCategory::Activations, dev));
    v_.push_back(Tensor({capacity, heads, d}, dtype, MemCategory::Activations, dev));
  }
  pos_dev_ = Tensor({std::max<int64_t>(capacity, 1)}, DType::I64, MemCategory::Workspace, dev);
}

int64_t KvCache::append(const std::vector<int64_t>& pos) {
  const int64_t n = static_cast<int64_t>(pos.size()), slot = size();
  TSP_CHECK(slot + n <= capacity_,
            "K/V cache full ({} tokens reserved by prefill); decode() was called more often than "
            "the `extra` passed to prefill()",
            capacity_);
  if (n == 0) return slot;
  pos_.insert(pos_.end(), pos.begin(), pos.end());
  be_->upload(pos.data(), pos_dev_.slice(slot, slot + n));
  return slot;
}

void KvCache::put(int64_t layer, int64_t slot, int64_t h0, TensorView k_src, TensorView v_src) {
  const int64_t n = k_src.dim(0), hn = k_src.dim(1);
  TSP_CHECK(slot >= 0 && slot + n <= capacity_ && h0 >= 0 && h0 + hn <= heads_ &&
                k_src.shape() == v_src.shape() && k_src.dim(2) == d_,
            "KvCache::put: {} keys of heads [{}, {}) into slot {} of a [{}, {}, {}] cache",
            shape_str(k_src.shape()), h0, h0 + hn, slot, capacity_, heads_, d_);
  if (n == 0) return;
  // Row i of the source (hn·d) lands at slot + i, heads h0.. of the cache (stride heads·d).
  const int64_t row = heads_ * d_, off = (slot * heads_ + h0) * d_, span = (n - 1) * row + hn * d_;
  be_->copy_2d(k_src, hn * d_, k_[layer].window(off, {span}), row, n, hn * d_);
  be_->copy_2d(v_src, hn * d_, v_[layer].window(off, {span}), row, n, hn * d_);
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

void attend_cache(Backend& be, const block::AttnDims& a, const KvCache& cache, int64_t layer,
                  TensorView q, TensorView q_pos, TensorView o, TensorView lse) {
  if (cache.size() == 0) {  // no key here: the neutral element of the merge
    be.zero(o);
    be.fill(lse, -std::numeric_limits<float>::infinity());
    return;
  }
  block::attention_forward(be, a, 1, q, cache.k(layer), cache.v(layer), q_pos, cache.positions(), o,
                           lse);
}

GroupMerge::GroupMerge(Backend& be, Communicator& c, int64_t n, int64_t hq, int64_t d, DType dtype)
    : be_(be), c_(c) {
  const int D = c.size();
  if (D == 1) return;
  const Device dev = be.device();
  all_o_ = Tensor({D, n, hq, d}, dtype, MemCategory::Comm, dev);
  all_lse_ = Tensor::f32({D, n, hq}, MemCategory::Comm, dev);
  acc_ = Tensor::f32({n, hq, d}, MemCategory::Workspace, dev);
}

void GroupMerge::merge(TensorView o, TensorView lse) {
  const int D = c_.size();
  if (D == 1) return;
  const int64_t no = o.numel(), nl = lse.numel();
  TSP_CHECK(all_o_.numel() == D * no && all_lse_.numel() == D * nl && o.dtype() == all_o_.dtype(),
            "GroupMerge: o {} {} and lse {} do not match the buffers", dtype_name(o.dtype()),
            shape_str(o.shape()), shape_str(lse.shape()));
  c_.all_gather(o.data(), all_o_.data(), no, o.dtype());
  c_.all_gather(lse.data(), all_lse_.data(), nl, DType::F32);
  const Shape os = o.shape(), ls = lse.shape();
  // Rank order on every rank, in fp32; o is rounded to its dtype once, at the end.
  be_.copy(all_o_.window(0, os), acc_.view());
  be_.copy(all_lse_.window(0, ls), lse);
  for (int r = 1; r < D; ++r)
    be_.attention_merge(acc_.view(), lse, all_o_.window(r * no, os), all_lse_.window(r * nl, ls));
  be_.copy(acc_.view(), o);
}

// ---- Output head -------------------------------------------------------------------------------

std::vector<float> head_logits(Backend& be, Communicator& c, TensorView xn, TensorView head,
                               int64_t V, bool sharded) {
  const Device dev = be.device();
  Tensor logits = Tensor::f32({1, V}, MemCategory::Workspace, dev);
  if (!sharded || c.size() == 1) {
    be.linear_forward(xn, head, logits.view(), /*accumulate=*/false);
  } else {
    Tensor mine = Tensor::f32({1, head.dim(0)}, MemCategory::Comm, dev);
    be.linear_forward(xn, head, mine.view(), false);
    c.all_gather(mine.data(), logits.data(), mine.numel(), DType::F32);  // vocabulary order
  }
  return be.host_vector<float>(logits.view());  // the step's one download
}

// ---- EngineBase --------------------------------------------------------------------------------

EngineBase::EngineBase(std::string name, const LlamaConfig& config, Communicator& world,
                       bool one_rank, DType dtype, Device device)
    : name_(std::move(name)),
      config_(config),
      be_(backend_for(device)),
      dtype_(dtype),
      w_(config, be_, dtype) {
  config_.validate();
  // The data path on a GPU: NCCL or MPI staging (comm/device_comm.h); on the CPU the split itself.
  group_ = make_data_communicator(world.split(one_rank ? world.rank() : 0, world.rank()), device);
  // What the K/V cache is checked against (KvCache::reset): every rank of world builds its engine.
  memory_ = memory_pool(device, world);
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
  return {w_.w(l.wg), w_.w(l.wu), w_.w(l.wd)};
}

int EngineBase::head_param() const {
  return config_.tie_word_embeddings ? w_.idx().embed : w_.idx().lm_head;
}

}  // namespace tsp::infer
