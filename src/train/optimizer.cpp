#include "tsp/train/optimizer.h"

#include <cmath>

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
  for (const ParamShard& s : shards_) {
    TSP_CHECK(s.spec != nullptr, "a parameter shard has no spec");
    TSP_CHECK(s.value.dtype() == DType::F32 && s.grad.dtype() == DType::F32 &&
                  s.value.numel() == s.grad.numel(),
              "{}: the optimizer needs f32 weights and gradients of the same size (value {} {}, "
              "grad {} {})",
              s.spec->name, dtype_name(s.value.dtype()), shape_str(s.value.shape()),
              dtype_name(s.grad.dtype()), shape_str(s.grad.shape()));
    TSP_CHECK(
        s.value.device() == shards_.front().value.device() && s.grad.device() == s.value.device(),
        "{}: every shard the optimizer updates must live on one device", s.spec->name);
  }
  backend_ = &backend_for(shards_.empty() ? Device::cpu() : shards_.front().value.device());
  for (const ParamShard& s : shards_) {
    // The moments start at zero (explicitly: allocations are not zeroed, and a store's partition
    // may hold a previous optimizer's).
    for (const auto& [given, out] : {std::pair{s.exp_avg, &m_}, std::pair{s.exp_avg_sq, &v_}}) {
      if (given.empty()) {
        owned_.push_back(
            Tensor::zeros(s.value.shape(), DType::F32, MemCategory::Optimizer, s.value.device()));
        out->push_back(owned_.back().view());
      } else {
        TSP_CHECK(given.dtype() == DType::F32 && given.numel() == s.value.numel() &&
                      given.device() == s.value.device(),
                  "{}: the moments the store provides must be f32 of the shard's size, on its "
                  "device",
                  s.spec->name);
        backend_->zero(given);
        out->push_back(given);
      }
    }
  }
}

AdamW::AdamW(Layout& layout, AdamWConfig config) : AdamW(layout.parameters(), config) {
  layout_ = &layout;
}

void AdamW::step(double lr, double grad_scale) {
  // The last update's all-gathers (ZeRO-1) send the master parts written below: they must be
  // over. After a forward they are (it waits for every bucket), so this costs nothing in a step.
  if (layout_ != nullptr) layout_->wait_parameters();
  ++t_;
  const double b1 = config_.beta1, b2 = config_.beta2;
  const double bias1 = 1.0 - std::pow(b1, static_cast<double>(t_));
  const double bias2 = 1.0 - std::pow(b2, static_cast<double>(t_));
  // Scalars in double, rounded once to f32; the backend's element loop is pure f32, so it gives
  // the same bits on every rank for the same inputs.
  AdamWStep st;
  st.grad_scale = static_cast<float>(grad_scale);
  st.beta1 = static_cast<float>(b1);
  st.one_minus_beta1 = static_cast<float>(1.0 - b1);
  st.beta2 = static_cast<float>(b2);
  st.one_minus_beta2 = static_cast<float>(1.0 - b2);
  st.step_size = static_cast<float>(lr / bias1);
  st.inv_sqrt_bias2 = static_cast<float>(1.0 / std::sqrt(bias2));
  st.eps = static_cast<float>(config_.eps);
  for (size_t i = 0; i < shards_.size(); ++i) {
    const ParamShard& sh = shards_[i];
    st.decay = applies_weight_decay(sh.spec->kind)
                   ? static_cast<float>(1.0 - lr * config_.weight_decay)
                   : 1.0f;
    backend_->adamw(sh.value, sh.grad, m_[i], v_[i], st);
  }
  if (layout_ != nullptr) layout_->parameters_updated();
}

bool counts_in_global_sum(const ParamShard& shard, int group_rank, int replica_rank) {
  if (replica_rank != 0 && !shard.partitioned_over_replicas) return false;
  if (shard.replicated_in_group && group_rank != 0) return false;
  return shard.copy_index == 0;
}

double local_grad_sumsq(const std::vector<ParamShard>& shards, int group_rank, int replica_rank,
                        double grad_scale) {
  if (shards.empty()) return 0;
  Backend& be = backend_for(shards.front().grad.device());
  // Each shard's sum of squares in double on the device, added up there; one download.
  Tensor total = Tensor::zeros({1}, DType::F64, MemCategory::Workspace, be.device());
  for (const ParamShard& s : shards) {
    if (!counts_in_global_sum(s, group_rank, replica_rank)) continue;
    be.sum_squares(s.grad, total.view());
  }
  return be.host_f64(total.view()) * grad_scale * grad_scale;
}

double sum_over_ranks(Communicator& comm, double value) {
  return comm.sum_host(value);  // rank order on every rank: bit-identical everywhere
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
