// Helper program for abort_test.sh (not a test itself): one rank fails while the others sit in a
// collective. Through run_mpi_main the job must exit non-zero at once, printing the failing
// rank's message, never hang.
//   abort_probe ok                 every rank finishes normally (exit 0): the control case
//   abort_probe error   [rank]     `rank` (default: last) throws tsp::Error
//   abort_probe std     [rank]     `rank` throws a plain std::runtime_error
//   abort_probe pending [rank]     `rank` throws with a large irecv still pending (its Request
//                                  destructor must not wait for a message that never comes)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tsp/comm/mpi.h"
#include "tsp/core/error.h"

namespace {

int body(tsp::Communicator& world, int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "ok";
  const int thrower = argc > 2 ? std::atoi(argv[2]) : world.size() - 1;
  TSP_CHECK(mode == "ok" || mode == "error" || mode == "std" || mode == "pending",
            "unknown mode '{}'; use ok, error, std or pending", mode);
  TSP_CHECK(thrower >= 0 && thrower < world.size(), "thrower rank {} is not in [0, {})", thrower,
            world.size());
  if (mode != "ok" && world.rank() == thrower) {
    // Let the other ranks enter the collective first, so the test covers "they sit in it".
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    std::vector<float> never(1 << 20);
    tsp::RequestPtr pending;
    if (mode == "pending") {
      // Nobody sends this message.
      pending = world.irecv(never.data(), static_cast<int64_t>(never.size()), tsp::DType::F32,
                            (thrower + 1) % world.size());
    }
    if (mode == "std") throw std::runtime_error("probe std failure on purpose");
    TSP_FAIL("probe failure on purpose (mode {})", mode);
  }
  int32_t x = 1;
  world.all_reduce(&x, 1, tsp::DType::I32);  // the thrower never joins: the others wait here
  world.barrier();
  if (world.rank() == 0) std::printf("probe ok: sum %d\n", x);
  return x == world.size() ? 0 : 3;
}

}  // namespace

int main(int argc, char** argv) {
  return tsp::run_mpi_main(argc, argv, body);
}
