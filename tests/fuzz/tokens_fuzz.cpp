// Fuzz target: llm.c token files and training data on arbitrary bytes: the token-file reader
// (include/tsp/model/tokens.h) and the training corpus (Corpus and a small DataLoader,
// include/tsp/train/data.h), which decides by content whether a file is tokens or text.
// The two readers must agree on every token of a file both accept.
// Rules in tests/fuzz/fuzz_util.h; run it as docs/testing.md says.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "fuzz_util.h"
#include "tsp/core/error.h"
#include "tsp/model/tokens.h"
#include "tsp/train/data.h"

namespace {

// Reads stop here: the inputs are small, and min_vocab_size() scans the whole corpus anyway.
constexpr int64_t kMaxRead = 1 << 16;

void token_file(const std::string& path, std::vector<int32_t>* tokens) {
  try {
    const tsp::TokenFileInfo info = tsp::read_token_file_info(path);
    fuzz_require(info.num_tokens >= 0, "token count is non-negative");
    *tokens = tsp::read_tokens(path, 0, std::min(info.num_tokens, kMaxRead));
    if (info.num_tokens > 1) {
      const auto tail = tsp::read_tokens(path, info.num_tokens - 1, 1);
      fuzz_require(tail.size() == 1, "one token read");
    }
  } catch (const tsp::Error&) {
    tokens->clear();
  }
}

void corpus(const std::string& path, const std::vector<int32_t>& tokens, const uint8_t* data) {
  auto c = std::make_shared<const tsp::Corpus>(path);
  fuzz_require(c->num_tokens() >= 0, "token count is non-negative");
  const int64_t vocab = c->min_vocab_size();
  const int64_t n = std::min(c->num_tokens(), kMaxRead);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  c->read(0, n, ids.data());
  for (int32_t id : ids) fuzz_require(0 <= id && id < vocab, "ids lie in [0, min_vocab_size)");
  if (c->format() == tsp::CorpusFormat::LlmcTokens && !tokens.empty()) {
    fuzz_require(std::equal(tokens.begin(), tokens.end(), ids.begin()),
                 "Corpus and read_tokens agree");
  }
  if (c->format() == tsp::CorpusFormat::Text) {
    fuzz_require(std::equal(ids.begin(), ids.end(), data), "text tokens are the file's bytes");
  }
  // A small training set-up on the corpus, as `tsp train` builds one.
  tsp::DataOptions options;
  options.batch = 2;
  options.seq = 3;
  options.val_windows = 3;
  tsp::DataLoader loader(c, options);
  const tsp::Batch batch = loader.train_batch(1, 0);
  for (int32_t id : batch.tokens) fuzz_require(0 <= id && id < vocab, "batch ids in range");
  for (int64_t i = 0; i < loader.num_val_batches(); ++i) (void)loader.val_batch(i);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto fds_before = tsp_fuzz::open_fds();
  {
    tsp_fuzz::MemFile file(data, size);
    std::vector<int32_t> tokens;
    token_file(file.path(), &tokens);
    try {
      corpus(file.path(), tokens, data);
    } catch (const tsp::Error&) {
      // Bad input, reported as it should be.
    }
  }
  fuzz_require(tsp_fuzz::open_fds() == fds_before, "no file descriptor leaked");
  return 0;
}
