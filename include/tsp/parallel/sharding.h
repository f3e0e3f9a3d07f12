// Sharding maps shared by every layout: which tokens, heads, weight rows / columns and vocabulary
// ids a rank owns, plus the validation that turns an impossible split into an actionable error.
// All splits are even (equal parts); a shape that does not divide raises tsp::Error saying which
// degrees or sizes would work. See docs/layouts.md for pictures of each map.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tsp/core/tensor.h"
#include "tsp/model/config.h"

namespace tsp {

// A half-open index range [begin, end).
struct Range {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
  bool operator==(const Range&) const = default;
};

// Part `index` of `n` items cut into `parts` equal parts: [index·n/parts, (index+1)·n/parts).
// Throws when parts does not divide n (`what` names the quantity in the message, e.g.
// "intermediate_size").
Range even_range(int64_t n, int parts, int index, const std::string& what = "size");

// ---- Weights -----------------------------------------------------------------------------------
// Shard r of D of a [rows, cols] weight stored [out, in]: by output rows (q, k, v, gate, up,
// embedding / LM head by vocabulary) or by input columns (o, down).
inline Range row_shard(int64_t rows, int D, int r) {
  return even_range(rows, D, r, "rows");
}
inline Range col_shard(int64_t cols, int D, int r) {
  return even_range(cols, D, r, "columns");
}
// Vocabulary ids [v0, v1) of shard r (the rows of the embedding / LM head it holds).
Range vocab_shard(int64_t vocab_size, int D, int r);

// ---- Heads (GQA) -------------------------------------------------------------------------------
// Head group r of D: n_kv/D kv heads and the g·n_kv/D query heads that read them. Query head j
// reads kv head j/g, so the groups are contiguous in both and the weight shards are contiguous
// rows: wq rows [q.begin·d, q.end·d), wk / wv rows [kv.begin·d, kv.end·d), wo columns as wq rows.
struct HeadGroup {
  Range q;   // query heads
  Range kv;  // key / value heads
  int64_t head_dim = 0;
  int64_t hq() const { return q.size(); }
  int64_t hkv() const { return kv.size(); }
  Range q_rows() const { return {q.begin * head_dim, q.end * head_dim}; }
  Range kv_rows() const { return {kv.begin * head_dim, kv.end * head_dim}; }
};
HeadGroup head_group(const LlamaConfig& c, int D, int r);  // validates (check_heads)

// ---- Zigzag sequence sharding ---------------------------------------------------------------
// The sequence of S tokens is cut into 2D chunks of S/(2D); rank p holds chunks p and 2D-1-p, in
// that order, so every rank does the same causal attention work. Every row of a batch is cut the
// same way: a rank's local tokens are [B, S/D] (row-major: row b, then local index).
std::vector<int64_t> zigzag_positions(int64_t S, int D, int p);  // [S/D] global positions
// The same positions as increasing half-open ranges: chunks p and 2D-1-p, merged into one range
// when they touch (p = D-1). Validates like zigzag_positions.
std::vector<Range> zigzag_ranges(int64_t S, int D, int p);
// Positions of the concatenation of every rank's local tokens in rank order (what an all-gather
// of per-rank [S/D] blocks produces): [S], a permutation of 0..S-1.
std::vector<int64_t> zigzag_gathered_positions(int64_t S, int D);
// full [B, S, ...] -> local [B, S/D, ...] of rank p (any dtype; trailing dims copied whole).
void zigzag_take(TensorView full, TensorView local, int D, int p);
// local [B, S/D, ...] of rank p -> its places in full [B, S, ...] (other places untouched).
void zigzag_put(TensorView local, TensorView full, int D, int p);

// ---- Validation (throw tsp::Error with what would work) ----------------------------------------
// "num_key_value_heads=4 is not divisible by D=8; use D in {1, 2, 4}" (also num_attention_heads).
void check_heads(const LlamaConfig& c, int D);
// S must split into 2D equal chunks: "sequence length S=100 cannot be cut into 2D=16 equal zigzag
// chunks; use S a multiple of 16 (e.g. 96 or 112), or D in {1, 2, 5, 10, 25, 50}".
void check_zigzag(int64_t S, int D);
void check_vocab(int64_t vocab_size, int D);
void check_ffn(int64_t intermediate_size, int D);
// World of W ranks = D·R: R (dp) must divide W, and T (tp, for tp-sp) must divide D. Returns D.
int check_world(int world, int dp, int tp = 1);

// The divisors of n up to `limit`, as "{1, 2, 4}" (for error messages).
std::string divisors_str(int64_t n, int64_t limit = 1 << 20);

}  // namespace tsp
