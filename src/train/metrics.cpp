#include "tsp/train/metrics.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "tsp/core/error.h"

namespace tsp {

void max_memory_peaks(Communicator& world, StepMetrics& m) {
  const MemorySnapshot s = MemoryTracker::instance().snapshot();
  constexpr int kFields = kNumMemCategories + 1;
  std::array<int64_t, kFields> mine{};
  for (int i = 0; i < kNumMemCategories; ++i) mine[i] = s.peak[i];
  mine[kNumMemCategories] = s.peak_total;
  std::vector<int64_t> all(static_cast<size_t>(kFields) * world.size());
  world.all_gather(mine.data(), all.data(), kFields, DType::I64);
  m.peak_bytes.fill(0);
  m.peak_total_bytes = 0;
  for (int r = 0; r < world.size(); ++r) {
    const int64_t* p = &all[static_cast<size_t>(r) * kFields];
    for (int i = 0; i < kNumMemCategories; ++i) m.peak_bytes[i] = std::max(m.peak_bytes[i], p[i]);
    m.peak_total_bytes = std::max(m.peak_total_bytes, p[kNumMemCategories]);
  }
}

std::string metrics_json(const StepMetrics& m) {
  nlohmann::ordered_json j;
  j["step"] = m.step;
  j["loss"] = m.loss;
  j["lr"] = m.lr;
  j["grad_norm"] = m.grad_norm;
  j["tokens_per_s"] = m.tokens_per_s;
  j["step_s"] = m.step_seconds;
  j["elapsed_s"] = m.elapsed_s;
  if (m.val_loss >= 0) j["val_loss"] = m.val_loss;
  if (m.tokens_read_max >= 0) {
    j["tokens_read_per_rank"] = {{"min", m.tokens_read_min}, {"max", m.tokens_read_max}};
  }
  nlohmann::ordered_json peak;
  for (int i = 0; i < kNumMemCategories; ++i) {
    peak[std::string(mem_category_name(static_cast<MemCategory>(i)))] = to_mb(m.peak_bytes[i]);
  }
  peak["total"] = to_mb(m.peak_total_bytes);
  j["peak_mem_mb"] = peak;  // maximum over ranks, per category
  // Non-finite numbers are not JSON: nlohmann writes them as null, which readers handle.
  return j.dump();
}

MetricsWriter::MetricsWriter(const std::string& path, int64_t keep_up_to_step) {
  std::string kept;
  if (keep_up_to_step >= 0) {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
          j["step"].get<int64_t>() <= keep_up_to_step) {
        kept += line + "\n";
      }
    }
  }
  f_ = std::fopen(path.c_str(), "w");
  TSP_CHECK(f_ != nullptr, "cannot open metrics file {}: {}", path, std::strerror(errno));
  std::fputs(kept.c_str(), f_);
  std::fflush(f_);
}

MetricsWriter::~MetricsWriter() {
  if (f_) std::fclose(f_);
}

void MetricsWriter::write(const StepMetrics& m) {
  const std::string line = metrics_json(m) + "\n";
  std::fputs(line.c_str(), f_);
  std::fflush(f_);
}

}  // namespace tsp
