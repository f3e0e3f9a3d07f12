// Shared by the libFuzzer targets (tests/fuzz/*_fuzz.cpp): the input as a file the readers can
// open, and the harness rules (docs/testing.md):
//   - a tsp::Error is the expected outcome of bad input (the caller catches it);
//   - anything else is a finding: a sanitizer report, a crash, an uncaught exception (libFuzzer
//     reports the abort), a leaked file descriptor, or a property check that fails (fuzz_require).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <bitset>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "tsp/core/error.h"

namespace tsp_fuzz {

// A property that must hold for every input (not just "no crash"); abort() makes libFuzzer save
// the input as a crash.
#define fuzz_require(cond, what)                                                              \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      std::fprintf(stderr, "fuzz property violated: %s (%s:%d)\n", what, __FILE__, __LINE__); \
      std::abort();                                                                           \
    }                                                                                         \
  } while (0)

// Which of the first 256 descriptors are open: taken before and after an input, they must be
// equal, else the code under test leaked one (e.g. on an error path). A snapshot, not the
// lowest free number, because the fuzzer's own descriptors leave holes below the ones a reader
// gets.
inline std::bitset<256> open_fds() {
  std::bitset<256> open;
  for (int fd = 0; fd < 256; ++fd) open[fd] = ::fcntl(fd, F_GETFD) != -1;
  return open;
}

// The input bytes as an anonymous in-memory file (memfd: a regular file, no disk I/O), opened by
// path through /proc/self/fd, so the readers run exactly as on a file given on the command line.
class MemFile {
 public:
  MemFile(const uint8_t* data, size_t size) {
    fd_ = ::memfd_create("tsp-fuzz-input", MFD_CLOEXEC);
    if (fd_ < 0) die("memfd_create");
    size_t done = 0;
    while (done < size) {
      const ssize_t n = ::write(fd_, data + done, size - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) die("write");
      done += static_cast<size_t>(n);
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  [[noreturn]] static void die(const char* what) {
    // The harness itself failed (not the code under test): say so and stop.
    std::fprintf(stderr, "fuzz harness: %s failed: %s\n", what, std::strerror(errno));
    std::exit(2);
  }
  int fd_ = -1;
  std::string path_;
};

// The body of a target's LLVMFuzzerTestOneInput: run(data, size) on the input, where a
// tsp::Error is bad input reported as it should be, and no file descriptor may stay open.
template <class Run>
int fuzz_one(Run run, const uint8_t* data, size_t size) {
  const auto fds_before = open_fds();
  try {
    run(data, size);
  } catch (const tsp::Error&) {
    // Bad input, reported as it should be.
  }
  fuzz_require(open_fds() == fds_before, "no file descriptor leaked");
  return 0;
}

}  // namespace tsp_fuzz
