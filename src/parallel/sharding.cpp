#include "tsp/parallel/sharding.h"

#include <cstring>

namespace tsp {

std::string divisors_str(int64_t n, int64_t limit) {
  std::string out = "{";
  bool first = true;
  int shown = 0;
  for (int64_t d = 1; d <= n && d <= limit; ++d) {
    if (n % d) continue;
    if (shown == 24) {  // long lists (e.g. of a vocabulary size) stay readable
      out += ", ...";
      break;
    }
    out += (first ? "" : ", ") + std::to_string(d);
    first = false;
    ++shown;
  }
  return out + "}";
}

Range even_range(int64_t n, int parts, int index, const std::string& what) {
  TSP_CHECK(parts >= 1, "cannot split {} into {} parts", what, parts);
  TSP_CHECK(0 <= index && index < parts, "part {} does not exist in a split into {} parts", index,
            parts);
  TSP_CHECK(n % parts == 0, "{}={} is not divisible by {}; use a degree in {}", what, n, parts,
            divisors_str(n, 4096));
  const int64_t step = n / parts;
  return {index * step, (index + 1) * step};
}

Range vocab_shard(int64_t vocab_size, int D, int r) {
  check_vocab(vocab_size, D);
  return even_range(vocab_size, D, r, "vocab_size");
}

HeadGroup head_group(const LlamaConfig& c, int D, int r) {
  check_heads(c, D);
  HeadGroup g;
  g.head_dim = c.head_dim();
  g.kv = even_range(c.num_key_value_heads, D, r, "num_key_value_heads");
  g.q = {g.kv.begin * c.gqa_group(), g.kv.end * c.gqa_group()};
  return g;
}

void check_heads(const LlamaConfig& c, int D) {
  TSP_CHECK(D >= 1, "the parallel degree D must be at least 1 (got {})", D);
  // Query heads follow their kv heads (D | n_kv implies D | n_h), so n_kv is the binding
  // constraint and is checked first; the second check only guards a config that skipped validate().
  TSP_CHECK(c.num_key_value_heads % D == 0,
            "num_key_value_heads={} is not divisible by D={}; use D in {}", c.num_key_value_heads,
            D, divisors_str(c.num_key_value_heads));
  TSP_CHECK(c.num_attention_heads % D == 0,
            "num_attention_heads={} is not divisible by D={}; use D in {}", c.num_attention_heads,
            D, divisors_str(c.num_key_value_heads));
}

void check_zigzag(int64_t S, int D) {
  TSP_CHECK(D >= 1, "the parallel degree D must be at least 1 (got {})", D);
  TSP_CHECK(S >= 1, "sequence length must be positive (got S={})", S);
  if (S % (2 * D) == 0) return;
  const int64_t m = 2 * D;
  const int64_t lower = S / m * m, upper = lower + m;
  std::string sizes =
      lower > 0 ? fmt::format("e.g. {} or {}", lower, upper) : fmt::format("e.g. {}", upper);
  std::string degrees = S % 2 == 0 ? fmt::format(", or D in {}", divisors_str(S / 2))
                                   : " (an odd S fits no zigzag split)";
  TSP_FAIL(
      "sequence length S={} cannot be cut into 2D={} equal zigzag chunks; use S a multiple of {} "
      "({}){}",
      S, m, m, sizes, degrees);
}

void check_vocab(int64_t vocab_size, int D) {
  TSP_CHECK(D >= 1 && vocab_size % D == 0,
            "vocab_size={} is not divisible by D={}; use D in {} (or pad the vocabulary to a "
            "multiple of D)",
            vocab_size, D, divisors_str(vocab_size, 4096));
}

void check_ffn(int64_t intermediate_size, int D) {
  TSP_CHECK(D >= 1 && intermediate_size % D == 0,
            "intermediate_size={} is not divisible by D={}; use D in {}", intermediate_size, D,
            divisors_str(intermediate_size, 4096));
}

int check_world(int world, int dp, int tp) {
  TSP_CHECK(world >= 1, "world size must be positive (got {})", world);
  TSP_CHECK(dp >= 1, "--dp must be at least 1 (got {})", dp);
  TSP_CHECK(tp >= 1, "--tp must be at least 1 (got {})", tp);
  TSP_CHECK(world % dp == 0,
            "{} ranks cannot hold dp={} equal replicas (world = D·R); use --dp in {} or a "
            "multiple of {} ranks",
            world, dp, divisors_str(world), dp);
  const int D = world / dp;
  TSP_CHECK(D % tp == 0,
            "the layout group of D={} ranks (world {} / dp {}) cannot be split into tp={} groups; "
            "use --tp in {}",
            D, world, dp, tp, divisors_str(D));
  return D;
}

// ---- zigzag --------------------------------------------------------------------------------

std::vector<int64_t> zigzag_positions(int64_t S, int D, int p) {
  check_zigzag(S, D);
  TSP_CHECK(0 <= p && p < D, "rank {} is outside a group of {}", p, D);
  const int64_t c = S / (2 * D);
  std::vector<int64_t> pos;
  pos.reserve(2 * c);
  for (int64_t i = 0; i < c; ++i) pos.push_back(p * c + i);
  for (int64_t i = 0; i < c; ++i) pos.push_back((2 * D - 1 - p) * c + i);
  return pos;
}

std::vector<Range> zigzag_ranges(int64_t S, int D, int p) {
  check_zigzag(S, D);
  TSP_CHECK(0 <= p && p < D, "rank {} is outside a group of {}", p, D);
  const int64_t c = S / (2 * D);
  const Range first{p * c, (p + 1) * c}, second{(2 * D - 1 - p) * c, (2 * D - p) * c};
  if (first.end == second.begin) return {{first.begin, second.end}};
  return {first, second};
}

std::vector<int64_t> zigzag_gathered_positions(int64_t S, int D) {
  std::vector<int64_t> all;
  all.reserve(S);
  for (int p = 0; p < D; ++p) {
    auto pos = zigzag_positions(S, D, p);
    all.insert(all.end(), pos.begin(), pos.end());
  }
  return all;
}

namespace {
// Bytes of one token's trailing dims, after checking full [B, S, ...] against local [B, S/D, ...].
size_t zigzag_token_bytes(const TensorView& full, const TensorView& local, int D) {
  TSP_CHECK(full.rank() >= 2 && local.rank() == full.rank() && full.dtype() == local.dtype(),
            "zigzag: full {} and local {} must both be [B, S, ...] of one dtype",
            shape_str(full.shape()), shape_str(local.shape()));
  check_zigzag(full.dim(1), D);
  Shape want = full.shape();
  want[1] /= D;
  TSP_CHECK(local.shape() == want, "zigzag: local tensor is {}, expected {} for D={}",
            shape_str(local.shape()), shape_str(want), D);
  return full.numel() / (full.dim(0) * full.dim(1)) * dtype_size(full.dtype());
}

// Copies between full and local order, chunk by chunk (each chunk is contiguous in both).
void zigzag_copy(TensorView full, TensorView local, int D, int p, bool to_local) {
  const size_t tok = zigzag_token_bytes(full, local, D);
  check_host(full);  // host copies (on a device: Backend::copy_2d)
  check_host(local);
  TSP_CHECK(0 <= p && p < D, "rank {} is outside a group of {}", p, D);
  const int64_t B = full.dim(0), S = full.dim(1), n = S / D, c = S / (2 * D);
  auto* f = static_cast<char*>(full.data());
  auto* l = static_cast<char*>(local.data());
  const int64_t chunks[2] = {p, 2 * D - 1 - p};
  for (int64_t b = 0; b < B; ++b) {
    for (int k = 0; k < 2; ++k) {
      char* fp = f + (b * S + chunks[k] * c) * tok;
      char* lp = l + (b * n + k * c) * tok;
      if (to_local)
        std::memcpy(lp, fp, c * tok);
      else
        std::memcpy(fp, lp, c * tok);
    }
  }
}
}  // namespace

void zigzag_take(TensorView full, TensorView local, int D, int p) {
  zigzag_copy(full, local, D, p, true);
}
void zigzag_put(TensorView local, TensorView full, int D, int p) {
  zigzag_copy(full, local, D, p, false);
}

}  // namespace tsp
