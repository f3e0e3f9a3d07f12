// The training steps whose memory and traffic the model is checked against: shared by
// tests/plan/measured_vs_predicted_mpi_test.cpp (CPU) and tests/parallel/cuda_memory_mpi_test.cpp
// (the same steps on a GPU, against the CUDA backend's model).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "tsp/model/config.h"
#include "tsp/parallel/layout.h"

namespace tsp::test {

struct Case {
  const char* name;
  LlamaConfig config;
  int64_t B, S;
};

inline std::vector<Case> cases() {
  LlamaConfig a;  // MHA, untied, B divisible by every world size (single runs as pure DP)
  a.hidden_size = 64;
  a.num_attention_heads = 4;
  a.num_key_value_heads = 4;
  a.intermediate_size = 128;
  a.num_hidden_layers = 2;
  a.vocab_size = 256;
  a.max_position_embeddings = 256;
  LlamaConfig b;  // GQA, tied, more layers, longer sequence
  b.hidden_size = 128;
  b.num_attention_heads = 8;
  b.num_key_value_heads = 4;
  b.intermediate_size = 352;
  b.num_hidden_layers = 3;
  b.vocab_size = 512;
  b.max_position_embeddings = 256;
  b.tie_word_embeddings = true;
  // mha_untied with long rows: n·h outgrows the MLP's chunk buffers, so under tp the backward's
  // replay of the MLP forward (full recomputation) is the busiest moment
  return {{"mha_untied", a, 4, 64}, {"gqa_tied", b, 4, 128}, {"long_rows", a, 4, 256}};
}

inline int default_tp(int D) {
  int best = 1;
  for (int t = 1; t * t <= D; ++t)
    if (D % t == 0) best = t;
  return best;
}

inline Batch random_batch(const LlamaConfig& c, int64_t B, int64_t S) {
  Batch b;
  b.B = B;
  b.S = S;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(c.vocab_size - 1));
  b.tokens.resize(B * (S + 1));
  for (int32_t& t : b.tokens) t = id(rng);
  return b;
}

}  // namespace tsp::test
