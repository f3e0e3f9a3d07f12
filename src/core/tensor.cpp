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
    case DType::F64:
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
    case DType::F64:
      return "f64";
  }
  return "?";
}

DType parse_compute_dtype(std::string_view text) {
  if (text == "fp32" || text == "f32") return DType::F32;
  if (text == "bf16") return DType::BF16;
  TSP_FAIL("unknown dtype '{}': use fp32 or bf16", text);
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
  return TensorView(static_cast<char*>(data_) + begin * row * dtype_size(dtype_), s, dtype_,
                    device_);
}

TensorView TensorView::reshape(Shape shape) const {
  TSP_CHECK(shape_numel(shape) == numel(), "cannot reshape {} into {}", shape_str(shape_),
            shape_str(shape));
  return TensorView(data_, std::move(shape), dtype_, device_);
}

TensorView TensorView::window(int64_t offset, Shape shape) const {
  const int64_t n = shape_numel(shape);
  TSP_CHECK(offset >= 0 && n >= 0 && offset + n <= numel(),
            "window of {} elements at offset {} is outside a tensor of shape {}", n, offset,
            shape_str(shape_));
  return TensorView(static_cast<char*>(data_) + offset * dtype_size(dtype_), std::move(shape),
                    dtype_, device_);
}

void fail_host_access(Device device, const Shape& shape, DType dtype) {
  TSP_FAIL(
      "host access to a {} tensor {} {}: download it first (Backend::download / host_vector), "
      "or upload host values into it (Backend::upload / device_copy)",
      device.str(), shape_str(shape), dtype_name(dtype));
}

Tensor::Tensor(Shape shape, DType dtype, MemCategory category, Device device)
    : shape_(std::move(shape)), dtype_(dtype), category_(category), device_(device) {
  for (int64_t d : shape_) TSP_CHECK(d >= 0, "negative dimension in shape {}", shape_str(shape_));
  const size_t bytes = nbytes();
  if (bytes == 0) return;
  try {
    data_ = allocator_for(device_).allocate(bytes);
  } catch (const Error& e) {
    TSP_FAIL("out of memory allocating {:.1f} MB for a {} tensor {} ({}) on {}: {}", to_mb(bytes),
             dtype_name(dtype), shape_str(shape_), mem_category_name(category), device_.str(),
             e.what());
  }
  if (device_.is_cpu() && poison_allocations()) std::memset(data_, 0xFF, bytes);
  MemoryTracker::instance().on_alloc(category_, static_cast<int64_t>(bytes));
}

Tensor Tensor::zeros(Shape shape, DType dtype, MemCategory category, Device device) {
  Tensor t(std::move(shape), dtype, category, device);
  t.zero();
  return t;
}

Tensor::~Tensor() {
  release();
}

void Tensor::release() {
  if (data_) {
    MemoryTracker::instance().on_free(category_, static_cast<int64_t>(nbytes()));
    allocator_for(device_).deallocate(data_, nbytes());
    data_ = nullptr;
  }
}

Tensor::Tensor(Tensor&& o) noexcept
    : data_(o.data_),
      shape_(std::move(o.shape_)),
      dtype_(o.dtype_),
      category_(o.category_),
      device_(o.device_) {
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
    device_ = o.device_;
    o.data_ = nullptr;
    o.shape_.clear();
  }
  return *this;
}

Tensor Tensor::clone(MemCategory category) const {
  Tensor t(shape_, dtype_, category, device_);
  if (nbytes()) allocator_for(device_).copy(t.data_, data_, nbytes());
  return t;
}

void Tensor::zero() {
  if (data_) allocator_for(device_).zero(data_, nbytes());
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
  TSP_CHECK(src.device().is_cpu() && dst.device().is_cpu(),
            "copy: host copy of {} memory into {} memory (use Backend::copy)", src.device().str(),
            dst.device().str());
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

void swap_leading_dims(TensorView src, TensorView dst) {
  TSP_CHECK(src.rank() >= 2 && dst.rank() == src.rank() && src.dtype() == dst.dtype(),
            "swap_leading_dims: {} and {} must have the same rank (>= 2) and dtype",
            shape_str(src.shape()), shape_str(dst.shape()));
  Shape want = src.shape();
  std::swap(want[0], want[1]);
  TSP_CHECK(dst.shape() == want, "swap_leading_dims: destination is {}, expected {}",
            shape_str(dst.shape()), shape_str(want));
  TSP_CHECK(src.device().is_cpu() && dst.device().is_cpu(),
            "swap_leading_dims: host swap of {} memory into {} memory (use "
            "Backend::swap_leading_dims)",
            src.device().str(), dst.device().str());
  const int64_t a = src.dim(0), b = src.dim(1);
  const size_t inner = (a * b != 0) ? src.nbytes() / (a * b) : 0;
  const auto* s = static_cast<const char*>(src.data());
  auto* d = static_cast<char*>(dst.data());
  for (int64_t i = 0; i < a; ++i)
    for (int64_t j = 0; j < b; ++j)
      std::memcpy(d + (j * a + i) * inner, s + (i * b + j) * inner, inner);
}

}  // namespace tsp
