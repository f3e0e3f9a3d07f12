// Learning-rate schedule: linear warm-up, then cosine decay to a floor.
#pragma once

#include <cstdint>

namespace tsp {

struct LrSchedule {
  double max_lr = 3e-3;
  double min_lr_ratio = 0.1;  // floor = max_lr · min_lr_ratio, reached at total_steps
  int64_t warmup_steps = 50;
  int64_t total_steps = 1000;

  // Learning rate of 0-based optimizer step `step`:
  //   step < warmup:           max_lr · (step + 1) / warmup   (the first step is not a no-op)
  //   warmup <= step < total:  floor + (max_lr - floor) · (1 + cos(π · progress)) / 2,
  //                            progress = (step - warmup) / (total - warmup)
  //   step >= total:           floor
  double at(int64_t step) const;
  void validate() const;  // tsp::Error naming the bad value
};

}  // namespace tsp
