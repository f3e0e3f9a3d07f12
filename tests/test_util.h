// Small helpers shared by the tests.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "tsp/core/error.h"

namespace tsp::test {

// The message of the tsp::Error that f() throws, or "(no error)": lets a test assert on what a
// user would read.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.message();
  }
  return "(no error)";
}

// n values drawn uniformly from [lo, hi) by rng (the same values for the same generator state).
inline std::vector<float> uniform_values(int64_t n, std::mt19937& rng, float lo = -1.f,
                                         float hi = 1.f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

}  // namespace tsp::test
