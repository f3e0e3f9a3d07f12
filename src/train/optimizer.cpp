#include "tsp/train/optimizer.h"

#include <cmath>
#include <cstring>

namespace tsp {

bool applies_weight_decay(ParamKind kind) {
  switch (kind) {
    case ParamKind::InputNorm:
    case ParamKind::PostNorm:
    case ParamKind::FinalNorm:
      return false;
    default:
      return true;
  }
}

AdamW::AdamW(std::vector<ParamShard> shards, AdamWConfig config)
    : shards_(std::move(shards)), config_(config) {
  TSP_CHECK(config_.beta1 >= 0 && config_.beta1 < 1 && config_.beta2 >= 0 && config_.beta2 < 1,
            "AdamW betas must lie in [0, 1), got ({}, {})", config_.beta1, config_.beta2);
  TSP_CHECK(config_.eps > 0, "AdamW eps must be positive, got {}", config_.eps);
  TSP_CHECK(config_.weight_decay >= 0, "weight decay must be >= 0, got {}", config_.weight_decay);
  m_.reserve(shards_.size());
  v_.reserve(shards_.size());
  for (const ParamShard& s : shards_) {
    TSP_CHECK(s.spec != nullptr, "a parameter shard has no spec");
    TSP_CHECK(s.value.dtype() == DType::F32 && s.grad.dtype() == DType::F32 &&
                  s.value.numel() == s.grad.numel(),
              "{}: the optimizer needs f32 weights and gradients of the same size (value {} {}, "
              "grad {} {})",
              s.spec->name, dtype_name(s.value.dtype()), shape_str(s.value.shape()),
              dtype_name(s.grad.dtype()), shape_str(s.grad.shape()));
    m_.push_back(Tensor::f32(s.value.shape(), MemCategory::Optimizer));
    v_.push_back(Tensor::f32(s.value.shape(), MemCategory::Optimizer));
  }
}

void AdamW::step(double lr, double grad_scale) {
  ++t_;
  const double b1 = config_.beta1, b2 = config_.beta2;
  const double bias1 = 1.0 - std::pow(b1, static_cast<double>(t_));
  const double bias2 = 1.0 - std::pow(b2, static_cast<double>(t_));
  // Scalars in double, rounded once to f32; the element loop is pure f32 so it vectorises and
  // gives the same bits on every rank for the same inputs.
  const float s = static_cast<float>(grad_scale);
  const float fb1 = static_cast<float>(b1), fc1 = static_cast<float>(1.0 - b1);
  const float fb2 = static_cast<float>(b2), fc2 = static_cast<float>(1.0 - b2);
  const float step_size = static_cast<float>(lr / bias1);
  const float inv_sqrt_bias2 = static_cast<float>(1.0 / std::sqrt(bias2));
  const float eps = static_cast<float>(config_.eps);
  for (size_t i = 0; i < shards_.size(); ++i) {
    const ParamShard& sh = shards_[i];
    const float decay = applies_weight_decay(sh.spec->kind)
                            ? static_cast<float>(1.0 - lr * config_.weight_decay)
                            : 1.0f;
    float* __restrict w = sh.value.f32();
    const float* __restrict g = sh.grad.f32();
    float* __restrict m = m_[i].f32();
    float* __restrict v = v_[i].f32();
    const int64_t n = sh.value.numel();
    for (int64_t j = 0; j < n; ++j) {
      const float gj = g[j] * s;
      m[j] = fb1 * m[j] + fc1 * gj;
      v[j] = fb2 * v[j] + fc2 * gj * gj;
      const float denom = std::sqrt(v[j]) * inv_sqrt_bias2 + eps;
      w[j] = w[j] * decay - step_size * (m[j] / denom);
    }
  }
}

bool counts_in_global_sum(const ParamShard& shard, int group_rank, int replica_rank) {
  if (replica_rank != 0) return false;
  if (shard.replicated_in_group && group_rank != 0) return false;
  return shard.copy_index == 0;
}

double local_grad_sumsq(const std::vector<ParamShard>& shards, int group_rank, int replica_rank,
                        double grad_scale) {
  double total = 0;
  for (const ParamShard& s : shards) {
    if (!counts_in_global_sum(s, group_rank, replica_rank)) continue;
    const float* g = s.grad.f32();
    const int64_t n = s.grad.numel();
    double acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += static_cast<double>(g[j]) * g[j];
    total += acc;
  }
  return total * grad_scale * grad_scale;
}

double sum_over_ranks(Communicator& comm, double value) {
  static_assert(sizeof(double) == sizeof(int64_t));
  std::vector<int64_t> all(comm.size());
  int64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  comm.all_gather(&bits, all.data(), 1, DType::I64);
  double sum = 0;
  for (int64_t b : all) {
    double d;
    std::memcpy(&d, &b, sizeof d);
    sum += d;
  }
  return sum;
}

double global_grad_norm(const std::vector<ParamShard>& shards, Layout& layout, Communicator& world,
                        double grad_scale) {
  const double local =
      local_grad_sumsq(shards, layout.group().rank(), layout.replicas().rank(), grad_scale);
  return std::sqrt(sum_over_ranks(world, local));
}

double clip_factor(double norm, double max_norm) {
  if (max_norm <= 0 || !std::isfinite(norm)) return 1.0;
  // torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1.
  const double coef = max_norm / (norm + 1e-6);
  return coef < 1.0 ? coef : 1.0;
}

}  // namespace tsp
