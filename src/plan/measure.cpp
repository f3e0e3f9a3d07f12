// Predictions of OUR implementation on this machine, to compare with `tsp bench` measurements
// (include/tsp/plan/measure.h). What every layout shares is here (the ShardStore's slabs, the loss
// reduction, the data-parallel all-reduce); what a layout allocates and sends is its model's
// (at the end of src/parallel/<layout>.cpp), where every term names the tensor of src/parallel/*.cpp or
// src/model/block.cpp it stands for. When a layout changes what it allocates or sends, its model
// is the file to update (tests/plan/measured_vs_predicted_mpi_test.cpp says which term is off).
#include "tsp/plan/measure.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <vector>

#include "backend/cuda/attention_cudnn_pieces.h"  // plain C++: the cuDNN path's cut into calls
#include "ops/cpu/attention_internal.h"
#include "plan/model_util.h"
#include "tsp/core/error.h"
#include "tsp/model/block.h"  // token_chunk
#include "tsp/ops/gemm.h"
#include "tsp/parallel/layout.h"
#include "tsp/parallel/sharding.h"

namespace tsp::plan {

// The fast attention backward's per-thread scratch (src/ops/cpu/attention_fast.cpp,
// backward_scratch_floats with kBq = kBk = 64: dO·V and P/dS tiles, row statistics), one per
// thread for min(compute threads, kv heads of the call); none on the reference path. At test
// shapes it is several percent of a rank's peak, so it is modelled. Bytes.
int64_t attention_backward_scratch(int64_t d, int64_t kv_heads) {
  if (!attn::fast_path_available(d)) return 0;
  constexpr int64_t kBq = 64, kBk = 64;
  const int64_t threads = std::min<int64_t>(compute_threads(), kv_heads);
  return kF32 * threads * (2 * d * kBq + 2 * kBk * kBq + 2 * kBq);
}

int64_t attention_backward_transient(int64_t d, int64_t hq, int64_t hkv, int64_t nq, int64_t nk,
                                     const ElemBytes& e) {
  if (!e.mixed()) return attention_backward_scratch(d, hkv);
  if (attn::bf16_fast_path_available(d)) {
    constexpr int64_t kBq = 64, kBk = 64;  // attention_avx512.h
    const int64_t threads = std::min<int64_t>(compute_threads(), hkv);
    const int64_t packed = 2 * hkv * ((nk + 1) / 2) * 2 * d;  // bf16 key pairs
    return packed + kF32 * threads * (2 * d * kBq + 2 * kBk * kBq + 3 * kBk * kBq / 2 + 2 * kBq);
  }
  return kF32 * (2 * nq * hq * d + 2 * nk * hkv * d) + attention_backward_scratch(d, hkv);
}

int64_t flash_v2_backward_scratch(int64_t nq, int64_t hq, int64_t d) {
  // backward_d's Carve: every piece rounded up to 256 bytes; query tiles of BR = 32 rows
  // (bwd_br), nq_pad = 32·n_qt. The padded query positions I64 [nq_pad], the tiles' min and max
  // I64 [n_qt] each, dout in bf16 [nq_pad, hq, d], lse·log2(e) and D = dout·o F32 [hq, nq_pad]
  // each. (With documents three more: the padded starts I64 [nq_pad] and their tiles' min, max.)
  constexpr int64_t kBR = 32;
  const auto piece = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  const int64_t n_qt = (nq + kBR - 1) / kBR, nq_pad = n_qt * kBR;
  return piece(8 * nq_pad) + 2 * piece(8 * n_qt) + piece(2 * nq_pad * hq * d) +
         2 * piece(kF32 * nq_pad * hq);
}

namespace {
// Whether the CUDA backend's bf16 attention backward takes the v2 flash kernel for this call
// (attention.cpp: flash_serves, then flash_v2_supported(sh, true); the views of the layouts are
// aligned): head dim 64 or 128, at most 8192 query tiles of 32, grids within 65535.
bool cuda_flash_v2_backward_serves(int64_t d, int64_t hq, int64_t nq, int64_t nk) {
  const int64_t max_tiles = 8192;
  return (d == 64 || d == 128) && (nq + 31) / 32 <= max_tiles && (nk + 127) / 128 <= 65535 &&
         hq <= 65535;
}
}  // namespace

// The v2 flash FORWARD's scratch (attention_flash_v2.cu, forward_d) is not in any moment: one
// Workspace tensor per call, carved into 256-byte pieces (Carve), of the padded key positions
// I64 [64·n_kt] and the key tiles' min and max I64 [n_kt] each, n_kt = ⌈nk/64⌉ (kFwdBC = 64):
// 512·n_kt + 2·256·⌈8·n_kt/256⌉ bytes (256 when nk = 0), ≈ 8·nk + 512, freed when the launcher
// returns. It lives only inside the attention forward, and the same layer's attention backward
// holds everything the forward call held (the layer's saved inputs and q, k, v, o, the same K/V
// buffers) plus at least the fp32 dk and dv of its keys, 8·nk·hkv·d ≥ 512·nk bytes (d ≥ 64 on
// the flash path): far above the scratch. Checked byte for byte at 1, 2 and 4 ranks under the
// emulation (tests/parallel/cuda_memory_mpi_test.cpp, FlashV2).
int64_t LocalInputs::attention_backward_transient(int64_t d, int64_t hq, int64_t hkv, int64_t nq,
                                                  int64_t nk) const {
  if (!target.cuda()) return plan::attention_backward_transient(d, hq, hkv, nq, nk, e);
  if (e.mixed() && target.cudnn && (d == 64 || d == 128))
    return cudnn_attention_transient(true, nq, nk, hq, hkv, d, token_part, target);
  if (e.mixed() && target.flash_v2 && cuda_flash_v2_backward_serves(d, hq, nq, nk))
    return flash_v2_backward_scratch(nq, hq, d);
  return 0;
}

namespace {
std::atomic<bool (*)()> g_cuda_cudnn_in_force{nullptr};
std::atomic<int64_t (*)(const CudnnPieceQuery&)> g_cuda_cudnn_workspace{nullptr};
}  // namespace

void set_cuda_cudnn_query(bool (*cudnn_in_force)(),
                          int64_t (*cudnn_workspace)(const CudnnPieceQuery&)) {
  g_cuda_cudnn_workspace.store(cudnn_workspace);
  g_cuda_cudnn_in_force.store(cudnn_in_force);
}

CudnnCallCut cudnn_call_cut(int64_t nq, int64_t nk, int64_t hq, int64_t hkv, int64_t d,
                            int token_part) {
  namespace cudnn = cuda::attn::cudnn;
  TSP_CHECK(nq > 0 && nk > 0 && nk % nq == 0,
            "cudnn_call_cut: {} queries are not a zigzag part of {} keys (the layouts' calls: "
            "nq = nk / parts)",
            nq, nk);
  // The layouts' positions (take_tokens): one part, every position in order; else the zigzag
  // part `token_part` of nk / nq parts against the whole row in rank order.
  const int parts = static_cast<int>(nk / nq);
  std::vector<int64_t> q_pos, k_pos;
  if (parts == 1) {
    q_pos.resize(nk);
    std::iota(q_pos.begin(), q_pos.end(), int64_t{0});
    k_pos = q_pos;
  } else {
    q_pos = zigzag_positions(nk, parts, token_part);
    k_pos = zigzag_gathered_positions(nk, parts);
  }
  // attention.cpp, then cudnn_forward / cudnn_backward (plan_call): the path's shape rules, then
  // the cut of the positions' runs into pieces.
  CudnnCallCut out;
  cudnn::CallShape c;
  c.bf16 = true, c.d = static_cast<int>(d), c.documents = false, c.aligned = true;
  c.nq = nq, c.nk = nk, c.hq = static_cast<int>(hq), c.hkv = static_cast<int>(hkv);
  if (!cudnn::shape_covered(c)) return out;
  const cudnn::PiecePlan cut =
      cudnn::plan_pieces(cudnn::runs_of(q_pos.data(), nq), cudnn::runs_of(k_pos.data(), nk));
  if (!cut.covered) return out;
  out.covered = true;
  out.keys_in_order = cut.keys_in_order;
  for (const cudnn::Piece& pc : cut.pieces) {
    out.pieces.push_back({pc.nq, pc.nk, pc.right_bound});
    out.max_nq = std::max(out.max_nq, pc.nq);
    out.max_nk = std::max(out.max_nk, pc.nk);
  }
  return out;
}

// Derived from attention_cudnn.cpp (cudnn_forward, cudnn_backward), which allocates all of it
// before its first cuDNN call and frees it on return, every piece reusing it:
//   both directions: stats F32 [hq, max_nq] (cuDNN's Stats, transposed to and from our lse); the
//     plan workspace, an I64 tensor of ⌈ws/8⌉ elements (workspace_bytes; none when ws = 0), ws the
//     largest over the call's pieces; when the keys' memory order is not their position order
//     (sorted_keys: the zigzag chunks gathered in rank order), bf16 copies of K and V
//     [max_nk, hkv·d] each;
//   backward also: dout rounded to bf16 [nq, hq, d], and cuDNN's bf16 dQ [max_nq, hq, d], dK and
//     dV [max_nk, hkv, d], added into our fp32 gradients piece by piece;
// with max_nq, max_nk the most queries and keys of one piece. The run finder's buffers
// (DeviceState: cudaMalloc and pinned host memory, 24 bytes once per device) are not tensors:
// outside the tracker and the model, like cuBLASLt's workspace.
// The forward's share (stats, ws, the copies) is not in any moment: the same layer's backward
// holds what the forward call held, its own stats and copies, and the fp32 dk, dv (8·nk·hkv·d)
// on top, which exceed the forward plan's workspace at every shape we know of (cuDNN's SDPA
// forward asks for none or little); the GPU memory test would show a forward peak.
int64_t cudnn_attention_transient(bool backward, int64_t nq, int64_t nk, int64_t hq, int64_t hkv,
                                  int64_t d, int token_part, const MemoryTarget& target) {
  if (token_part < 0) {
    // The rank with the largest: part 0 has the most keys in one piece, a middle part may have
    // the most queries (its two chunks in one run). cudnn_call_cut checks that nq divides nk.
    const int64_t parts = nq > 0 ? std::max<int64_t>(1, nk / nq) : 1;
    int64_t most = 0;
    for (int p = 0; p < parts; ++p)
      most = std::max(most, cudnn_attention_transient(backward, nq, nk, hq, hkv, d, p, target));
    return most;
  }
  int64_t (*workspace)(const CudnnPieceQuery&) = g_cuda_cudnn_workspace.load();
  TSP_CHECK(workspace,
            "the cuDNN attention's memory: no CUDA backend in this build registered "
            "the cuDNN workspace query (src/backend/cuda/attention.cpp)");
  const CudnnCallCut cut = cudnn_call_cut(nq, nk, hq, hkv, d, token_part);
  if (!cut.covered) return 0;
  // Then a plan for every piece (plan_call), else the whole call takes v1.
  int64_t ws = 0;
  for (const CudnnCallCut::Piece& pc : cut.pieces) {
    CudnnPieceQuery q;
    q.backward = backward;
    q.nq = pc.nq, q.nk = pc.nk;
    q.hq = static_cast<int>(hq), q.hkv = static_cast<int>(hkv), q.d = static_cast<int>(d);
    q.right_bound = pc.right_bound;
    q.scale = 1.0f / std::sqrt(static_cast<float>(d));  // block::AttnDims::scale
    q.device = target.device_index;
    const int64_t piece_ws = workspace(q);
    if (piece_ws < 0) return 0;
    ws = std::max(ws, piece_ws);
  }
  const int64_t bf16 = 2, max_nq = cut.max_nq, max_nk = cut.max_nk;
  int64_t bytes = kF32 * hq * max_nq + (ws + 7) / 8 * 8;
  if (!cut.keys_in_order) bytes += 2 * bf16 * max_nk * hkv * d;
  if (backward) bytes += bf16 * nq * hq * d + bf16 * max_nq * hq * d + 2 * bf16 * max_nk * hkv * d;
  return bytes;
}

int64_t LocalInputs::add_widening(int64_t n) const {
  return !target.cuda() && e.mixed() ? kF32 * n : 0;
}

int64_t LocalInputs::accumulate_widening(int64_t n) const {
  return target.cuda() && e.mixed() ? kF32 * n : 0;
}

int64_t LocalInputs::row_loss(int64_t m) const {
  return target.cuda() ? 8 * m : 0;
}

int64_t MemoryTarget::token_chunk() const {
  return block::token_chunk(device);
}

namespace {
std::atomic<bool (*)()> g_cuda_flash_v2_query{nullptr};
}  // namespace

void set_cuda_flash_v2_query(bool (*v2_in_force)()) {
  g_cuda_flash_v2_query.store(v2_in_force);
}

MemoryTarget memory_target_of(Device device) {
  MemoryTarget t;
  t.device = device.kind;
  if (t.cuda()) {
    t.device_index = device.index;
    if (bool (*v2)() = g_cuda_flash_v2_query.load()) t.flash_v2 = v2();
    if (bool (*cudnn)() = g_cuda_cudnn_in_force.load()) t.cudnn = cudnn();
  }
  return t;
}

int64_t params_held(const Dims& s, int64_t w, bool split_norms) {
  const int64_t norm = split_norms ? s.h / w : s.h;
  const std::vector<int64_t> numels = block_param_numels(s);
  int64_t block = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    const bool is_norm = i == 0 || i == 5;
    block += aligned(is_norm ? norm : numels[i] / w);
  }
  const int64_t vocab = aligned(s.V / w * s.h) * (s.tied ? 1 : 2);
  return s.L * block + vocab + aligned(norm);
}

int64_t store_elements(const Dims& s, int64_t w, bool split_norms, int zero_replicas,
                       bool norms_at_end) {
  if (zero_replicas <= 1) return params_held(s, w, split_norms);
  // ZeRO-1 (ShardStore::allocate): one bucket per layer and one for what is final at the end of
  // the backward, each padded to a multiple of lcm(16, R) elements.
  const int64_t quantum = std::lcm<int64_t>(16, zero_replicas);
  auto padded = [&](int64_t x) { return (x + quantum - 1) / quantum * quantum; };
  const int64_t norm = aligned(split_norms ? s.h / w : s.h);
  const std::vector<int64_t> numels = block_param_numels(s);
  int64_t layer = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    const bool is_norm = i == 0 || i == 5;
    if (is_norm && norms_at_end) continue;
    layer += is_norm ? norm : aligned(numels[i] / w);
  }
  const int64_t end =
      aligned(s.V / w * s.h) * (s.tied ? 1 : 2) + norm + (norms_at_end ? 2 * s.L * norm : 0);
  return s.L * padded(layer) + padded(end);
}

int64_t LocalInputs::kept(int64_t n, int64_t h, int64_t f) const {
  if (recompute != Recompute::None) return 0;
  return 2 * e.act * n * h + (2 * kF32 + e.act) * n * f;
}

int64_t LocalInputs::mlp_backward_work(int64_t r, int64_t f) const {
  const int64_t grads = 2 * kF32 * r * f;  // da (then dg), du
  return recompute == Recompute::None ? grads : grads + 2 * kF32 * r * f + e.act * r * f;
}

LayoutSpec LayoutModel::spec_of(Layout& layout, int D, int R) const {
  return {layout.name(), D, 1, R};
}

MemoryBreakdown predict_state_memory(const LlamaConfig& m, const LayoutSpec& l, bool optimizer,
                                     DType compute) {
  const LayoutModel& model = layout_model(l.name);
  const Dims s = dims_of(m);
  const ElemBytes e = ElemBytes::of(compute);
  // The ShardStore (src/parallel/layout_common.cpp): fp32 master values and fp32 gradients, each
  // one slab of the aligned shards; under bf16 a third slab of the same element count holds the
  // compute copy (Weights). AdamW's two fp32 moments per element (Optimizer).
  // Under ZeRO-1 over R replicas (ShardStore's partition): the slabs are cut in buckets padded
  // to R equal parts; the fp32 master (under bf16; under f32 it is the whole compute slab), the
  // reduced gradient and both moments are kept for this replica's part only (1/R), beside the
  // whole compute copy and the whole local gradient slab.
  const int zr = zero_replicas(l);
  const int64_t held = store_elements(s, model.store_split(l), model.store_splits_norms(), zr,
                                      zr > 1 && model.norm_grads_final_at_end(l));
  const int64_t part = held / zr;
  MemoryBreakdown state;
  if (zr == 1) {
    state[MemCategory::Weights] = kF32 * held + (e.mixed() ? e.weight * held : 0);
    state[MemCategory::Grads] = kF32 * held;
    if (optimizer) state[MemCategory::Optimizer] = 2 * kF32 * held;
  } else {
    state[MemCategory::Weights] = e.mixed() ? e.weight * held + kF32 * part : kF32 * held;
    state[MemCategory::Grads] = kF32 * held + kF32 * part;
    if (optimizer) state[MemCategory::Optimizer] = 2 * kF32 * part;  // the store's partition
  }
  return state;
}

MemoryBreakdown predict_local_memory(const LlamaConfig& m, const LayoutSpec& l, int64_t B,
                                     int64_t S, bool optimizer, DType compute, Recompute recompute,
                                     MemoryTarget target, int token_part) {
  const LayoutModel& model = layout_model(l.name);
  TSP_CHECK(B % l.R == 0, "predict_local_memory: B={} rows do not split over R={} replicas", B,
            l.R);
  const ElemBytes e = ElemBytes::of(compute);
  const MemoryBreakdown state = predict_state_memory(m, l, optimizer, compute);

  LocalInputs in;
  in.m = &m;
  in.l = &l;
  in.Br = B / l.R;
  in.S = S;
  in.e = e;
  in.recompute = recompute;
  in.target = target;
  in.token_part = token_part;
  std::vector<Moment> moments;
  model.local_moments(in, moments);
  TSP_CHECK(!moments.empty(), "predict_local_memory: the model of layout '{}' gives no moment",
            l.name);
  MemoryBreakdown best;
  double best_total = -1;
  for (const Moment& mo : moments) {
    MemoryBreakdown b = state;
    b[MemCategory::Activations] += mo.act;
    b[MemCategory::Comm] += mo.comm;
    b[MemCategory::Workspace] += mo.work;
    b[MemCategory::Grads] += mo.grads_extra;
    if (b.total() > best_total) best_total = b.total(), best = b;
  }
  return best;
}

StepTraffic predict_local_traffic(const LlamaConfig& m, const LayoutSpec& l, int64_t B, int64_t S,
                                  int group_rank, DType compute, Recompute recompute) {
  const LayoutModel& model = layout_model(l.name);
  const Dims s = dims_of(m);
  const int64_t Br = B / l.R, N = Br * S;
  const ElemBytes e = ElemBytes::of(compute);
  StepTraffic t;
  // The loss sum (one double per rank, Communicator::sum_host) and the batch checks are host
  // control traffic, counted apart in CommStats::control: not part of this data traffic.
  // One source of truth for the blocks: block_comm (sp and tp-sp keep the gathered K/V, as
  // tp_sp.cpp does; tsp and fsdp-cp re-gather whatever regather_kv says).
  const BlockComm blk = block_comm(m, l, N, e, /*regather_kv=*/false);
  // Full recomputation: the backward replays every block's forward first (LayoutCommon::run),
  // with the communication the layout's replay_comm names. None moves what selective moves (what
  // it keeps is computed from data every rank already has).
  const Traffic replay = recompute == Recompute::Full ? replay_comm(m, l, N, e) : Traffic{};
  for (int64_t i = 0; i < s.L; ++i) {
    t.forward += blk.forward;
    t.backward += blk.backward;
    t.backward += replay;
  }
  LocalInputs in;
  in.m = &m;
  in.l = &l;
  in.Br = Br;
  in.S = S;
  in.e = e;
  if (l.D > 1) model.outside_traffic(in, t);
  const int zr = zero_replicas(l);
  if (zr > 1) {
    // ZeRO-1 (ShardStore): every bucket reduce-scattered over the replicas in fp32, each replica
    // receiving its part; after the optimizer step the parts all-gathered in the compute dtype.
    const int64_t part = store_elements(s, model.store_split(l), model.store_splits_norms(), zr,
                                        model.norm_grads_final_at_end(l)) /
                         zr;
    t.backward += reduce_scatter(zr, part * e.reduce);
    t.update += all_gather(zr, part * e.weight);
  } else if (l.R > 1) {
    // LayoutCommon: the whole fp32 gradient slab all-reduced over the replicas.
    t.backward += all_reduce(
        l.R, params_held(s, model.store_split(l), model.store_splits_norms()) * e.reduce);
  }
  (void)group_rank;  // broadcast roots: every rank is root once per round set, so totals agree
  return t;
}

CommStats measure_call_traffic(Layout& layout, Communicator& world,
                               const std::function<void()>& call) {
  // tp, sp, tp-sp fold their sub-communicators' traffic into group().stats() at the end of each
  // call, so world + group + replicas covers every layout.
  Communicator* comms[3] = {&world, &layout.group(), &layout.replicas()};
  CommStats before[3];
  for (int i = 0; i < 3; ++i) before[i] = comms[i]->stats();
  call();
  CommStats total;
  for (int i = 0; i < 3; ++i) {
    bool seen = false;  // the same communicator object twice (e.g. R = 1 with no split) counts once
    for (int j = 0; j < i; ++j) seen = seen || comms[j] == comms[i];
    if (!seen) total += comms[i]->stats() - before[i];
  }
  return total;
}

LayoutSpec layout_spec_of(Layout& layout, int world_size) {
  const int D = layout.group().size(), R = layout.replicas().size();
  TSP_CHECK(D * R == world_size, "layout {}: D={} × R={} is not the world size {}", layout.name(),
            D, R, world_size);
  LayoutSpec l = layout_model(layout.name()).spec_of(layout, D, R);
  l.zero = layout.zero_stage();
  return l;
}

}  // namespace tsp::plan
