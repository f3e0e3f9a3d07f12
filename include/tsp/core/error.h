// Errors a user can act on: every tsp::Error carries the rank that raised it and the source
// location, and its message says what would work ("use D in {1,2,4}").
#pragma once

#include <source_location>
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace tsp {

// The rank of this process, stamped into every error. Set once by whoever initialises the
// communicator; -1 means "not in a distributed job yet".
void set_error_rank(int rank);
int error_rank();

class Error : public std::runtime_error {
 public:
  Error(std::string message, std::source_location where = std::source_location::current());
  // The user's message alone, without rank and location.
  const std::string& message() const { return message_; }
  int rank() const { return rank_; }
  const char* file() const { return file_; }
  int line() const { return line_; }

 private:
  std::string message_;
  int rank_;
  const char* file_;
  int line_;
};

}  // namespace tsp

// TSP_CHECK(cond, "fmt {}", args...): throw tsp::Error with a formatted message when cond is false.
#define TSP_CHECK(cond, ...)                          \
  do {                                                \
    if (!(cond)) [[unlikely]] {                       \
      throw ::tsp::Error(::fmt::format(__VA_ARGS__)); \
    }                                                 \
  } while (0)

#define TSP_FAIL(...) throw ::tsp::Error(::fmt::format(__VA_ARGS__))
