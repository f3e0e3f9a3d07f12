#include "tsp/train/data.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <filesystem>

#include "tsp/core/error.h"
#include "tsp/core/limits.h"
#include "tsp/model/tokens.h"
#include "tsp/parallel/sharding.h"

namespace tsp {

namespace {

constexpr int32_t kLlmcMagicU16 = 20240520;  // version 1, uint16 ids
constexpr int32_t kLlmcMagicU32 = 20240801;  // version 7, uint32 ids
constexpr int64_t kLlmcHeaderBytes = 256 * sizeof(int32_t);

// pread until count bytes are read (pread may return short counts).
void pread_all(int fd, void* dst, size_t count, int64_t offset, const std::string& path) {
  auto* p = static_cast<char*>(dst);
  while (count > 0) {
    const ssize_t got = ::pread(fd, p, count, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    TSP_CHECK(got > 0, "{}: read failed at byte {} ({}); the file changed or is unreadable", path,
              offset, got < 0 ? std::strerror(errno) : "unexpected end of file");
    p += got;
    offset += got;
    count -= static_cast<size_t>(got);
  }
}

// A file without an llm.c magic number is read as text with the byte-level tokenizer, but only
// when it is text: a token file whose magic number was damaged (or any other binary file) would
// otherwise be trained on as raw bytes, silently. The rule needs no option:
//  - a header whose version and token count are llm.c's and match the file size, or a ".bin"
//    name (llm.c's convention for token files), is a token file with a bad magic number;
//  - text has no NUL byte and almost no other control characters (all but tab, newline, \v, \f,
//    \r and escape) in its first 64 kB, in UTF-8 or any 8-bit encoding; an llm.c header is
//    mostly zero bytes, and ids below 256 stored in uint16 are every other byte zero.
// Raw bytes of a binary file remain trainable: `tsp encode` turns any file into a token file.
void reject_non_text(int fd, const std::string& path, int64_t size, int32_t magic) {
  const std::string expect = fmt::format(
      "an llm.c token file starts with magic number {} (uint16 ids) or {} (uint32 ids); write "
      "one with `tsp encode`",
      kLlmcMagicU16, kLlmcMagicU32);
  TSP_CHECK(!has_llmc_layout(path),
            "data file {} looks like an llm.c token file with a damaged magic number: its header's "
            "version and token count are llm.c's and match its size, but the magic number is {}; "
            "{}",
            path, magic, expect);
  const std::string name = std::filesystem::path(path).extension().string();
  TSP_CHECK(name != ".bin",
            "data file {} has a .bin name, so it is read as an llm.c token file, but its magic "
            "number is {}: the file is damaged or not a token file; {}. If it really is text, "
            "give it another extension (e.g. .txt)",
            path, magic, expect);
  std::vector<unsigned char> head(static_cast<size_t>(std::min<int64_t>(size, 64 << 10)));
  pread_all(fd, head.data(), head.size(), 0, path);
  int64_t nul = 0, control = 0;
  for (unsigned char c : head) {
    nul += c == 0;
    control += (c < 0x20 && !(c >= '\t' && c <= '\r') && c != 0x1b) || c == 0x7f;
  }
  TSP_CHECK(nul == 0 && control * 100 <= static_cast<int64_t>(head.size()),
            "data file {} is neither text nor an llm.c token file: {} of its first {} bytes are "
            "control characters ({} NUL). If it is a token file, its magic number ({}) is damaged; "
            "{}. To train on the raw bytes of a binary file, convert it first: `tsp encode --text "
            "{} --out FILE.bin`",
            path, control, head.size(), nul, magic, expect, path);
}

}  // namespace

uint64_t window_hash(uint64_t seed, uint64_t counter) {
  // SplitMix64 finaliser of (seed·golden + counter), applied twice so nearby seeds and counters
  // give unrelated values.
  auto mix = [](uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  return mix(mix(seed) ^ counter);
}

Corpus::Corpus(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TSP_CHECK(fd_ >= 0,
            "cannot open data file {}: {} (for the demo corpus run scripts/prepare_data.sh)", path,
            std::strerror(errno));
  // A throwing constructor runs no destructor: close the descriptor when a check below rejects
  // the file, or every rejected file leaks one (found by tests/fuzz/tokens_fuzz).
  struct CloseOnThrow {
    int& fd;
    const int uncaught = std::uncaught_exceptions();
    ~CloseOnThrow() {
      if (std::uncaught_exceptions() > uncaught) {
        ::close(fd);
        fd = -1;
      }
    }
  } close_on_throw{fd_};
  struct stat st {};
  TSP_CHECK(::fstat(fd_, &st) == 0, "cannot stat {}: {}", path, std::strerror(errno));
  TSP_CHECK(S_ISREG(st.st_mode), "data file {} is not a regular file", path);
  const int64_t size = st.st_size;
  TSP_CHECK(size > 0, "data file {} is empty", path);
  int32_t magic = 0;
  if (size >= 4) pread_all(fd_, &magic, sizeof magic, 0, path);
  if (magic != kLlmcMagicU16 && magic != kLlmcMagicU32) reject_non_text(fd_, path, size, magic);
  if (magic == kLlmcMagicU16 || magic == kLlmcMagicU32) {
    // read_token_file_info validates the header (version, announced count against the size).
    const TokenFileInfo info = read_token_file_info(path);
    format_ = CorpusFormat::LlmcTokens;
    num_tokens_ = info.num_tokens;
    bytes_per_token_ = info.bytes_per_token;
    header_bytes_ = kLlmcHeaderBytes;
  } else {
    format_ = CorpusFormat::Text;  // byte-level tokenizer: every byte is a token id 0-255
    num_tokens_ = size;
    bytes_per_token_ = 1;
    header_bytes_ = 0;
  }
}

Corpus::~Corpus() {
  if (fd_ >= 0) ::close(fd_);
}

int64_t Corpus::min_vocab_size() const {
  if (format_ == CorpusFormat::Text) return 256;
  if (min_vocab_ < 0) {
    int64_t max_id = -1;
    std::vector<int32_t> buf;
    constexpr int64_t kChunk = 1 << 20;
    for (int64_t b = 0; b < num_tokens_; b += kChunk) {
      const int64_t n = std::min(kChunk, num_tokens_ - b);
      buf.resize(n);
      read(b, n, buf.data());
      for (int32_t t : buf) max_id = std::max<int64_t>(max_id, t);
    }
    min_vocab_ = max_id + 1;
  }
  return min_vocab_;
}

void Corpus::read(int64_t begin, int64_t count, int32_t* out) const {
  TSP_CHECK(begin >= 0 && count >= 0 && begin + count <= num_tokens_,
            "{}: tokens [{}, {}) are outside the corpus of {} tokens", path_, begin, begin + count,
            num_tokens_);
  if (count == 0) return;
  const int64_t offset = header_bytes_ + begin * bytes_per_token_;
  if (bytes_per_token_ == 1) {
    std::vector<uint8_t> raw(count);
    pread_all(fd_, raw.data(), raw.size(), offset, path_);
    for (int64_t i = 0; i < count; ++i) out[i] = raw[i];
  } else if (bytes_per_token_ == 2) {
    std::vector<uint16_t> raw(count);
    pread_all(fd_, raw.data(), raw.size() * 2, offset, path_);
    for (int64_t i = 0; i < count; ++i) out[i] = raw[i];
  } else {
    std::vector<uint32_t> raw(count);
    pread_all(fd_, raw.data(), raw.size() * 4, offset, path_);
    for (int64_t i = 0; i < count; ++i) {
      TSP_CHECK(raw[i] <= static_cast<uint32_t>(INT32_MAX), "{}: token {} has id {} (corrupt file)",
                path_, begin + i, raw[i]);
      out[i] = static_cast<int32_t>(raw[i]);
    }
  }
}

TokenNeed zigzag_token_need(int64_t B, int64_t S, int D, int p, int R, int replica) {
  TSP_CHECK(R >= 1 && B % R == 0 && 0 <= replica && replica < R,
            "batch of {} rows cannot be split over {} replicas", B, R);
  TSP_CHECK(D >= 1 && 0 <= p && p < D, "rank {} outside a group of {}", p, D);
  TokenNeed need;
  need.row_begin = replica * (B / R);
  need.row_end = (replica + 1) * (B / R);
  if (D == 1) return need;
  for (const Range& r : zigzag_ranges(S, D, p)) need.input_ranges.push_back({r.begin, r.end});
  return need;
}

DataLoader::DataLoader(std::shared_ptr<const Corpus> corpus, DataOptions options)
    : corpus_(std::move(corpus)), options_(options) {
  const DataOptions& o = options_;
  TSP_CHECK(o.batch > 0, "--batch must be positive, got {}", o.batch);
  TSP_CHECK(o.seq > 0, "--seq must be positive, got {}", o.seq);
  TSP_CHECK(o.accum > 0, "--accum must be positive, got {}", o.accum);
  TSP_CHECK(o.val_fraction > 0 && o.val_fraction < 1, "--val-fraction must lie in (0, 1), got {}",
            o.val_fraction);
  TSP_CHECK(o.val_windows >= 0, "--val-windows must be >= 0, got {}", o.val_windows);
  TSP_CHECK(o.doc_sep >= -1, "--doc-sep must be a token id or -1 (none), got {}", o.doc_sep);
  // Sizes are checked before anything is allocated: a batch holds B·(S+1) int32 tokens (plus B
  // window starts) on every rank, so an impossible --batch or --seq fails here with the option's
  // name instead of growing until the kernel kills the job.
  const int64_t n = corpus_->num_tokens();
  const int64_t window = checked_add(o.seq, 1, "--seq + 1 (a window with its last label)");
  const int64_t batch_tokens =
      checked_mul(o.batch, window, "--batch × (--seq + 1), the tokens of a batch");
  require_memory(checked_add(checked_mul(batch_tokens, 4, "bytes of a batch"),
                             checked_mul(o.batch, 8, "bytes of a batch"), "bytes of a batch"),
                 fmt::format("a batch of --batch {} × (--seq {} + 1) tokens", o.batch, o.seq),
                 "use a smaller --batch or --seq (--accum N keeps the tokens per step)");
  const int64_t val = static_cast<int64_t>(static_cast<double>(n) * o.val_fraction);
  train_tokens_ = n - val;
  // A training window must fit strictly inside the training part so windows can start in more
  // than one place; a validation window must fit in the held-out tail.
  TSP_CHECK(train_tokens_ > window && val >= window,
            "{} holds {} tokens: too few for windows of --seq {} (+1) in a training part and a "
            "held-out {:.0f}% (needs at least {} tokens); use a larger corpus or a smaller --seq",
            corpus_->path(), n, o.seq, 100 * o.val_fraction,
            static_cast<int64_t>(static_cast<double>(window) / o.val_fraction) + window + 2);
  // Validation windows: evenly spaced over the held-out tail (overlapping when the tail is
  // short), rounded up to whole micro-batches. More windows than the tail has distinct start
  // positions only repeats windows, so a larger --val-windows is refused; the default stays
  // valid whatever the corpus (a few repeats in a tiny tail are harmless).
  const int64_t span = val - window;  // >= 0
  const int64_t distinct = span + 1;
  TSP_CHECK(o.val_windows <= std::max(distinct, DataOptions{}.val_windows),
            "--val-windows {} asks for more windows than the held-out tail of {} holds: its {} "
            "tokens give {} distinct windows of --seq {} (+1); use --val-windows <= {} or a "
            "larger --val-fraction",
            o.val_windows, corpus_->path(), val, distinct, o.seq, distinct);
  const int64_t windows = o.val_windows == 0
                              ? 0
                              : checked_mul((o.val_windows - 1) / o.batch + 1, o.batch,
                                            "--val-windows rounded up to whole batches");
  require_memory(
      checked_mul(windows, 8, "bytes of the validation window starts"),
      fmt::format("--val-windows {} (rounded up to whole batches of {})", o.val_windows, o.batch),
      "use a smaller --val-windows");
  val_starts_.reserve(static_cast<size_t>(windows));
  for (int64_t i = 0; i < windows; ++i) {
    const int64_t off =
        windows > 1 ? static_cast<int64_t>(static_cast<__int128>(span) * i / (windows - 1)) : 0;
    val_starts_.push_back(train_tokens_ + off);
  }
}

int64_t DataLoader::train_window_start(int64_t n) const {
  const uint64_t positions = static_cast<uint64_t>(train_tokens_ - options_.seq);  // > 1
  return static_cast<int64_t>(window_hash(options_.seed, static_cast<uint64_t>(n)) % positions);
}

Batch DataLoader::train_batch(int64_t step, int64_t micro) const {
  TSP_CHECK(step >= 0 && micro >= 0 && micro < options_.accum, "bad batch index ({}, {})", step,
            micro);
  const char* what = "training data position (step × --accum + micro) × --batch";
  return train_rows(checked_mul(checked_add(checked_mul(step, options_.accum, what), micro, what),
                                options_.batch, what));
}

Batch DataLoader::train_rows(int64_t first_sample) const {
  TSP_CHECK(first_sample >= 0, "negative data position {}", first_sample);
  const int64_t B = options_.batch;
  checked_add(first_sample, B, "training data position + --batch");
  std::vector<int64_t> starts(B);
  for (int64_t r = 0; r < B; ++r) starts[r] = train_window_start(first_sample + r);
  return make_batch(starts);
}

Batch DataLoader::val_batch(int64_t i) const {
  TSP_CHECK(i >= 0 && i < num_val_batches(), "validation batch {} of {}", i, num_val_batches());
  const int64_t B = options_.batch;
  std::vector<int64_t> starts(val_starts_.begin() + i * B, val_starts_.begin() + (i + 1) * B);
  return make_batch(starts);
}

Batch DataLoader::make_batch(const std::vector<int64_t>& starts) const {
  const int64_t B = static_cast<int64_t>(starts.size()), S = options_.seq, W = S + 1;
  Batch batch;
  batch.B = B;
  batch.S = S;
  batch.doc_sep = options_.doc_sep;
  batch.tokens.assign(B * W, kTokenNotRead);
  const int64_t r0 = need_.row_begin, r1 = need_.row_end < 0 ? B : need_.row_end;
  TSP_CHECK(0 <= r0 && r0 <= r1 && r1 <= B, "token need rows [{}, {}) outside a batch of {} rows",
            r0, r1, B);
  std::vector<std::pair<int64_t, int64_t>> ranges = need_.input_ranges;
  if (ranges.empty()) ranges.push_back({0, S});
  for (int64_t r = r0; r < r1; ++r) {
    for (auto [p0, p1] : ranges) {
      TSP_CHECK(0 <= p0 && p0 <= p1 && p1 <= S, "token need positions [{}, {}) outside [0, {})", p0,
                p1, S);
      // Inputs p0..p1-1 and their labels p0+1..p1: tokens [p0, p1] of the window.
      if (p1 > p0) {
        corpus_->read(starts[r] + p0, p1 - p0 + 1, &batch.tokens[r * W + p0]);
        tokens_read_ += p1 - p0 + 1;
      }
    }
  }
  return batch;
}

}  // namespace tsp
