#include "tsp/train/schedule.h"

#include <cmath>
#include <numbers>

#include "tsp/core/error.h"

namespace tsp {

void LrSchedule::validate() const {
  TSP_CHECK(max_lr > 0 && std::isfinite(max_lr), "--lr must be a positive number, got {}", max_lr);
  TSP_CHECK(min_lr_ratio >= 0 && min_lr_ratio <= 1, "--min-lr-ratio must lie in [0, 1], got {}",
            min_lr_ratio);
  TSP_CHECK(warmup_steps >= 0, "--warmup must be >= 0, got {}", warmup_steps);
  TSP_CHECK(total_steps > 0, "--steps must be positive, got {}", total_steps);
}

double LrSchedule::at(int64_t step) const {
  const double floor = max_lr * min_lr_ratio;
  if (step < warmup_steps) {
    return max_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  }
  if (step >= total_steps) return floor;
  const int64_t decay_steps = total_steps - warmup_steps;  // > 0 here since warmup <= step < total
  const double progress =
      static_cast<double>(step - warmup_steps) / static_cast<double>(decay_steps);
  return floor + (max_lr - floor) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

}  // namespace tsp
