// Force-included (-include) into the clang-14 fuzz build only. libstdc++ 12's <source_location>
// needs __builtin_source_location, which clang gained in version 15, so with clang 14 the header
// is empty and tsp/core/error.h would not compile. This supplies the same interface from the
// older builtins (__builtin_FILE, __builtin_LINE, ...). Inert with any compiler that has it.
#pragma once

#include <version>

#if !defined(__cpp_lib_source_location) && defined(__clang__) && \
    !__has_builtin(__builtin_source_location)
#include <cstdint>

namespace std {
struct source_location {
  static constexpr source_location current(const char* file = __builtin_FILE(),
                                           const char* function = __builtin_FUNCTION(),
                                           uint_least32_t line = __builtin_LINE(),
                                           uint_least32_t column = __builtin_COLUMN()) noexcept {
    source_location loc;
    loc.file_ = file;
    loc.function_ = function;
    loc.line_ = line;
    loc.column_ = column;
    return loc;
  }
  constexpr source_location() noexcept = default;
  constexpr const char* file_name() const noexcept { return file_; }
  constexpr const char* function_name() const noexcept { return function_; }
  constexpr uint_least32_t line() const noexcept { return line_; }
  constexpr uint_least32_t column() const noexcept { return column_; }

 private:
  const char* file_ = "";
  const char* function_ = "";
  uint_least32_t line_ = 0;
  uint_least32_t column_ = 0;
};
}  // namespace std
#endif
