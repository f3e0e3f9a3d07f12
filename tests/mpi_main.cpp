// main() for multi-rank GoogleTest executables: initialises MPI once, runs the tests on every
// rank, and makes the job fail if any rank fails (each rank's exit code reaches mpiexec). Only
// rank 0 prints the test listing; other ranks print failures only.
#include <gtest/gtest.h>

#include "mpi_test_util.h"
#include "tsp/comm/mpi.h"

namespace tsp::test {
namespace {
Communicator* g_world = nullptr;
}
Communicator& world() {
  return *g_world;
}
}  // namespace tsp::test

int main(int argc, char** argv) {
  tsp::MpiRuntime mpi(&argc, &argv);
  tsp::test::g_world = &mpi.world();
  ::testing::InitGoogleTest(&argc, argv);
  if (mpi.world().rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    // Failures on other ranks still print through the assertion messages' own output.
    struct FailurePrinter : ::testing::EmptyTestEventListener {
      int rank;
      explicit FailurePrinter(int r) : rank(r) {}
      void OnTestPartResult(const ::testing::TestPartResult& r) override {
        if (r.failed()) {
          fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank,
                  r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
        }
      }
    };
    listeners.Append(new FailurePrinter(mpi.world().rank()));
  }
  int result = RUN_ALL_TESTS();
  // A failure on any rank fails the job on every rank, so ctest sees it whatever mpiexec reports.
  int any_failed = result != 0 ? 1 : 0;
  mpi.world().all_reduce(&any_failed, 1, tsp::DType::I32);
  return any_failed ? 1 : 0;
}
