// Core: tensors and views, bf16 rounding (ties to even, NaN, inf, denormals, bulk == scalar),
// the memory tracker's current/peak/at_peak per category, tsp::Error's rank and location, and the
// checked size arithmetic and memory requirement of tsp/core/limits.h.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "tsp/core/bf16.h"
#include "tsp/core/error.h"
#include "tsp/core/limits.h"
#include "tsp/core/memory.h"
#include "tsp/core/tensor.h"

namespace tsp {
namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ---- bf16 ------------------------------------------------------------------------------------

TEST(Bf16, RoundsToNearestTiesToEven) {
  // bf16 keeps 8 significant bits: around 1.0 the spacing is 2^-7.
  EXPECT_EQ(bf16::from_float(1.f), 0x3f80);
  EXPECT_EQ(bf16::from_float(1.f + 0x1p-9f), 0x3f80);             // below half: down
  EXPECT_EQ(bf16::from_float(1.f + 0x1p-8f), 0x3f80);             // exact tie, even neighbour: down
  EXPECT_EQ(bf16::from_float(1.f + 0x1p-7f + 0x1p-8f), 0x3f82);   // tie, odd below: up to even
  EXPECT_EQ(bf16::from_float(1.f + 0x1p-8f + 0x1p-20f), 0x3f81);  // just above the tie: up
  EXPECT_EQ(bf16::from_float(-1.f - 0x1p-8f), 0xbf80);            // sign-symmetric
  EXPECT_EQ(bf16::from_float(-1.f - 0x1p-7f - 0x1p-8f), 0xbf82);
  // Rounding carries into the exponent: the largest value below 2 rounds up to 2.
  EXPECT_EQ(bf16::from_float(from_bits(0x3fffffff)), 0x4000);
}

TEST(Bf16, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(bf16::from_float(inf), 0x7f80);
  EXPECT_EQ(bf16::from_float(-inf), 0xff80);
  EXPECT_EQ(bf16::from_float(0.f), 0x0000);
  EXPECT_EQ(bf16::from_float(-0.f), 0x8000);
  // FLT_MAX is above the largest bf16 by more than half a step: it rounds to inf.
  EXPECT_EQ(bf16::from_float(std::numeric_limits<float>::max()), 0x7f80);
  // A NaN whose payload sits only in the low 16 bits must stay a NaN (truncation would give
  // inf) and stays quiet; the sign is kept.
  for (uint32_t nan : {0x7f800001u, 0x7fc00000u, 0xff800001u, 0x7fffffffu}) {
    const uint16_t b = bf16::from_float(from_bits(nan));
    EXPECT_TRUE(std::isnan(bf16::to_float(b))) << std::hex << nan;
    EXPECT_EQ(b & 0x8000, (nan >> 16) & 0x8000) << std::hex << nan;
    EXPECT_NE(b & 0x40, 0) << "quiet bit " << std::hex << nan;
  }
  // Denormals round like everything else (the bulk path must not flush them to zero).
  EXPECT_EQ(bf16::from_float(from_bits(0x00018000)), 0x0002);  // tie 1.5 -> even 2
  EXPECT_EQ(bf16::from_float(from_bits(0x00010001)), 0x0001);
  EXPECT_EQ(bf16::to_float(0x0001), from_bits(0x00010000));
  // to_float is exact: every bf16 is a float.
  EXPECT_EQ(bf16::to_float(0x3f81), 1.f + 0x1p-7f);
  EXPECT_EQ(static_cast<float>(bf16(2.5f)), 2.5f);
}

TEST(Bf16, BulkConversionMatchesScalarBitForBit) {
  // Every upper half-word with low halves that probe the rounding boundaries (0x7fff/0x8000/
  // 0x8001 are just below, at and above a tie), plus random words; the length 65536·6 + 7 also
  // exercises the remainder loop of the vectorised path.
  std::vector<uint32_t> words;
  for (uint32_t hi = 0; hi < 0x10000u; ++hi)
    for (uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu})
      words.push_back(hi << 16 | lo);
  std::mt19937 rng(7);
  for (int i = 0; i < 7; ++i) words.push_back(rng());
  std::vector<float> src(words.size());
  for (size_t i = 0; i < words.size(); ++i) src[i] = from_bits(words[i]);
  std::vector<bf16> dst(src.size());
  convert_f32_to_bf16(src.data(), dst.data(), static_cast<int64_t>(src.size()));
  for (size_t i = 0; i < src.size(); ++i) {
    ASSERT_EQ(dst[i].bits, bf16::from_float(src[i])) << std::hex << words[i];
  }
  std::vector<float> back(src.size());
  convert_bf16_to_f32(dst.data(), back.data(), static_cast<int64_t>(dst.size()));
  for (size_t i = 0; i < src.size(); ++i) {
    ASSERT_EQ(to_bits(back[i]), static_cast<uint32_t>(dst[i].bits) << 16) << i;
  }
  // Short lengths (all remainder) and an offset start.
  for (int64_t n = 0; n < 40; ++n) {
    std::vector<bf16> d(n + 1);
    convert_f32_to_bf16(src.data() + 3, d.data() + 1, n);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(d[i + 1].bits, bf16::from_float(src[i + 3]));
  }
}

// ---- Tensors and views -----------------------------------------------------------------------

TEST(Tensor, AllocationShapesAndViews) {
  Tensor t({3, 4}, DType::F32, MemCategory::Workspace);
  EXPECT_EQ(t.numel(), 12);
  EXPECT_EQ(t.nbytes(), 48u);
  EXPECT_EQ(t.dim(-1), 4);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % 64, 0u);
  // Not zeroed: under TSP_POISON_ALLOCATIONS=1 (the test suite's setting) every byte is 0xFF, a
  // NaN for floats, so code relying on fresh memory being zero fails instead of passing by luck.
  if (poison_allocations()) {
    for (int64_t i = 0; i < 12; ++i) EXPECT_TRUE(std::isnan(t.f32()[i])) << "poisoned";
  }
  const Tensor z = Tensor::zeros({3, 4}, DType::F32, MemCategory::Workspace);
  for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(z.f32()[i], 0.f) << "Tensor::zeros";
  EXPECT_EQ(z.device(), Device::cpu());
  for (int64_t i = 0; i < 12; ++i) t.f32()[i] = static_cast<float>(i);

  const TensorView rows = t.slice(1, 3);
  EXPECT_EQ(rows.shape(), (Shape{2, 4}));
  EXPECT_EQ(rows.f32()[0], 4.f);
  EXPECT_EQ(rows.reshape({8}).f32()[7], 11.f);
  EXPECT_EQ(t.slice(3, 3).numel(), 0);
  EXPECT_THROW(t.slice(2, 4), Error);
  EXPECT_THROW(t.slice(2, 1), Error);
  EXPECT_THROW(rows.reshape({3, 3}), Error);
  EXPECT_THROW(t.data_as<int32_t>(), Error);  // wrong dtype
  EXPECT_THROW(Tensor({2, -1}, DType::F32, MemCategory::Workspace), Error);

  Tensor c = t.clone(MemCategory::Activations);
  EXPECT_EQ(c.category(), MemCategory::Activations);
  EXPECT_NE(c.data(), t.data());
  EXPECT_EQ(std::memcmp(c.data(), t.data(), t.nbytes()), 0);

  Tensor moved = std::move(c);
  EXPECT_TRUE(c.empty());  // NOLINT(bugprone-use-after-move): moved-from state is specified
  EXPECT_EQ(moved.f32()[5], 5.f);
  moved.zero();
  EXPECT_EQ(moved.f32()[5], 0.f);
  EXPECT_EQ(shape_str({4, 256}), "[4, 256]");
}

TEST(Tensor, CopyConvertsBetweenF32AndBf16) {
  Tensor f = Tensor::f32({5}, MemCategory::Workspace);
  const float values[5] = {1.f, -2.5f, 1.f + 0x1p-8f, 3.3f, 0.f};
  std::memcpy(f.data(), values, sizeof values);
  Tensor b({5}, DType::BF16, MemCategory::Workspace);
  copy(f, b);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(b.data_as<bf16>()[i].bits, bf16::from_float(values[i]));
  Tensor g = Tensor::f32({5}, MemCategory::Workspace);
  copy(b, g);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(g.f32()[i], static_cast<float>(bf16(values[i])));
  Tensor wrong({4}, DType::F32, MemCategory::Workspace);
  EXPECT_THROW(copy(f, wrong), Error);
  Tensor ints({5}, DType::I32, MemCategory::Workspace);
  EXPECT_THROW(copy(f, ints), Error);
}

// ---- Memory tracker --------------------------------------------------------------------------

TEST(MemoryTracker, CurrentPeakAndAtPeakPerCategory) {
  MemoryTracker& tracker = MemoryTracker::instance();
  tracker.reset_peaks();
  const MemorySnapshot base = tracker.snapshot();
  const int W = static_cast<int>(MemCategory::Weights);
  const int A = static_cast<int>(MemCategory::Activations);
  const int G = static_cast<int>(MemCategory::Grads);
  {
    Tensor w({250}, DType::F32, MemCategory::Weights);  // 1000 B
    {
      Tensor a({1000}, DType::F32, MemCategory::Activations);  // 4000 B: total peak here
      const MemorySnapshot s = tracker.snapshot();
      EXPECT_EQ(s.current[W] - base.current[W], 1000);
      EXPECT_EQ(s.current[A] - base.current[A], 4000);
    }
    Tensor g({500}, DType::F32, MemCategory::Grads);  // 2000 B, after the activations left
    const MemorySnapshot s = tracker.snapshot();
    EXPECT_EQ(s.current[A], base.current[A]);
    EXPECT_EQ(s.current[G] - base.current[G], 2000);
    EXPECT_EQ(s.current_total - base.current_total, 3000);
    EXPECT_EQ(s.peak_total - base.current_total, 5000);
    EXPECT_EQ(s.peak[A] - base.current[A], 4000);
    EXPECT_EQ(s.peak[G] - base.current[G], 2000);
    // At the moment of the total peak the grads were not allocated yet.
    EXPECT_EQ(s.at_peak[W] - base.current[W], 1000);
    EXPECT_EQ(s.at_peak[A] - base.current[A], 4000);
    EXPECT_EQ(s.at_peak[G] - base.current[G], 0);

    // Moving a buffer to another category moves its bytes.
    g.recategorize(MemCategory::Activations);
    const MemorySnapshot r = tracker.snapshot();
    EXPECT_EQ(r.current[G], base.current[G]);
    EXPECT_EQ(r.current[A] - base.current[A], 2000);
  }
  const MemorySnapshot end = tracker.snapshot();
  EXPECT_EQ(end.current_total, base.current_total);
  tracker.reset_peaks();
  EXPECT_EQ(tracker.snapshot().peak_total, base.current_total);
  EXPECT_NE(tracker.report().find("weights"), std::string::npos);
}

// ---- Errors ----------------------------------------------------------------------------------

TEST(Error, CarriesRankAndFileLine) {
  set_error_rank(3);
  int line = 0;
  try {
    line = __LINE__ + 1;
    TSP_CHECK(1 + 1 == 3, "D={} does not divide n_kv={}", 8, 4);
    FAIL() << "TSP_CHECK did not throw";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("[rank 3]"), std::string::npos) << what;
    EXPECT_NE(what.find("D=8 does not divide n_kv=4"), std::string::npos) << what;
    // The path is shortened from "tests/" on (or from an earlier "/src/" if the checkout lives
    // under one), so match its tail.
    EXPECT_NE(what.find(fmt::format("core/core_test.cpp:{}", line)), std::string::npos) << what;
    EXPECT_EQ(e.message(), "D=8 does not divide n_kv=4");
    EXPECT_EQ(e.rank(), 3);
    EXPECT_EQ(e.line(), line);
    EXPECT_TRUE(std::string(e.file()).ends_with("tests/core/core_test.cpp")) << e.file();
  }
  set_error_rank(-1);
  try {
    TSP_FAIL("outside a job");
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find("[rank"), std::string::npos) << e.what();
    EXPECT_EQ(e.rank(), -1);
  }
}

// ---- Size limits -----------------------------------------------------------------------------

// The message of the tsp::Error that f throws ("" when it throws none).
template <class F>
std::string message_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.message();
  }
  return "";
}

TEST(Limits, CheckedArithmeticRefusesOverflowAndNegatives) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(checked_mul(int64_t{1} << 31, int64_t{1} << 31, "x"), int64_t{1} << 62);
  EXPECT_EQ(checked_add(kMax - 1, 1, "x"), kMax);
  EXPECT_EQ(checked_product({2, 3, 7}, "x"), 42);
  EXPECT_EQ(checked_product({}, "x"), 1);
  EXPECT_EQ(message_of([] { checked_mul(int64_t{1} << 62, 2, "--batch × (--seq + 1)"); }),
            "--batch × (--seq + 1): 4611686018427387904 × 2 does not fit in 64 bits");
  EXPECT_NE(message_of([] { checked_add(kMax, 1, "sum"); }).find("does not fit"),
            std::string::npos);
  EXPECT_NE(message_of([] {
              checked_product({4, int64_t{1} << 61, 2}, "tensor");
            }).find("tensor"),
            std::string::npos);
  EXPECT_NE(message_of([] { checked_mul(-1, 2, "rows"); }).find("negative"), std::string::npos);
  EXPECT_NE(message_of([] { checked_add(1, -2, "rows"); }).find("negative"), std::string::npos);
}

TEST(Limits, MemoryRequirementNamesWhatAndHint) {
  const int64_t have = physical_memory_bytes();
  ASSERT_GT(have, 0);
  EXPECT_NO_THROW(require_memory(1 << 20, "a small buffer", "hint"));
  const std::string m = message_of(
      [&] { require_memory(have + 1, "a batch of --batch 9", "use a smaller --batch"); });
  EXPECT_NE(m.find("a batch of --batch 9 needs"), std::string::npos) << m;
  EXPECT_NE(m.find("use a smaller --batch"), std::string::npos) << m;
  EXPECT_EQ(format_bytes(512), "512 B");
  EXPECT_EQ(format_bytes(1.5e9), "1.5 GB");
  EXPECT_EQ(format_bytes(2.81e14), "281.0 TB");
}

// Ranks sharing a machine each hold their share: what fits one rank may not fit four.
TEST(Limits, MemoryRequirementCountsTheRanksOnThisMachine) {
  const int64_t have = physical_memory_bytes();
  const char* saved = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  const std::string restore = saved ? saved : "";
  ::setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1", 1);
  EXPECT_EQ(local_ranks(), 1);
  EXPECT_NO_THROW(require_memory(have / 2, "half the machine", "hint"));
  ::setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4", 1);
  EXPECT_EQ(local_ranks(), 4);
  EXPECT_NO_THROW(require_memory(have / 5, "a fifth of the machine", "hint"));
  const std::string m = message_of([&] { require_memory(have / 2, "half the machine", "hint"); });
  EXPECT_NE(m.find("for the 4 ranks on this machine"), std::string::npos) << m;
  if (saved) {
    ::setenv("OMPI_COMM_WORLD_LOCAL_SIZE", restore.c_str(), 1);
  } else {
    ::unsetenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  }
}

// A GPU is its own pool: its memory and the ranks that compute on it, named in the message (the
// pool a CUDA run builds with memory_pool is checked on a GPU, tests/comm/cuda_collectives_mpi_test).
TEST(Limits, MemoryRequirementAgainstAnotherPool) {
  const MemoryPool gpu{80'000'000'000, 2, "the GPU cuda:0"};
  EXPECT_NO_THROW(require_memory(40'000'000'000, "a step", "hint", gpu));
  const std::string two =
      message_of([&] { require_memory(40'000'000'001, "a step", "use fewer tokens", gpu); });
  EXPECT_NE(two.find("a step needs 40.0 GB per rank, 80.0 GB for the 2 ranks on the GPU cuda:0, "
                     "more than the 80.0 GB it has; use fewer tokens"),
            std::string::npos)
      << two;
  const MemoryPool alone{80'000'000'000, 1, "the GPU cuda:1"};
  EXPECT_NO_THROW(require_memory(80'000'000'000, "a step", "hint", alone));
  const std::string one =
      message_of([&] { require_memory(80'000'000'001, "a step", "hint", alone); });
  EXPECT_NE(one.find("more than the 80.0 GB the GPU cuda:1 has"), std::string::npos) << one;
  // The host pool is this machine's memory and the ranks on it.
  const MemoryPool host = host_memory_pool();
  EXPECT_EQ(host.bytes, physical_memory_bytes());
  EXPECT_EQ(host.ranks, local_ranks());
  EXPECT_EQ(host.place, "this machine");
}

}  // namespace
}  // namespace tsp
