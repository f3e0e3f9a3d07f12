// Fuzz target: config.json parsing (LlamaConfig::from_file, include/tsp/model/config.h) on
// arbitrary bytes. An accepted configuration must validate or be rejected by validate() with a
// tsp::Error, and a valid one must survive a round trip through to_json_string() unchanged.
// Rules in tests/fuzz/fuzz_util.h; run it as docs/testing.md says.
#include <cstdint>

#include "fuzz_util.h"
#include "tsp/core/error.h"
#include "tsp/model/config.h"

namespace {

bool same(const tsp::LlamaConfig& a, const tsp::LlamaConfig& b) {
  return a.hidden_size == b.hidden_size && a.intermediate_size == b.intermediate_size &&
         a.num_attention_heads == b.num_attention_heads &&
         a.num_key_value_heads == b.num_key_value_heads &&
         a.num_hidden_layers == b.num_hidden_layers && a.vocab_size == b.vocab_size &&
         a.rms_norm_eps == b.rms_norm_eps && a.rope_theta == b.rope_theta &&
         a.max_position_embeddings == b.max_position_embeddings &&
         a.tie_word_embeddings == b.tie_word_embeddings && a.torch_dtype == b.torch_dtype;
}

void run(const uint8_t* data, size_t size) {
  tsp_fuzz::MemFile file(data, size);
  const tsp::LlamaConfig config = tsp::LlamaConfig::from_file(file.path());
  config.validate();
  // What the CLI computes from any model it loads (sizes, memory estimates).
  (void)config.head_dim();
  (void)config.kv_dim();
  (void)config.gqa_group();
  (void)config.num_parameters();
  const tsp::LlamaConfig again = tsp::LlamaConfig::from_json_string(config.to_json_string());
  fuzz_require(same(config, again), "a valid config round-trips through to_json_string()");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return tsp_fuzz::fuzz_one(run, data, size);
}
