// The CUDA backend against the CPU backend, op by op, through the Backend interface: the same
// random inputs on both devices, results downloaded and compared.
//
// Tolerances (u32 = 2^-24, the fp32 unit roundoff; one bf16 ulp is at most 2^-7 of a value):
//   * copies, casts, add, scale, fill, count_non_finite, embedding_forward: the same operations
//     on the same values, so bitwise equal (tolerance 0).
//   * a reduction of K fp32 terms summed in another order differs by at most ~K·u32 of Σ|terms|;
//     checked normwise: max |gpu - cpu| <= c·K·u32 · max|cpu|, with c a small constant (the
//     terms here are of the size of the result, so Σ|terms| ~ K·typical term ~ max|result|).
//   * expf / sinf / cosf: CUDA's are within 2 ulp, the CPU's within 1 ulp: a few u32 per value.
//   * a BF16 output is the rounding of two fp32 values that agree to the bounds above: equal, or
//     one bf16 ulp apart when they straddle a rounding boundary: elementwise 2^-7·|value| on top.
// On failure a check prints the largest error, its index and both values, and the first index
// over the bound.
//
// Every test needing a GPU starts with GTEST_SKIP() when there is none: ctest then reports the
// executable as Skipped (tests/cuda_test_listener.cpp), never as Passed.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/allocator.h"
#include "backend/cuda/cuda_common.h"
#include "test_util.h"
#include "tsp/backend/backend.h"
#include "tsp/core/bf16.h"

namespace tsp {
namespace {

constexpr double kU32 = 1.0 / (1 << 24);
constexpr double kBf16Ulp = 1.0 / (1 << 7);
constexpr MemCategory kCat = MemCategory::Workspace;

#define REQUIRE_GPU()                                                     \
  do {                                                                    \
    if (tsp::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

Device gpu_device() {
  return Device::cuda(0);
}
Backend& gpu() {
  return backend_for(gpu_device());
}
Backend& cpu() {
  return backend_for(Device::cpu());
}

std::vector<float> random_values(int64_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 rng(seed);
  return test::uniform_values(n, rng, lo, hi);
}

// The same values on the CPU and on the GPU (BF16: the values rounded once, identically).
struct Pair {
  Tensor c, g;
};
Pair make_pair(const Shape& shape, DType dtype, const std::vector<float>& values) {
  Pair p{Tensor(shape, dtype, kCat), Tensor(shape, dtype, kCat, gpu_device())};
  EXPECT_EQ(static_cast<int64_t>(values.size()), p.c.numel());
  if (dtype == DType::F32) {
    std::memcpy(p.c.data(), values.data(), p.c.nbytes());
  } else {
    bf16* b = p.c.data_as<bf16>();
    for (size_t i = 0; i < values.size(); ++i) b[i] = bf16(values[i]);
  }
  if (p.c.nbytes()) gpu().upload(p.c.data(), p.g.view());
  return p;
}
Pair random_pair(const Shape& shape, DType dtype, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  return make_pair(shape, dtype, random_values(shape_numel(shape), seed, lo, hi));
}
template <typename T>
Pair int_pair(const std::vector<T>& values) {
  Shape shape{static_cast<int64_t>(values.size())};
  Pair p{Tensor(shape, dtype_of<T>(), kCat), Tensor(shape, dtype_of<T>(), kCat, gpu_device())};
  if (!values.empty()) {
    std::memcpy(p.c.data(), values.data(), p.c.nbytes());
    gpu().upload(values.data(), p.g.view());
  }
  return p;
}

// A tensor's values as fp32 on the host (F32, BF16 widened, F64 narrowed).
std::vector<float> host_f32(Backend& b, const TensorView& t) {
  std::vector<float> out(t.numel());
  if (t.dtype() == DType::F32) {
    b.download(t, out.data());
  } else if (t.dtype() == DType::BF16) {
    std::vector<bf16> raw(t.numel());
    b.download(t, raw.data());
    for (size_t i = 0; i < raw.size(); ++i) out[i] = raw[i];
  } else {
    ADD_FAILURE() << "host_f32: " << dtype_name(t.dtype());
  }
  return out;
}
std::vector<uint8_t> host_bytes(Backend& b, const TensorView& t) {
  std::vector<uint8_t> out(t.nbytes());
  b.download(t, out.data());
  return out;
}

// Passes when |got_i - want_i| <= norm_tol · max|want| + elem_rtol · |want_i| for every i
// (infinities and NaN must match exactly).
void expect_close(const std::string& what, const std::vector<float>& got,
                  const std::vector<float>& want, double norm_tol, double elem_rtol = 0) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (float w : want)
    if (std::isfinite(w)) scale = std::max(scale, std::fabs(static_cast<double>(w)));
  double max_err = 0;
  int64_t max_at = -1, first_bad = -1, bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i];
    double err;
    if (!std::isfinite(g) || !std::isfinite(w))
      err = (g == w || (std::isnan(g) && std::isnan(w))) ? 0 : INFINITY;
    else
      err = std::fabs(g - w);
    if (err > max_err || max_at < 0) max_err = err, max_at = static_cast<int64_t>(i);
    if (err > norm_tol * scale + elem_rtol * std::fabs(w)) {
      if (first_bad < 0) first_bad = static_cast<int64_t>(i);
      ++bad;
    }
  }
  if (bad) {
    ADD_FAILURE() << what << ": " << bad << " of " << got.size() << " elements over the bound ("
                  << norm_tol << " x max|cpu| = " << norm_tol * scale << " + " << elem_rtol
                  << " x |cpu|); max error " << max_err << " at " << max_at << " (gpu "
                  << got[max_at] << ", cpu " << want[max_at] << "); first bad at " << first_bad
                  << " (gpu " << got[first_bad] << ", cpu " << want[first_bad] << ")";
  }
}
void expect_close(const std::string& what, const TensorView& g, const TensorView& c,
                  double norm_tol, double elem_rtol = 0) {
  expect_close(what, host_f32(gpu(), g), host_f32(cpu(), c), norm_tol, elem_rtol);
}
void expect_bitwise(const std::string& what, const TensorView& g, const TensorView& c) {
  const std::vector<uint8_t> a = host_bytes(gpu(), g), b = host_bytes(cpu(), c);
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) {
      ADD_FAILURE() << what << ": first differing byte " << i << " of " << a.size() << " (gpu "
                    << int(a[i]) << ", cpu " << int(b[i]) << "), element "
                    << i / dtype_size(c.dtype());
      return;
    }
}
// The bf16 extra: one ulp when the output is BF16.
double bf16_extra(DType t) {
  return t == DType::BF16 ? kBf16Ulp : 0;
}

// ---- device, allocator, errors ---------------------------------------------------------------

// Runs with or without a GPU: asking for a device that is not there names what was found.
TEST(CudaBackend, cuda_AbsentDeviceIsAClearError) {
  const int n = cuda::device_count();
  const std::string msg = test::error_of([&] { backend_for(Device::cuda(n)); });
  EXPECT_NE(msg.find("no backend for device cuda:" + std::to_string(n)), std::string::npos) << msg;
  EXPECT_NE(msg.find("no CUDA device " + std::to_string(n) + ": found " + std::to_string(n)),
            std::string::npos)
      << msg;
  const std::string alloc =
      test::error_of([&] { Tensor t({4}, DType::F32, kCat, Device::cuda(n)); });
  EXPECT_NE(alloc.find("no CUDA device"), std::string::npos) << alloc;
}

TEST(CudaBackend, cuda_NameDeviceAndPointers) {
  REQUIRE_GPU();
  Backend& b = gpu();
  EXPECT_EQ(b.device(), gpu_device());
  EXPECT_EQ(b.name().rfind("cuda:0 (", 0), 0u) << b.name();
  EXPECT_NE(b.name().find("sm_"), std::string::npos) << b.name();
  EXPECT_NE(b.name().find("cuBLASLt"), std::string::npos) << b.name();
  std::printf("backend: %s, native bf16 %d\n", b.name().c_str(), int(b.native_bf16()));
  Tensor t({16}, DType::F32, kCat, gpu_device());
  std::vector<float> host(16);
  EXPECT_EQ(cuda::pointer_device(t.data()), gpu_device());
  EXPECT_EQ(cuda::pointer_device(host.data()), Device::cpu());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // the failed host query left no sticky error
}

TEST(CudaBackend, cuda_ArgumentsOnAnotherDeviceAreRefused) {
  REQUIRE_GPU();
  Tensor host({8}, DType::F32, kCat);
  Tensor dev({8}, DType::F32, kCat, gpu_device());
  const std::string msg = test::error_of([&] { gpu().add(dev, host); });
  EXPECT_NE(msg.find("add: a tensor [8] f32 on cpu was given to the cuda:0 backend"),
            std::string::npos)
      << msg;
  const std::string cpu_msg = test::error_of([&] { cpu().add(host, dev); });
  EXPECT_NE(cpu_msg.find("cuda:0"), std::string::npos) << cpu_msg;
}

TEST(CudaBackend, cuda_AllocatorCachesAndReusesBlocks) {
  REQUIRE_GPU();
  EXPECT_EQ(cuda::allocator_block_size(1), 512u);
  EXPECT_EQ(cuda::allocator_block_size(513), 1024u);
  EXPECT_EQ(cuda::allocator_block_size((1 << 20) + 1), size_t{2} << 20);
  EXPECT_EQ(cuda::allocator_block_size(size_t{5} << 20), size_t{6} << 20);
  gpu().synchronize();
  cuda::release_cached_blocks(0);
  EXPECT_EQ(cuda::cached_bytes(0), 0u);
  const size_t before = cuda::allocated_bytes(0);
  void* first = nullptr;
  {
    Tensor t({3 << 20}, DType::F32, kCat, gpu_device());  // 12 MiB
    first = t.data();
    EXPECT_EQ(cuda::allocated_bytes(0), before + (size_t{12} << 20));
  }
  EXPECT_EQ(cuda::cached_bytes(0), size_t{12} << 20);
  EXPECT_EQ(cuda::allocated_bytes(0), before);
  Tensor again({3 << 20}, DType::F32, kCat, gpu_device());
  EXPECT_EQ(again.data(), first) << "a freed block of the same size is reused";
  EXPECT_EQ(cuda::cached_bytes(0), 0u);
  // Out of memory: the message names the request, the device and the bytes in use and cached.
  const std::string msg =
      test::error_of([&] { Tensor huge({int64_t{1} << 48}, DType::F32, kCat, gpu_device()); });
  EXPECT_NE(msg.find("cuda:0 is out of memory"), std::string::npos) << msg;
  EXPECT_NE(msg.find("in use by tensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("cached"), std::string::npos) << msg;
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST(CudaBackend, cuda_TensorCopiesThroughTheAllocator) {
  REQUIRE_GPU();
  Pair a = random_pair({1000}, DType::F32, 1);
  Tensor c = a.g.clone();
  expect_bitwise("clone", c, a.c);
  c.zero();
  EXPECT_EQ(host_f32(gpu(), c), std::vector<float>(1000, 0.f));
}

// ---- memory ops --------------------------------------------------------------------------------

TEST(CudaBackend, cuda_FillZeroCopyAndCastsAreBitwiseTheCpus) {
  REQUIRE_GPU();
  for (DType t : {DType::F32, DType::BF16}) {
    Pair p = random_pair({37, 5}, t, 2);
    gpu().fill(p.g, 0.3f);
    cpu().fill(p.c, 0.3f);
    expect_bitwise(std::string("fill ") + std::string(dtype_name(t)), p.g, p.c);
    gpu().zero(p.g);
    cpu().zero(p.c);
    expect_bitwise("zero", p.g, p.c);
  }
  // Casts both ways, with values that round to even and a NaN and infinities.
  std::vector<float> v = random_values(1001, 3, -100, 100);
  v[0] = std::numeric_limits<float>::quiet_NaN();
  v[1] = INFINITY;
  v[2] = -INFINITY;
  v[3] = bf16::to_float(0x3f80) + std::ldexp(1.f, -8);  // a tie: rounds to even
  for (auto [from, to] : {std::pair{DType::F32, DType::BF16}, std::pair{DType::BF16, DType::F32},
                          std::pair{DType::F32, DType::F32}, std::pair{DType::BF16, DType::BF16}}) {
    Pair src = make_pair({1001}, from, v);
    Pair dst = random_pair({1001}, to, 4);
    gpu().copy(src.g, dst.g);
    cpu().copy(src.c, dst.c);
    expect_bitwise(
        std::string("copy ") + std::string(dtype_name(from)) + " -> " + std::string(dtype_name(to)),
        dst.g, dst.c);
  }
}

TEST(CudaBackend, cuda_Copy2dSwapLeadingDimsUploadDownload) {
  REQUIRE_GPU();
  for (DType t : {DType::F32, DType::BF16}) {
    Pair src = random_pair({7, 13}, t, 5);
    Pair dst = random_pair({9, 11}, t, 6);
    gpu().copy_2d(src.g, 13, dst.g.window(2, {9 * 11 - 2}), 11, 6, 9);
    cpu().copy_2d(src.c, 13, dst.c.window(2, {9 * 11 - 2}), 11, 6, 9);
    expect_bitwise("copy_2d", dst.g, dst.c);
    for (Shape s : {Shape{3, 5, 7}, Shape{4, 6, 8}, Shape{2, 3}, Shape{5, 1, 3}}) {
      Pair a = random_pair(s, t, 7);
      Shape swapped = s;
      std::swap(swapped[0], swapped[1]);
      Pair b = random_pair(swapped, t, 8);
      gpu().swap_leading_dims(a.g, b.g);
      cpu().swap_leading_dims(a.c, b.c);
      expect_bitwise("swap_leading_dims " + shape_str(s), b.g, b.c);
    }
  }
  // I64 and I32 round trips.
  std::vector<int64_t> pos = {5, -1, 1 << 30, int64_t{1} << 40};
  Tensor d = gpu().device_copy(pos, kCat);
  EXPECT_EQ(gpu().host_vector<int64_t>(d), pos);
}

// ---- element-wise and reductions ---------------------------------------------------------------

TEST(CudaBackend, cuda_AddScaleAreBitwiseTheCpus) {
  REQUIRE_GPU();
  for (DType ty : {DType::F32, DType::BF16})
    for (DType tx : {DType::F32, DType::BF16}) {
      Pair y = random_pair({3001}, ty, 9), x = random_pair({3001}, tx, 10);
      gpu().add(y.g, x.g);
      cpu().add(y.c, x.c);
      expect_bitwise("add", y.g, y.c);
      gpu().scale(y.g, -1.7f);
      cpu().scale(y.c, -1.7f);
      expect_bitwise("scale", y.g, y.c);
    }
}

TEST(CudaBackend, cuda_SumSquaresAndCountNonFinite) {
  REQUIRE_GPU();
  // Σ x² in double of fp32 squares (exact in double): only the summation order differs, K = 1e6
  // terms at 2^-53 each: relative 1e6·2^-53 ~ 1e-10.
  Pair x = random_pair({1000003}, DType::F32, 11, -3, 3);
  Pair out = int_pair(std::vector<double>{2.5});
  gpu().sum_squares(x.g, out.g);
  cpu().sum_squares(x.c, out.c);
  const double g = gpu().host_f64(out.g), c = cpu().host_f64(out.c);
  EXPECT_NEAR(g, c, 1e-10 * c) << "sum_squares";
  for (DType t : {DType::F32, DType::BF16}) {
    std::vector<float> v = random_values(100003, 12);
    v[5] = NAN;
    v[77] = INFINITY;
    v[99999] = -INFINITY;
    v[100] = -0.f;
    Pair p = make_pair({100003}, t, v);
    for (bool neg : {false, true}) {
      Pair cnt = int_pair(std::vector<int64_t>{7});
      gpu().count_non_finite(p.g, cnt.g, neg);
      cpu().count_non_finite(p.c, cnt.c, neg);
      EXPECT_EQ(gpu().host_i64(cnt.g), cpu().host_i64(cnt.c))
          << dtype_name(t) << " also_negative=" << neg;
    }
  }
}

// ---- linear ------------------------------------------------------------------------------------

// Normwise bound of a GEMM over K terms (|x|,|w| <= 1): c·K·u32 of the result's scale, plus
// one bf16 ulp for a BF16 output.
TEST(CudaBackend, cuda_LinearForwardAndBackwardAllDtypes) {
  REQUIRE_GPU();
  const int64_t N = 67, in = 96, out = 80;
  struct Combo {
    DType x, w, y;
  };
  for (Combo cb :
       {Combo{DType::F32, DType::F32, DType::F32}, Combo{DType::BF16, DType::BF16, DType::BF16},
        Combo{DType::BF16, DType::BF16, DType::F32}, Combo{DType::BF16, DType::F32, DType::F32},
        Combo{DType::F32, DType::BF16, DType::BF16}}) {
    const std::string tag = std::string(dtype_name(cb.x)) + "/" + std::string(dtype_name(cb.w)) +
                            "/" + std::string(dtype_name(cb.y));
    Pair x = random_pair({N, in}, cb.x, 13), w = random_pair({out, in}, cb.w, 14);
    for (bool acc : {false, true}) {
      Pair y = random_pair({N, out}, cb.y, 15);
      gpu().linear_forward(x.g, w.g, y.g, acc);
      cpu().linear_forward(x.c, w.c, y.c, acc);
      expect_close("linear_forward " + tag + (acc ? " +=" : " ="), y.g, y.c, 4 * in * kU32,
                   bf16_extra(cb.y));
    }
    Pair dy = random_pair({N, out}, DType::F32, 16);
    for (int which = 0; which < 3; ++which) {  // both, dx only, dw only
      Pair dx = random_pair({N, in}, DType::F32, 17), dw = random_pair({out, in}, DType::F32, 18);
      TensorView gdx = which == 2 ? TensorView() : dx.g.view();
      TensorView cdx = which == 2 ? TensorView() : dx.c.view();
      TensorView gdw = which == 1 ? TensorView() : dw.g.view();
      TensorView cdw = which == 1 ? TensorView() : dw.c.view();
      gpu().linear_backward(dy.g, x.g, w.g, gdx, gdw);
      cpu().linear_backward(dy.c, x.c, w.c, cdx, cdw);
      expect_close("linear_backward dx " + tag, dx.g, dx.c, 4 * out * kU32);
      expect_close("linear_backward dw " + tag, dw.g, dw.c, 4 * N * kU32);
    }
  }
}

// ---- RMSNorm, RoPE, SwiGLU -----------------------------------------------------------------------

TEST(CudaBackend, cuda_RmsNormForwardApplyBackward) {
  REQUIRE_GPU();
  const int64_t N = 33, h = 1000;
  struct Combo {
    DType x, w, y;
  };
  for (Combo cb :
       {Combo{DType::F32, DType::F32, DType::F32}, Combo{DType::BF16, DType::BF16, DType::BF16},
        Combo{DType::BF16, DType::F32, DType::F32}}) {
    const std::string tag = std::string(dtype_name(cb.x)) + "/" + std::string(dtype_name(cb.w)) +
                            "/" + std::string(dtype_name(cb.y));
    Pair x = random_pair({N, h}, cb.x, 19, -2, 2), w = random_pair({h}, cb.w, 20, 0.5f, 1.5f);
    Pair y = random_pair({N, h}, cb.y, 21), rstd = random_pair({N}, DType::F32, 22);
    gpu().rmsnorm_forward(x.g, w.g, y.g, rstd.g, 1e-5f);
    cpu().rmsnorm_forward(x.c, w.c, y.c, rstd.c, 1e-5f);
    // rstd: Σ of h squares, relative h·u32 in the sum, half of it in 1/sqrt.
    expect_close("rmsnorm rstd " + tag, rstd.g, rstd.c, h * kU32);
    expect_close("rmsnorm y " + tag, y.g, y.c, h * kU32, bf16_extra(cb.y));
    // rmsnorm_apply from identical rstd: no reduction, the same expression: bitwise in fp32.
    Pair r_same = make_pair({N}, DType::F32, host_f32(gpu(), rstd.g));
    Pair ya = random_pair({N, h}, cb.y, 24), yb = random_pair({N, h}, cb.y, 24);
    gpu().rmsnorm_apply(x.g, w.g, r_same.g, ya.g);
    cpu().rmsnorm_apply(x.c, w.c, r_same.c, yb.c);
    expect_bitwise("rmsnorm_apply " + tag, ya.g, yb.c);
    // Backward from the same rstd: dx's dot product over h terms; dw sums N rows (+=).
    Pair dy = random_pair({N, h}, DType::F32, 25), dx = random_pair({N, h}, DType::F32, 26);
    Pair dw = random_pair({h}, DType::F32, 27);
    gpu().rmsnorm_backward(dy.g, x.g, w.g, r_same.g, dx.g, dw.g);
    cpu().rmsnorm_backward(dy.c, x.c, w.c, r_same.c, dx.c, dw.c);
    expect_close("rmsnorm dx " + tag, dx.g, dx.c, 4 * h * kU32);
    expect_close("rmsnorm dw " + tag, dw.g, dw.c, 4 * N * kU32);
  }
}

TEST(CudaBackend, cuda_RopeAtExplicitLargePositions) {
  REQUIRE_GPU();
  const int64_t N = 19, heads = 3, d = 64;
  std::vector<int64_t> pos(N);
  std::mt19937 rng(28);
  for (auto& p : pos)
    p = rng() % 200000;  // unsorted, up to 2e5: the angle's fp32 rounding is
                         // the same on both (same inv_freq bits)
  Pair pp = int_pair(pos);
  for (DType t : {DType::F32, DType::BF16})
    for (bool fwd : {true, false}) {
      Pair x = random_pair({N, heads, d}, t, 29);
      if (fwd) {
        gpu().rope_forward(x.g, pp.g, 500000.f);
        cpu().rope_forward(x.c, pp.c, 500000.f);
      } else {
        gpu().rope_backward(x.g, pp.g, 500000.f);
        cpu().rope_backward(x.c, pp.c, 500000.f);
      }
      // cos/sin within 2 ulp each side: a·c - b·s within ~8 u32 of max|x|.
      expect_close(
          std::string(fwd ? "rope_forward " : "rope_backward ") + std::string(dtype_name(t)), x.g,
          x.c, 16 * kU32, bf16_extra(t));
    }
}

TEST(CudaBackend, cuda_SwiGluForwardBackward) {
  REQUIRE_GPU();
  const int64_t N = 41, F = 300;
  Pair g = random_pair({N, F}, DType::F32, 30, -6, 6),
       u = random_pair({N, F}, DType::F32, 31, -2, 2);
  for (DType t : {DType::F32, DType::BF16}) {
    Pair a = random_pair({N, F}, t, 32);
    gpu().swiglu_forward(g.g, u.g, a.g);
    cpu().swiglu_forward(g.c, u.c, a.c);
    // expf on both sides within 2 ulp; sigmoid and two products: ~8 u32 relative.
    expect_close(std::string("swiglu_forward ") + std::string(dtype_name(t)), a.g, a.c, 0,
                 16 * kU32 + bf16_extra(t));
  }
  Pair da = random_pair({N, F}, DType::F32, 33);
  Pair dg = random_pair({N, F}, DType::F32, 34), du = random_pair({N, F}, DType::F32, 35);
  gpu().swiglu_backward(da.g, g.g, u.g, dg.g, du.g);
  cpu().swiglu_backward(da.c, g.c, u.c, dg.c, du.c);
  // dg = da·u·s·(1 + g(1 - s)): 1 + g(1-s) cancels for g near -1/(1-s), so normwise.
  expect_close("swiglu_backward dg", dg.g, dg.c, 32 * kU32);
  expect_close("swiglu_backward du", du.g, du.c, 16 * kU32);
  // dg aliasing da.
  gpu().swiglu_backward(da.g, g.g, u.g, da.g, du.g);
  cpu().swiglu_backward(da.c, g.c, u.c, da.c, du.c);
  expect_close("swiglu_backward dg aliasing da", da.g, da.c, 32 * kU32);
}

// ---- embedding ---------------------------------------------------------------------------------

TEST(CudaBackend, cuda_EmbeddingOverAVocabularyRange) {
  REQUIRE_GPU();
  const int64_t V_shard = 50, h = 72, v0 = 100, N = 64;
  std::vector<int32_t> ids(N);
  std::mt19937 rng(36);
  for (auto& i : ids) i = 80 + static_cast<int32_t>(rng() % 90);  // some below, some above range
  ids[3] = ids[4] = ids[5] = 120;                                 // repeated ids add up
  Pair pid = int_pair(ids);
  struct Combo {
    DType table, out;
  };
  for (Combo cb : {Combo{DType::F32, DType::F32}, Combo{DType::BF16, DType::BF16},
                   Combo{DType::F32, DType::BF16}, Combo{DType::BF16, DType::F32}}) {
    Pair table = random_pair({V_shard, h}, cb.table, 37);
    Pair out = random_pair({N, h}, cb.out, 38);  // rows out of range keep these values
    gpu().embedding_forward(pid.g, table.g, out.g, v0);
    cpu().embedding_forward(pid.c, table.c, out.c, v0);
    expect_bitwise("embedding_forward " + std::string(dtype_name(cb.table)) + " -> " +
                       std::string(dtype_name(cb.out)),
                   out.g, out.c);
  }
  Pair dout = random_pair({N, h}, DType::F32, 39),
       dtable = random_pair({V_shard, h}, DType::F32, 40);
  gpu().embedding_backward(pid.g, dout.g, dtable.g, v0);
  cpu().embedding_backward(pid.c, dout.c, dtable.c, v0);
  // At most a handful of terms per row, added in another order (atomics): a few u32.
  expect_close("embedding_backward", dtable.g, dtable.c, 8 * kU32);
}

// ---- cross-entropy and the online softmax -----------------------------------------------------

TEST(CudaBackend, cuda_CrossEntropyLossAndGradient) {
  REQUIRE_GPU();
  const int64_t N = 23, V = 3001;
  const int32_t ignore = -100;
  std::vector<int32_t> labels(N);
  std::mt19937 rng(41);
  for (auto& l : labels) l = static_cast<int32_t>(rng() % V);
  labels[2] = labels[17] = ignore;
  Pair pl = int_pair(labels);
  // Per row: a sum of V exponentials (V·u32 relative) then its log: V·u32 absolute per row.
  const double loss_tol = N * (V + 16) * kU32;
  for (int mode = 0; mode < 3; ++mode) {  // separate dlogits, aliased, loss only
    Pair logits = random_pair({N, V}, DType::F32, 42, -8, 8);
    Pair dl = random_pair({N, V}, DType::F32, 43);
    Pair loss = int_pair(std::vector<double>{1.0});
    TensorView gd = mode == 0 ? dl.g.view() : mode == 1 ? logits.g.view() : TensorView();
    TensorView cd = mode == 0 ? dl.c.view() : mode == 1 ? logits.c.view() : TensorView();
    gpu().cross_entropy(logits.g, pl.g, gd, 0.25f, loss.g, ignore);
    cpu().cross_entropy(logits.c, pl.c, cd, 0.25f, loss.c, ignore);
    EXPECT_NEAR(gpu().host_f64(loss.g), cpu().host_f64(loss.c), loss_tol) << "mode " << mode;
    if (mode < 2)
      expect_close("cross_entropy dlogits mode " + std::to_string(mode), gd, cd,
                   2 * (V + 16) * kU32);
  }
}

TEST(CudaBackend, cuda_OnlineSoftmaxOverTwoShards) {
  REQUIRE_GPU();
  const int64_t N = 17, V0 = 1000, V1 = 777, V = V0 + V1;
  const int32_t ignore = -1;
  std::vector<int32_t> labels(N);
  std::mt19937 rng(44);
  for (auto& l : labels) l = static_cast<int32_t>(rng() % V);
  labels[5] = ignore;
  labels[6] = 3;       // in shard 0
  labels[7] = V0 + 2;  // in shard 1
  Pair pl = int_pair(labels);
  Pair l0 = random_pair({N, V0}, DType::F32, 45, -5, 5),
       l1 = random_pair({N, V1}, DType::F32, 46, -5, 5);
  auto stats = [&](float init) { return make_pair({N}, DType::F32, std::vector<float>(N, init)); };
  // Shard 0 folded into (m, s); shard 1 into its own (m1, s1); merged; target from either shard.
  Pair m = stats(-INFINITY), s = stats(0), t = stats(0), m1 = stats(-INFINITY), s1 = stats(0);
  gpu().online_softmax_update(l0.g, pl.g, m.g, s.g, t.g, 0);
  cpu().online_softmax_update(l0.c, pl.c, m.c, s.c, t.c, 0);
  gpu().online_softmax_update(l1.g, pl.g, m1.g, s1.g, t.g, V0);
  cpu().online_softmax_update(l1.c, pl.c, m1.c, s1.c, t.c, V0);
  expect_close("online max", m1.g, m1.c, 0);  // a max is exact
  expect_close("online sum shard 1", s1.g, s1.c, 0, (V1 + 16) * kU32);
  // A second fold into the same statistics (rescaling the running sum).
  Pair m2 = make_pair({N}, DType::F32, host_f32(cpu(), m.c)),
       s2 = make_pair({N}, DType::F32, host_f32(cpu(), s.c));
  gpu().online_softmax_update(l1.g, pl.g, m2.g, s2.g, t.g, V0);
  cpu().online_softmax_update(l1.c, pl.c, m2.c, s2.c, t.c, V0);
  expect_close("online sum two folds", s2.g, s2.c, 0, (V + 16) * kU32);
  gpu().online_softmax_merge(m.g, s.g, m1.g, s1.g);
  cpu().online_softmax_merge(m.c, s.c, m1.c, s1.c);
  expect_close("online merged max", m.g, m.c, 0);
  expect_close("online merged sum", s.g, s.c, 0, (V + 16) * kU32);
  expect_close("online target", t.g, t.c, 0);
  // Backward and loss from the same (CPU) statistics on both devices.
  Pair mc = make_pair({N}, DType::F32, host_f32(cpu(), m.c)),
       sc = make_pair({N}, DType::F32, host_f32(cpu(), s.c));
  Pair tc = make_pair({N}, DType::F32, host_f32(cpu(), t.c));
  Pair d1 = random_pair({N, V1}, DType::F32, 47);
  gpu().online_softmax_backward(l1.g, pl.g, mc.g, sc.g, d1.g, V0, 0.5f, ignore);
  cpu().online_softmax_backward(l1.c, pl.c, mc.c, sc.c, d1.c, V0, 0.5f, ignore);
  expect_close("online_softmax_backward", d1.g, d1.c, 8 * kU32);
  Pair loss = int_pair(std::vector<double>{-3.0});
  gpu().online_softmax_loss(mc.g, sc.g, tc.g, pl.g, loss.g, ignore);
  cpu().online_softmax_loss(mc.c, sc.c, tc.c, pl.c, loss.c, ignore);
  EXPECT_NEAR(gpu().host_f64(loss.g), cpu().host_f64(loss.c), 1e-12 * N) << "online loss";
}

// ---- attention through the interface -----------------------------------------------------------

// GQA (4 query heads on 2 kv heads) at explicit, unsorted positions; query 0 sees no key (its
// position is below every key's): lse -inf and o = 0 on both devices. Then the merge of two
// partial attentions over disjoint key sets. Without and with packed documents (starting at 0,
// 10, 25, 26 (a one-token document), 40 and 56; query 0 stays blind).
TEST(CudaBackend, cuda_AttentionGqaPositionsAndMerge) {
  REQUIRE_GPU();
  const int64_t nq = 21, nk = 37, hq = 4, hkv = 2;
  std::vector<int64_t> qp(nq), kp(nk);
  std::mt19937 rng(48);
  for (auto& p : kp) p = 10 + rng() % 60;
  for (auto& p : qp) p = 10 + rng() % 60;
  qp[0] = 3;
  Pair qpos = int_pair(qp), kpos = int_pair(kp);
  std::vector<int64_t> qd(nq);  // q_doc_pos: the position minus its document's start
  for (int64_t i = 0; i < nq; ++i) {
    int64_t start = 0;
    for (int64_t s : {10, 25, 26, 40, 56})
      if (qp[i] >= s) start = s;
    qd[i] = qp[i] - start;
  }
  Pair qdoc = int_pair(qd);
  for (bool docs : {false, true})
    for (DType t : {DType::F32, DType::BF16})
      for (int64_t d : {int64_t{64}, int64_t{40}}) {  // 64: the flash path in bf16; 40: reference
        const std::string tag =
            std::string(dtype_name(t)) + " d=" + std::to_string(d) + (docs ? " documents" : "");
        const TensorView qdoc_g = docs ? qdoc.g.view() : TensorView(),
                         qdoc_c = docs ? qdoc.c.view() : TensorView();
        const float scale = 1.f / std::sqrt(static_cast<float>(d));
        Pair q = random_pair({nq, hq, d}, t, 49), k = random_pair({nk, hkv, d}, t, 50);
        Pair v = random_pair({nk, hkv, d}, t, 51);
        Pair o = random_pair({nq, hq, d}, t, 52), lse = random_pair({nq, hq}, DType::F32, 53);
        gpu().attention_forward(q.g, k.g, v.g, qpos.g, kpos.g, qdoc_g, o.g, lse.g, scale);
        cpu().attention_forward(q.c, k.c, v.c, qpos.c, kpos.c, qdoc_c, o.c, lse.c, scale);
        // fp32: sums over nk keys (nk·u32); bf16 flash rounds P to bf16 before P·V (2^-8 relative
        // per term) and o once: 2^-7 normwise, one ulp elementwise.
        const bool bf = t == DType::BF16;
        expect_close("attention o " + tag, o.g, o.c, bf ? kBf16Ulp : 4 * (nk + d) * kU32,
                     bf16_extra(t));
        expect_close("attention lse " + tag, lse.g, lse.c, 4 * (nk + d) * kU32);
        const std::vector<float> l = host_f32(gpu(), lse.g), og = host_f32(gpu(), o.g);
        for (int64_t h = 0; h < hq; ++h) EXPECT_EQ(l[h], -INFINITY) << "query 0 sees no key";
        for (int64_t i = 0; i < hq * d; ++i) ASSERT_EQ(og[i], 0.f) << "query 0's output, " << i;
        // Backward, accumulating into random dq, dk, dv; from the CPU's o and lse on both devices.
        Pair oc = make_pair({nq, hq, d}, t, host_f32(cpu(), o.c));
        Pair lc = make_pair({nq, hq}, DType::F32, host_f32(cpu(), lse.c));
        Pair dout = random_pair({nq, hq, d}, DType::F32, 54);
        Pair dq = random_pair({nq, hq, d}, DType::F32, 55),
             dk = random_pair({nk, hkv, d}, DType::F32, 56);
        Pair dv = random_pair({nk, hkv, d}, DType::F32, 57);
        gpu().attention_backward(q.g, k.g, v.g, qpos.g, kpos.g, qdoc_g, oc.g, lc.g, dout.g, dq.g,
                                 dk.g, dv.g, scale);
        cpu().attention_backward(q.c, k.c, v.c, qpos.c, kpos.c, qdoc_c, oc.c, lc.c, dout.c, dq.c,
                                 dk.c, dv.c, scale);
        // bf16 flash: dout, P and dS are rounded to bf16 for their products (each 2^-8 relative),
        // three roundings in a chain: 2^-5 normwise leaves room for cancellation in dS.
        const double btol = bf ? 1.0 / 32 : 8 * (nk + nq + d) * kU32;
        expect_close("attention dq " + tag, dq.g, dq.c, btol);
        expect_close("attention dk " + tag, dk.g, dk.c, btol);
        expect_close("attention dv " + tag, dv.g, dv.c, btol);
        // Merge: (o, lse) with a second partial over other keys; rows with -inf on one side.
        Pair o2 = random_pair({nq, hq, d}, t, 58);
        std::vector<float> l2 = random_values(nq * hq, 59, -2, 2);
        l2[5] = -INFINITY;
        Pair lse2 = make_pair({nq, hq}, DType::F32, l2);
        Pair oa = make_pair({nq, hq, d}, t, host_f32(cpu(), o.c));
        gpu().attention_merge(oa.g, lc.g, o2.g, lse2.g);
        cpu().attention_merge(oa.c, lc.c, o2.c, lse2.c);
        expect_close("attention_merge o " + tag, oa.g, oa.c, 16 * kU32, bf16_extra(t));
        expect_close("attention_merge lse " + tag, lc.g, lc.c, 16 * kU32);
      }
}

// ---- optimizer ---------------------------------------------------------------------------------

TEST(CudaBackend, cuda_AdamWMatchesTheCpu) {
  REQUIRE_GPU();
  const int64_t n = 100003;
  Pair w = random_pair({n}, DType::F32, 60), g = random_pair({n}, DType::F32, 61);
  Pair m = random_pair({n}, DType::F32, 62, -0.1f, 0.1f),
       v = random_pair({n}, DType::F32, 63, 0, 0.01f);
  AdamWStep st;
  st.grad_scale = 0.5f;
  st.step_size = 1e-3f / (1 - 0.9f);
  st.inv_sqrt_bias2 = 1.f / std::sqrt(1 - 0.95f);
  st.decay = 1 - 1e-3f * 0.1f;
  for (int step = 0; step < 3; ++step) {
    gpu().adamw(w.g, g.g, m.g, v.g, st);
    cpu().adamw(w.c, g.c, m.c, v.c, st);
  }
  // The same operations in the same order, each rounded (no FMA contraction on the GPU): equal
  // unless the host compiler contracted (it does not: ISO C++20, no -ffast-math); a few ulp of
  // the values, and of the largest value for elements that cancel, either way.
  expect_close("adamw m", m.g, m.c, 4 * kU32, 4 * kU32);
  expect_close("adamw v", v.g, v.c, 4 * kU32, 4 * kU32);
  expect_close("adamw w", w.g, w.c, 4 * kU32, 4 * kU32);
}

}  // namespace
}  // namespace tsp
