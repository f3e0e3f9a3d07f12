#include "tsp/core/memory.h"

#include <algorithm>

#include <fmt/format.h>

namespace tsp {

std::string_view mem_category_name(MemCategory c) {
  switch (c) {
    case MemCategory::Weights:
      return "weights";
    case MemCategory::Grads:
      return "grads";
    case MemCategory::Optimizer:
      return "optimizer";
    case MemCategory::Activations:
      return "activations";
    case MemCategory::Comm:
      return "comm";
    case MemCategory::Workspace:
      return "workspace";
  }
  return "?";
}

MemoryTracker& MemoryTracker::instance() {
  static MemoryTracker tracker;
  return tracker;
}

void MemoryTracker::on_alloc(MemCategory c, int64_t bytes) {
  std::lock_guard lock(mutex_);
  const int i = static_cast<int>(c);
  s_.current[i] += bytes;
  s_.peak[i] = std::max(s_.peak[i], s_.current[i]);
  s_.current_total += bytes;
  if (s_.current_total > s_.peak_total) {
    s_.peak_total = s_.current_total;
    s_.at_peak = s_.current;
  }
}

void MemoryTracker::on_free(MemCategory c, int64_t bytes) {
  std::lock_guard lock(mutex_);
  s_.current[static_cast<int>(c)] -= bytes;
  s_.current_total -= bytes;
}

MemorySnapshot MemoryTracker::snapshot() const {
  std::lock_guard lock(mutex_);
  return s_;
}

void MemoryTracker::reset_peaks() {
  std::lock_guard lock(mutex_);
  s_.peak = s_.current;
  s_.peak_total = s_.current_total;
  s_.at_peak = s_.current;
}

std::string MemoryTracker::report() const {
  const MemorySnapshot s = snapshot();
  std::string out;
  for (int i = 0; i < kNumMemCategories; ++i) {
    out += fmt::format("{} {:.2f} MB (peak {:.2f} MB), ",
                       mem_category_name(static_cast<MemCategory>(i)), to_mb(s.current[i]),
                       to_mb(s.peak[i]));
  }
  out +=
      fmt::format("total {:.2f} MB (peak {:.2f} MB)", to_mb(s.current_total), to_mb(s.peak_total));
  return out;
}

}  // namespace tsp
