// Inference engines against the single engine: greedy tokens identical for every layout and
// degree, KV cache 1/D per rank, weight-stationary tsp decode (traffic = activations only, by
// formula), seeded sampling reproducible, request errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "infer/common.h"
#include "mpi_test_util.h"
#include "tsp/core/memory.h"
#include "tsp/infer/engine.h"
#include "tsp/ops/ops.h"
#include "tsp/parallel/sharding.h"

namespace tsp::infer {
namespace {

Communicator& world() {
  return test::world();
}

// Random weights scaled up from init's N(0, 0.02): at 0.02 the logits of a tiny model are nearly
// uniform and attention nearly flat, so greedy equality would test little. ×20 (std 0.4) makes
// attention peaked and the argmax decisive, while norms stay 1.
class ScaledWeights : public WeightSource {
 public:
  // vocab_scale < 0: the same scale for the embedding / head as for the layers.
  ScaledWeights(uint64_t seed, float scale, float vocab_scale = -1)
      : base_(seed), scale_(scale), vocab_scale_(vocab_scale < 0 ? scale : vocab_scale) {}
  void read_rows(const ParamSpec& s, int64_t r0, int64_t r1, TensorView dst) const override {
    base_.read_rows(s, r0, r1, dst);
    const bool norm = s.kind == ParamKind::InputNorm || s.kind == ParamKind::PostNorm ||
                      s.kind == ParamKind::FinalNorm;
    const bool vocab = s.kind == ParamKind::Embedding || s.kind == ParamKind::LmHead;
    if (!norm) scale_inplace(dst.f32(), vocab ? vocab_scale_ : scale_, dst.numel());
  }

 private:
  RandomWeights base_;
  float scale_, vocab_scale_;
};

// Heads, FFN and vocabulary divide every degree up to 8.
LlamaConfig mha_config() {
  LlamaConfig c;
  c.hidden_size = 64;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 8;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.vocab_size = 256;
  c.max_position_embeddings = 96;
  return c;
}
LlamaConfig gqa_config() {  // g = 2, tied embeddings
  LlamaConfig c = mha_config();
  c.hidden_size = 128;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 8;
  c.tie_word_embeddings = true;
  return c;
}

std::vector<int32_t> prompt_of(int64_t P, int64_t V, int salt) {
  std::vector<int32_t> t(P);
  for (int64_t i = 0; i < P; ++i) t[i] = static_cast<int32_t>((i * 37 + salt * 11 + 5) % V);
  return t;
}

GenerateResult run(const LlamaConfig& c, const std::string& layout,
                   const std::vector<int32_t>& prompt, int64_t max_new, SamplingParams s = {0.f},
                   std::vector<float>* first_logits = nullptr, DType dtype = DType::F32) {
  auto engine = make_engine(c, layout, world(), dtype);
  engine->load(ScaledWeights(1234, 20.f));
  if (first_logits) *first_logits = engine->prefill(prompt, 0);
  GenerateOptions o;
  o.max_new = max_new;
  o.sampling = s;
  return generate(*engine, prompt, o);
}

TEST(Generate, SplitPromptIsTheZigzagMapWhenItDivides) {
  for (int D : {1, 2, 4}) {
    for (int p = 0; p < D; ++p) {
      const PromptSplit s = split_prompt(32, D, p);
      EXPECT_EQ(s.pos, zigzag_positions(32, D, p));
      EXPECT_EQ(s.n_max, 32 / D);
    }
  }
  // Any length: every position exactly once, counts within two of each other.
  for (int64_t P : {1, 5, 13}) {
    for (int D : {2, 4, 8}) {
      std::vector<int> seen(P, 0);
      for (int p = 0; p < D; ++p) {
        const PromptSplit s = split_prompt(P, D, p);
        EXPECT_LE(s.n_max - s.n_local(), 2);
        for (int64_t t : s.pos) ++seen[t];
        if (p == s.last_owner) {
          EXPECT_EQ(s.pos[s.last_local], P - 1);
        }
      }
      EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));
    }
  }
}

TEST(Generate, GreedyTokensEqualSingleForEveryLayout) {
  const int D = world().size();
  for (const LlamaConfig& c : {mha_config(), gqa_config()}) {
    // 32 divides into 2D chunks; 13 exercises the padded split (and ranks with few tokens).
    for (int64_t P : {32, 13}) {
      const std::vector<int32_t> prompt = prompt_of(P, c.vocab_size, static_cast<int>(P));
      std::vector<float> ref_logits;
      const GenerateResult ref = run(c, "single", prompt, 12, {0.f}, &ref_logits);
      for (const std::string layout : {"tp", "sp", "tsp"}) {
        SCOPED_TRACE(layout + " D=" + std::to_string(D) + " P=" + std::to_string(P) +
                     " n_kv=" + std::to_string(c.num_key_value_heads));
        std::vector<float> logits;
        const GenerateResult r = run(c, layout, prompt, 12, {0.f}, &logits);
        EXPECT_EQ(r.tokens, ref.tokens);
        // Same maths in another summation order (all-reduce, lse merge, split GEMMs): fp32
        // rounding of O(10) logits over 2 layers stays far below 1e-3; a wrong head, position
        // or mask shifts logits by O(1).
        float err = 0;
        for (size_t i = 0; i < logits.size(); ++i)
          err = std::max(err, std::abs(logits[i] - ref_logits[i]));
        EXPECT_LT(err, 1e-3f);
        if (D == 1) {
          EXPECT_EQ(logits, ref_logits);  // one rank: the same operations
        }
      }
    }
  }
}

TEST(Generate, KvCacheIsOneDthOfSinglesUnderSpAndTsp) {
  const int D = world().size();
  const LlamaConfig c = gqa_config();
  const std::vector<int32_t> prompt = prompt_of(32, c.vocab_size, 1);
  const int64_t max_new = 1 + 8;  // 8 decode tokens: round-robin puts 8/D on each rank
  const int64_t single_bytes = run(c, "single", prompt, max_new).kv_cache_bytes;
  EXPECT_EQ(single_bytes, c.num_hidden_layers * 2 * (32 + 8) * c.kv_dim() * 4);
  for (const std::string layout : {"sp", "tsp"}) {
    auto engine = make_engine(c, layout, world());
    engine->load(ScaledWeights(1234, 20.f));
    const int64_t before =
        MemoryTracker::instance().snapshot().current[static_cast<int>(MemCategory::Activations)];
    GenerateOptions o;
    o.max_new = max_new;
    generate(*engine, prompt, o);
    const int64_t after =
        MemoryTracker::instance().snapshot().current[static_cast<int>(MemCategory::Activations)];
    EXPECT_EQ(engine->kv_cache_bytes() * D, single_bytes) << layout;
    EXPECT_EQ(after - before, engine->kv_cache_bytes()) << layout << ": tracker sees the cache";
    EXPECT_EQ(engine->cached_tokens(), (32 + 8) / D) << layout;
  }
}

// The bytes one tsp decode step sends from this rank, in the Communicator's convention:
// embedding row broadcast (root only) + per layer all-gathers of q, k, v and of the partial
// (o, lse), two all-reduces of h + the logits all-gather. Only activation sizes appear:
// activations (the embedding row, q, k, v, o) in the compute dtype; lse, the all-reduced partial
// outputs and the logits in f32 (statistics and reductions stay fp32).
int64_t tsp_decode_sent_bytes(const LlamaConfig& c, int D, int p, int32_t token, DType dtype) {
  if (D == 1) return 0;
  const int64_t a = static_cast<int64_t>(dtype_size(dtype)), f = 4, h = c.hidden_size,
                d = c.head_dim(), hq = c.num_attention_heads, hkv = c.num_key_value_heads,
                V = c.vocab_size;
  const int64_t ag = (D - 1);  // all_gather: sent (D-1)·B with B per rank
  int64_t per_layer = ag * (hq * d / D) * a + 2 * ag * (hkv * d / D) * a +
                      ag * (hq * d * a + hq * f) + 2 * (2 * (D - 1) * h * f / D);
  const int64_t embed = (p == token / (V / D)) ? h * a : 0;
  return embed + c.num_hidden_layers * per_layer + ag * (V / D) * f;
}

TEST(Generate, TspDecodeMovesActivationsOnly) {
  const int D = world().size();
  for (DType dtype : {DType::F32, DType::BF16}) {
    for (int64_t ffn : {128, 512}) {  // 4× the MLP weights: the same decode traffic
      LlamaConfig c = gqa_config();
      c.intermediate_size = ffn;
      auto engine = make_engine(c, "tsp", world(), dtype);
      engine->load(ScaledWeights(1234, 20.f));
      engine->prefill(prompt_of(16, c.vocab_size, 3), 4);
      for (int32_t token : {7, 200, 99}) {
        const CommStats before = engine->group().stats();
        engine->decode(token);
        const CommStats step = engine->group().stats() - before;
        EXPECT_EQ(step.total_sent(), tsp_decode_sent_bytes(c, D, world().rank(), token, dtype))
            << dtype_name(dtype) << " F=" << ffn << " token " << token;
        EXPECT_EQ(step[CommOp::Send].calls, 0) << "no ring (weight transfer) during decode";
      }
    }
  }
}

// ---- bf16 ------------------------------------------------------------------------------------

// The logits of every step of a sequence whose tokens are given (teacher forcing): prefill of the
// prompt, then one decode per token of `fed` but the last. Every layout and dtype is thus
// compared on the same positions, whatever it would have chosen.
std::vector<std::vector<float>> step_logits(const LlamaConfig& c, const std::string& layout,
                                            DType dtype, const std::vector<int32_t>& prompt,
                                            const std::vector<int32_t>& fed,
                                            const WeightSource& weights) {
  auto engine = make_engine(c, layout, world(), dtype);
  engine->load(weights);
  std::vector<std::vector<float>> out;
  out.push_back(engine->prefill(prompt, static_cast<int64_t>(fed.size()) - 1));
  for (size_t i = 0; i + 1 < fed.size(); ++i) out.push_back(engine->decode(fed[i]));
  return out;
}

// ||a - b||_2 / ||b||_2 over one step's logits.
double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// The largest logit minus the second largest.
double top2_gap(const std::vector<float>& l) {
  std::vector<float> s = l;
  std::partial_sort(s.begin(), s.begin() + 2, s.end(), std::greater<float>());
  return static_cast<double>(s[0]) - s[1];
}

// Bounds for bf16 logits, norm-wise relative (rel_error), and the model they hold for.
//
// The model is "trained-like": not chaotic, and with a decisive next token at every step. Its
// embedding and LM head are those of a trained bigram model over the prompts' progression
// t -> t + 37 (mod V): head row b is the embedding row of b - 37, both ×20 (std 0.4), so the
// final state of a token a scores a + 37 at about h·0.4² ≈ 20 above the rest (whose scores
// are O(sqrt(h)·0.4²)); the top two logits of every step are far apart (checked), as after
// training, instead of the near-ties of a random model. The layers (weights ×3, std 0.06) add
// context as a trained model's do, in the regime where RMSNorm renormalises the residual stream
// and a relative perturbation of one stage reaches the logits without amplification (bf16
// against f32 measures well below its bound). At ×20 everywhere, the model of the f32 tests,
// attention is so peaked that one flipped bf16 ulp changes later steps by percents: fine for
// f32, whose rounding is 2^-24, not for a bf16 bound.
class BigramWeights : public WeightSource {
 public:
  explicit BigramWeights(const LlamaConfig& c) : base_(1234, 3.f, 20.f), V_(c.vocab_size) {
    for (const ParamSpec& s : llama_param_specs(c))
      if (s.kind == ParamKind::Embedding) embed_ = s;
  }
  void read_rows(const ParamSpec& s, int64_t r0, int64_t r1, TensorView dst) const override {
    if (s.kind != ParamKind::LmHead) return base_.read_rows(s, r0, r1, dst);
    const int64_t h = s.shape[1];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t prev = ((r - 37) % V_ + V_) % V_;
      base_.read_rows(embed_, prev, prev + 1, dst.window((r - r0) * h, {1, h}));
    }
  }

 private:
  ScaledWeights base_;
  int64_t V_;
  ParamSpec embed_;
};

// Layout against single, both bf16: every fp32 accumulation differs only by summation order
// (~1e-6), but results are rounded to bf16 at each sub-block output; where two fp32 values that
// differ by ~1e-6 straddle a rounding boundary they land one bf16 ulp apart (2^-8 relative), so a
// stage adds at most 2^-8 norm-wise (the argument of kLayoutRtolBf16 in
// tests/parallel/layout_harness.h). Forward stages that can differ: the 2L sub-block outputs, the
// final norm, and under sp / tsp decode the merge of partial attentions, which rounds each
// rank's partial o before the merge and the merged o after it (one more stage per layer):
// (2L + 1 + L)·2^-8 = 7·2^-8 = 2.7e-2 for L = 2. A sharding bug (a wrong head group, shard or
// position) moves logits by O(1).
constexpr double kBf16LayoutRtol = 7.0 / 256;
// bf16 against f32 (single): every weight matrix and norm is rounded once (relative error at most
// u = 2^-9), and every activation stage once more: per layer 9 weights (q, k, v, o, gate, up,
// down, two norms) and 10 activations (xn1, q, k, v, o and its merge, x2, xn2, the MLP
// activation, x), plus the embedding, the final norm's weight and output: 2·19 + 3 = 41 stages,
// 41·2^-9 = 8.0e-2. A wrong dtype path (bf16 bits read as f32, a missing cast) gives garbage.
constexpr double kBf16VsF32Rtol = 41.0 / 512;

LlamaConfig bf16_config() {
  LlamaConfig c = gqa_config();   // g = 2
  c.tie_word_embeddings = false;  // the bigram head
  return c;
}

// Teacher-forced logits of every step (see step_logits) with the trained-like weights.
std::vector<std::vector<float>> bf16_step_logits(const std::string& layout, DType dtype,
                                                 const std::vector<int32_t>& prompt,
                                                 const std::vector<int32_t>& fed) {
  return step_logits(bf16_config(), layout, dtype, prompt, fed, BigramWeights(bf16_config()));
}

GenerateResult bf16_generate(const std::string& layout, const std::vector<int32_t>& prompt,
                             int64_t max_new) {
  auto engine = make_engine(bf16_config(), layout, world(), DType::BF16);
  engine->load(BigramWeights(bf16_config()));
  GenerateOptions o;
  o.max_new = max_new;
  o.sampling = {0.f};
  return generate(*engine, prompt, o);
}

TEST(Generate, Bf16GreedyTokensEqualSingleBf16ForEveryLayout) {
  const int D = world().size();
  const int64_t V = bf16_config().vocab_size;
  for (int64_t P : {32, 13}) {
    const std::vector<int32_t> prompt = prompt_of(P, V, static_cast<int>(P));
    const GenerateResult ref = bf16_generate("single", prompt, 12);
    const auto ref_l = bf16_step_logits("single", DType::BF16, prompt, ref.tokens);
    // Not a trivial sequence, and every step decided by a margin no layout difference within
    // kBf16LayoutRtol can cross (|Δ_i| <= ||Δ||_2 <= rtol·||l||_2 on each side of the gap).
    std::vector<int32_t> distinct = ref.tokens;
    std::sort(distinct.begin(), distinct.end());
    EXPECT_GE(std::unique(distinct.begin(), distinct.end()) - distinct.begin(), 3);
    for (size_t i = 0; i < ref_l.size(); ++i) {
      double norm = 0;
      for (float v : ref_l[i]) norm += static_cast<double>(v) * v;
      ASSERT_GT(top2_gap(ref_l[i]), 2 * kBf16LayoutRtol * std::sqrt(norm))
          << "step " << i << ": the model's top two logits are too close for a greedy comparison";
    }
    for (const std::string layout : {"tp", "sp", "tsp"}) {
      SCOPED_TRACE(layout + " bf16 D=" + std::to_string(D) + " P=" + std::to_string(P));
      EXPECT_EQ(bf16_generate(layout, prompt, 12).tokens, ref.tokens);
      const auto l = bf16_step_logits(layout, DType::BF16, prompt, ref.tokens);
      for (size_t i = 0; i < l.size(); ++i) {
        EXPECT_LE(rel_error(l[i], ref_l[i]), kBf16LayoutRtol) << "step " << i;
        if (D == 1) {
          EXPECT_EQ(l[i], ref_l[i]) << "one rank: the same operations, step " << i;
        }
      }
    }
  }
}

TEST(Generate, Bf16LogitsNearF32) {
  const int64_t V = bf16_config().vocab_size;
  for (int64_t P : {32, 13}) {
    const std::vector<int32_t> prompt = prompt_of(P, V, static_cast<int>(P));
    const GenerateResult ref = bf16_generate("single", prompt, 12);
    const auto f32 = bf16_step_logits("single", DType::F32, prompt, ref.tokens);
    for (const std::string layout : {"single", "tp", "sp", "tsp"}) {
      const auto bf = bf16_step_logits(layout, DType::BF16, prompt, ref.tokens);
      for (size_t i = 0; i < bf.size(); ++i) {
        // Against f32 single: bf16's own rounding plus the layout's (kBf16LayoutRtol).
        const double e = rel_error(bf[i], f32[i]);
        EXPECT_LE(e, kBf16VsF32Rtol + (layout == "single" ? 0 : kBf16LayoutRtol))
            << layout << " P=" << P << " step " << i;
        EXPECT_GT(e, 0) << layout << ": bf16 must round (is the dtype passed through?)";
      }
    }
  }
}

TEST(Generate, Bf16KvCacheIsHalfOfF32) {
  const LlamaConfig c = gqa_config();
  const std::vector<int32_t> prompt = prompt_of(32, c.vocab_size, 1);
  for (const std::string layout : {"single", "tp", "sp", "tsp"}) {
    const int64_t f32 = run(c, layout, prompt, 9, {0.f}, nullptr, DType::F32).kv_cache_bytes;
    const int64_t bf16 = run(c, layout, prompt, 9, {0.f}, nullptr, DType::BF16).kv_cache_bytes;
    EXPECT_EQ(2 * bf16, f32) << layout;
    if (layout == "single") {
      EXPECT_EQ(bf16, c.num_hidden_layers * 2 * (32 + 8) * c.kv_dim() * 2);
    }
  }
}

TEST(Generate, ComputeDtypeErrors) {
  EXPECT_THROW(make_engine(mha_config(), "single", world(), DType::I32), Error);
  auto engine = make_engine(mha_config(), "tsp", world(), DType::BF16);
  EXPECT_EQ(engine->compute_dtype(), DType::BF16);
}

TEST(Generate, SeededSamplingIsReproducibleAcrossRunsAndLayouts) {
  const LlamaConfig c = mha_config();
  const std::vector<int32_t> prompt = prompt_of(16, c.vocab_size, 2);
  const SamplingParams s{0.9f, 40, 0.95f, 2024};
  const GenerateResult a = run(c, "single", prompt, 10, s);
  EXPECT_EQ(run(c, "single", prompt, 10, s).tokens, a.tokens);
  EXPECT_EQ(run(c, "tsp", prompt, 10, s).tokens, a.tokens);
  EXPECT_EQ(run(c, "sp", prompt, 10, s).tokens, a.tokens);
  SamplingParams other = s;
  other.seed = 7;
  const GenerateResult b = run(c, "single", prompt, 10, other);
  EXPECT_NE(b.tokens, a.tokens) << "the seed must matter (10 draws from a peaked but not "
                                   "one-hot distribution)";
}

TEST(Generate, SamplingBasics) {
  std::vector<float> logits = {0.1f, 3.f, 3.f, -1.f};
  EXPECT_EQ(sample_token(logits, {0.f}, 0), 1);  // greedy: lowest id among the maxima
  for (int64_t step = 0; step < 50; ++step) {
    EXPECT_EQ(sample_token(logits, {1.f, 1, 1.f, 9}, step), 1);       // top-k 1 = greedy
    const int32_t t = sample_token(logits, {1.f, 0, 0.5f, 9}, step);  // nucleus: {1, 2}
    EXPECT_TRUE(t == 1 || t == 2);
    const double u = counter_uniform(9, step);
    EXPECT_TRUE(u >= 0 && u < 1);
  }
  EXPECT_THROW(validate_sampling({-1.f}), Error);
  EXPECT_THROW(validate_sampling({1.f, -1}), Error);
  EXPECT_THROW(validate_sampling({1.f, 0, 0.f}), Error);
}

TEST(Generate, RequestErrors) {
  const LlamaConfig c = mha_config();  // max_position_embeddings = 96
  auto engine = make_engine(c, "tsp", world());
  engine->load(ScaledWeights(1, 1.f));
  GenerateOptions o;
  o.max_new = 4;
  auto message = [&](const std::vector<int32_t>& prompt, int64_t max_new) -> std::string {
    o.max_new = max_new;
    try {
      generate(*engine, prompt, o);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message({}, 4).find("prompt is empty"), std::string::npos);
  EXPECT_NE(message(prompt_of(97, 256, 0), 1).find("max_position_embeddings=96"),
            std::string::npos);
  EXPECT_NE(message(prompt_of(90, 256, 0), 7).find("use --max-new <= 6"), std::string::npos);
  EXPECT_NE(message({1, 300}, 2).find("outside the vocabulary"), std::string::npos);
  EXPECT_NE(message({1, 2}, 0).find("at least 1"), std::string::npos);
  try {
    make_engine(c, "fsdp-cp", world());
    ADD_FAILURE() << "fsdp-cp has no engine";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("single, sp, tp, tsp"), std::string::npos);
  }
}

}  // namespace
}  // namespace tsp::infer
