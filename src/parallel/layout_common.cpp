#include "parallel/layout_common.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <map>
#include <numeric>

#include "parallel/registry.h"
#include "tsp/comm/device_comm.h"

namespace tsp {

// ---- registry and factory -----------------------------------------------------------------------

namespace {
std::vector<LayoutInfo>& layout_registry() {
  static std::vector<LayoutInfo> layouts;
  return layouts;
}
// Layout models by name (sorted), owned here for the life of the library.
std::map<std::string, std::shared_ptr<const plan::LayoutModel>>& model_registry() {
  static std::map<std::string, std::shared_ptr<const plan::LayoutModel>> models;
  return models;
}
}  // namespace

LayoutModelRegistration::LayoutModelRegistration(std::string name,
                                                 std::shared_ptr<const plan::LayoutModel> model) {
  TSP_CHECK(model, "layout model '{}' registered without a model", name);
  TSP_CHECK(!model_registry().count(name), "layout model '{}' is registered twice", name);
  for (LayoutInfo& l : layout_registry())
    if (l.name == name) l.model = model.get();
  model_registry().emplace(std::move(name), std::move(model));
}

const plan::LayoutModel* find_registered_model(const std::string& name) {
  const auto it = model_registry().find(name);
  return it == model_registry().end() ? nullptr : it->second.get();
}

std::vector<std::string> registered_model_names() {
  std::vector<std::string> out;
  for (const auto& [name, model] : model_registry()) out.push_back(name);
  return out;
}

// ---- inference engines by layout name (infer/engine.h) ----------------------------------------

namespace {
std::map<std::string, EngineFactory>& engine_registry() {
  static std::map<std::string, EngineFactory> engines;
  return engines;
}
void attach_engine(LayoutInfo& layout) {
  const auto it = engine_registry().find(layout.name);
  if (it != engine_registry().end()) layout.engine = it->second;
}
}  // namespace

EngineRegistration::EngineRegistration(std::string layout, EngineFactory make) {
  TSP_CHECK(make, "inference engine '{}' registered without a factory", layout);
  TSP_CHECK(!engine_registry().count(layout), "inference engine '{}' is registered twice", layout);
  auto& engines = engine_registry();
  engines.emplace(layout, std::move(make));
  for (LayoutInfo& l : layout_registry()) attach_engine(l);
}

const EngineFactory* find_engine(const std::string& layout) {
  const auto it = engine_registry().find(layout);
  return it == engine_registry().end() ? nullptr : &it->second;
}

std::string engine_layout_names_str() {
  std::string out;
  for (const auto& [name, make] : engine_registry()) out += (out.empty() ? "" : ", ") + name;
  return out.empty() ? "(none registered)" : out;
}

const std::vector<LayoutInfo>& registered_layouts() {
  return layout_registry();
}

const LayoutInfo* find_layout(const std::string& name) {
  for (const LayoutInfo& l : layout_registry())
    if (l.name == name) return &l;
  return nullptr;
}

std::string layout_names_str() {
  std::string out;
  for (const LayoutInfo& l : layout_registry()) out += (out.empty() ? "" : ", ") + l.name;
  return out.empty() ? "(none registered)" : out;
}

LayoutRegistration::LayoutRegistration(std::string name, std::string description,
                                       LayoutFactory make) {
  TSP_CHECK(!find_layout(name), "layout '{}' is registered twice", name);
  auto& reg = layout_registry();
  const plan::LayoutModel* model = find_registered_model(name);
  reg.push_back({std::move(name), std::move(description), std::move(make), {}, model});
  attach_engine(reg.back());
  std::sort(reg.begin(), reg.end(),
            [](const LayoutInfo& a, const LayoutInfo& b) { return a.name < b.name; });
}

std::unique_ptr<Layout> make_layout(const LlamaConfig& config, const ParallelConfig& parallel,
                                    Communicator& world) {
  const LayoutInfo* info = find_layout(parallel.layout);
  TSP_CHECK(info, "unknown layout '{}'; available layouts: {}", parallel.layout,
            layout_names_str());
  config.validate();
  check_world(world.size(), parallel.dp, parallel.tp);
  TSP_CHECK(parallel.tp == 1 || parallel.layout == "tp-sp",
            "--tp {} only applies to the tp-sp layout (layout '{}' uses all D ranks of its group); "
            "drop --tp or use --layout tp-sp",
            parallel.tp, parallel.layout);
  return info->make(config, parallel, world);
}

// ---- weight sources -----------------------------------------------------------------------------

void ModelDirWeights::read_rows(const ParamSpec& s, int64_t r0, int64_t r1, TensorView dst) const {
  TSP_CHECK(dir_.weights, "model directory {} has no open model.safetensors", dir_.path);
  dir_.weights->read_rows(s.name, r0, r1, dst);
}

void RandomWeights::read_rows(const ParamSpec& s, int64_t r0, int64_t r1, TensorView dst) const {
  init_param_rows(s, seed_, r0, r1, dst);
}

// ---- parameter indices -------------------------------------------------------------------------

ParamIndex::ParamIndex(const std::vector<ParamSpec>& specs) {
  int num_layers = 0;
  for (const ParamSpec& s : specs) num_layers = std::max(num_layers, s.layer + 1);
  layers.assign(num_layers, Layer{-1, -1, -1, -1, -1, -1, -1, -1, -1});
  for (int i = 0; i < static_cast<int>(specs.size()); ++i) {
    const ParamSpec& s = specs[i];
    Layer* l = s.layer >= 0 ? &layers[s.layer] : nullptr;
    switch (s.kind) {
      case ParamKind::Embedding:
        embed = i;
        break;
      case ParamKind::FinalNorm:
        final_norm = i;
        break;
      case ParamKind::LmHead:
        lm_head = i;
        break;
      case ParamKind::InputNorm:
        l->input_norm = i;
        break;
      case ParamKind::Wq:
        l->wq = i;
        break;
      case ParamKind::Wk:
        l->wk = i;
        break;
      case ParamKind::Wv:
        l->wv = i;
        break;
      case ParamKind::Wo:
        l->wo = i;
        break;
      case ParamKind::PostNorm:
        l->post_norm = i;
        break;
      case ParamKind::Wgate:
        l->wg = i;
        break;
      case ParamKind::Wup:
        l->wu = i;
        break;
      case ParamKind::Wdown:
        l->wd = i;
        break;
    }
  }
}

// ---- shard maps ---------------------------------------------------------------------------------

Shape ShardMap::shard_shape(const Shape& full) const {
  Shape s = full;
  if (kind == Kind::Rows) s[0] = even_range(full[0], parts, piece, "rows").size();
  if (kind == Kind::Cols) {
    TSP_CHECK(full.size() == 2, "a column shard needs a 2-D tensor, not {}", shape_str(full));
    s[1] = even_range(full[1], parts, piece, "columns").size();
  }
  return s;
}

Range ShardMap::range(const Shape& full) const {
  if (kind == Kind::Rows) return even_range(full[0], parts, piece, "rows");
  if (kind == Kind::Cols) return even_range(full.at(1), parts, piece, "columns");
  return {0, full[0]};
}

void load_shard(const WeightSource& src, const ParamSpec& spec, const ShardMap& map,
                TensorView dst) {
  TSP_CHECK(dst.shape() == map.shard_shape(spec.shape),
            "loading {}: destination is {}, the shard is {}", spec.name, shape_str(dst.shape()),
            shape_str(map.shard_shape(spec.shape)));
  check_host(dst);  // sources write host memory; ShardStore::load stages a device shard
  if (map.kind != ShardMap::Kind::Cols) {
    const Range r = map.range(spec.shape);
    src.read_rows(spec, r.begin, r.end, dst);
    return;
  }
  // Columns: read full rows a block at a time and keep [c0, c1) of each.
  const int64_t rows = spec.shape[0], cols = spec.shape[1];
  const Range c = map.range(spec.shape);
  const int64_t block =
      std::clamp<int64_t>((int64_t{1} << 20) / std::max<int64_t>(cols, 1), 1, rows);
  Tensor tmp = Tensor::f32({block, cols}, MemCategory::Workspace);
  float* out = dst.f32();
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t r1 = std::min(rows, r0 + block);
    TensorView t = tmp.slice(0, r1 - r0);
    src.read_rows(spec, r0, r1, t);
    for (int64_t r = r0; r < r1; ++r)
      std::memcpy(out + r * c.size(), t.f32() + (r - r0) * cols + c.begin,
                  c.size() * sizeof(float));
  }
}

// ---- shard store --------------------------------------------------------------------------------

int ShardStore::add(int param, ShardMap map, bool replicated_in_group) {
  TSP_CHECK(!allocated_, "ShardStore::add after allocate()");
  for (const Entry& e : entries_)
    TSP_CHECK(e.param != param, "parameter #{} declared twice in a shard store", param);
  entries_.push_back({param, map, replicated_in_group, {}, 0});
  return static_cast<int>(entries_.size()) - 1;
}

void ShardStore::allocate(const std::vector<ParamSpec>& specs, Communicator& group,
                          Backend& backend, DType compute, ReplicaPartition partition) {
  TSP_CHECK(!allocated_, "ShardStore::allocate called twice");
  TSP_CHECK(compute == DType::F32 || compute == DType::BF16,
            "the compute dtype must be f32 or bf16, not {}", dtype_name(compute));
  const int n = static_cast<int>(specs.size());
  const int R = partition.replicas;
  TSP_CHECK(R >= 1 && 0 <= partition.replica && partition.replica < R,
            "replica {} of {} does not exist", partition.replica, R);
  TSP_CHECK(R == 1 || static_cast<int>(partition.bucket_of_param.size()) == n,
            "ZeRO-1 needs the gradient bucket of each of the {} parameters", n);
  partition_ = std::move(partition);
  entry_of_param_.assign(n, -1);
  for (int i = 0; i < size(); ++i) {
    Entry& e = entries_[i];
    TSP_CHECK(0 <= e.param && e.param < n, "shard of unknown parameter #{}", e.param);
    e.shape = e.map.shard_shape(specs[e.param].shape);
    entry_of_param_[e.param] = i;
  }
  // Each shard starts 64-byte aligned (16 floats). Without ZeRO-1 the shards lie in declaration
  // order; with it, grouped into buckets by key, highest layer first (the order backward makes
  // them final), the end bucket last, each bucket padded to a multiple of R (and of 16).
  auto aligned = [](int64_t x) { return (x + 15) / 16 * 16; };
  total_ = 0;
  if (R == 1) {
    for (Entry& e : entries_) {
      e.offset = total_;
      total_ += aligned(shape_numel(e.shape));
    }
  } else {
    std::vector<int> keys;
    for (const Entry& e : entries_) keys.push_back(partition_.bucket_of_param[e.param]);
    std::sort(keys.begin(), keys.end());
    keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
    std::reverse(keys.begin(), keys.end());  // L-1, ..., 0, then -1
    const int64_t quantum = std::lcm<int64_t>(16, R);
    for (int key : keys) {
      Bucket b{key, total_, 0, 0, 0, nullptr, false, nullptr};
      for (Entry& e : entries_) {
        if (partition_.bucket_of_param[e.param] != key) continue;
        e.offset = total_;
        e.bucket = static_cast<int>(buckets_.size());
        total_ += aligned(shape_numel(e.shape));
      }
      b.length = (total_ - b.begin + quantum - 1) / quantum * quantum;
      b.part = b.length / R;
      total_ = b.begin + b.length;
      buckets_.push_back(std::move(b));
    }
    int64_t owned = 0;
    for (Bucket& b : buckets_) {
      b.owned = owned;
      owned += b.part;
    }
  }
  backend_ = &backend;
  compute_dtype_ = compute;
  const Device dev = backend.device();
  const int64_t total = total_;
  const bool bf16_master = compute != DType::F32;
  // Without ZeRO-1, or under F32 (where the compute copy is the master), the values slab is whole.
  if (R == 1 || !bf16_master)
    values_ = Tensor::zeros({total}, DType::F32, MemCategory::Weights, dev);
  grads_ = Tensor::zeros({total}, DType::F32, MemCategory::Grads, dev);
  if (bf16_master) compute_ = Tensor::zeros({total}, compute, MemCategory::Weights, dev);
  if (R > 1) {
    const int64_t owned = total / R;
    if (bf16_master) master_ = Tensor::zeros({owned}, DType::F32, MemCategory::Weights, dev);
    owned_grads_ = Tensor::zeros({owned}, DType::F32, MemCategory::Grads, dev);
    exp_avg_ = Tensor::zeros({owned}, DType::F32, MemCategory::Optimizer, dev);
    exp_avg_sq_ = Tensor::zeros({owned}, DType::F32, MemCategory::Optimizer, dev);
  }
  allocated_ = true;

  // Learn which piece (of how many, by rows or columns) every group rank holds, for gather().
  // Host control traffic (set-up agreement, counted in stats().control).
  std::vector<int64_t> mine(3 * n, -1);
  for (const Entry& e : entries_) {
    mine[3 * e.param] = e.map.piece;
    mine[3 * e.param + 1] = e.map.parts;
    mine[3 * e.param + 2] = static_cast<int64_t>(e.map.kind);
  }
  const std::vector<int64_t> all = group.gather_host(mine);
  held_.assign(n, std::vector<int>(group.size(), -1));
  parts_.assign(n, 0);
  kinds_.assign(n, ShardMap::Kind::Whole);
  for (int r = 0; r < group.size(); ++r) {
    for (int p = 0; p < n; ++p) {
      const int64_t* t = &all[3 * (r * n + p)];
      if (t[0] < 0) continue;
      TSP_CHECK(parts_[p] == 0 || (parts_[p] == t[1] && static_cast<int64_t>(kinds_[p]) == t[2]),
                "ranks of the layout group disagree on how {} is sharded", specs[p].name);
      held_[p][r] = static_cast<int>(t[0]);
      parts_[p] = static_cast<int>(t[1]);
      kinds_[p] = static_cast<ShardMap::Kind>(t[2]);
    }
  }
}

int ShardStore::entry_of(int param) const {
  return 0 <= param && param < static_cast<int>(entry_of_param_.size()) ? entry_of_param_[param]
                                                                        : -1;
}

int ShardStore::entry_of_checked(int param) const {
  const int e = entry_of(param);
  TSP_CHECK(e >= 0, "this rank holds no shard of parameter #{}", param);
  return e;
}

TensorView ShardStore::value(int entry) const {
  const Entry& e = entries_.at(entry);
  TSP_CHECK(!values_.empty(),
            "the whole fp32 master of a shard is not kept under ZeRO-1 with bf16");
  if (zero()) check_gathered(buckets_[e.bucket], "fp32 values");  // F32: the gathered slab
  return values_.window(e.offset, e.shape);
}

TensorView ShardStore::grad(int entry) const {
  const Entry& e = entries_.at(entry);
  return grads_.window(e.offset, e.shape);
}

TensorView ShardStore::compute(int entry) const {
  const Entry& e = entries_.at(entry);
  if (zero()) check_gathered(buckets_[e.bucket], "the weights");
  return (compute_.empty() ? values_ : compute_).window(e.offset, e.shape);
}

TensorView ShardStore::master_part(const Bucket& b) const {
  check_gathered(b, "this replica's master values");
  return master_.empty() ? values_.window(owned_begin(b), {b.part})
                         : master_.window(b.owned, {b.part});
}

void ShardStore::check_gathered(const Bucket& b, const char* what) const {
  TSP_CHECK(!b.gather,
            "ZeRO-1: {} in the gradient bucket of {} are read while the bucket's all-gather over "
            "the replicas (ShardStore::sync_compute) is still in flight; wait for it first "
            "(ShardStore::wait_gathers_through before the layer's forward, or wait_gathers)",
            what,
            b.key < 0 ? std::string("the end (embedding, final norm, head)")
                      : fmt::format("layer {}", b.key));
}

void ShardStore::zero_grads() {
  backend_->zero(grads_.view());
  if (zero()) backend_->zero(owned_grads_.view());
}

void ShardStore::refresh_compute() {
  if (!compute_.empty() && !zero()) backend_->copy(values_.view(), compute_.view());
}

std::vector<ParamShard> ShardStore::shards(const std::vector<ParamSpec>& specs) const {
  std::vector<ParamShard> out;
  if (!zero()) {
    for (int i = 0; i < size(); ++i) {
      ParamShard sh;
      sh.spec = &specs[entries_[i].param];
      sh.value = value(i);
      sh.grad = grad(i);
      sh.replicated_in_group = entries_[i].replicated;
      out.push_back(sh);
    }
    return out;
  }
  // This replica's part of each bucket, cut at the shards' boundaries (alignment and bucket
  // padding belong to no shard and are never updated).
  for (const Bucket& b : buckets_) {
    const int64_t lo = owned_begin(b), hi = lo + b.part;
    const TensorView master = master_part(b);
    for (const Entry& e : entries_) {
      if (&buckets_[e.bucket] != &b) continue;
      const int64_t p0 = std::max(lo, e.offset), p1 = std::min(hi, e.offset + shape_numel(e.shape));
      if (p0 >= p1) continue;
      const int64_t at = p0 - lo;  // into this part
      ParamShard sh;
      sh.spec = &specs[e.param];
      sh.value = master.window(at, {p1 - p0});
      sh.grad = owned_grads_.window(b.owned + at, {p1 - p0});
      sh.replicated_in_group = e.replicated;
      sh.partitioned_over_replicas = true;
      sh.exp_avg = exp_avg_.window(b.owned + at, {p1 - p0});
      sh.exp_avg_sq = exp_avg_sq_.window(b.owned + at, {p1 - p0});
      out.push_back(sh);
    }
  }
  return out;
}

void ShardStore::load(const WeightSource& src, const std::vector<ParamSpec>& specs) {
  TSP_CHECK(allocated_, "ShardStore::load before allocate()");
  wait_gathers();  // a gather in flight still writes the compute copy
  for (int i = 0; i < size(); ++i) {
    const Entry& e = entries_[i];
    if (!values_.empty() && values_.device().is_cpu()) {  // straight into the master slab
      load_shard(src, specs[e.param], e.map, value(i));
      continue;
    }
    // Read on the host, then one upload: into the whole master, or (ZeRO-1 under bf16) into a
    // shard-sized buffer from which the compute copy and this replica's master parts are taken.
    Tensor host(e.shape, DType::F32, MemCategory::Workspace);
    load_shard(src, specs[e.param], e.map, host.view());
    if (!values_.empty()) {
      backend_->upload(host.data(), value(i));
      continue;
    }
    Tensor full(e.shape, DType::F32, MemCategory::Workspace, backend_->device());
    backend_->upload(host.data(), full.view());
    const int64_t numel = shape_numel(e.shape);
    backend_->copy(full.view(), compute(i));
    const Bucket& b = buckets_[e.bucket];
    const int64_t lo = owned_begin(b);
    const int64_t p0 = std::max(lo, e.offset), p1 = std::min(lo + b.part, e.offset + numel);
    if (p0 < p1)
      backend_->copy(full.window(p0 - e.offset, {p1 - p0}),
                     master_.window(b.owned + (p0 - lo), {p1 - p0}));
  }
  refresh_compute();
}

// ---- ZeRO-1 -------------------------------------------------------------------------------------

void ShardStore::begin_backward() {
  if (!zero()) return;
  backend_->zero(grads_.view());
  for (Bucket& b : buckets_) {
    TSP_CHECK(!b.started, "a gradient reduction of the previous backward was never finished");
  }
}

void ShardStore::start_bucket_reductions(int from_layer, Communicator& replicas) {
  if (!zero()) return;
  for (Bucket& b : buckets_) {
    if (b.started || (from_layer >= 0 && b.key < from_layer)) continue;
    // In place: the bucket holds the R parts' local sums; the sum of this replica's part comes
    // back at the bucket's start. Gradients reduce in fp32 whatever the compute dtype.
    void* bucket = grads_.window(b.begin, {b.length}).data();
    b.reduce = replicas.ireduce_scatter(bucket, bucket, b.part, DType::F32);
    b.started = true;
  }
}

void ShardStore::finish_reductions() {
  if (!zero()) return;
  for (Bucket& b : buckets_) {
    TSP_CHECK(b.started, "ZeRO-1: a gradient bucket was never reduced");
    b.reduce->wait();
    b.reduce = nullptr;
    b.started = false;
    backend_->add(owned_grads_.window(b.owned, {b.part}), grads_.window(b.begin, {b.part}));
  }
}

void ShardStore::sync_compute(Communicator& replicas) {
  if (!zero()) return;
  wait_gathers();  // two updates with no forward between: the last one's gathers are over first
  const TensorView slab = compute_.empty() ? values_.view() : compute_.view();
  const DType dt = slab.dtype();
  // buckets_ is in backward order (layer L-1 … 0, then the end bucket); the forward reads the
  // end bucket first (embedding), then layer 0, 1, …: start them in that order, so the first
  // waited for is the first started.
  for (auto it = buckets_.rbegin(); it != buckets_.rend(); ++it) {
    Bucket& b = *it;
    // Round the owned master part into its place (under F32 it is that place already), then
    // gather every replica's part of the bucket in place, in the compute dtype. Left in flight:
    // each bucket is waited for before its first read (wait_gathers_through).
    const TensorView mine = slab.window(owned_begin(b), {b.part});
    if (!compute_.empty()) backend_->copy(master_part(b), mine);
    b.gather =
        replicas.iall_gather(mine.data(), slab.window(b.begin, {b.length}).data(), b.part, dt);
  }
}

void ShardStore::finish_gathers_through(int layer, bool host) {
  // In the order sync_compute started them (the end bucket first).
  for (auto it = buckets_.rbegin(); it != buckets_.rend(); ++it) {
    if (it->key > layer || !it->gather) continue;
    // join_compute: every later read of the bucket is a device operation queued after this call
    // (on the compute stream, or on a communicator's stream, which first waits for the compute
    // stream), so ordering them after the transfer is enough.
    if (host)
      it->gather->wait();
    else
      it->gather->join_compute();
    it->gather = nullptr;
  }
}

bool ShardStore::gathering() const {
  for (const Bucket& b : buckets_)
    if (b.gather) return true;
  return false;
}

void ShardStore::settle_gathers() noexcept {
  if (!gathering()) return;
  if (std::uncaught_exceptions() > 0) {
    // The gathered slab stays allocated (reachable, so no leak report) for the life of the
    // process: an abandoned transfer may still write it. The job is about to abort.
    static std::vector<Tensor>* const kept = new std::vector<Tensor>();
    kept->push_back(std::move(compute_.empty() ? values_ : compute_));
  }
  // Without an exception each Request's destructor waits (aborting the job if MPI reports a
  // failure: a destructor cannot throw); with one, it lets the transfer go (MpiTransfer).
  for (Bucket& b : buckets_) b.gather = nullptr;
}

Tensor ShardStore::assemble_over_replicas(bool grads, Communicator& replicas) const {
  if (!zero()) return {};
  TSP_CHECK(!gathering(),
            "ShardStore::assemble_over_replicas while the weights' all-gathers are in flight; "
            "call wait_gathers first");
  Tensor full = Tensor::zeros({total_}, DType::F32, MemCategory::Workspace, backend_->device());
  for (const Bucket& b : buckets_) {
    const TensorView mine = full.window(owned_begin(b), {b.part});
    backend_->copy(grads ? owned_grads_.window(b.owned, {b.part}) : master_part(b), mine);
    replicas.all_gather(mine.data(), full.window(b.begin, {b.length}).data(), b.part, DType::F32);
  }
  return full;
}

namespace {
// Copy a shard (piece of map) into its place in the full tensor.
void place_shard(const ShardMap& map, const Shape& full_shape, const float* shard, float* full) {
  if (map.kind != ShardMap::Kind::Cols) {
    const Range r = map.range(full_shape);
    const int64_t row = shape_numel(full_shape) / full_shape[0];
    std::memcpy(full + r.begin * row, shard, r.size() * row * sizeof(float));
    return;
  }
  const Range c = map.range(full_shape);
  const int64_t rows = full_shape[0], cols = full_shape[1];
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(full + r * cols + c.begin, shard + r * c.size(), c.size() * sizeof(float));
}
}  // namespace

void ShardStore::gather(const std::vector<ParamSpec>& specs, Communicator& group, bool grads,
                        const std::function<void(const ParamSpec&, TensorView)>& sink,
                        TensorView full_slab) const {
  TSP_CHECK(allocated_, "ShardStore::gather before allocate()");
  TSP_CHECK(!zero() || !full_slab.empty(),
            "ShardStore::gather under ZeRO-1 needs the slab assembled over the replicas");
  // What this rank sends of entry e: its shard in the store, or in the assembled slab.
  auto shard_of = [&](int e) {
    if (!full_slab.empty()) return full_slab.window(entries_[e].offset, entries_[e].shape);
    return grads ? grad(e) : value(e);
  };
  const int me = group.rank();
  for (int p = 0; p < static_cast<int>(specs.size()); ++p) {
    const ParamSpec& spec = specs[p];
    TSP_CHECK(parts_[p] > 0, "no rank of the layout group holds {}", spec.name);
    // The lowest group rank holding each piece sends it.
    std::vector<int> holder(parts_[p], -1);
    for (int r = group.size() - 1; r >= 0; --r)
      if (held_[p][r] >= 0) holder[held_[p][r]] = r;
    for (int i = 0; i < parts_[p]; ++i)
      TSP_CHECK(holder[i] >= 0, "piece {} of {} of {} is held by no rank", i, parts_[p], spec.name);
    const int e = entry_of(p);
    const Device dev = backend_->device();
    // Pieces travel in the memory they live in (device buffers for a data communicator that may
    // be NCCL; host memory on the CPU) and are brought to the host on rank 0 only.
    if (me != 0) {
      for (int i = 0; i < parts_[p]; ++i) {
        if (holder[i] != me) continue;
        const TensorView t = shard_of(e);
        // Untagged: each sender sends in (parameter, piece) order, the order rank 0 receives.
        group.send(t.data(), t.numel(), DType::F32, 0);
      }
      continue;
    }
    Tensor full = Tensor::f32(spec.shape, MemCategory::Workspace);
    for (int i = 0; i < parts_[p]; ++i) {
      const ShardMap map{kinds_[p], parts_[p], i};
      Tensor piece;  // this piece, received (on the device) or rank 0's own
      TensorView src;
      if (holder[i] == 0) {
        src = shard_of(e);
      } else {
        piece = Tensor::f32(map.shard_shape(spec.shape), MemCategory::Comm, dev);
        group.recv(piece.data(), piece.numel(), DType::F32, holder[i]);
        src = piece.view();
      }
      if (src.device().is_cpu()) {
        place_shard(map, spec.shape, src.f32(), full.f32());
      } else {  // one download (the synchronisation point), then placed on the host
        Tensor host = Tensor::f32(src.shape(), MemCategory::Comm);
        backend_->download(src, host.data());
        place_shard(map, spec.shape, host.f32(), full.f32());
      }
    }
    sink(spec, full.view());
  }
}

// ---- the base class -----------------------------------------------------------------------------

LayoutCommon::LayoutCommon(std::string name, const LlamaConfig& config,
                           const ParallelConfig& parallel, Communicator& world)
    : config_(config),
      parallel_(parallel),
      be_(backend_for(parallel.device)),
      specs_(llama_param_specs(config)),
      idx_(specs_),
      name_(std::move(name)),
      world_(world) {
  R_ = parallel.dp;
  D_ = check_world(world.size(), parallel.dp, parallel.tp);
  // Layout group: D consecutive world ranks (so world rank 0 is group rank 0 of replica 0, where
  // gather() delivers). Replica group: the R ranks with the same position in their groups.
  group_rank_ = world.rank() % D_;
  replica_ = world.rank() / D_;
  // On a GPU the data path is NCCL where every rank of the group has its own GPU, else MPI staging
  // through pinned host memory (comm/device_comm.h); on the CPU the MPI splits themselves.
  TSP_CHECK(parallel.zero == 0 || parallel.zero == 1,
            "--zero {} is not a ZeRO stage tsp implements; use 0 (every replica keeps the whole "
            "optimizer state) or 1 (the optimizer state partitioned over the --dp replicas)",
            parallel.zero);
  group_ =
      make_data_communicator(world.split(/*color=*/replica_, /*key=*/group_rank_), be_.device());
  replicas_ =
      make_data_communicator(world.split(/*color=*/group_rank_, /*key=*/replica_), be_.device());
}

void LayoutCommon::allocate_store() {
  ReplicaPartition partition;
  if (parallel_.zero == 1 && R_ > 1) {
    partition.replicas = R_;
    partition.replica = replica_;
    for (int p = 0; p < static_cast<int>(specs_.size()); ++p)
      partition.bucket_of_param.push_back(grad_final_at_end(p) ? -1 : specs_[p].layer);
  }
  store_.allocate(specs_, *group_, be_, parallel_.dtype, std::move(partition));
}

void LayoutCommon::gather(bool grads,
                          const std::function<void(const ParamSpec&, TensorView)>& sink) {
  // Under ZeRO-1 each replica holds its part of the master values and reduced gradients: every
  // replica takes part in assembling them (the other replicas' weights in the compute copy are
  // rounded, so the fp32 masters travel). The last update's all-gathers are over first.
  store_.wait_gathers();
  const Tensor full = store_.assemble_over_replicas(grads, *replicas_);
  // Every replica holds the same values (and, after forward_backward, the same gradients), so
  // replica 0 alone reassembles; its group rank 0 is world rank 0.
  if (replica_ != 0) return;
  store_.gather(specs_, *group_, grads, sink, full.view());
}

ReplicaBatch LayoutCommon::replica_batch(const Batch& batch) const {
  const int64_t B = batch.B, S = batch.S;
  TSP_CHECK(B >= 1 && S >= 1, "a batch needs B >= 1 rows of S >= 1 tokens (got B={}, S={})", B, S);
  TSP_CHECK(static_cast<int64_t>(batch.tokens.size()) == B * (S + 1),
            "a batch of B={} rows of S+1={} tokens needs {} tokens, got {}", B, S + 1, B * (S + 1),
            batch.tokens.size());
  TSP_CHECK(S <= config_.max_position_embeddings,
            "sequence length S={} exceeds max_position_embeddings={} of the model", S,
            config_.max_position_embeddings);
  TSP_CHECK(B % R_ == 0,
            "batch of B={} rows cannot be split evenly over dp={} replicas; use B a multiple of {}",
            B, R_, R_);
  // Every rank must run the same step; a mismatch would hang or silently mix batches.
  world_.check_same(B, "batch rows B");
  world_.check_same(S, "sequence length S");
  TSP_CHECK(batch.doc_sep >= -1, "document separator id {} must be a token id, or -1 for none",
            batch.doc_sep);
  world_.check_same(batch.doc_sep, "document separator id doc_sep (--doc-sep)");

  ReplicaBatch rb;
  rb.B = B / R_;
  rb.S = S;
  rb.row0 = replica_ * rb.B;
  rb.inputs.resize(rb.B * S);
  rb.labels.resize(rb.B * S);
  for (int64_t b = 0; b < rb.B; ++b) {
    const int32_t* row = batch.tokens.data() + (rb.row0 + b) * (S + 1);
    std::copy(row, row + S, rb.inputs.begin() + b * S);
    std::copy(row + 1, row + S + 1, rb.labels.begin() + b * S);
  }
  rb.counted = B * S;
  rb.grad_scale = static_cast<float>(1.0 / static_cast<double>(rb.counted));
  return rb;
}

TokenNeed LayoutCommon::token_need(int64_t B, int64_t S) const {
  TSP_CHECK(B >= 1 && S >= 1, "a batch needs B >= 1 rows of S >= 1 tokens (got B={}, S={})", B, S);
  TSP_CHECK(B % R_ == 0,
            "batch of B={} rows cannot be split evenly over dp={} replicas; use B a multiple of {}",
            B, R_, R_);
  ReplicaBatch shape;  // the layout's own checks of B and S (zigzag chunks, ...); no tokens
  shape.B = B / R_;
  shape.S = S;
  shape.row0 = replica_ * shape.B;
  check_batch(shape);
  TokenNeed need;
  need.row_begin = shape.row0;
  need.row_end = shape.row0 + shape.B;
  const std::vector<Range> ranges = input_ranges(S);
  for (size_t i = 0; i < ranges.size(); ++i) {
    const Range& r = ranges[i];
    TSP_CHECK(
        0 <= r.begin && r.begin < r.end && r.end <= S && (i == 0 || ranges[i - 1].end < r.begin),
        "layout {}: input range [{}, {}) is empty, outside [0, {}) or not after the previous "
        "one (a bug in the layout)",
        name_, r.begin, r.end, S);
    need.input_ranges.push_back({r.begin, r.end});
  }
  return need;
}

void LayoutCommon::check_tokens(const Batch& batch) const {
  const int64_t S = batch.S, W = S + 1, V = config_.vocab_size;
  const TokenNeed need = token_need(batch.B, S);
  std::vector<std::pair<int64_t, int64_t>> ranges = need.input_ranges;
  if (ranges.empty()) ranges.push_back({0, S});
  std::string error;  // this rank's first bad token, if any
  for (int64_t r = need.row_begin; r < need.row_end && error.empty(); ++r) {
    for (auto [p0, p1] : ranges) {
      for (int64_t i = p0; i <= p1 && error.empty(); ++i) {  // inputs p0..p1-1, labels p0+1..p1
        const int32_t t = batch.tokens[r * W + i];
        if (0 <= t && t < V) continue;
        error = t == kTokenNotRead
                    ? fmt::format(
                          "token at row {}, column {} of the batch was not read (it holds "
                          "kTokenNotRead), but layout {} on group rank {} of replica {} reads it; "
                          "read the tokens that Layout::token_need({}, {}) names "
                          "(DataLoader::set_need)",
                          r, i, name_, group_rank_, replica_, batch.B, S)
                    : fmt::format(
                          "token id {} at row {}, column {} is outside the vocabulary "
                          "[0, {})",
                          t, r, i, V);
      }
    }
  }
  // Ranks read different tokens, so a bad one may be seen by some ranks only. Agree before
  // anything else is computed: every rank throws the error of the lowest rank that found one (a
  // rank throwing alone would leave the others waiting in run()'s collectives). This is host
  // control traffic (communicator.h): counted in stats().control, never in the layout's data
  // traffic, so measured traffic still equals the model of src/plan. The common case costs one
  // any_true.
  const bool bad = !error.empty();
  if (!world_.any_true(bad)) return;
  const std::vector<int64_t> all = world_.gather_host(int64_t{bad ? 1 : 0});
  const int root = static_cast<int>(std::find(all.begin(), all.end(), 1) - all.begin());
  throw Error(world_.broadcast_host(error, root));
}

double LayoutCommon::reduce_loss(double local_sum, int64_t tokens) {
  // Every rank's contribution added in world-rank order on every rank (Communicator::sum_host):
  // the loss is bit-identical everywhere, whatever a transport's reduction order would have been.
  // Host control traffic, not part of the step's modelled data traffic.
  const double mine = counts_loss() ? local_sum : 0.0;
  return world_.sum_host(mine) / static_cast<double>(tokens);
}

ReplicaBatch LayoutCommon::prepare(const Batch& batch) {
  ReplicaBatch rb = replica_batch(batch);
  check_batch(rb);
  check_tokens(batch);
  if (batch.doc_sep >= 0) find_documents(batch, rb);
  return rb;
}

int64_t LayoutCommon::counted_labels(const Batch& batch) {
  return prepare(batch).counted;
}

double LayoutCommon::step(const Batch& batch, bool backward) {
  ReplicaBatch rb = prepare(batch);
  // The divisor of the loss sum and of the gradient: the batch's own count, or the caller's
  // (gradient accumulation: the step's total count, so every token of the step weighs the same).
  int64_t denominator = rb.counted;
  if (batch.loss_denominator != 0) {
    TSP_CHECK(batch.loss_denominator >= rb.counted,
              "loss denominator {} is below the {} labels the batch counts; pass the sum of "
              "Layout::counted_labels over the micro-batches of the step, or 0 for the batch's own",
              batch.loss_denominator, rb.counted);
    world_.check_same(batch.loss_denominator, "loss denominator (Batch::loss_denominator)");
    denominator = batch.loss_denominator;
    rb.grad_scale = static_cast<float>(1.0 / static_cast<double>(denominator));
  }
  // The optimizer updated the fp32 master weights since the last step: round them into the compute
  // copy (nothing to do under f32).
  store_.refresh_compute();
  TensorView g = store_.grad_slab();
  if (backward && store_.zero()) {
    // ZeRO-1: the gradient slab is this backward's scratch; run() reduce-scatters its buckets over
    // the replicas as they become final, and the sums of this replica's parts accumulate in the
    // store's partition (so gradient accumulation needs no scaling).
    store_.begin_backward();
  } else if (backward && R_ > 1) {
    // The replica all-reduce below sums the whole gradient slab, including what earlier calls
    // accumulated (identical on every replica after their own all-reduce). Pre-scaling it by 1/R
    // makes the sum come back to the old value plus the new contributions of every replica,
    // without a second gradient buffer. (The 1/R scaling is exact for R a power of two; the sums
    // round as any all-reduce does.)
    be_.scale(g, 1.0f / static_cast<float>(R_));
  }
  Tensor loss = Tensor::zeros({1}, DType::F64, MemCategory::Workspace, device());
  run(rb, backward, loss.view());
  if (backward && store_.zero()) {
    store_.start_bucket_reductions(-1, *replicas_);  // the end bucket, and any left
    store_.finish_reductions();
  } else if (backward && R_ > 1) {
    replicas_->all_reduce(g.data(), g.numel(), DType::F32);
  }
  // The step's one host synchronisation: this rank's loss sum.
  return reduce_loss(be_.host_f64(loss.view()), denominator);
}

// ---- documents (docs/layouts.md, "Documents") --------------------------------------------------

int64_t document_chunks(int64_t S, int parts) {
  if (parts == 1) return 1;
  check_zigzag(S, parts);
  return 2 * int64_t{parts};
}

void LayoutCommon::find_documents(const Batch& batch, ReplicaBatch& rb) {
  const int32_t sep = batch.doc_sep;
  TSP_CHECK(0 <= sep && sep < config_.vocab_size,
            "document separator id {} is outside the vocabulary [0, {}): pass --doc-sep with a "
            "token id of the model",
            sep, config_.vocab_size);
  const int parts = token_parts();
  const int64_t B = rb.B, S = rb.S, C = document_chunks(S, parts), w = S / C;
  // The chunks this rank reads: all (parts = 1), else zigzag chunks index and 2·parts-1-index.
  std::vector<int64_t> own;
  if (parts == 1)
    own = {0};
  else
    own = {token_index(), C - 1 - token_index()};
  // Per row and chunk: the last separator among its inputs (-1: none) and how many it has;
  // (-2, -1) where this rank does not read the chunk. Labels are never needed: a label is
  // ignored exactly when its input (same position) is a separator.
  constexpr int64_t kNotRead = -2;
  std::vector<int64_t> mine(B * C * 2, kNotRead);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c : own) {
      int64_t last = -1, count = 0;
      for (int64_t x = c * w; x < (c + 1) * w; ++x)
        if (rb.inputs[b * S + x] == sep) last = x, ++count;
      mine[(b * C + c) * 2] = last;
      mine[(b * C + c) * 2 + 1] = count;
    }
  // The group's view of every chunk (ranks reading the same chunk agree: same tokens). Host
  // control traffic, like check_tokens: 16 bytes per row and chunk.
  std::vector<int64_t> all = mine;
  if (parts > 1) {
    const std::vector<int64_t> g = group_->gather_host(mine);
    for (size_t r = 0; r < g.size() / mine.size(); ++r)
      for (size_t e = 0; e < mine.size(); e += 2)
        if (all[e] == kNotRead && g[r * mine.size() + e] != kNotRead)
          all[e] = g[r * mine.size() + e], all[e + 1] = g[r * mine.size() + e + 1];
  }
  rb.doc_sep = sep;
  rb.chunks = C;
  rb.doc_start.assign(B * C, 0);
  int64_t separators = 0;  // of this replica's rows
  for (int64_t b = 0; b < B; ++b) {
    int64_t start = 0;  // every row starts a document at position 0
    for (int64_t c = 0; c < C; ++c) {
      const int64_t last = all[(b * C + c) * 2];
      TSP_CHECK(last != kNotRead,
                "layout {}: no rank of the group reads chunk {} of row {} (a bug "
                "in the layout's token parts)",
                name_, c, b);
      rb.doc_start[b * C + c] = start;
      if (last >= 0) start = last + 1;
      separators += all[(b * C + c) * 2 + 1];
    }
  }
  // Counted labels over the whole batch: each replica's count once (group rank 0's), summed in
  // rank order (exact: integers far below 2^53).
  const double counted = world_.sum_host(group_rank_ == 0 ? double(B * S - separators) : 0.0);
  rb.counted = static_cast<int64_t>(counted);
  TSP_CHECK(rb.counted > 0,
            "every label of the batch follows a document separator (id {}), so the loss counts "
            "no token; use longer rows or another separator",
            sep);
  rb.grad_scale = static_cast<float>(1.0 / counted);
}

// ---- the layer recipe (layout_common.h) ------------------------------------------------------

void LayoutCommon::allocate_saved(block::LayerSaved& s, const LocalTokens& t) const {
  s.allocate(t.n, config_.hidden_size, config_.num_attention_heads, config_.num_key_value_heads,
             config_.head_dim(), act_dtype(), device());
}

void LayoutCommon::allocate_layer(block::LayerSaved& s, const LocalTokens& t, bool kept) const {
  allocate_saved(s, t);
  if (kept)
    s.allocate_kept(t.n, config_.hidden_size, mlp_slices(), mlp_slice_rows(), act_dtype(),
                    device());
}

// xn [n, h] is the run's normed-input buffer; under --recompute none the layer's own s.xn1 and
// s.xn2 take its place (the same kernels write them, so every value is the same).
void LayoutCommon::layer_forward(int l, const LocalTokens& t, block::LayerSaved& s, TensorView x,
                                 TensorView xn) {
  const ParamIndex::Layer& P = idx_.layers[l];
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const TensorView xn1 = s.kept() ? s.xn1.view() : xn, xn2 = s.kept() ? s.xn2.view() : xn;
  be_.copy(x, s.x.view());
  be_.rmsnorm_forward(s.x.view(), norm_weight(P.input_norm), xn1, s.rstd1.view(), eps);
  be_.copy(s.x.view(), s.x2.view());  // x2 = x + attention(norm1(x))·Woᵀ
  attention_forward(l, t, xn1, s);
  be_.rmsnorm_forward(s.x2.view(), norm_weight(P.post_norm), xn2, s.rstd2.view(), eps);
  be_.copy(s.x2.view(), x);  // x = x2 + mlp(norm2(x2))
  mlp_forward(l, t, xn2, x, s);
}

// dx F32 [n, h]: d(layer output) in, d(layer input) out. The normed inputs are recomputed into xn
// (selective, full), or read from s (none).
void LayoutCommon::layer_backward(int l, const LocalTokens& t, const block::LayerSaved& s,
                                  TensorView dx, TensorView xn, TensorView dxn) {
  const ParamIndex::Layer& P = idx_.layers[l];
  begin_layer_backward(l);
  // MLP sub-block: x_out = x2 + mlp(norm2(x2)); dx = d x_out becomes d x2.
  TensorView xn2 = xn;
  if (s.kept())
    xn2 = s.xn2.view();
  else
    be_.rmsnorm_apply(s.x2.view(), norm_weight(P.post_norm), s.rstd2.view(), xn);
  be_.zero(dxn);
  mlp_backward(l, t, xn2, dx, dxn, s);
  block::rmsnorm_backward_add(be_, dxn, s.x2.view(), norm_weight(P.post_norm), s.rstd2.view(), dx,
                              grad_target(P.post_norm));
  // Attention sub-block: x2 = x + attention(norm1(x))·Woᵀ; dx becomes d x.
  TensorView xn1 = xn;
  if (s.kept())
    xn1 = s.xn1.view();
  else
    be_.rmsnorm_apply(s.x.view(), norm_weight(P.input_norm), s.rstd1.view(), xn);
  be_.zero(dxn);
  attention_backward(l, t, xn1, s, dx, dxn);
  block::rmsnorm_backward_add(be_, dxn, s.x.view(), norm_weight(P.input_norm), s.rstd1.view(), dx,
                              grad_target(P.input_norm));
  end_layer_backward(l);
}

void LayoutCommon::run(const ReplicaBatch& rb, bool backward, TensorView loss) {
  const LlamaConfig& c = config_;
  const int L = static_cast<int>(c.num_hidden_layers);
  const int64_t h = c.hidden_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const LocalTokens t = take_tokens(be_, rb, token_parts(), token_index());
  const int64_t n = t.n;
  const Device dev = device();
  constexpr MemCategory kWork = MemCategory::Workspace;

  Tensor x({n, h}, act_dtype(), kWork, dev);   // residual stream of the local tokens
  Tensor xn({n, h}, act_dtype(), kWork, dev);  // normed input of a sub-block
  // ZeRO-1: the last update's all-gathers over the replicas (ShardStore::sync_compute) are
  // waited for here, each bucket right before the forward first reads it, so the gathers of the
  // later layers move behind the earlier layers' compute (on the CPU they advance inside MPI
  // calls: the layouts' own, and the waits). The end bucket (embedding, final norm, LM head and
  // the parameters a layout reduces at the end) comes first, then one bucket per layer. A layout
  // that reads the store ahead of the recipe waits there itself (fsdp-cp's unit prefetch);
  // reading a bucket in flight throws (ShardStore::compute).
  store_.wait_gathers_through(-1);
  embed_forward(t, x.view());
  part_done(Part::EmbeddingForward, -1);

  // Forward-only keeps one layer's activations at a time; backward keeps all L (selective; under
  // none with the normed inputs and MLP activations besides), or under full recomputation only
  // each layer's input: the checkpoint s.x stays, the rest of s is freed after the layer, so at
  // most one layer's whole set exists at once.
  const bool full = backward && full_recompute();
  const bool kept = backward && parallel_.recompute == plan::Recompute::None;
  std::vector<block::LayerSaved> saved(backward ? L : 1);
  for (int l = 0; l < L; ++l) {
    block::LayerSaved& s = saved[backward ? l : 0];
    if (s.x.empty()) allocate_layer(s, t, kept);
    store_.wait_gathers_through(l);
    layer_forward(l, t, s, x.view(), xn.view());
    if (full) {
      Tensor checkpoint = std::move(s.x);
      s = block::LayerSaved();
      s.x = std::move(checkpoint);
    }
    part_done(Part::LayerForward, l);
  }

  // Final norm and loss head (forward and backward fused; logits never stored whole).
  Tensor rstd_f = Tensor::f32({n}, MemCategory::Activations, dev);
  be_.rmsnorm_forward(x.view(), norm_weight(idx_.final_norm), xn.view(), rstd_f.view(), eps);
  Tensor dxn = backward ? Tensor::f32({n, h}, kWork, dev) : Tensor();
  head_loss(t, xn.view(), rb.grad_scale, loss, dxn.view());
  part_done(Part::HeadForward, -1);
  if (!backward) return;

  Tensor dx = Tensor::zeros({n, h}, DType::F32, kWork, dev);  // gradient of the residual stream
  block::rmsnorm_backward_add(be_, dxn.view(), x.view(), norm_weight(idx_.final_norm),
                              rstd_f.view(), dx.view(), grad_target(idx_.final_norm));
  part_done(Part::HeadBackward, -1);
  for (int l = L - 1; l >= 0; --l) {
    if (full) {
      // Replay the layer's forward from its checkpoint. x (the residual stream) is free once the
      // final norm's backward has read it: it takes the checkpoint, which is freed before the
      // fresh set is allocated (so L-1 checkpoints and one whole set at most), and receives the
      // replay's output, which nobody reads. xn is rebuilt by layer_backward.
      be_.copy(saved[l].x.view(), x.view());
      saved[l] = block::LayerSaved();
      allocate_layer(saved[l], t, /*kept=*/false);
      begin_layer_replay(l);
      layer_forward(l, t, saved[l], x.view(), xn.view());
      end_layer_replay(l);
    }
    layer_backward(l, t, saved[l], dx.view(), xn.view(), dxn.view());
    saved[l] = block::LayerSaved();  // this layer's activations are no longer needed
    part_done(Part::LayerBackward, l);
    // ZeRO-1: the buckets whose gradients are final now start their reduce-scatter over the
    // replicas, moving behind the backward of the layers below (on the CPU they advance inside
    // MPI calls: the layout's own, and the progress point here).
    if (store_.zero()) {
      store_.start_bucket_reductions(grads_final_from_layer(l), *replicas_);
      replicas_->progress();
    }
  }
  embed_backward(t, dx.view());
  part_done(Part::EmbeddingBackward, -1);
  end_backward(t);
  part_done(Part::End, -1);
}

// ---- tokens and batch checks -----------------------------------------------------------------

LocalTokens take_tokens(Backend& be, const ReplicaBatch& rb, int parts, int index) {
  LocalTokens t;
  t.B = rb.B;
  t.S = rb.S;
  t.parts = parts;
  t.index = index;
  std::vector<int64_t> q_pos, k_pos;
  if (parts == 1) {  // every token in its order (no zigzag: S need not be even)
    q_pos.resize(t.S);
    std::iota(q_pos.begin(), q_pos.end(), int64_t{0});
    k_pos = q_pos;
  } else {
    check_zigzag(t.S, parts);
    q_pos = zigzag_positions(t.S, parts, index);
    k_pos = zigzag_gathered_positions(t.S, parts);
  }
  t.nl = static_cast<int64_t>(q_pos.size());
  t.n = t.B * t.nl;
  std::vector<int32_t> ids(t.n), labels(t.n);
  std::vector<int64_t> tok_pos(t.n);
  for (int64_t b = 0; b < t.B; ++b) {
    for (int64_t i = 0; i < t.nl; ++i) {
      const int64_t j = b * t.nl + i, src = b * t.S + q_pos[i];
      tok_pos[j] = q_pos[i];
      ids[j] = rb.inputs[src];
      labels[j] = rb.labels[src];
    }
  }
  t.documents = rb.doc_sep >= 0;
  if (t.documents) {
    // Positions in documents: a row's local tokens are increasing runs, one per chunk it reads;
    // each run starts in the document find_documents found for its chunk, and a separator
    // starts a new one after it. The label after a separator is the next document's first token:
    // not predicted from this document, so not counted (kIgnoreIndex).
    TSP_CHECK(static_cast<int64_t>(rb.doc_start.size()) == t.B * rb.chunks &&
                  rb.chunks == document_chunks(t.S, parts),
              "take_tokens: the document starts are for {} chunks of {} rows, not {} parts of {} "
              "rows (find_documents was not run for this layout)",
              rb.chunks, rb.doc_start.size() / std::max<int64_t>(rb.chunks, 1), parts, t.B);
    const int64_t w = t.S / rb.chunks;
    for (int64_t b = 0; b < t.B; ++b) {
      int64_t start = 0;
      for (int64_t i = 0; i < t.nl; ++i) {
        const int64_t x = q_pos[i], j = b * t.nl + i;
        if (x % w == 0 || i == 0) start = rb.doc_start[b * rb.chunks + x / w];
        tok_pos[j] = x - start;
        if (ids[j] == rb.doc_sep) {
          labels[j] = block::kIgnoreIndex;
          start = x + 1;
        }
      }
    }
  }
  constexpr MemCategory kWork = MemCategory::Workspace;
  t.ids = be.device_copy(ids, kWork);
  t.labels = be.device_copy(labels, kWork);
  t.q_pos = be.device_copy(q_pos, kWork);
  t.k_pos = be.device_copy(k_pos, kWork);
  t.tok_pos = be.device_copy(tok_pos, kWork);
  return t;
}

void LayoutCommon::check_batch(const ReplicaBatch& rb) const {
  if (token_parts() > 1) check_zigzag(rb.S, token_parts());
}

std::vector<Range> LayoutCommon::input_ranges(int64_t S) const {
  if (token_parts() == 1) return {};
  return zigzag_ranges(S, token_parts(), token_index());
}

double LayoutCommon::forward_backward(const Batch& batch) {
  return step(batch, true);
}
double LayoutCommon::forward(const Batch& batch) {
  return step(batch, false);
}

}  // namespace tsp
