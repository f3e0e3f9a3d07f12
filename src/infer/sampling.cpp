#include "tsp/infer/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "tsp/core/error.h"

namespace tsp::infer {

void validate_sampling(const SamplingParams& s) {
  TSP_CHECK(std::isfinite(s.temperature) && s.temperature >= 0.f,
            "--temperature {} must be a finite number >= 0 (0 = greedy)", s.temperature);
  TSP_CHECK(s.top_k >= 0, "--top-k {} must be >= 0 (0 = no limit)", s.top_k);
  TSP_CHECK(s.top_p > 0.f && s.top_p <= 1.f, "--top-p {} must be in (0, 1] (1 = no limit)",
            s.top_p);
}

double counter_uniform(uint64_t seed, uint64_t counter) {
  // splitmix64 on seed ⊕ a golden-ratio multiple of the counter, finalised twice: consecutive
  // counters give unrelated draws and no state is carried between calls.
  uint64_t z = seed ^ (counter * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull);
  for (int round = 0; round < 2; ++round) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
  }
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

int32_t sample_token(const std::vector<float>& logits, const SamplingParams& s, int64_t step) {
  TSP_CHECK(!logits.empty(), "sample_token: empty logits");
  validate_sampling(s);
  const int64_t V = static_cast<int64_t>(logits.size());
  if (s.temperature == 0.f)  // greedy: first maximum, i.e. the lowest id on ties
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());

  // Ids by decreasing logit (ties: lower id first, so the order is a pure function of logits).
  std::vector<int32_t> ids(V);
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t keep = (s.top_k > 0) ? std::min<int64_t>(s.top_k, V) : V;

  // Softmax of logits / T over the kept ids, in double.
  std::vector<double> prob(keep);
  const double top = logits[ids[0]] / static_cast<double>(s.temperature);
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    prob[i] = std::exp(logits[ids[i]] / static_cast<double>(s.temperature) - top);
    sum += prob[i];
  }
  // Nucleus: the shortest prefix whose probability reaches top_p (at least one id).
  if (s.top_p < 1.f) {
    double cum = 0;
    int64_t n = 0;
    while (n < keep) {
      cum += prob[n] / sum;
      ++n;
      if (cum >= s.top_p) break;
    }
    keep = n;
    sum = std::accumulate(prob.begin(), prob.begin() + keep, 0.0);
  }
  const double u = counter_uniform(s.seed, static_cast<uint64_t>(step)) * sum;
  double cum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += prob[i];
    if (u < cum) return ids[i];
  }
  return ids[keep - 1];  // u·sum rounded up to the total
}

}  // namespace tsp::infer
