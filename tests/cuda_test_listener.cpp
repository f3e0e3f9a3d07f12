// Linked into every GPU test (tests/<area>/cuda_*_test.cpp, built only with TSP_WITH_CUDA): makes
// ctest report an executable as Skipped, never as Passed, when any of its tests skipped
// (GTEST_SKIP, e.g. "no CUDA device") and none failed. At the end of the run it prints
//   [tsp-cuda-test] SKIPPED 5 of 7 tests: no CUDA device
// which tests/CMakeLists.txt gives ctest as SKIP_REGULAR_EXPRESSION. GoogleTest's own
// "[  SKIPPED ]" lines cannot serve: ctest's skip expression wins over the exit code, so an
// executable with one skipped and one failed test would be reported as skipped, hiding the failure.
// In a multi-rank run only rank 0 prints (ranks from Open MPI's or PMI's environment).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

bool is_rank_zero() {
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"}) {
    if (const char* r = std::getenv(var)) return std::string(r) == "0";
  }
  return true;
}

class SkipReporter : public ::testing::EmptyTestEventListener {
  std::string first_reason_;

  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.skipped() && first_reason_.empty()) {
      first_reason_ = r.message() ? r.message() : "";
      const size_t eol = first_reason_.find('\n');
      if (eol != std::string::npos) first_reason_.resize(eol);
    }
  }

  void OnTestProgramEnd(const ::testing::UnitTest& u) override {
    if (u.failed_test_count() > 0 || u.skipped_test_count() == 0 || !is_rank_zero()) return;
    std::printf("[tsp-cuda-test] SKIPPED %d of %d tests: %s\n", u.skipped_test_count(),
                u.test_to_run_count(),
                first_reason_.empty() ? "(no reason given)" : first_reason_.c_str());
    std::fflush(stdout);
  }
};

// Registered before main() runs (this object file is linked directly, so the initialiser is kept);
// GoogleTest's listener list exists from the first GetInstance() call.
const bool registered = [] {
  ::testing::UnitTest::GetInstance()->listeners().Append(new SkipReporter);
  return true;
}();

}  // namespace
