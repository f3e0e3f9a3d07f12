// The cuDNN attention path (attention_cudnn.h; attention.h says when it runs). NOT YET RUN ON A
// GPU. The only file that includes the cuDNN frontend (its headers take most of a minute to
// compile); without TSP_HAVE_CUDNN (CMake's TSP_WITH_CUDNN off) it only says so.
//
// What cuDNN computes, and how it maps onto ours (frontend 1.32.0; the lines are quoted from its
// headers):
//   * Layout: cuDNN's tensors are [b, h, s, d] with arbitrary strides; ours are token-major
//     [n, h, d] (b = 1): dims (1, h, n, d), strides (n·h·d, d, h·d, 1). GQA: K and V have hkv
//     heads, query head h reads kv head h / (hq / hkv) (cuDNN's einsum "b (hk g) skv d", g =
//     hq / hk, node/scaled_dot_product_flash_attention.h), our mapping.
//   * Mask: attention_cudnn_rules.h (TOP_LEFT diagonal band, right bound q0 - k0, keys cut to nk').
//     Positions in several runs (the zigzag chunks, K/V gathered in rank order) are cut into
//     pieces of one band each (attention_cudnn_pieces.h): one cuDNN call per piece, on its own
//     query rows, against the keys in position order (K and V gathered into that order when their
//     memory order differs; their gradients added back run by run).
//   * Forward statistics (set_generate_stats(true)): the softmax node's Stats = max + log(Σ
//     exp(x - max)) of the scaled, masked scores x = scale·q·k (node/softmax.h, "log" is
//     PointwiseMode_t::LOG, the natural log; base 2 only with set_stats_use_log2, which we leave
//     off), F32 — exactly our lse (src/ops/cpu/attention_reference.cpp: lse = log Σ e^{scale·q·k}).
//     Layout [b, h, s, 1]; we declare it packed (strides h·s, s, 1, 1) in a Workspace tensor and
//     transpose to our [nq, hq] (a strided Stats is only honoured by cuDNN >= 9.12 in the forward
//     and >= 9.26 in the backward: "For cuDNN version below 9.26.0, a non-ragged Stats input of
//     sdpa_backward must be a packed BHSD tensor").
//   * Backward (CompositeSDPABackwardNode): softmax_sum = reduce(dO * O) over d ("mul_dO_O",
//     "reduce_dO_o": D = rowsum(dO∘O) from the O given), then P = exp(scale·s - Stats) ("sub_s_m",
//     then "exp_s", with the Stats given) — no renormalisation. So passing the FINAL o and lse (merged
//     over K/V chunks) gives this chunk's part of the gradients, as our kernels do.
//     cuDNN writes (=) dQ, dK, dV in the io dtype (bf16): they go to bf16 Workspace tensors and
//     are added (+=) into our F32 gradients. dout (F32) is rounded to bf16 first (cuDNN's dO is
//     the io dtype), as the flash path does.
//   * Extra rounding against the reference (cuda_attention_test derives its bounds from these):
//     forward: P to bf16 before P·V (cuDNN's fused kernels, like ours), o once to bf16; backward:
//     dO to bf16 (in dP, dV and D), P and dS to bf16 for the products, and each of this call's
//     dQ, dK, dV rounded once to bf16 before it is added to ours (relative 2^-8 of the call's
//     part; the flash path adds fp32).
//
// Cost per call, before cuDNN runs: the run finder (a small kernel, a 2 KB copy to pinned host
// memory and a stream sync: the host waits for everything queued on the stream so far, then
// decides; the GPU idles for the time it takes the host to queue the next kernels, ~10-20 µs);
// per piece the LSE transpose(s), in the backward three += kernels (dK, dV: one per key run), once
// the dout rounding, and with keys out of position order their gather (2·nk'·hkv·d bf16). Plans
// are built once per (direction, device, nq, nk', hq, hkv, d, band, scale) and cached: a layout's
// pieces repeat every step.
//
// Memory per call (Workspace tensors, allocated before the first piece and freed on return): the
// memory model counts them (plan::cudnn_attention_transient, src/plan/measure.cpp), so a change
// here is a change there.
#include "backend/cuda/attention_cudnn.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backend/cuda/attention_cudnn_pieces.h"
#include "backend/cuda/attention_cudnn_rules.h"
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/gemm_cast.h"
#include "tsp/core/error.h"
#include "tsp/core/tensor.h"

#if TSP_HAVE_CUDNN
#include <dlfcn.h>

#include <cudnn_frontend.h>

// The frontend's dynamic-loading mode (NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING, set by CMake for
// this file) calls cuDNN through dlsym on this handle, which the program must define and set
// (cudnn_frontend_shim.h: "extern void *cudnn_dlhandle"); libcudnn is not linked.
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;
}
#endif

namespace tsp::cuda::attn {

#if !TSP_HAVE_CUDNN

bool cudnn_built() {
  return false;
}
std::string cudnn_unavailable_reason() {
  return "this build has no cuDNN attention path (CMake's TSP_WITH_CUDNN was off or found no "
         "cuDNN / cuDNN frontend headers: see the configure output)";
}
int cudnn_loaded_version() {
  return 0;
}
int64_t cudnn_calls_run() {
  return 0;
}
bool cudnn_forward(const Fwd&, int, cudaStream_t) {
  TSP_FAIL("TSP_CUDA_FLASH=cudnn: {}", cudnn_unavailable_reason());
}
bool cudnn_backward(const Bwd&, int, cudaStream_t) {
  TSP_FAIL("TSP_CUDA_FLASH=cudnn: {}", cudnn_unavailable_reason());
}
std::string cudnn_check_graph(bool, const Shape&, int64_t, float, int) {
  TSP_FAIL("cudnn_check_graph: {}", cudnn_unavailable_reason());
}
int64_t cudnn_plan_workspace(bool, const Shape&, int64_t, float, int) {
  TSP_FAIL("TSP_CUDA_FLASH=cudnn: {}", cudnn_unavailable_reason());
}

#else

namespace fe = cudnn_frontend;

namespace {

// ---- the library ------------------------------------------------------------------------------

struct Library {
  std::string missing;  // "" when loaded
  int version = 0;
};

// dlopen once; the handle is never closed (cached plans and handles outlive any scope).
const Library& library() {
  static const Library lib = [] {
    Library l;
    dlerror();
    void* h = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_GLOBAL);
    if (h == nullptr) {
      const char* err = dlerror();
      l.missing = fmt::format(
          "libcudnn.so.9 could not be loaded ({}): install cuDNN 9 for this CUDA (e.g. the pip "
          "wheel nvidia-cudnn-cu13) and put the folder holding libcudnn.so.9 on LD_LIBRARY_PATH",
          err ? err : "no dlerror");
      return l;
    }
    fe::cudnn_dlhandle = h;
    try {
      l.version = static_cast<int>(fe::detail::get_backend_version());
    } catch (const std::exception& e) {
      l.missing = fmt::format("libcudnn.so.9 loaded but cudnnGetVersion failed: {}", e.what());
      return l;
    }
    if (l.version < 90000) {
      l.missing = fmt::format("libcudnn.so.9 reports version {}, below 9.0.0", l.version);
      return l;
    }
    // cuDNN is built for one CUDA major (the wheels nvidia-cudnn-cu12 / -cu13), and its runtime-
    // compiled attention kernels need that major's NVRTC: a libcudnn.so.9 of another CUDA loads
    // and answers, then has every plan refused, so every call would quietly take the flash path.
    using CudartVersionFn = size_t (*)();
    auto cudart_of = reinterpret_cast<CudartVersionFn>(dlsym(h, "cudnnGetCudartVersion"));
    const size_t built_for = cudart_of ? cudart_of() : 0;
    if (built_for / 1000 != CUDART_VERSION / 1000) {
      l.missing = fmt::format(
          "libcudnn.so.9 (version {}) was built for CUDA {}, this program for CUDA {}: install "
          "cuDNN 9 for CUDA {} (e.g. the pip wheel nvidia-cudnn-cu{}) and put its folder first on "
          "LD_LIBRARY_PATH",
          fe::detail::convert_version_to_str(l.version), built_for, CUDART_VERSION,
          CUDART_VERSION / 1000, CUDART_VERSION / 1000);
      return l;
    }
    // The frontend makes its own CUDA runtime calls (the device's properties at validation; with
    // cuDNN < 9.6 the backward's dQ-accumulator memset, on the handle's stream) through a
    // runtime it dlopens itself: libcudart.so.12, then .13, the first found wins
    // (cudnn_frontend_shim.h, load_cudart_so). Pin it to the runtime this program links
    // (CUDART_VERSION's major; the same library then, already loaded), so a CUDA 12 runtime
    // elsewhere on the library path is never mixed in; CUDNN_FRONTEND_CUDART_LIB_NAME is the
    // frontend's override, and one the user set is kept. Then load it now, so that a failure
    // is this sentence rather than an exception in the first plan build.
    const std::string cudart = fmt::format("libcudart.so.{}", CUDART_VERSION / 1000);
    setenv("CUDNN_FRONTEND_CUDART_LIB_NAME", cudart.c_str(), 0);
    int runtime = 0;
    try {
      if (fe::detail::cuda_runtime_get_version(&runtime) != cudaSuccess) runtime = 0;
    } catch (const std::exception& e) {
      l.missing = fmt::format("the cuDNN frontend could not load the CUDA runtime: {}", e.what());
      return l;
    }
    if (runtime / 1000 != CUDART_VERSION / 1000) {
      const char* chosen = std::getenv("CUDNN_FRONTEND_CUDART_LIB_NAME");
      l.missing = fmt::format(
          "the cuDNN frontend loaded CUDA runtime {} (CUDNN_FRONTEND_CUDART_LIB_NAME={}), but this "
          "program was built with CUDA {}: unset that variable or set it to {}",
          runtime, chosen ? chosen : "", CUDART_VERSION, cudart);
      return l;
    }
    // cuDNN's attention engines are runtime-compiled, and cuDNN dlopens NVRTC for them (cuDNN
    // 9.19's heuristics, mode A, given an H100's device properties on a machine without a GPU,
    // offer for this path's graphs only engines 1, 2, 8, 9 forward and 6, 7 backward, each
    // refused there as RUNTIME_PREREQUISITE_MISSING for want of the driver and compiler).
    // Without it every plan is refused and each call would quietly take the flash path: say so.
    const std::string nvrtc = fmt::format("libnvrtc.so.{}", CUDART_VERSION / 1000);
    dlerror();
    if (dlopen(nvrtc.c_str(), RTLD_NOW) == nullptr) {  // kept open: cuDNN loads the same one
      const char* err = dlerror();
      l.missing = fmt::format(
          "{} could not be loaded ({}): cuDNN compiles its attention kernels at run time with "
          "NVRTC; put the folder holding {} (the CUDA toolkit's lib64, or the pip wheel "
          "nvidia-cuda-nvrtc's lib) on LD_LIBRARY_PATH",
          nvrtc, err ? err : "no dlerror", nvrtc);
      return l;
    }
    std::fprintf(stderr, "tsp: cuDNN attention path: libcudnn %s loaded\n",
                 fe::detail::convert_version_to_str(l.version).c_str());
    return l;
  }();
  return lib;
}

void require_library() {
  const Library& l = library();
  TSP_CHECK(l.missing.empty(), "TSP_CUDA_FLASH=cudnn: {}", l.missing);
}

// ---- per device: the handle, the position check's buffers ------------------------------------

struct DeviceState {
  std::mutex m;  // the handle (plan builds, stream binding + execute), the position buffers
  cudnnHandle_t handle = nullptr;
  PositionRuns* runs_dev = nullptr;   // device scratch of the position check
  PositionRuns* runs_host = nullptr;  // pinned: the copy the host reads
};

// Created on first use, never destroyed: destroying handles and plans during process exit races
// with the CUDA runtime's own teardown. The 24-byte buffers are outside the memory tracker.
DeviceState& device_state(int device) {
  static std::mutex m;
  // Allocated and never freed, so that no destructor runs at exit (the comment above).
  static auto& states = *new std::map<int, std::unique_ptr<DeviceState> >;
  std::lock_guard<std::mutex> lock(m);
  std::unique_ptr<DeviceState>& st = states[device];
  if (!st) {
    auto s = std::make_unique<DeviceState>();
    const cudnnStatus_t status = fe::detail::create_handle(&s->handle);
    TSP_CHECK(status == CUDNN_STATUS_SUCCESS, "cuDNN attention: cudnnCreate on cuda:{} failed: {}",
              device, fe::detail::get_error_string(status));
    TSP_CUDA_CHECK(cudaMalloc(&s->runs_dev, sizeof(PositionRuns)));
    TSP_CUDA_CHECK(cudaMallocHost(&s->runs_host, sizeof(PositionRuns)));
    st = std::move(s);
  }
  return *st;
}

// ---- plans ------------------------------------------------------------------------------------

enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

struct Key {
  bool backward;
  int device;
  int64_t nq, nk;  // nk: the keys passed (nk')
  int hq, hkv, d;
  int64_t right_bound;  // or cudnn::kNoMask
  uint32_t scale_bits;
  auto tie() const {
    return std::tie(backward, device, nq, nk, hq, hkv, d, right_bound, scale_bits);
  }
  bool operator<(const Key& o) const { return tie() < o.tie(); }
  std::string str() const {
    float scale;
    std::memcpy(&scale, &scale_bits, 4);
    return fmt::format(
        "{} nq={} nk={} hq={} hkv={} d={} band={} scale={} on cuda:{}",
        backward ? "backward" : "forward", nq, nk, hq, hkv, d,
        right_bound == cudnn::kNoMask ? std::string("none") : "j-i<=" + std::to_string(right_bound),
        scale, device);
  }
};

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;  // null: cuDNN does not support this key
  int64_t workspace = 0;                    // bytes
};

// A token-major [n, h, d] bf16 tensor as cuDNN's [1, h, n, d].
std::shared_ptr<fe::graph::Tensor_attributes> token_major(fe::graph::Graph& g, const char* name,
                                                          Uid uid, int64_t n, int64_t h,
                                                          int64_t d) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_data_type(fe::DataType_t::BFLOAT16)
                      .set_dim({1, h, n, d})
                      .set_stride({n * h * d, d, h * d, 1}));
}

void set_token_major(fe::graph::Tensor_attributes& t, Uid uid, int64_t n, int64_t h, int64_t d) {
  t.set_output(true)
      .set_uid(uid)
      .set_data_type(fe::DataType_t::BFLOAT16)
      .set_dim({1, h, n, d})
      .set_stride({n * h * d, d, h * d, 1});
}

// The softmax statistics, F32 [1, hq, nq, 1] packed (see the top).
void set_stats(fe::graph::Tensor_attributes& t, int64_t nq, int64_t hq) {
  t.set_uid(kStats)
      .set_data_type(fe::DataType_t::FLOAT)
      .set_dim({1, hq, nq, 1})
      .set_stride({hq * nq, nq, 1, 1});
}

// sm > 0: the SM version the frontend's checks assume instead of asking the device (set before
// the nodes are added: each copies the graph's context when it is created). impl: the forward's
// implementation (AUTO: the frontend picks UNIFIED where its support surface allows it, else
// COMPOSITE; the backward has one).
std::shared_ptr<fe::graph::Graph> make_graph(
    const Key& k, int sm = 0,
    fe::AttentionImplementation_t impl = fe::AttentionImplementation_t::AUTO) {
  auto g = std::make_shared<fe::graph::Graph>();
  if (sm > 0) g->set_sm_version(sm);
  g->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  float scale;
  std::memcpy(&scale, &k.scale_bits, 4);
  auto q = token_major(*g, "q", kQ, k.nq, k.hq, k.d);
  auto kk = token_major(*g, "k", kK, k.nk, k.hkv, k.d);
  auto v = token_major(*g, "v", kV, k.nk, k.hkv, k.d);
  const bool masked = k.right_bound != cudnn::kNoMask;
  if (!k.backward) {
    auto opts = fe::graph::SDPA_attributes()
                    .set_name("tsp_attention_forward")
                    .set_generate_stats(true)
                    .set_attn_scale(scale)
                    .set_implementation(impl);
    if (masked)
      opts.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
          .set_diagonal_band_right_bound(static_cast<int>(k.right_bound));
    auto [o, stats] = g->sdpa(q, kk, v, opts);
    set_token_major(*o, kO, k.nq, k.hq, k.d);
    stats->set_output(true);
    set_stats(*stats, k.nq, k.hq);
  } else {
    auto o = token_major(*g, "o", kO, k.nq, k.hq, k.d);
    auto dout = token_major(*g, "dout", kDO, k.nq, k.hq, k.d);
    auto stats = g->tensor(fe::graph::Tensor_attributes().set_name("stats"));
    set_stats(*stats, k.nq, k.hq);
    auto opts = fe::graph::SDPA_backward_attributes()
                    .set_name("tsp_attention_backward")
                    .set_attn_scale(scale);
    if (masked)
      opts.set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
          .set_diagonal_band_right_bound(static_cast<int>(k.right_bound));
    auto [dq, dk, dv] = g->sdpa_backward(q, kk, v, o, dout, stats, opts);
    set_token_major(*dq, kDQ, k.nq, k.hq, k.d);
    set_token_major(*dk, kDK, k.nk, k.hkv, k.d);
    set_token_major(*dv, kDV, k.nk, k.hkv, k.d);
  }
  return g;
}

std::string fe_error(const fe::error_t& e) {
  std::ostringstream s;
  s << e.code;
  return s.str() + ": " + e.err_msg;
}

// The implementations a plan build tries, in order (build_plan), and cudnn_check_graph checks: the
// frontend's own choice (AUTO), then for the forward COMPOSITE. With cuDNN >= 9.13.1 AUTO picks
// the UNIFIED operation for unmasked forward graphs, and whether this cuDNN offers an engine for
// it on this GPU is known only there; masked graphs and the backward are COMPOSITE anyway.
std::vector<fe::AttentionImplementation_t> implementations(bool backward) {
  if (backward) return {fe::AttentionImplementation_t::AUTO};
  return {fe::AttentionImplementation_t::AUTO, fe::AttentionImplementation_t::COMPOSITE};
}

// How messages name a forced implementation ("" for the frontend's own choice).
const char* implementation_label(fe::AttentionImplementation_t impl) {
  return impl == fe::AttentionImplementation_t::COMPOSITE ? "COMPOSITE " : "";
}

// Why a graph got no plan: the step that said "not supported", and what it said.
struct Refusal {
  const char* step;
  fe::error_t error;
};

// Builds the graph of k with the forward implementation impl, into plan. Steps that say "not
// supported" return their refusal: validation's GRAPH_NOT_SUPPORTED; build_operation_graph's
// GRAPH_NOT_SUPPORTED or CUDNN_BACKEND_API_FAILED (the frontend reports a descriptor the library
// refuses as the latter: graph_helpers.h, cudnn_interface.h); no engine from the heuristics;
// check_support; no plan that builds. Any other failure throws.
std::optional<Refusal> try_build(const Key& k, cudnnHandle_t handle,
                                 fe::AttentionImplementation_t impl, Plan& plan) {
  auto fail = [&](const char* step, const std::string& msg) {
    TSP_FAIL("cuDNN attention: {} failed for {}: {}", step, k.str(), msg);
  };
  std::shared_ptr<fe::graph::Graph> g;
  // Graph::sdpa picks the implementation (UNIFIED or COMPOSITE) when it is called and throws
  // std::runtime_error when neither supports the attributes (frontend 1.32 graph_interface.h,
  // sdpa_internal: "No suitable implementation for given SDPA_attributes"): not supported.
  try {
    g = make_graph(k, 0, impl);
  } catch (const std::runtime_error& ex) {
    return Refusal{"sdpa", fe::error_t{fe::error_code_t::GRAPH_NOT_SUPPORTED, ex.what()}};
  }
  fe::error_t e = g->validate();
  if (e.is_bad()) {
    if (e.code == fe::error_code_t::GRAPH_NOT_SUPPORTED) return Refusal{"validate", e};
    fail("validate", fe_error(e));
  }
  e = g->build_operation_graph(handle);
  if (e.is_bad()) {
    if (e.code == fe::error_code_t::GRAPH_NOT_SUPPORTED ||
        e.code == fe::error_code_t::CUDNN_BACKEND_API_FAILED)
      return Refusal{"build_operation_graph", e};
    fail("build_operation_graph", fe_error(e));
  }
  if (e = g->create_execution_plans({fe::HeurMode_t::A}); e.is_bad())
    return Refusal{"create_execution_plans", e};
  if (e = g->check_support(handle); e.is_bad()) return Refusal{"check_support", e};
  if (e = g->build_plans(handle); e.is_bad()) return Refusal{"build_plans", e};
  int64_t ws = 0;
  if (e = g->get_workspace_size(ws); e.is_bad()) fail("get_workspace_size", fe_error(e));
  plan.graph = std::move(g);
  plan.workspace = ws;
  return std::nullopt;
}

// Builds the plan of k (implementations() in turn): a null graph, logged once, when cuDNN does not
// support it.
Plan build_plan(const Key& k, cudnnHandle_t handle) {
  std::string why;
  // A band whose right bound is above 0 (queries after the first key, s_q <= s_kv) is what cuDNN
  // supports from 9.6 on (Transformer Engine's backend rules: "9.6: SWA", any right window with
  // top-left alignment); the frontend itself checks only that the bound is not negative.
  if (k.right_bound > 0 && library().version < 90600) {
    why = fmt::format("a band bound above 0 needs cuDNN 9.6, this is {}", library().version);
  } else {
    try {
      for (fe::AttentionImplementation_t impl : implementations(k.backward)) {
        Plan plan;
        const std::optional<Refusal> r = try_build(k, handle, impl, plan);
        if (!r) return plan;
        why += fmt::format("{}{}{}: {}", why.empty() ? "" : "; ", implementation_label(impl),
                           r->step, fe_error(r->error));
      }
    } catch (const tsp::Error&) {
      throw;
    } catch (const std::exception& ex) {  // the frontend throws too (cudnnException, dlsym errors)
      TSP_FAIL("cuDNN attention: building the plan failed for {}: {}", k.str(), ex.what());
    }
  }
  std::fprintf(stderr,
               "tsp: cuDNN attention does not support %s (%s); such calls take the flash path\n",
               k.str().c_str(), why.c_str());
  return Plan{};
}

const Plan& plan_for(const Key& k, DeviceState& st) {
  static std::mutex m;
  // Never destroyed, as the device states (each plan holds cuDNN descriptors, and a descriptor's
  // destructor calls into cuDNN).
  static auto& plans = *new std::map<Key, std::unique_ptr<Plan> >;
  std::lock_guard<std::mutex> lock(m);  // a build takes milliseconds, once per key
  std::unique_ptr<Plan>& p = plans[k];
  if (!p) {
    // The build uses the handle: not while another thread executes on it (a cuDNN handle serves
    // one thread at a time). Lock order: plans, then the device's; nothing takes them reversed.
    std::lock_guard<std::mutex> handle_lock(st.m);
    p = std::make_unique<Plan>(build_plan(k, st.handle));
  }
  return *p;
}

// ---- per call ---------------------------------------------------------------------------------

bool aligned16(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// The cuDNN calls of one attention call: its cut into pieces (attention_cudnn_pieces.h), each
// with its plan.
struct PieceCall {
  cudnn::Piece piece;
  Key key{};
  const Plan* plan = nullptr;
};
struct CallPlan {
  cudnn::PiecePlan cut;
  std::vector<PieceCall> calls;
  int64_t max_nq = 0, max_nk = 0;  // the largest piece's queries and keys (every piece reads a
                                   // prefix of the sorted keys: max_nk of them are used)
  int64_t workspace = 0;           // the largest plan's workspace, bytes
};

// The runs of q_pos and k_pos, found on the device (queued on s) and read by the host after one
// stream sync (see the top); empty when either side has more than kMaxRuns.
using Runs = std::vector<cudnn::PosRun>;
std::pair<Runs, Runs> find_runs(const int64_t* q_pos, int64_t nq, const int64_t* k_pos, int64_t nk,
                                int device, cudaStream_t s) {
  static_assert(kMaxPositionRuns == cudnn::kMaxRuns, "the device's slots are the planner's runs");
  DeviceState& st = device_state(device);
  PositionRuns runs;
  {
    std::lock_guard<std::mutex> lock(st.m);
    TSP_CUDA_CHECK(cudnn_find_runs(q_pos, nq, k_pos, nk, st.runs_dev, s));
    TSP_CUDA_CHECK(cudaMemcpyAsync(st.runs_host, st.runs_dev, sizeof(PositionRuns),
                                   cudaMemcpyDeviceToHost, s));
    wait_for_stream(s);  // pinned: the copy is queued; polls (cuda_common.h)
    runs = *st.runs_host;
  }
  if (runs.q_count > cudnn::kMaxRuns || runs.k_count > cudnn::kMaxRuns) return {};
  Runs q, k;
  for (int32_t r = 0; r < runs.q_count; ++r) q.push_back({runs.q_row[r], 0, runs.q_pos[r]});
  for (int32_t r = 0; r < runs.k_count; ++r) k.push_back({runs.k_row[r], 0, runs.k_pos[r]});
  return {cudnn::runs_from_starts(std::move(q), nq), cudnn::runs_from_starts(std::move(k), nk)};
}

// Whether cuDNN takes the call, and how: the shape rules, then the positions' runs cut into
// pieces, then a supported plan for every piece (else the whole call takes the flash path).
bool plan_call(bool backward, const Shape& sh, bool documents, bool aligned, float scale,
               const int64_t* q_pos, const int64_t* k_pos, int device, cudaStream_t s,
               CallPlan* out) {
  cudnn::CallShape c;
  c.bf16 = true, c.d = sh.d, c.documents = documents, c.aligned = aligned;
  c.nq = sh.nq, c.nk = sh.nk, c.hq = sh.hq, c.hkv = sh.hkv;
  if (!cudnn::shape_covered(c)) return false;
  auto [q_runs, k_runs] = find_runs(q_pos, sh.nq, k_pos, sh.nk, device, s);
  CallPlan call;
  call.cut = cudnn::plan_pieces(q_runs, k_runs);
  if (!call.cut.covered) return false;
  for (const cudnn::Piece& pc : call.cut.pieces) {
    PieceCall pcall;
    pcall.piece = pc;
    Key& k = pcall.key;
    k.backward = backward;
    k.device = device;
    k.nq = pc.nq, k.nk = pc.nk;
    k.hq = sh.hq, k.hkv = sh.hkv, k.d = sh.d;
    k.right_bound = pc.right_bound;
    std::memcpy(&k.scale_bits, &scale, 4);
    const Plan& plan = plan_for(k, device_state(device));
    if (!plan.graph) return false;
    pcall.plan = &plan;
    call.max_nq = std::max(call.max_nq, pc.nq);
    call.max_nk = std::max(call.max_nk, pc.nk);
    call.workspace = std::max(call.workspace, plan.workspace);
    call.calls.push_back(pcall);
  }
  *out = std::move(call);
  return true;
}

// Workspace tensors belong to the compute stream's order (allocator.cpp). A call on another
// stream (the tests pass the legacy default stream) allocates all of them first, then waits for
// the compute stream (their poison fills and the blocks' earlier users are queued there), and the
// compute stream waits for it before they are freed.
void wait_for(cudaStream_t waiter, cudaStream_t on) {
  cudaEvent_t e;
  TSP_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  TSP_CUDA_CHECK(cudaEventRecord(e, on));
  TSP_CUDA_CHECK(cudaStreamWaitEvent(waiter, e, 0));
  TSP_CUDA_CHECK(cudaEventDestroy(e));
}

Tensor workspace_bytes(int64_t bytes, int device) {
  if (bytes <= 0) return Tensor();
  return Tensor({(bytes + 7) / 8}, DType::I64, MemCategory::Workspace, Device::cuda(device));
}

std::atomic<int64_t> g_calls_run{0};

void execute(const Key& k, const Plan& plan, std::unordered_map<int64_t, void*>& pack,
             void* workspace, cudaStream_t s) {
  DeviceState& st = device_state(k.device);
  std::lock_guard<std::mutex> lock(st.m);  // the handle is bound to one stream at a time
  try {
    const cudnnStatus_t status = fe::detail::set_stream(st.handle, s);
    TSP_CHECK(status == CUDNN_STATUS_SUCCESS, "cuDNN attention: cudnnSetStream failed for {}: {}",
              k.str(), fe::detail::get_error_string(status));
    const fe::error_t e = plan.graph->execute(st.handle, pack, workspace);
    TSP_CHECK(e.is_good(), "cuDNN attention: execute failed for {}: {}", k.str(), fe_error(e));
    g_calls_run.fetch_add(1, std::memory_order_relaxed);
  } catch (const tsp::Error&) {
    throw;
  } catch (const std::exception& ex) {
    TSP_FAIL("cuDNN attention: execute failed for {}: {}", k.str(), ex.what());
  }
}

}  // namespace

bool cudnn_built() {
  return true;
}

std::string cudnn_unavailable_reason() {
  return library().missing;
}

int cudnn_loaded_version() {
  return library().version;
}

int64_t cudnn_calls_run() {
  return g_calls_run.load(std::memory_order_relaxed);
}

std::string cudnn_check_graph(bool backward, const Shape& sh, int64_t right_bound, float scale,
                              int sm) {
  require_library();
  Key k{};
  k.backward = backward, k.device = -1;
  k.nq = sh.nq, k.nk = sh.nk, k.hq = sh.hq, k.hkv = sh.hkv, k.d = sh.d;
  k.right_bound = right_bound;
  std::memcpy(&k.scale_bits, &scale, 4);
  for (fe::AttentionImplementation_t impl : implementations(backward)) {  // as build_plan tries
    const std::string which = implementation_label(impl);
    try {
      std::shared_ptr<fe::graph::Graph> g = make_graph(k, sm, impl);
      fe::error_t e = g->validate();
      if (e.is_bad()) return which + "validate: " + fe_error(e);
      e = g->build_operation_graph(nullptr);
      if (e.is_bad()) return which + "build_operation_graph: " + fe_error(e);
    } catch (const std::exception& ex) {
      return which + "exception: " + ex.what();
    }
  }
  return "";
}

int64_t cudnn_plan_workspace(bool backward, const Shape& sh, int64_t right_bound, float scale,
                             int device) {
  require_library();
  Key k{};  // as plan_call keys a piece
  k.backward = backward;
  k.device = device;
  k.nq = sh.nq, k.nk = sh.nk, k.hq = sh.hq, k.hkv = sh.hkv, k.d = sh.d;
  k.right_bound = right_bound;
  std::memcpy(&k.scale_bits, &scale, 4);
  const Plan& plan = plan_for(k, device_state(device));
  return plan.graph ? plan.workspace : -1;
}

namespace {
// The cuDNN calls of a forward (Fwd) or backward (Bwd) call, or false when cuDNN does not take it
// (not covered, or a piece's graph unsupported on this device): the caller then takes the flash
// kernels.
template <class Params>
bool plan_for_call(bool backward, const Params& p, int device, cudaStream_t s, CallPlan* call) {
  require_library();
  if (!p.bf16) return false;
  return plan_call(backward, p.sh, p.q_doc_pos != nullptr, aligned16({p.q, p.k, p.v, p.o}), p.scale,
                   p.q_pos, p.k_pos, device, s, call);
}

// Element `e` of a bf16 array.
const void* bf16_at(const void* base, int64_t e) {
  return static_cast<const char*>(base) + 2 * e;
}
void* bf16_at(void* base, int64_t e) {
  return static_cast<char*>(base) + 2 * e;
}

// K and V with their keys in position order, as the pieces read them: k, v themselves when that
// is their memory order, else bf16 copies [max_nk, hkv, d] (Workspace) that gather_keys fills by
// runs. Two steps because of wait_for's rule: a call on another stream than the compute stream
// allocates every Workspace tensor before it waits for the compute stream, which is where the
// allocator queues a block's poison fill (and where the block's earlier users ran); a copy
// allocated after that wait could be filled by its stream before the poison fill lands on it.
struct SortedKeys {
  const void *k = nullptr, *v = nullptr;
  Tensor k_copy, v_copy;
};
SortedKeys sorted_keys(const CallPlan& call, const void* k, const void* v, int64_t row,
                       int device) {
  SortedKeys out;
  if (call.cut.keys_in_order) {
    out.k = k, out.v = v;
    return out;
  }
  const Device dev = Device::cuda(device);
  out.k_copy = Tensor({call.max_nk, row}, DType::BF16, MemCategory::Workspace, dev);
  out.v_copy = Tensor({call.max_nk, row}, DType::BF16, MemCategory::Workspace, dev);
  out.k = out.k_copy.data(), out.v = out.v_copy.data();
  return out;
}
// The copies of sorted_keys, queued on s (nothing to do when k, v are in position order).
void gather_keys(const CallPlan& call, const SortedKeys& keys, const void* k, const void* v,
                 int64_t row, cudaStream_t s) {
  if (call.cut.keys_in_order) return;
  int64_t base = 0;
  for (const cudnn::PosRun& r : call.cut.keys) {
    const int64_t n = std::min(r.len, call.max_nk - base);
    if (n <= 0) break;
    TSP_CUDA_CHECK(cudaMemcpyAsync(bf16_at(keys.k_copy.data(), base * row), bf16_at(k, r.row * row),
                                   2 * n * row, cudaMemcpyDeviceToDevice, s));
    TSP_CUDA_CHECK(cudaMemcpyAsync(bf16_at(keys.v_copy.data(), base * row), bf16_at(v, r.row * row),
                                   2 * n * row, cudaMemcpyDeviceToDevice, s));
    base += r.len;
  }
}

// dst (F32, memory order) += src (bf16, the first nk sorted keys), run by run.
void add_sorted(const CallPlan& call, const void* src, float* dst, int64_t nk, int64_t row,
                cudaStream_t s) {
  int64_t base = 0;
  for (const cudnn::PosRun& r : call.cut.keys) {
    const int64_t n = std::min(r.len, nk - base);
    if (n <= 0) break;
    TSP_CUDA_CHECK(cudnn_add_bf16(bf16_at(src, base * row), dst + r.row * row, n * row, s));
    base += r.len;
  }
}
}  // namespace

bool cudnn_forward(const Fwd& p, int device, cudaStream_t s) {
  CallPlan call;
  if (!plan_for_call(false, p, device, s, &call)) return false;

  const cudaStream_t cs = compute_stream(device);
  const int64_t hq = p.sh.hq, q_row = hq * p.sh.d, k_row = p.sh.hkv * p.sh.d;
  Tensor stats({hq, call.max_nq}, DType::F32, MemCategory::Workspace, Device::cuda(device));
  Tensor ws = workspace_bytes(call.workspace, device);
  const SortedKeys keys = sorted_keys(call, p.k, p.v, k_row, device);
  if (s != cs) wait_for(s, cs);  // after the last allocation (sorted_keys)
  gather_keys(call, keys, p.k, p.v, k_row, s);
  for (const PieceCall& pc : call.calls) {
    const int64_t r0 = pc.piece.q_row;
    std::unordered_map<int64_t, void*> pack = {{kQ, const_cast<void*>(bf16_at(p.q, r0 * q_row))},
                                               {kK, const_cast<void*>(keys.k)},
                                               {kV, const_cast<void*>(keys.v)},
                                               {kO, bf16_at(p.o, r0 * q_row)},
                                               {kStats, stats.data()}};
    execute(pc.key, *pc.plan, pack, ws.data(), s);
    TSP_CUDA_CHECK(cudnn_stats_to_lse(static_cast<const float*>(stats.data()), p.lse + r0 * hq,
                                      pc.piece.nq, static_cast<int>(hq), s));
  }
  if (s != cs) wait_for(cs, s);
  return true;
}

bool cudnn_backward(const Bwd& p, int device, cudaStream_t s) {
  CallPlan call;
  if (!plan_for_call(true, p, device, s, &call)) return false;

  const cudaStream_t cs = compute_stream(device);
  const Device dev = Device::cuda(device);
  const int64_t hq = p.sh.hq, d = p.sh.d, hkv = p.sh.hkv, q_row = hq * d, k_row = hkv * d;
  Tensor stats({hq, call.max_nq}, DType::F32, MemCategory::Workspace, dev);
  Tensor dout({p.sh.nq, hq, d}, DType::BF16, MemCategory::Workspace, dev);
  Tensor dq({call.max_nq, hq, d}, DType::BF16, MemCategory::Workspace, dev);
  Tensor dk({call.max_nk, hkv, d}, DType::BF16, MemCategory::Workspace, dev);
  Tensor dv({call.max_nk, hkv, d}, DType::BF16, MemCategory::Workspace, dev);
  Tensor ws = workspace_bytes(call.workspace, device);
  const SortedKeys keys = sorted_keys(call, p.k, p.v, k_row, device);
  if (s != cs) wait_for(s, cs);  // after the last allocation (sorted_keys)
  TSP_CUDA_CHECK(launch_round_f32_to_bf16(p.dout, static_cast<__nv_bfloat16*>(dout.data()),
                                          p.sh.nq * q_row, s));
  gather_keys(call, keys, p.k, p.v, k_row, s);
  for (const PieceCall& pc : call.calls) {
    const int64_t r0 = pc.piece.q_row;
    TSP_CUDA_CHECK(cudnn_lse_to_stats(p.lse + r0 * hq, static_cast<float*>(stats.data()),
                                      pc.piece.nq, static_cast<int>(hq), s));
    std::unordered_map<int64_t, void*> pack = {{kQ, const_cast<void*>(bf16_at(p.q, r0 * q_row))},
                                               {kK, const_cast<void*>(keys.k)},
                                               {kV, const_cast<void*>(keys.v)},
                                               {kO, const_cast<void*>(bf16_at(p.o, r0 * q_row))},
                                               {kDO, bf16_at(dout.data(), r0 * q_row)},
                                               {kStats, stats.data()},
                                               {kDQ, dq.data()},
                                               {kDK, dk.data()},
                                               {kDV, dv.data()}};
    execute(pc.key, *pc.plan, pack, ws.data(), s);
    // This piece's rows of dq; its keys' dk, dv (keys past its nk are seen by none of its queries:
    // += 0, left alone).
    TSP_CUDA_CHECK(cudnn_add_bf16(dq.data(), p.dq + r0 * q_row, pc.piece.nq * q_row, s));
    add_sorted(call, dk.data(), p.dk, pc.piece.nk, k_row, s);
    add_sorted(call, dv.data(), p.dv, pc.piece.nk, k_row, s);
  }
  if (s != cs) wait_for(cs, s);
  return true;
}

#endif  // TSP_HAVE_CUDNN

}  // namespace tsp::cuda::attn
