// Shared pieces of the layout models (the end of each src/parallel/<layout>.cpp), the planner (cost_model.cpp) and the
// model of our implementation (measure.cpp): model shapes, the Communicator's byte-counting
// convention, and the sizes of the tensors our implementation allocates.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tsp/plan/layout_model.h"

namespace tsp::plan {

// ---- shapes (docs/cost-model.md §1) -----------------------------------------------------------

struct Shape {
  int64_t h, kv, I, nh, V, L;
  int64_t attn_params() const { return 2 * h * h + 2 * kv * h; }  // q, k, v, o
  int64_t mlp_params() const { return 3 * I * h; }                // gate, up, down
  int64_t block_matrix_params() const { return attn_params() + mlp_params(); }
  int64_t norm_params() const { return 2 * h; }  // input and post-attention RMSNorm weights
  // Elements of one rank's row pieces of a whole block (fsdp-cp cuts every parameter, norms
  // included, into D pieces; D divides every parameter's rows, so this is the sum of the pieces).
  int64_t block_params_per_piece(int64_t D) const {
    return (block_matrix_params() + norm_params()) / D;
  }
};
inline Shape shape_of(const LlamaConfig& m) {
  return {m.hidden_size,         m.kv_dim(),   m.intermediate_size,
          m.num_attention_heads, m.vocab_size, m.num_hidden_layers};
}

// ---- Communicator counting convention (include/tsp/comm/communicator.h), bytes ------------------

inline Traffic all_gather(int64_t k, int64_t block) {
  return {(k - 1) * block, (k - 1) * block};
}
inline Traffic reduce_scatter(int64_t k, int64_t block_out) {
  return {(k - 1) * block_out, (k - 1) * block_out};
}
inline Traffic all_reduce(int64_t k, int64_t B) {
  const int64_t x = k > 1 ? 2 * (k - 1) * B / k : 0;
  return {x, x};
}
// D rounds of broadcast (round r rooted at rank r) of a B-byte block: each rank is root once
// (sends B) and receives the D-1 others.
inline Traffic broadcast_rounds(int64_t D, int64_t B) {
  return {B, (D - 1) * B};
}
// D rounds of reduce to root r: each rank sends D-1 times and receives (as root) once.
inline Traffic reduce_rounds(int64_t D, int64_t B) {
  return {(D - 1) * B, B};
}
// `count` hops of a B-byte block (a ring of D ranks makes D-1).
inline Traffic hops(int64_t count, int64_t B) {
  return {count * B, count * B};
}

// ---- our implementation's tensors (measure.cpp and the models' local_moments) -------------------

struct Dims {
  int64_t h, d, nh, nkv, F, V, L;
  bool tied;
};
inline Dims dims_of(const LlamaConfig& m) {
  return {m.hidden_size,       m.head_dim(), m.num_attention_heads, m.num_key_value_heads,
          m.intermediate_size, m.vocab_size, m.num_hidden_layers,   m.tie_word_embeddings};
}

constexpr int64_t kF32 = 4;

// block::LayerSaved of n tokens, hq query heads and kv rows `kv_tokens` × hkv heads, bytes: x, x2,
// q, k, v, o in the compute dtype; rstd1, rstd2 and lse fp32.
inline int64_t saved_bytes(const Dims& s, int64_t n, int64_t hq, int64_t hkv, int64_t kv_tokens,
                           const ElemBytes& e) {
  return e.act * (n * s.h * 2                   // x, x2
                  + n * hq * s.d * 2            // q, o
                  + kv_tokens * hkv * s.d * 2)  // k, v
         + kF32 * (n * 2                        // rstd1, rstd2
                   + n * hq);                   // lse
}

// The tokens LayoutCommon::run uploads (take_tokens): ids, labels I32 [n], every token's position
// I64 [n], a row's query positions I64 [nl] and key positions I64 [S]; and the F64 loss.
inline int64_t token_bytes(int64_t n, int64_t nl, int64_t S) {
  return 4 * n + 4 * n + 8 * n + 8 * nl + 8 * S + 8;
}

// The fast attention backward's per-thread scratch, bytes (src/ops/cpu/attention_fast.cpp).
int64_t attention_backward_scratch(int64_t d, int64_t kv_heads);
// What the CPU backend's attention_backward allocates beyond its operands for one call of nq
// queries × hq heads against nk keys × hkv heads, bytes: fp32, the fast path's scratch; bf16, the
// native kernel's packed keys and scratch (AVX512_BF16 and head_dim % 32 == 0), else fp32 copies
// of q, o, k, v for the fp32 kernel and its scratch (src/ops/cpu/attention_bf16.cpp).
int64_t attention_backward_transient(int64_t d, int64_t hq, int64_t hkv, int64_t nq, int64_t nk,
                                     const ElemBytes& e);

// The CUDA v2 flash backward's scratch for one call of nq queries × hq heads, head dim d, without
// documents (attention_flash_v2.cu, backward_d): one Workspace tensor carved into 256-byte
// aligned pieces. Bytes.
int64_t flash_v2_backward_scratch(int64_t nq, int64_t hq, int64_t d);

// How the CUDA cuDNN attention path cuts one attention call of a layout into cuDNN calls
// (attention_cudnn_pieces.h): nq queries × hq heads, the zigzag part `token_part` of rows of nk = S
// tokens cut in nk / nq parts (all of them when nq = nk), against the whole row in the layouts'
// order (LayoutCommon's take_tokens) × hkv heads, head dim d; no documents, views 16-byte aligned
// (the layouts'). `covered` false: the path's shape rules or the cut refuse it (the call runs v1).
struct CudnnCallCut {
  struct Piece {
    int64_t nq = 0, nk = 0, right_bound = 0;  // attention_cudnn_pieces.h's Piece
  };
  bool covered = false;
  std::vector<Piece> pieces;
  int64_t max_nq = 0, max_nk = 0;  // the most queries and keys of one piece
  bool keys_in_order = true;       // false: the path copies K and V into position order
};
CudnnCallCut cudnn_call_cut(int64_t nq, int64_t nk, int64_t hq, int64_t hkv, int64_t d,
                            int token_part);

// What the CUDA cuDNN attention path allocates (Workspace tensors) for one call of a layout, in
// the forward (`backward` false) or the backward, bytes, for the call cudnn_call_cut describes
// (token_part -1: the largest over the nk / nq parts);
// each piece's plan workspace is the CUDA backend's answer (set_cuda_cudnn_query). 0 when the path
// does not take the call (not covered, or a piece cuDNN has no plan for): it then runs on v1,
// which allocates nothing.
int64_t cudnn_attention_transient(bool backward, int64_t nq, int64_t nk, int64_t hq, int64_t hkv,
                                  int64_t d, int token_part, const MemoryTarget& target);

// ShardStore lays every shard 64-byte aligned (16 elements of its slabs): layout_common.cpp.
inline int64_t aligned(int64_t n) {
  return (n + 15) / 16 * 16;
}

// The parameters of one block, elements: input norm, q, k, v, o, post norm, gate, up, down (the
// order of fsdp-cp's layer unit).
inline std::vector<int64_t> block_param_numels(const Dims& s) {
  const int64_t q = s.nh * s.d, kv = s.nkv * s.d;
  return {s.h, q * s.h, kv * s.h, kv * s.h, s.h * q, s.h, s.F * s.h, s.F * s.h, s.h * s.F};
}

// Parameters held by this rank, elements of the ShardStore's slabs (each shard aligned):
// matrices split `w` ways (embedding and LM head by vocabulary rows); RMSNorm weights whole, or
// split too when `split_norms` (fsdp-cp cuts every parameter).
int64_t params_held(const Dims& s, int64_t w, bool split_norms);

// The replicas ZeRO-1 partitions the optimizer state over: R when it is on and R > 1, else 1.
inline int zero_replicas(const LayoutSpec& l) {
  return l.zero == 1 && l.R > 1 ? l.R : 1;
}
// Elements of each ShardStore slab: params_held, or under ZeRO-1 over `zero_replicas` > 1 the
// buckets (one per layer, one for the end of the backward, which also takes the norms when
// `norms_at_end`) each padded to a multiple of lcm(16, R).
int64_t store_elements(const Dims& s, int64_t w, bool split_norms, int zero_replicas,
                       bool norms_at_end);

// A unit of fsdp-cp (src/parallel/fsdp_cp.cpp, struct Unit): its full tensors one after another,
// each aligned, and this rank's pieces likewise (elements).
struct UnitSize {
  int64_t full = 0, piece = 0;
};
inline UnitSize unit_size(const std::vector<int64_t>& numels, int64_t D) {
  UnitSize u;
  for (int64_t x : numels) {
    u.full += aligned(x);
    u.piece += aligned(x / D);
  }
  return u;
}

}  // namespace tsp::plan
