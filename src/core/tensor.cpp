#include "tsp/core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <new>

namespace tsp {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32:
      return 4;
    case DType::BF16:
      return 2;
    case DType::I32:
      return 4;
    case DType::I64:
      return 8;
  }
  return 0;
}

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "f32";
    case DType::BF16:
      return "bf16";
    case DType::I32:
      return "i32";
    case DType::I64:
      return "i64";
  }
  return "?";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

TensorView TensorView::slice(int64_t begin, int64_t end) const {
  TSP_CHECK(!shape_.empty() && 0 <= begin && begin <= end && end <= shape_[0],
            "slice [{}, {}) is outside a tensor of shape {}", begin, end, shape_str(shape_));
  Shape s = shape_;
  s[0] = end - begin;
  const int64_t row = shape_[0] ? numel() / shape_[0] : 0;
  return TensorView(static_cast<char*>(data_) + begin * row * dtype_size(dtype_), s, dtype_);
}

TensorView TensorView::reshape(Shape shape) const {
  TSP_CHECK(shape_numel(shape) == numel(), "cannot reshape {} into {}", shape_str(shape_),
            shape_str(shape));
  return TensorView(data_, std::move(shape), dtype_);
}

Tensor::Tensor(Shape shape, DType dtype, MemCategory category)
    : shape_(std::move(shape)), dtype_(dtype), category_(category) {
  for (int64_t d : shape_) TSP_CHECK(d >= 0, "negative dimension in shape {}", shape_str(shape_));
  const size_t bytes = nbytes();
  if (bytes == 0) return;
  const size_t padded = (bytes + 63) / 64 * 64;
  data_ = std::aligned_alloc(64, padded);
  if (!data_) {
    TSP_FAIL("out of memory allocating {:.1f} MB for a {} tensor {} ({})", to_mb(bytes),
             dtype_name(dtype), shape_str(shape_), mem_category_name(category));
  }
  std::memset(data_, 0, bytes);
  MemoryTracker::instance().on_alloc(category_, static_cast<int64_t>(bytes));
}

Tensor::~Tensor() {
  release();
}

void Tensor::release() {
  if (data_) {
    MemoryTracker::instance().on_free(category_, static_cast<int64_t>(nbytes()));
    std::free(data_);
    data_ = nullptr;
  }
}

Tensor::Tensor(Tensor&& o) noexcept
    : data_(o.data_), shape_(std::move(o.shape_)), dtype_(o.dtype_), category_(o.category_) {
  o.data_ = nullptr;
  o.shape_.clear();
}

Tensor& Tensor::operator=(Tensor&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    shape_ = std::move(o.shape_);
    dtype_ = o.dtype_;
    category_ = o.category_;
    o.data_ = nullptr;
    o.shape_.clear();
  }
  return *this;
}

Tensor Tensor::clone(MemCategory category) const {
  Tensor t(shape_, dtype_, category);
  if (nbytes()) std::memcpy(t.data_, data_, nbytes());
  return t;
}

void Tensor::zero() {
  if (data_) std::memset(data_, 0, nbytes());
}

void Tensor::recategorize(MemCategory category) {
  if (data_) {
    MemoryTracker::instance().on_free(category_, static_cast<int64_t>(nbytes()));
    MemoryTracker::instance().on_alloc(category, static_cast<int64_t>(nbytes()));
  }
  category_ = category;
}

void copy(TensorView src, TensorView dst) {
  TSP_CHECK(src.numel() == dst.numel(), "copy: {} elements into {}", src.numel(), dst.numel());
  if (src.dtype() == dst.dtype()) {
    std::memcpy(dst.data(), src.data(), src.nbytes());
  } else if (src.dtype() == DType::F32 && dst.dtype() == DType::BF16) {
    convert_f32_to_bf16(src.f32(), dst.data_as<bf16>(), src.numel());
  } else if (src.dtype() == DType::BF16 && dst.dtype() == DType::F32) {
    convert_bf16_to_f32(src.data_as<bf16>(), dst.f32(), src.numel());
  } else {
    TSP_FAIL("copy: no conversion from {} to {}", dtype_name(src.dtype()), dtype_name(dst.dtype()));
  }
}

}  // namespace tsp
