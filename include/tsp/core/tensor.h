// Tensors: an owning, tracked buffer (Tensor) and non-owning views (TensorView). Row-major,
// contiguous. Kernels take raw pointers with shapes in comments; tensors own and account memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "tsp/core/bf16.h"
#include "tsp/core/error.h"
#include "tsp/core/memory.h"

namespace tsp {

enum class DType : int { F32, BF16, I32, I64 };
size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // "f32", "bf16", "i32", "i64"
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

using Shape = std::vector<int64_t>;
int64_t shape_numel(const Shape& s);
std::string shape_str(const Shape& s);  // "[4, 256]"

// A non-owning window onto contiguous memory.
class TensorView {
 public:
  TensorView() = default;
  TensorView(void* data, Shape shape, DType dtype)
      : data_(data), shape_(std::move(shape)), dtype_(dtype) {}

  void* data() const { return data_; }
  template <typename T>
  T* data_as() const {
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
  // Rows [begin, end) along the first dimension.
  TensorView slice(int64_t begin, int64_t end) const;
  // Same memory, another shape with the same number of elements.
  TensorView reshape(Shape shape) const;

 private:
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
};

// An owning buffer, 64-byte aligned, zero-initialised, accounted in the MemoryTracker under its
// category for its whole lifetime. Move-only: copies are explicit (clone).
class Tensor {
 public:
  Tensor() = default;
  Tensor(Shape shape, DType dtype, MemCategory category);
  ~Tensor();
  Tensor(Tensor&& other) noexcept;
  Tensor& operator=(Tensor&& other) noexcept;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  static Tensor f32(Shape shape, MemCategory category) {
    return Tensor(std::move(shape), DType::F32, category);
  }
  Tensor clone(MemCategory category) const;
  Tensor clone() const { return clone(category_); }

  bool empty() const { return data_ == nullptr; }
  void* data() const { return data_; }
  template <typename T>
  T* data_as() const {
    return view().data_as<T>();
  }
  float* f32() const { return data_as<float>(); }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return numel() * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  MemCategory category() const { return category_; }
  TensorView view() const { return TensorView(data_, shape_, dtype_); }
  operator TensorView() const { return view(); }
  TensorView slice(int64_t begin, int64_t end) const { return view().slice(begin, end); }
  void zero();
  // Change the accounting category (e.g. a workspace buffer that becomes a saved activation).
  void recategorize(MemCategory category);

 private:
  void release();
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
  MemCategory category_ = MemCategory::Workspace;
};

// Copy src into dst (same numel and dtype, or f32<->bf16 conversion).
void copy(TensorView src, TensorView dst);

}  // namespace tsp
