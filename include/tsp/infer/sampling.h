// Choosing the next token from logits: greedy (temperature 0) or temperature / top-k / top-p
// sampling driven by a counter-based generator, so (seed, step) alone decides the draw: the same
// seed gives the same tokens on any machine, layout or degree (given the same logits).
#pragma once

#include <cstdint>
#include <vector>

namespace tsp::infer {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy (argmax, lowest id on ties)
  int64_t top_k = 0;         // keep the k most likely ids (0: all)
  float top_p = 1.0f;        // keep the smallest most-likely set with probability >= top_p
  uint64_t seed = 0;
};

// Throws tsp::Error for temperature < 0, top_k < 0 or top_p outside (0, 1].
void validate_sampling(const SamplingParams& s);

// Uniform double in [0, 1) from (seed, counter) alone (splitmix64 finaliser).
double counter_uniform(uint64_t seed, uint64_t counter);

// logits [V] -> the chosen id. `step` is the index of the token being generated (0 for the
// first), used as the generator's counter.
int32_t sample_token(const std::vector<float>& logits, const SamplingParams& s, int64_t step);

}  // namespace tsp::infer
