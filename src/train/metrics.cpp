#include "tsp/train/metrics.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
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
  const std::vector<int64_t> all = world.gather_host(mine);  // control traffic, not data
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

MetricsWriter::MetricsWriter(const std::string& path, int64_t keep_up_to_step) : path_(path) {
  std::string kept;
  std::error_code ec;
  // Only a regular file is read back: a device (/dev/full reads endless zeros) or a FIFO holds
  // no earlier lines.
  const bool regular = std::filesystem::is_regular_file(path, ec);
  if (keep_up_to_step >= 0 && regular) {
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
  if (!kept.empty()) {
    // Rewrite the kept lines beside the file and rename: the old file stays whole until the new
    // one is complete.
    const std::string tmp = path + ".tmp." + std::to_string(::getpid());
    std::FILE* t = std::fopen(tmp.c_str(), "w");
    TSP_CHECK(t != nullptr, "cannot create {} (to rewrite the metrics file): {}", tmp,
              std::strerror(errno));
    bool ok = std::fputs(kept.c_str(), t) >= 0 && std::fflush(t) == 0;
    int err = errno;
    if (std::fclose(t) != 0 && ok) {
      ok = false;
      err = errno;
    }
    if (ok && std::rename(tmp.c_str(), path.c_str()) != 0) {
      ok = false;
      err = errno;
    }
    if (!ok) {
      std::remove(tmp.c_str());
      TSP_FAIL("writing metrics file {} failed: {}; its previous content is kept", path,
               std::strerror(err));
    }
    f_ = std::fopen(path.c_str(), "a");
    TSP_CHECK(f_ != nullptr, "cannot open metrics file {}: {}", path, std::strerror(errno));
    return;
  }
  f_ = std::fopen(path.c_str(), "w");
  TSP_CHECK(f_ != nullptr, "cannot open metrics file {}: {}", path, std::strerror(errno));
  put(kept);
}

MetricsWriter::~MetricsWriter() {
  if (f_) std::fclose(f_);
}

void MetricsWriter::put(const std::string& text) {
  TSP_CHECK(f_ != nullptr, "metrics file {} is closed", path_);
  if (text.empty()) return;
  const bool ok =
      std::fwrite(text.data(), 1, text.size(), f_) == text.size() && std::fflush(f_) == 0;
  TSP_CHECK(ok, "writing metrics file {} failed: {} (disk full, or not a writable file?)", path_,
            std::strerror(errno));
}

void MetricsWriter::write(const StepMetrics& m) {
  put(metrics_json(m) + "\n");
}

void MetricsWriter::close() {
  if (f_ == nullptr) return;
  const int rc = std::fclose(f_);
  f_ = nullptr;
  TSP_CHECK(rc == 0, "closing metrics file {} failed: {}", path_, std::strerror(errno));
}

}  // namespace tsp
