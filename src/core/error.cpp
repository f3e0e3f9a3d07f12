#include "tsp/core/error.h"

#include <atomic>
#include <cstring>

namespace tsp {
namespace {
std::atomic<int> g_rank{-1};

const char* short_path(const char* path) {
  // Keep the path from "src/" or "include/" on so messages stay readable.
  for (const char* marker : {"/src/", "/include/", "/tests/", "/bench/"}) {
    if (const char* at = std::strstr(path, marker)) return at + 1;
  }
  return path;
}

std::string decorate(const std::string& message, int rank, const std::source_location& where) {
  std::string prefix = rank >= 0 ? fmt::format("[rank {}] ", rank) : std::string();
  return fmt::format("{}{} ({}:{})", prefix, message, short_path(where.file_name()), where.line());
}
}  // namespace

void set_error_rank(int rank) {
  g_rank = rank;
}
int error_rank() {
  return g_rank;
}

Error::Error(std::string message, std::source_location where)
    : std::runtime_error(decorate(message, g_rank.load(), where)),
      message_(std::move(message)),
      rank_(g_rank.load()),
      file_(short_path(where.file_name())),
      line_(static_cast<int>(where.line())) {}

}  // namespace tsp
