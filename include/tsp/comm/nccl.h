// The NCCL communicator (a CUDA build only; src/comm/cuda/nccl.cpp). Normally made through
// make_data_communicator (include/tsp/comm/device_comm.h), which checks that NCCL can run the group.
//
// - Bootstrap over MPI: rank 0's ncclUniqueId is broadcast on the wrapped MPI communicator, then
//   ncclCommInitRank; split() is the MPI split plus ncclCommSplit of this NCCL communicator.
// - The control API (check_same, gather_host, ...) runs on the wrapped MPI communicator (host
//   values), so it never waits behind device transfers.
// - Data: each communicator has its own high-priority communication stream. A transfer first
//   makes that stream wait for the work queued so far on the compute stream (an event), so its
//   inputs are ready; then NCCL runs on it and an event marks the end. Request::wait() blocks the
//   host on that event; join_compute() makes the compute stream wait on it (no host block); test()
//   queries it. Blocking calls on device buffers are a launch plus join_compute(): the result is
//   there for every kernel or download that follows on the compute stream, and the host never
//   stalls. A sendrecv pair is ncclSend + ncclRecv inside ncclGroupStart/End.
// - Host buffers passed to the data path (rare: a sampled token, a shard gather on the host) are
//   staged through device memory, so every data transfer of the communicator goes through NCCL,
//   in one order on every rank (a host send may meet a device receive). Such a transfer completes
//   on the host: join_compute() is wait(), and blocking calls return with the host buffer filled.
// - Counts: NCCL counts are size_t (no limit); byte counting is the base class's, identical to
//   MPI's. Unlike MPI, NCCL cannot detect a receive whose count differs from the send's.
#pragma once

#include <memory>

#include "tsp/comm/communicator.h"

namespace tsp {

// An NCCL communicator over the ranks of `mpi_group` (kept for the control API and splits), on
// CUDA device `device`, which must differ on every rank. Collective over mpi_group.
std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> mpi_group,
                                                     int device);
bool is_nccl_communicator(const Communicator& comm);

}  // namespace tsp
