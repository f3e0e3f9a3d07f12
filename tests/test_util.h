// Small helpers shared by the tests.
#pragma once

#include <string>

#include "tsp/core/error.h"

namespace tsp::test {

// The message of the tsp::Error that f() throws, or "(no error)": lets a test assert on what a
// user would read.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.message();
  }
  return "(no error)";
}

}  // namespace tsp::test
