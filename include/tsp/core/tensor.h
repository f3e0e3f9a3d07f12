// Tensors: an owning, tracked buffer (Tensor) and non-owning views (TensorView). Row-major,
// contiguous, on one Device (device.h). Operations on tensor memory go through a Backend
// (tsp/backend/backend.h), which dispatches on device and dtype; tensors own and account memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "tsp/core/bf16.h"
#include "tsp/core/device.h"
#include "tsp/core/error.h"
#include "tsp/core/memory.h"

namespace tsp {

enum class DType : int { F32, BF16, I32, I64, F64 };
size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // "f32", "bf16", "i32", "i64", "f64"
// "fp32"/"f32" or "bf16" (the compute dtypes a user may choose); tsp::Error otherwise.
DType parse_compute_dtype(std::string_view text);
template <typename T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::F32;
}
template <>
constexpr DType dtype_of<bf16>() {
  return DType::BF16;
}
template <>
constexpr DType dtype_of<int32_t>() {
  return DType::I32;
}
template <>
constexpr DType dtype_of<int64_t>() {
  return DType::I64;
}
template <>
constexpr DType dtype_of<double>() {
  return DType::F64;
}

using Shape = std::vector<int64_t>;
int64_t shape_numel(const Shape& s);
std::string shape_str(const Shape& s);  // "[4, 256]"

// Throws "host access to a cuda:0 tensor [4096, 512] bf16: download it first": the typed host
// accessors (data_as, f32) call it, out of line, when the tensor is not in host memory.
[[noreturn]] void fail_host_access(Device device, const Shape& shape, DType dtype);

// A non-owning window onto contiguous memory.
class TensorView {
 public:
  TensorView() = default;
  TensorView(void* data, Shape shape, DType dtype, Device device = Device::cpu())
      : data_(data), shape_(std::move(shape)), dtype_(dtype), device_(device) {}

  // The raw address on the tensor's device: what backends and communicators are handed.
  void* data() const { return data_; }
  // Typed HOST access: the tensor must be in host memory (checked, one compare; a device tensor
  // fails loudly here instead of faulting in a host loop). Device memory is read and written
  // through Backend::upload / download (or host_vector / device_copy).
  template <typename T>
  T* data_as() const {
    if (!device_.is_cpu()) [[unlikely]]
      fail_host_access(device_, shape_, dtype_);
    TSP_CHECK(dtype_of<T>() == dtype_, "tensor holds {}, asked for {}", dtype_name(dtype_),
              dtype_name(dtype_of<T>()));
    return static_cast<T*>(data_);
  }
  float* f32() const { return data_as<float>(); }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return numel() * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool empty() const { return data_ == nullptr; }
  // Rows [begin, end) along the first dimension.
  TensorView slice(int64_t begin, int64_t end) const;
  // Same memory, another shape with the same number of elements.
  TensorView reshape(Shape shape) const;
  // The contiguous window of `shape` starting `offset` elements in (bounds checked): how a packed
  // buffer is cut into its pieces, or one block of a [blocks, ...] array is addressed.
  TensorView window(int64_t offset, Shape shape) const;

 private:
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
  Device device_;
};

// For host code that reads or writes t.data() itself (file I/O, host loops): throws as data_as
// does unless t is in host memory.
inline void check_host(const TensorView& t) {
  if (!t.device().is_cpu()) [[unlikely]]
    fail_host_access(t.device(), t.shape(), t.dtype());
}

// An owning buffer on one device, 64-byte aligned, accounted in the MemoryTracker under its
// category for its whole lifetime. NOT initialised (zeros() or zero() where zeros are needed; see
// poison_allocations in device.h). Move-only: copies are explicit (clone).
class Tensor {
 public:
  Tensor() = default;
  Tensor(Shape shape, DType dtype, MemCategory category, Device device = Device::cpu());
  ~Tensor();
  Tensor(Tensor&& other) noexcept;
  Tensor& operator=(Tensor&& other) noexcept;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  static Tensor f32(Shape shape, MemCategory category, Device device = Device::cpu()) {
    return Tensor(std::move(shape), DType::F32, category, device);
  }
  // Allocated and explicitly zeroed.
  static Tensor zeros(Shape shape, DType dtype, MemCategory category,
                      Device device = Device::cpu());
  Tensor clone(MemCategory category) const;
  Tensor clone() const { return clone(category_); }

  bool empty() const { return data_ == nullptr; }
  void* data() const { return data_; }
  // Typed host access, checked as TensorView::data_as.
  template <typename T>
  T* data_as() const {
    if (!device_.is_cpu()) [[unlikely]]
      fail_host_access(device_, shape_, dtype_);
    TSP_CHECK(dtype_of<T>() == dtype_, "tensor holds {}, asked for {}", dtype_name(dtype_),
              dtype_name(dtype_of<T>()));
    return static_cast<T*>(data_);
  }
  float* f32() const { return data_as<float>(); }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return numel() * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  MemCategory category() const { return category_; }
  Device device() const { return device_; }
  TensorView view() const { return TensorView(data_, shape_, dtype_, device_); }
  operator TensorView() const { return view(); }
  TensorView slice(int64_t begin, int64_t end) const { return view().slice(begin, end); }
  TensorView window(int64_t offset, Shape shape) const {
    return view().window(offset, std::move(shape));
  }
  void zero();
  // Change the accounting category (e.g. a workspace buffer that becomes a saved activation).
  void recategorize(MemCategory category);

 private:
  void release();
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
  MemCategory category_ = MemCategory::Workspace;
  Device device_;
};

// Copy src into dst on the host (same numel and dtype, or f32<->bf16 conversion). Both views must
// be host memory; engine code uses Backend::copy, which works on any device.
void copy(TensorView src, TensorView dst);
// Swap the first two dimensions: src [a, b, ...] -> dst [b, a, ...] (any dtype). An all-gather
// over the group of per-rank [B, n, c] blocks gives [D, B, n, c]; attention wants each row's keys
// contiguous, [B, D·n, c], at zigzag_gathered_positions. Also the inverse, for reduce-scatter.
// Host memory (Backend::swap_leading_dims is the same on any device).
void swap_leading_dims(TensorView src, TensorView dst);

}  // namespace tsp
