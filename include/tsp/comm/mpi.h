// MPI implementation of the Communicator and the process-level MPI set-up.
#pragma once

#include <memory>

#include "tsp/comm/communicator.h"

namespace tsp {

// RAII owner of MPI_Init_thread / MPI_Finalize. Requests MPI_THREAD_MULTIPLE (a progress thread
// may call MPI), sets the error rank, and installs error handlers that return codes so tsp can
// raise tsp::Error instead of MPI printing and aborting on its own.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  // The world communicator (owned by the runtime).
  Communicator& world();

 private:
  std::unique_ptr<Communicator> world_;
};

// Abort the whole job (MPI_Abort on MPI_COMM_WORLD) after printing `message` once from this rank
// to stderr. Used by main() when a tsp::Error escapes, so no other rank hangs in a collective.
[[noreturn]] void abort_job(const std::string& message, int exit_code = 1);

// Background progress thread for `comm` (MpiRuntime::world() or a communicator split from it;
// anything else is rejected). While on, a thread polls this communicator's outstanding
// non-blocking requests (MPI_Testsome, then a 20 us sleep), so transfers above the eager limit
// move while the caller computes without calling progress(). Trade-off: the copy is CPU work done
// by the polling thread, so on cores that are all busy (2 cores, >= 2 ranks) it steals time from
// compute and the wall time stays compute + communication; it only pays off with idle cores.
// Requires MPI_THREAD_MULTIPLE (requested by MpiRuntime). Off by default; turning it off joins it.
void set_progress_thread(Communicator& comm, bool on);

// Non-blocking requests of `comm` started and not yet seen complete by test(), wait(),
// progress() or the progress thread. For tests and diagnostics.
int64_t pending_requests(const Communicator& comm);

// Run body(world) with the standard error handling: a tsp::Error or std::exception on any rank
// prints "error: <message>" on that rank and aborts the job. Returns body's exit code.
int run_mpi_main(int argc, char** argv, int (*body)(Communicator& world, int argc, char** argv));

}  // namespace tsp
