// Corpus formats and the data loader: windows depend only on (seed, sample index), every rank's
// partial read equals the full batch where it reads, and bad data is rejected up front.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>

#include "tsp/train/data.h"

namespace tsp {
namespace {

namespace fs = std::filesystem;

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("tsp_data_test_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Byte i of write_text's files: pseudo-random printable ASCII, so every window is
  // distinguishable and the file is text (a corpus that is not text is refused).
  static int32_t text_byte(int64_t i) { return 32 + static_cast<int32_t>(window_hash(7, i) % 95); }
  std::string write_text(const std::string& name, int64_t n) {
    std::string bytes(n, '\0');
    for (int64_t i = 0; i < n; ++i) bytes[i] = static_cast<char>(text_byte(i));
    return write_bytes(name, bytes);
  }
  std::string write_bytes(const std::string& name, const std::string& bytes) {
    const fs::path p = dir_ / name;
    std::ofstream(p, std::ios::binary)
        .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return p.string();
  }
  static std::string read_bytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), {}};
  }
  // llm.c format written by hand (header of 256 int32: magic, version, count), so this test
  // does not lean on the writer it would be checking.
  std::string write_llmc(const std::string& name, const std::vector<uint16_t>& ids,
                         int64_t announced) {
    std::vector<int32_t> header(256, 0);
    header[0] = 20240520;
    header[1] = 1;
    header[2] = static_cast<int32_t>(announced);
    const fs::path p = dir_ / name;
    std::ofstream out(p, std::ios::binary);
    out.write(reinterpret_cast<const char*>(header.data()), 1024);
    out.write(reinterpret_cast<const char*>(ids.data()), ids.size() * 2);
    return p.string();
  }
  fs::path dir_;
};

TEST_F(DataTest, TextIsReadAsBytes) {
  const std::string path = write_text("a.txt", 1000);
  Corpus c(path);
  EXPECT_EQ(c.format(), CorpusFormat::Text);
  EXPECT_EQ(c.num_tokens(), 1000);
  EXPECT_EQ(c.min_vocab_size(), 256);
  std::vector<int32_t> t(10);
  c.read(990, 10, t.data());
  for (int i = 0; i < 10; ++i) EXPECT_EQ(t[i], text_byte(990 + i));
  EXPECT_THROW(c.read(995, 10, t.data()), Error);
}

TEST_F(DataTest, LlmcTokenFileIsDetectedByMagic) {
  std::vector<uint16_t> ids(5000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<uint16_t>((i * 37) % 50257);
  Corpus c(write_llmc("t.bin", ids, ids.size()));
  EXPECT_EQ(c.format(), CorpusFormat::LlmcTokens);
  EXPECT_EQ(c.num_tokens(), 5000);
  std::vector<int32_t> t(3);
  c.read(4000, 3, t.data());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(t[i], ids[4000 + i]);
  EXPECT_EQ(c.min_vocab_size(), *std::max_element(ids.begin(), ids.end()) + 1);
}

TEST_F(DataTest, MissingEmptyCorruptOrTooSmallDataIsRejected) {
  EXPECT_THROW(Corpus((dir_ / "missing.txt").string()), Error);
  std::ofstream(dir_ / "empty.txt").close();
  EXPECT_THROW(Corpus((dir_ / "empty.txt").string()), Error);
  std::vector<uint16_t> ids(100, 1);
  EXPECT_THROW(Corpus(write_llmc("short.bin", ids, 200)), Error);  // announces more than it holds
  try {
    auto small = std::make_shared<Corpus>(write_text("small.txt", 300));
    DataLoader loader(small, DataOptions{8, 256, 1, 1, 0.05, 8});
    ADD_FAILURE() << "a 300-byte corpus cannot hold windows of 257 in both splits";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--seq"), std::string::npos) << e.what();
  }
}

// Expects `make` to throw a tsp::Error whose message holds `fragment`.
template <class F>
void expect_error(F make, const std::string& fragment) {
  try {
    make();
    ADD_FAILURE() << "no error; expected one containing \"" << fragment << "\"";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST_F(DataTest, TextInAnyEncodingIsText) {
  // UTF-8 with tabs, CRLF and an escape sequence, and Latin-1 (bytes >= 0x80 that are not UTF-8).
  const std::string utf8 =
      "In the beginning\tGod created \xc3\xa9\xe2\x80\x94 the heaven\r\n\x1b[0m";
  const std::string latin1 = "caf\xe9 na\xefve \xe0 la carte\n";
  std::string a, b;
  for (int i = 0; i < 200; ++i) a += utf8, b += latin1;
  EXPECT_EQ(Corpus(write_bytes("utf8.txt", a)).format(), CorpusFormat::Text);
  EXPECT_EQ(Corpus(write_bytes("latin1.txt", b)).format(), CorpusFormat::Text);
  EXPECT_EQ(Corpus(write_bytes("noext", a)).format(), CorpusFormat::Text);
}

TEST_F(DataTest, DamagedTokenFilesAreNotReadAsText) {
  std::vector<uint16_t> ids(3000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<uint16_t>(i % 200);
  const std::string good = read_bytes(write_llmc("good.bin", ids, ids.size()));
  // Magic overwritten, version and count intact: recognised whatever the name.
  std::string bad = good;
  bad.replace(0, 4, "XXXX");
  expect_error([&] { Corpus c(write_bytes("magic.dat", bad)); },
               "looks like an llm.c token file with a damaged magic number");
  // The whole first 12 bytes damaged, named .bin (llm.c's convention for token files).
  bad.replace(0, 12, "garbagegarba");
  expect_error([&] { Corpus c(write_bytes("header.bin", bad)); }, "has a .bin name");
  // Text named .bin is refused too, saying how to use it.
  expect_error([&] { Corpus c(write_bytes("text.bin", std::string(5000, 'a'))); },
               "give it another extension");
  // Any other name: the zero bytes of the header and of the uint16 ids are not text.
  expect_error([&] { Corpus c(write_bytes("header.dat", bad)); },
               "is neither text nor an llm.c token file");
  std::string binary(5000, '\x01');
  expect_error([&] { Corpus c(write_bytes("ctrl.txt", binary)); }, "tsp encode --text");
}

TEST_F(DataTest, ImpossibleSizesAreRefusedUpFront) {
  auto corpus = std::make_shared<Corpus>(write_text("s.txt", 20000));
  // B·(S+1) beyond 64 bits, and a batch beyond this machine's memory: errors naming the options
  // before anything is allocated.
  expect_error(
      [&] {
        DataLoader l(corpus, DataOptions{int64_t{1} << 62, 1, 1, 1, 0.05, 8});
      },
      "--batch × (--seq + 1)");
  expect_error(
      [&] {
        DataLoader l(corpus, DataOptions{int64_t{1} << 40, 1, 1, 1, 0.05, 8});
      },
      "a batch of --batch 1099511627776");
  expect_error([&] { DataLoader l(corpus, DataOptions{8, INT64_MAX, 1, 1, 0.05, 8}); }, "--seq");
  // More validation windows than the held-out 1000 tokens hold (968 of --seq 32).
  expect_error(
      [&] {
        DataLoader l(corpus, DataOptions{8, 32, 1, 1, 0.05, 1000000000000});
      },
      "use --val-windows <= 968");
  const DataLoader all(corpus, DataOptions{8, 32, 1, 1, 0.05, 968});
  EXPECT_EQ(all.num_val_batches(), 121);
  // The default stays valid on a tail too short for 32 distinct windows (6 here).
  auto tiny = std::make_shared<Corpus>(write_text("t.txt", 800));
  const DataLoader dflt(tiny, DataOptions{8, 34, 1, 1, 0.05, DataOptions{}.val_windows});
  EXPECT_EQ(dflt.num_val_batches(), 4);
  // A data position beyond 64 bits.
  const DataLoader l(corpus, DataOptions{8, 32, 1, 1, 0.05, 8});
  expect_error([&] { l.train_batch(INT64_MAX / 4, 0); }, "training data position");
}

TEST_F(DataTest, WindowsDependOnlyOnSeedAndSampleIndex) {
  auto corpus = std::make_shared<Corpus>(write_text("c.txt", 20000));
  const DataLoader a(corpus, DataOptions{8, 32, 1, 42, 0.05, 16});
  const DataLoader b(corpus, DataOptions{4, 32, 2, 42, 0.05, 16});  // same rows, other split
  const DataLoader c(corpus, DataOptions{8, 32, 1, 43, 0.05, 16});
  int differing = 0;
  for (int64_t step = 0; step < 5; ++step) {
    const Batch whole = a.train_batch(step, 0);
    ASSERT_EQ(whole.tokens.size(), 8u * 33);
    for (int64_t micro = 0; micro < 2; ++micro) {
      const Batch half = b.train_batch(step, micro);
      EXPECT_TRUE(
          std::equal(half.tokens.begin(), half.tokens.end(), whole.tokens.begin() + micro * 4 * 33))
          << "step " << step << " micro " << micro;
    }
    // Stateless: asking again (e.g. after a resume at this step) gives the same batch.
    EXPECT_EQ(a.train_batch(step, 0).tokens, whole.tokens);
    differing += c.train_batch(step, 0).tokens != whole.tokens;
    for (int32_t t : whole.tokens) ASSERT_TRUE(t >= 0 && t < 256);
  }
  EXPECT_EQ(differing, 5) << "another seed must give other windows";
  // Windows stay in the training part, and their starts spread over it.
  std::set<int64_t> starts;
  for (int64_t n = 0; n < 2000; ++n) {
    const int64_t s = a.train_window_start(n);
    ASSERT_GE(s, 0);
    ASSERT_LE(s + 32, a.train_tokens() - 1);
    starts.insert(s / 1000);
  }
  EXPECT_EQ(static_cast<int64_t>(starts.size()), (a.train_tokens() - 33) / 1000 + 1);
}

TEST_F(DataTest, ValidationWindowsAreHeldOut) {
  auto corpus = std::make_shared<Corpus>(write_text("v.txt", 20000));
  const DataLoader loader(corpus, DataOptions{8, 32, 1, 1, 0.05, 10});
  EXPECT_EQ(loader.val_tokens(), 1000);
  EXPECT_EQ(loader.num_val_batches(), 2);  // 10 windows rounded up to 2 micro-batches of 8
  for (int64_t s : loader.val_window_starts()) {
    EXPECT_GE(s, loader.train_tokens());
    EXPECT_LE(s + 33, corpus->num_tokens());
  }
  EXPECT_EQ(loader.val_window_starts().front(), loader.train_tokens());
  EXPECT_EQ(loader.val_window_starts().back(), corpus->num_tokens() - 33);
  const Batch v = loader.val_batch(1);
  std::vector<int32_t> expect(33);
  corpus->read(loader.val_window_starts()[8], 33, expect.data());
  EXPECT_TRUE(std::equal(expect.begin(), expect.end(), v.tokens.begin()));
}

TEST_F(DataTest, EachRankReadsOnlyItsRowsAndZigzagChunks) {
  auto corpus = std::make_shared<Corpus>(write_text("z.txt", 20000));
  const int64_t B = 4, S = 16, D = 4, R = 2;
  DataLoader full(corpus, DataOptions{B, S, 1, 5, 0.05, 8});
  const Batch ref = full.train_batch(3, 0);
  std::vector<int> covered(B * (S + 1), 0);
  for (int64_t replica = 0; replica < R; ++replica) {
    for (int64_t p = 0; p < D; ++p) {
      DataLoader mine(corpus, DataOptions{B, S, 1, 5, 0.05, 8});
      const int64_t c = S / (2 * D);  // zigzag: chunks p and 2D-1-p of 2D
      TokenNeed need;
      need.row_begin = replica * B / R;
      need.row_end = (replica + 1) * B / R;
      need.input_ranges = {{p * c, (p + 1) * c}, {(2 * D - 1 - p) * c, (2 * D - p) * c}};
      mine.set_need(need);
      const Batch got = mine.train_batch(3, 0);
      for (int64_t r = 0; r < B; ++r) {
        for (int64_t i = 0; i <= S; ++i) {
          const int64_t k = r * (S + 1) + i;
          const bool in_rows = r >= need.row_begin && r < need.row_end;
          bool wanted = false;  // an input of a chunk, or the label of its last input
          for (auto [a, b] : need.input_ranges) wanted |= i >= a && i <= b;
          if (in_rows && wanted) {
            EXPECT_EQ(got.tokens[k], ref.tokens[k]) << "row " << r << " pos " << i;
            ++covered[k];
          } else {
            EXPECT_EQ(got.tokens[k], kTokenNotRead) << "row " << r << " pos " << i;
          }
        }
      }
    }
  }
  for (int64_t k = 0; k < B * (S + 1); ++k) EXPECT_GE(covered[k], 1) << k;
}

TEST(ZigzagNeed, MatchesTheZigzagMapAndRows) {
  // S = 16, D = 4: chunks of 2; rank 1 holds chunks 1 and 6 -> positions 2,3 and 12,13.
  const TokenNeed n = zigzag_token_need(8, 16, 4, 1, 2, 1);
  EXPECT_EQ(n.row_begin, 4);
  EXPECT_EQ(n.row_end, 8);
  ASSERT_EQ(n.input_ranges.size(), 2u);
  EXPECT_EQ(n.input_ranges[0], (std::pair<int64_t, int64_t>{2, 4}));
  EXPECT_EQ(n.input_ranges[1], (std::pair<int64_t, int64_t>{12, 14}));
  // The middle ranks' chunks touch: rank D-1 holds chunks D-1 and D, one range.
  const TokenNeed mid = zigzag_token_need(2, 16, 4, 3, 1, 0);
  ASSERT_EQ(mid.input_ranges.size(), 1u);
  EXPECT_EQ(mid.input_ranges[0], (std::pair<int64_t, int64_t>{6, 10}));
  EXPECT_TRUE(zigzag_token_need(2, 16, 1, 0, 1, 0).input_ranges.empty());  // D = 1: whole rows
  EXPECT_THROW(zigzag_token_need(2, 12, 4, 0, 1, 0), Error);  // 12 tokens do not cut into 8 chunks
  EXPECT_THROW(zigzag_token_need(3, 16, 2, 0, 2, 0), Error);  // 3 rows over 2 replicas
}

}  // namespace
}  // namespace tsp
