// The argument checks the CPU and CUDA backends share (src/backend/checks.h), on the host, for
// both devices: the device check reads only the views' metadata, so the CUDA backend's side of it
// (every entry of src/backend/cuda/cuda_backend.cpp calls it with its device, cuda:N) runs here
// without a GPU. Otherwise only a GPU run executes that side.
//
// The case that matters most: the engine passes an absent optional operand (q_doc_pos without
// documents, dx or dw not wanted, dlogits for the loss only) as a default TensorView, which is
// null, of shape [] (ONE element by shape_numel) and "on the CPU". A device check that tested
// numel() == 0 instead of empty() would take it for a host tensor and refuse every such call on a
// GPU, which is what src/backend/cuda/attention.cpp's own check did until the CUDA emulation ran
// it (tests/cuda_emulation/README.md).
#include <gtest/gtest.h>

#include <string>

#include "backend/checks.h"
#include "test_util.h"
#include "tsp/core/tensor.h"

namespace tsp {
namespace {

// A view of `shape` on `device` over host bytes: the checks read shapes, dtypes and devices,
// never the memory, so a CUDA view needs no GPU here.
float g_bytes[64];
TensorView view_on(Device device, Shape shape, DType dtype = DType::F32) {
  return TensorView(g_bytes, std::move(shape), dtype, device);
}

std::string device_error(std::initializer_list<const TensorView*> views, Device device) {
  return test::error_of([&] { checks::check_device(views, device, "add"); });
}

TEST(BackendChecks, AnAbsentViewIsNoTensorOnAnyDevice) {
  const TensorView absent;  // what the engine passes for "none"
  ASSERT_TRUE(absent.empty());
  ASSERT_EQ(absent.numel(), 1) << "shape [] counts one element: numel() cannot tell absence";
  ASSERT_TRUE(absent.device().is_cpu());
  // A zero-byte tensor has no memory either (Tensor allocates nothing for it), on its device.
  const Tensor no_rows({0, 4}, DType::F32, MemCategory::Workspace);
  const TensorView no_rows_on_gpu(nullptr, {0, 4}, DType::F32, Device::cuda(0));
  for (const Device d : {Device::cpu(), Device::cuda(0), Device::cuda(1)}) {
    const TensorView here = view_on(d, {8});
    const TensorView no_rows_view = no_rows.view();
    EXPECT_EQ(device_error({&here, &absent}, d), "(no error)") << d.str();
    EXPECT_EQ(device_error({&absent, &here, &absent}, d), "(no error)") << d.str();
    EXPECT_EQ(device_error({&no_rows_view, &no_rows_on_gpu, &here}, d), "(no error)") << d.str();
  }
}

TEST(BackendChecks, TheCudaBackendRefusesOtherDevicesTensors) {
  const TensorView mine = view_on(Device::cuda(0), {8});
  const TensorView host = view_on(Device::cpu(), {8});
  const TensorView other_gpu = view_on(Device::cuda(1), {2, 3}, DType::BF16);
  EXPECT_EQ(device_error({&mine, &mine}, Device::cuda(0)), "(no error)");
  EXPECT_EQ(device_error({&mine, &host}, Device::cuda(0)),
            "add: a tensor [8] f32 on cpu was given to the cuda:0 backend");
  EXPECT_EQ(device_error({&other_gpu, &mine}, Device::cuda(0)),
            "add: a tensor [2, 3] bf16 on cuda:1 was given to the cuda:0 backend");
  // The CPU backend takes host views only.
  EXPECT_EQ(device_error({&host}, Device::cpu()), "(no error)");
  EXPECT_EQ(device_error({&host, &mine}, Device::cpu()),
            "add: a tensor [8] f32 on cuda:0 was given to the CPU backend");
}

// The optional outputs of the per-operation checks: absent is skipped, present is checked.
TEST(BackendChecks, AbsentOptionalOutputsAreSkipped) {
  const Device gpu = Device::cuda(0);
  const TensorView absent;
  // linear_backward: dy [2, 3], x [2, 4], w [3, 4]; dx [2, 4] and dw [3, 4] F32 when given.
  const TensorView dy = view_on(gpu, {2, 3}), x = view_on(gpu, {2, 4}, DType::BF16),
                   w = view_on(gpu, {3, 4}, DType::BF16);
  const checks::LinearDims dims = checks::check_linear_backward(dy, x, w, absent, absent);
  EXPECT_EQ(dims.N, 2);
  EXPECT_EQ(dims.in, 4);
  EXPECT_EQ(dims.out, 3);
  const TensorView dx_bf16 = view_on(gpu, {2, 4}, DType::BF16);
  EXPECT_EQ(test::error_of([&] { checks::check_linear_backward(dy, x, w, dx_bf16, absent); }),
            "linear_backward: dx must be f32, got bf16 [2, 4]");
  // cross_entropy without dlogits (the loss only): logits [2, 5] F32, labels [2] I32, loss F64.
  const TensorView logits = view_on(gpu, {2, 5}), labels = view_on(gpu, {2}, DType::I32),
                   loss = view_on(gpu, {1}, DType::F64);
  const checks::LogitsDims ld = checks::check_cross_entropy(logits, labels, absent, loss);
  EXPECT_EQ(ld.N, 2);
  EXPECT_EQ(ld.V, 5);
  // rmsnorm_backward with neither gradient wanted: dy [3, 4] F32, x [3, 4], w [4], rstd [3].
  const TensorView ndy = view_on(gpu, {3, 4}), nx = view_on(gpu, {3, 4}, DType::BF16),
                   nw = view_on(gpu, {4}, DType::BF16), rstd = view_on(gpu, {3});
  const checks::RowsDims rd = checks::check_rmsnorm_backward(ndy, nx, nw, rstd, absent, absent);
  EXPECT_EQ(rd.N, 3);
  EXPECT_EQ(rd.h, 4);
}

}  // namespace
}  // namespace tsp
