// The engine factory, request validation and the generation loop shared by every layout.
#include <chrono>

#include "infer/common.h"
#include "parallel/registry.h"
#include "tsp/parallel/sharding.h"

namespace tsp::infer {

std::string supported_layouts() {
  return engine_layout_names_str();
}

std::unique_ptr<Engine> make_engine(const LlamaConfig& config, const std::string& layout,
                                    Communicator& world, DType dtype, Device device) {
  const EngineFactory* make = find_engine(layout);
  TSP_CHECK(make, "generate: layout '{}' has no inference engine; supported layouts: {}", layout,
            supported_layouts());
  TSP_CHECK(dtype == DType::F32 || dtype == DType::BF16,
            "generate: the compute dtype must be fp32 or bf16, not {}", dtype_name(dtype));
  return (*make)(config, world, dtype, device);
}

void validate_request(const LlamaConfig& c, const std::vector<int32_t>& prompt, int64_t max_new) {
  TSP_CHECK(!prompt.empty(), "generate: the prompt is empty; give at least one token");
  TSP_CHECK(max_new >= 1, "generate: --max-new {} must be at least 1", max_new);
  const int64_t P = static_cast<int64_t>(prompt.size());
  TSP_CHECK(P <= c.max_position_embeddings,
            "generate: the prompt has {} tokens, more than max_position_embeddings={} of the "
            "model; shorten the prompt to at most {} tokens",
            P, c.max_position_embeddings, c.max_position_embeddings);
  // max_new <= limit - P, not P + max_new <= limit: a huge --max-new must not wrap around.
  TSP_CHECK(max_new <= c.max_position_embeddings - P,
            "generate: prompt ({} tokens) + --max-new {} = {} positions exceed "
            "max_position_embeddings={}; use --max-new <= {}",
            P, max_new, static_cast<uint64_t>(P) + static_cast<uint64_t>(max_new),
            c.max_position_embeddings,
            P < c.max_position_embeddings ? fmt::format("{}", c.max_position_embeddings - P)
                                          : fmt::format("1 and a prompt of at most {} tokens",
                                                        c.max_position_embeddings - 1));
  for (int64_t i = 0; i < P; ++i)
    TSP_CHECK(prompt[i] >= 0 && prompt[i] < c.vocab_size,
              "generate: prompt token {} at index {} is outside the vocabulary [0, {})", prompt[i],
              i, c.vocab_size);
}

double GenerateResult::prefill_tokens_per_s() const {
  return prefill_seconds > 0 ? prompt_tokens / prefill_seconds : 0;
}
double GenerateResult::decode_tokens_per_s() const {
  return decode_seconds > 0 ? decode_steps / decode_seconds : 0;
}

GenerateResult generate(Engine& engine, const std::vector<int32_t>& prompt,
                        const GenerateOptions& opt) {
  validate_request(engine.config(), prompt, opt.max_new);
  validate_sampling(opt.sampling);
  Communicator& g = engine.group();
  using Clock = std::chrono::steady_clock;
  auto seconds = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };
  // Group rank 0 chooses, everyone continues with its choice (4 bytes per token). This broadcast
  // stays on the data path (not the control API): it is part of decoding's measured traffic, which
  // docs/inference.md counts per token.
  auto choose = [&](const std::vector<float>& logits, int64_t step) {
    int32_t t = g.rank() == 0 ? sample_token(logits, opt.sampling, step) : 0;
    g.broadcast(&t, 1, DType::I32, 0);
    if (opt.on_token) opt.on_token(t);
    return t;
  };

  GenerateResult r;
  r.prompt_tokens = static_cast<int64_t>(prompt.size());
  r.decode_steps = opt.max_new - 1;
  g.barrier();
  CommStats c0 = g.stats();
  auto t0 = Clock::now();
  int32_t tok = choose(engine.prefill(prompt, r.decode_steps), 0);
  r.tokens.push_back(tok);
  g.barrier();
  auto t1 = Clock::now();
  CommStats c1 = g.stats();
  for (int64_t step = 1; step < opt.max_new; ++step) {
    tok = choose(engine.decode(tok), step);
    r.tokens.push_back(tok);
  }
  g.barrier();
  auto t2 = Clock::now();
  r.prefill_seconds = seconds(t0, t1);
  r.decode_seconds = seconds(t1, t2);
  r.prefill_comm = c1 - c0;
  r.decode_comm = g.stats() - c1;
  r.kv_cache_bytes = engine.kv_cache_bytes();
  return r;
}

}  // namespace tsp::infer
