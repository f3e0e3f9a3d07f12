// The guard rail on host access: a tensor in device memory fails loudly, with its device, shape
// and dtype, when host code reads it through the typed accessors (data_as, f32) or a host-only
// routine (check_host, tsp::copy, swap_leading_dims), instead of faulting in a host loop. The raw
// address (data()) stays available: it is what backends and communicators are handed. No GPU is
// needed: a view that merely claims cuda:0 is enough, since the check never dereferences it.
#include <gtest/gtest.h>

#include "test_util.h"
#include "tsp/core/tensor.h"

namespace tsp {
namespace {

using test::error_of;

TEST(HostAccess, DeviceViewsRefuseTypedHostAccess) {
  alignas(64) float storage[4096 * 4] = {};
  const TensorView v(storage, {64, 256}, DType::BF16, Device::cuda(0));
  const std::string msg = error_of([&] { v.data_as<bf16>(); });
  EXPECT_NE(msg.find("host access to a cuda:0 tensor [64, 256] bf16: download it first"),
            std::string::npos)
      << msg;
  const TensorView f(storage, {4, 8}, DType::F32, Device::cuda(1));
  EXPECT_NE(error_of([&] { f.f32(); }).find("host access to a cuda:1 tensor [4, 8] f32"),
            std::string::npos);
  // Derived views keep the device, so the check follows them.
  EXPECT_NE(error_of([&] { f.slice(1, 2).f32(); }).find("cuda:1 tensor [1, 8] f32"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              check_host(f.window(8, {2, 4}));
            }).find("cuda:1 tensor [2, 4] f32"),
            std::string::npos);
  // The raw address is not host access.
  EXPECT_EQ(f.data(), static_cast<void*>(storage));
}

TEST(HostAccess, HostRoutinesRefuseDeviceMemory) {
  alignas(64) float a[32] = {}, b[32] = {};
  const TensorView host(a, {4, 8}, DType::F32);
  const TensorView dev(b, {4, 8}, DType::F32, Device::cuda(0));
  EXPECT_NE(error_of([&] { copy(host, dev); }).find("use Backend::copy"), std::string::npos);
  EXPECT_NE(error_of([&] { copy(dev, host); }).find("use Backend::copy"), std::string::npos);
  const TensorView dev_t(b, {8, 4}, DType::F32, Device::cuda(0));
  EXPECT_NE(error_of([&] { swap_leading_dims(host, dev_t); }).find("Backend::swap_leading_dims"),
            std::string::npos);
}

TEST(HostAccess, HostTensorsStillWork) {
  Tensor t = Tensor::zeros({3, 5}, DType::F32, MemCategory::Workspace);
  t.f32()[7] = 2.5f;
  EXPECT_EQ(t.view().data_as<float>()[7], 2.5f);
  check_host(t);  // no throw
  // The dtype check is unchanged, and comes after the device check.
  EXPECT_NE(error_of([&] { t.data_as<int32_t>(); }).find("tensor holds f32, asked for i32"),
            std::string::npos);
}

}  // namespace
}  // namespace tsp
