// `tsp generate`: prefill a prompt with the chosen layout, then decode N tokens (greedy or
// seeded sampling), streaming them on rank 0; prefill / decode tokens per second and the KV-cache
// bytes of every rank at the end. Byte-level text in and out (--prompt, for the byte-level demo
// model) or token ids (--prompt-tokens, any model); --out writes prompt + generated ids as a
// token file (`tsp grad` reads it). See docs/inference.md.
#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "cli/command.h"
#include "tsp/comm/device_comm.h"
#include "tsp/core/error.h"
#include "tsp/core/limits.h"
#include "tsp/infer/engine.h"
#include "tsp/model/params.h"
#include "tsp/model/tokens.h"

namespace tsp::cli {
namespace {

struct GenerateCliOptions {
  std::string model, layout = "tsp", prompt, prompt_tokens, out;
  int64_t max_new = 64;
  infer::SamplingParams sampling;
  bool quiet = false;
  bool text = false;  // --prompt was given (possibly empty): byte-level text in and out
  ComputeOptions compute;
};

std::vector<int32_t> read_prompt(const GenerateCliOptions& o, const LlamaConfig& c) {
  TSP_CHECK(o.text != !o.prompt_tokens.empty(),
            "generate: give exactly one of --prompt TEXT and --prompt-tokens FILE");
  if (!o.text) {
    // The length first: a token file far longer than the model's context is not read at all.
    const int64_t n = read_token_file_info(o.prompt_tokens).num_tokens;
    TSP_CHECK(n <= c.max_position_embeddings,
              "generate: --prompt-tokens {} holds {} tokens, more than max_position_embeddings={} "
              "of the model in {}; give a prompt of at most {} tokens",
              o.prompt_tokens, n, c.max_position_embeddings, o.model,
              c.max_position_embeddings - 1);
    return read_all_tokens(o.prompt_tokens);
  }
  TSP_CHECK(c.vocab_size >= 256,
            "generate: --prompt encodes text as bytes (ids 0..255) but the model in {} has "
            "vocab_size={}; give token ids with --prompt-tokens FILE",
            o.model, c.vocab_size);
  std::vector<int32_t> ids;
  for (unsigned char ch : o.prompt) ids.push_back(ch);
  return ids;
}

int run_generate(const GenerateCliOptions& o, Communicator& world) {
  // Options that need no file first.
  infer::validate_sampling(o.sampling);
  TSP_CHECK(o.max_new >= 1, "generate: --max-new {} must be at least 1", o.max_new);
  // --out is written after the whole generation: check now that it can be.
  if (!o.out.empty() && world.rank() == 0) check_output_path(o.out, "generate: --out");
  const ModelDir dir = open_model_arg(o.model, world);
  const std::vector<int32_t> prompt = read_prompt(o, dir.config);
  infer::validate_request(dir.config, prompt, o.max_new);  // before any weight is read
  const DType dtype = o.compute.parsed_dtype();
  auto engine = infer::make_engine(dir.config, o.layout, world, dtype, o.compute.parsed_device());
  {
    // The K/V cache of the whole sequence, shared by the engine's D ranks (every rank holds all
    // of it under single), before the weights are read (KvCache::reset checks each rank's again).
    const LlamaConfig& c = dir.config;
    const int64_t positions = static_cast<int64_t>(prompt.size()) + o.max_new;  // validated
    const int64_t share = engine->group().size();  // 1 under single (each rank on its own)
    require_memory(checked_product({2, c.num_hidden_layers, positions, c.kv_dim(),
                                    static_cast<int64_t>(dtype_size(dtype))},
                                   "generate: K/V cache bytes") /
                       share,
                   fmt::format("generate: the K/V cache of prompt ({} tokens) + --max-new {}",
                               prompt.size(), o.max_new),
                   "use a smaller --max-new or a shorter prompt, or more ranks (sp, tsp)",
                   memory_pool(o.compute.parsed_device(), world));
  }
  engine->load(ModelDirWeights(dir));

  const bool root = world.rank() == 0;
  const bool text = o.text;
  infer::GenerateOptions g;
  g.max_new = o.max_new;
  g.sampling = o.sampling;
  g.on_token = [&](int32_t t) {  // stream as produced
    if (!root || o.quiet) return;
    if (text && t < 256) {
      std::fputc(t, stdout);
    } else {
      std::printf("%s%d", text ? "" : " ", t);
    }
    std::fflush(stdout);
  };
  if (root && !o.quiet) {
    if (text) {
      std::fwrite(o.prompt.data(), 1, o.prompt.size(), stdout);
    } else {
      for (size_t i = 0; i < prompt.size(); ++i) std::printf(i ? " %d" : "%d", prompt[i]);
      std::printf(" |");
    }
    std::fflush(stdout);
  }
  const infer::GenerateResult r = infer::generate(*engine, prompt, g);

  // KV-cache bytes of every rank, gathered to print on rank 0 (control traffic: it stays out of
  // the generation's measured traffic).
  const std::vector<int64_t> kv = world.gather_host(int64_t{r.kv_cache_bytes});
  if (root) {
    if (!o.quiet) std::printf("\n");
    std::string kv_str;
    for (size_t i = 0; i < kv.size(); ++i) kv_str += fmt::format("{}{}", i ? " " : "", kv[i]);
    std::fprintf(stderr,
                 "# layout %s D=%d  prompt %" PRId64
                 " tokens  generated %zu\n"
                 "# prefill %.3f s  %.1f tokens/s   decode %.3f s  %.1f tokens/s\n"
                 "# kv-cache bytes per rank: %s\n",
                 engine->name().c_str(), engine->degree(), r.prompt_tokens, r.tokens.size(),
                 r.prefill_seconds, r.prefill_tokens_per_s(), r.decode_seconds,
                 r.decode_tokens_per_s(), kv_str.c_str());
    if (!o.out.empty()) {
      std::vector<int32_t> all = prompt;
      all.insert(all.end(), r.tokens.begin(), r.tokens.end());
      write_token_file(o.out, all);
      std::fprintf(stderr, "# wrote %zu ids (prompt + generated) to %s\n", all.size(),
                   o.out.c_str());
    }
  }
  world.barrier();
  return 0;
}

const CommandRegistration kGenerate{Command{
    "generate",
    "Prefill a prompt with a parallel layout and decode new tokens (greedy or seeded sampling); "
    "streams tokens, reports prefill/decode tokens/s and KV-cache bytes per rank",
    /*needs_mpi=*/true, [](CLI::App& sub) {
      auto o = std::make_shared<GenerateCliOptions>();
      sub.add_option("--model", o->model, "model directory (config.json + model.safetensors)")
          ->required();
      sub.add_option("--layout", o->layout, "layout: " + infer::supported_layouts())
          ->capture_default_str();
      CLI::Option* text = sub.add_option("--prompt", o->prompt, "prompt text (byte-level ids)");
      sub.add_option("--prompt-tokens", o->prompt_tokens, "prompt as an llm.c token file")
          ->check(CLI::ExistingFile);
      sub.add_option("--max-new", o->max_new, "tokens to generate")->capture_default_str();
      sub.add_option("--temperature", o->sampling.temperature, "0 = greedy")->capture_default_str();
      sub.add_option("--top-k", o->sampling.top_k, "keep the k most likely ids (0 = all)")
          ->capture_default_str();
      sub.add_option("--top-p", o->sampling.top_p, "nucleus probability (1 = all)")
          ->capture_default_str();
      // A negative seed would wrap around to a huge unsigned one: refuse it.
      sub.add_option("--seed", o->sampling.seed, "sampling seed")
          ->capture_default_str()
          ->check(kNotNegative);
      sub.add_option("--out", o->out, "write prompt + generated ids to this token file");
      sub.add_flag("--quiet", o->quiet, "do not stream the tokens (report only)");
      o->compute.add_to(sub);
      return [o, text](Communicator* world) {
        o->text = text->count() > 0;  // an empty --prompt "" is given, and an error
        return run_generate(*o, *world);
      };
    }}};

}  // namespace
}  // namespace tsp::cli
