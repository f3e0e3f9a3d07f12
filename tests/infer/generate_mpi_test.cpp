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
  ScaledWeights(uint64_t seed, float scale) : base_(seed), scale_(scale) {}
  void read_rows(const ParamSpec& s, int64_t r0, int64_t r1, TensorView dst) const override {
    base_.read_rows(s, r0, r1, dst);
    const bool norm = s.kind == ParamKind::InputNorm || s.kind == ParamKind::PostNorm ||
                      s.kind == ParamKind::FinalNorm;
    if (!norm) scale_inplace(dst.f32(), scale_, dst.numel());
  }

 private:
  RandomWeights base_;
  float scale_;
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
                   std::vector<float>* first_logits = nullptr) {
  auto engine = make_engine(c, layout, world());
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
// (o, lse), two all-reduces of h + the logits all-gather. Only activation sizes appear.
int64_t tsp_decode_sent_bytes(const LlamaConfig& c, int D, int p, int32_t token) {
  if (D == 1) return 0;
  const int64_t f = 4, h = c.hidden_size, d = c.head_dim(), hq = c.num_attention_heads,
                hkv = c.num_key_value_heads, V = c.vocab_size;
  const int64_t ag = (D - 1);  // all_gather: sent (D-1)·B with B per rank
  int64_t per_layer = ag * (hq * d / D) * f + 2 * ag * (hkv * d / D) * f + ag * (hq * d + hq) * f +
                      2 * (2 * (D - 1) * h * f / D);
  const int64_t embed = (p == token / (V / D)) ? h * f : 0;
  return embed + c.num_hidden_layers * per_layer + ag * (V / D) * f;
}

TEST(Generate, TspDecodeMovesActivationsOnly) {
  const int D = world().size();
  for (int64_t ffn : {128, 512}) {  // 4× the MLP weights: the same decode traffic
    LlamaConfig c = gqa_config();
    c.intermediate_size = ffn;
    auto engine = make_engine(c, "tsp", world());
    engine->load(ScaledWeights(1234, 20.f));
    engine->prefill(prompt_of(16, c.vocab_size, 3), 4);
    for (int32_t token : {7, 200, 99}) {
      const CommStats before = engine->group().stats();
      engine->decode(token);
      const CommStats step = engine->group().stats() - before;
      EXPECT_EQ(step.total_sent(), tsp_decode_sent_bytes(c, D, world().rank(), token))
          << "F=" << ffn << " token " << token;
      EXPECT_EQ(step[CommOp::Send].calls, 0) << "no ring (weight transfer) during decode";
    }
  }
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
    EXPECT_NE(std::string(e.what()).find("single, tp, sp, tsp"), std::string::npos);
  }
}

}  // namespace
}  // namespace tsp::infer
