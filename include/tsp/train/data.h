// Training data: a corpus of token ids (an llm.c token file, or a text file read as raw bytes
// with the byte-level tokenizer, ids 0-255), split into a training part and a held-out validation
// tail, and batches of random windows drawn by a counter-based RNG.
//
// Window n (the n-th training row ever drawn, n = (step·accum + micro)·B + row) starts at
// hash(seed, n) mod (train_tokens - S): the batches depend only on the seed and the batch shape,
// never on the layout, the degree, the number of replicas or the step a run resumed from.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tsp/parallel/layout.h"

namespace tsp {

enum class CorpusFormat { Text, LlmcTokens };

// Random-access reader (pread; nothing is loaded up front, memory stays small).
class Corpus {
 public:
  // Detects the format by the llm.c magic in the first 4 bytes; anything else must be text.
  // Missing, unreadable, empty or corrupt files (a token-file header that does not match the
  // size), and files that look like a token file with a damaged magic number (a .bin name, or an
  // llm.c version and count matching the size) or are not text (NUL or many control bytes)
  // raise a tsp::Error naming the file and what to do.
  explicit Corpus(const std::string& path);
  ~Corpus();
  Corpus(const Corpus&) = delete;
  Corpus& operator=(const Corpus&) = delete;

  const std::string& path() const { return path_; }
  CorpusFormat format() const { return format_; }
  int64_t num_tokens() const { return num_tokens_; }
  // Smallest vocabulary that can hold the ids: 256 for text; for token files the maximum id
  // seen in a scan of the file, plus one (computed once, on demand).
  int64_t min_vocab_size() const;
  // Tokens [begin, begin + count) into out.
  void read(int64_t begin, int64_t count, int32_t* out) const;

 private:
  std::string path_;
  CorpusFormat format_ = CorpusFormat::Text;
  int64_t num_tokens_ = 0;
  int64_t header_bytes_ = 0;
  int bytes_per_token_ = 1;
  int fd_ = -1;
  mutable int64_t min_vocab_ = -1;
};

struct DataOptions {
  int64_t batch = 8;  // B rows per micro-batch (all replicas together)
  int64_t seq = 256;  // S tokens per row (plus one label)
  int64_t accum = 1;  // micro-batches per optimizer step
  uint64_t seed = 1337;
  double val_fraction = 0.05;  // the last 5% of the corpus is held out
  int64_t val_windows = 32;    // evaluated windows, evenly spaced over the held-out part
  int32_t doc_sep = -1;        // packed documents: every batch's Batch::doc_sep (-1: none)
};

// Which tokens of a batch this rank reads: TokenNeed and kTokenNotRead (tsp/parallel/layout.h).
// A training run takes them from Layout::token_need, so the layout that reads the batch is the one
// that says what to read. Positions not read hold kTokenNotRead.

// The need of rank p of a zigzag-sharded layout group of D ranks in replica `replica` of R:
// its replica's rows of a batch of B, and in each row chunks p and 2D-1-p of S/(2D) tokens
// (tsp/parallel/sharding.h zigzag_positions). D = 1 reads whole rows.
TokenNeed zigzag_token_need(int64_t B, int64_t S, int D, int p, int R, int replica);

class DataLoader {
 public:
  // Validates the options against the corpus (enough tokens for a training and a validation
  // window, no more --val-windows than the held-out tail has distinct windows unless it is the
  // default) and against memory (a batch of B·(S+1) tokens, checked for 64-bit overflow, and
  // the validation window list must fit on this machine), before allocating anything, with
  // errors saying which option to change.
  DataLoader(std::shared_ptr<const Corpus> corpus, DataOptions options);

  const DataOptions& options() const { return options_; }
  const Corpus& corpus() const { return *corpus_; }
  int64_t train_tokens() const { return train_tokens_; }  // tokens [0, train_tokens)
  int64_t val_tokens() const { return corpus_->num_tokens() - train_tokens_; }
  void set_need(TokenNeed need) { need_ = std::move(need); }
  const TokenNeed& need() const { return need_; }
  // Tokens read from the corpus so far by this loader (training and validation batches), so a
  // run can report what each rank reads per step.
  int64_t tokens_read() const { return tokens_read_; }

  // Start (in the corpus) of the n-th training window.
  int64_t train_window_start(int64_t n) const;
  // Micro-batch `micro` of optimizer step `step`: B rows of S+1 tokens.
  Batch train_batch(int64_t step, int64_t micro) const;
  // B rows starting at training window `first_sample` (train_batch(step, micro) is
  // train_rows((step·accum + micro)·B)): a resumed run continues from the saved data position
  // even when it changes the batch shape.
  Batch train_rows(int64_t first_sample) const;
  // The held-out windows, in micro-batches of B rows (the last one padded with repeated
  // windows is avoided: val_windows is rounded up to a multiple of B at construction).
  int64_t num_val_batches() const {
    return static_cast<int64_t>(val_starts_.size()) / options_.batch;
  }
  Batch val_batch(int64_t i) const;
  const std::vector<int64_t>& val_window_starts() const { return val_starts_; }

 private:
  Batch make_batch(const std::vector<int64_t>& starts) const;
  std::shared_ptr<const Corpus> corpus_;
  DataOptions options_;
  TokenNeed need_;
  mutable int64_t tokens_read_ = 0;
  int64_t train_tokens_ = 0;
  std::vector<int64_t> val_starts_;
};

// The counter-based generator behind the windows (SplitMix64 finaliser over a combination of the
// seed and the counter): a pure function, so any rank computes any window without state.
uint64_t window_hash(uint64_t seed, uint64_t counter);

}  // namespace tsp
