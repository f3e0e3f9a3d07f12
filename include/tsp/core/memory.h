// Memory tracker: every tensor allocation is tagged with a category, so the peak per category can
// be printed, and compared line by line with the planner's prediction (same categories).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>

namespace tsp {

enum class MemCategory : int { Weights, Grads, Optimizer, Activations, Comm, Workspace };
inline constexpr int kNumMemCategories = 6;
std::string_view mem_category_name(MemCategory c);  // "weights", "grads", ...

struct MemorySnapshot {
  std::array<int64_t, kNumMemCategories> current{};
  std::array<int64_t, kNumMemCategories> peak{};  // peak of each category on its own
  int64_t current_total = 0;
  int64_t peak_total = 0;  // peak of the sum (not the sum of the peaks)
  // Bytes of each category at the moment the total peaked: this is what "peak by category" means
  // when the categories are meant to add up to the peak.
  std::array<int64_t, kNumMemCategories> at_peak{};
};

// One tracker per process (= per rank). It is process-wide on purpose: an allocation anywhere in
// the library must be counted, and threading a tracker through every call would add nothing.
class MemoryTracker {
 public:
  static MemoryTracker& instance();

  void on_alloc(MemCategory c, int64_t bytes);
  void on_free(MemCategory c, int64_t bytes);
  MemorySnapshot snapshot() const;
  // Forget old peaks: every peak becomes the current value (e.g. between benchmark runs).
  void reset_peaks();
  // "weights 12.0 MB, grads 12.0 MB, ... total 40.1 MB (peak 55.2 MB)"
  std::string report() const;

 private:
  mutable std::mutex mutex_;
  MemorySnapshot s_;
};

inline double to_mb(int64_t bytes) {
  return static_cast<double>(bytes) / 1.0e6;
}

}  // namespace tsp
