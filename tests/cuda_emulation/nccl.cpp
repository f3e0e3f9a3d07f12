// The emulated NCCL (include/nccl.h; README.md beside this file, "NCCL"): the calls
// src/comm/cuda/nccl.cpp makes, with NCCL's documented meaning, carried out by MPI between the
// processes of the job (each has a device of its own under emulation, as on a machine with a GPU
// per rank).
//
// - A communicator is two MPI communicators of its ranks in NCCL's rank order: `data`, which the
//   operations use, and `ctrl`, which ncclCommSplit uses. Neither is the library's, so the
//   emulated NCCL traffic never matches the library's own MPI messages, and a split on the host
//   never meets a collective running on a stream's thread on the same MPI communicator.
// - Every data operation is put on its stream with tsp::emu::enqueue: it runs after the work
//   queued there before it, possibly on the stream's own thread, concurrently with the host and
//   other streams (hence MPI_THREAD_MULTIPLE). It owns what it uses (captured by value), and a
//   failure is a std::runtime_error the runtime raises again at the next synchronising call.
// - MPI matches a communicator's collectives by their issue order, as NCCL requires every rank
//   to issue them in the same order; so one communicator's operations must all go on one stream
//   (else two stream threads could issue them in different orders): a second stream is refused.
// - ncclGroupStart/End collect the calling thread's operations; the outermost ncclGroupEnd
//   enqueues them as ONE operation, which posts the sends and receives (MPI_Isend/MPI_Irecv),
//   runs the collectives in order, then waits for the sends and receives: a ring step, where
//   every rank sends and receives, cannot deadlock. A call outside a group is a group of one.
// - Arguments NCCL would reject, and ones it would accept but tsp could get wrong (buffers that
//   are not device memory, overlapping buffers that are not NCCL's in-place form), fail the call
//   with ncclInvalidArgument, and ncclGetLastError says why.
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "settings.h"

namespace {

// ---- errors: the calling thread's last message, and each communicator's asynchronous error ----

thread_local std::string t_last_error;

// ---- communicators ----

struct CommState {
  MPI_Comm data = MPI_COMM_NULL;  // the operations' traffic
  MPI_Comm ctrl = MPI_COMM_NULL;  // ncclCommSplit
  int rank = 0, size = 0;
  // ncclCommAbort: peers may be gone, so the MPI communicators leak. Atomic: the last queued
  // operation may drop the state on a stream's thread.
  std::atomic<bool> aborted{false};

  std::mutex mutex;  // guards what follows (set by stream threads, read by the host)
  ncclResult_t async = ncclSuccess;
  std::string async_message;
  cudaStream_t stream = nullptr;  // of the first operation; every later one must use it
  bool has_stream = false;

  ~CommState() {
    if (aborted) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    // Local in MPI implementations (no message is exchanged); the last queued operation holding
    // this state may drop it on a stream's thread, after ncclCommDestroy returned.
    if (data != MPI_COMM_NULL) MPI_Comm_free(&data);
    if (ctrl != MPI_COMM_NULL) MPI_Comm_free(&ctrl);
  }
};

}  // namespace

// The handle the caller holds; queued operations share its state, so it outlives them.
struct ncclComm {
  std::shared_ptr<CommState> state;
};

namespace {

std::string describe(const CommState& s) {
  return fmt::format("rank {} of {}", s.rank, s.size);
}

// ---- groups: the calling thread's collected operations ----

// The sends and receives a group posted, and what each receive must get: NCCL needs a send and
// its receive to have the same count, and MPI would accept a shorter message silently.
struct Requests {
  std::vector<MPI_Request> requests;
  std::vector<int> expected;  // per request: the receive's element count, or -1 for a send
  std::vector<MPI_Datatype> types;
  std::vector<std::string> names;
  void add(MPI_Request r, int expected_count, MPI_Datatype type, std::string name) {
    requests.push_back(r);
    expected.push_back(expected_count);
    types.push_back(type);
    names.push_back(std::move(name));
  }
};

struct PendingOp {
  std::shared_ptr<CommState> comm;
  cudaStream_t stream;
  bool p2p;  // posts a request (Isend/Irecv) rather than running to completion
  std::string what;
  std::function<void(Requests&)> run;
};

thread_local int t_group_depth = 0;
thread_local std::vector<PendingOp> t_group_ops;
thread_local ncclResult_t t_group_error = ncclSuccess;  // the first failed call in the group
thread_local std::string t_group_message;               // and its message

// A failed call: the message for ncclGetLastError, the group's error (so ncclGroupEnd reports it
// and drops the group, as NCCL does), and the result to return.
ncclResult_t fail(ncclResult_t r, std::string message) {
  t_last_error = std::move(message);
  if (t_group_depth > 0 && t_group_error == ncclSuccess) {
    t_group_error = r;
    t_group_message = t_last_error;
  }
  return r;
}

void mpi_ok(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw std::runtime_error(fmt::format("{}: MPI error: {}", what, text));
}

// TSP_EMU_NCCL_LOSE_PEER (settings.h): what real NCCL does when a peer dies or the network
// fails under a running operation. Its kernels wait for the peer for ever, so the stream (and
// any stream waiting on it) never gets past the operation, while its proxy thread notices and
// sets the communicators' asynchronous error to ncclRemoteError. Only ncclCommAbort ends the
// kernels; here it ends the wait, and the operation fails (a sticky fault, as after a GPU's).
// TSP_EMU_NCCL_STALL_PEER: the same wait, with no error reported (a peer stuck in its own code or
// in another operation, or lost where NCCL's transports see nothing).
void lose_peer(const std::vector<PendingOp>& ops, bool reported) {
  const std::string message =
      reported
          ? fmt::format("emulated NCCL: {} lost its peer (TSP_EMU_NCCL_LOSE_PEER={})",
                        ops.front().what, tsp::emu::settings::nccl_lose_peer_at())
          : fmt::format("emulated NCCL: {} waited for a stalled peer (TSP_EMU_NCCL_STALL_PEER={})",
                        ops.front().what, tsp::emu::settings::nccl_stall_peer_at());
  for (const PendingOp& op : ops) {
    std::lock_guard lock(op.comm->mutex);
    if (reported && op.comm->async == ncclSuccess) {
      op.comm->async = ncclRemoteError;
      op.comm->async_message = message;
    }
  }
  for (const PendingOp& op : ops)
    while (!op.comm->aborted) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  throw std::runtime_error(message + "; its communicator was aborted");
}

std::atomic<uint32_t> g_groups_run{0};  // this process's groups, for the two settings above

// Issues one group (or a lone call) on its stream as one operation.
void run_group(std::vector<PendingOp> ops) {
  if (ops.empty()) return;
  const cudaStream_t stream = ops.front().stream;
  const uint32_t n = ++g_groups_run;
  const bool loses_peer = n == tsp::emu::settings::nccl_lose_peer_at();
  const bool stalls = n == tsp::emu::settings::nccl_stall_peer_at();
  tsp::emu::enqueue(stream, [ops = std::move(ops), loses_peer, stalls]() {
    if (loses_peer || stalls) lose_peer(ops, loses_peer);
    try {
      Requests posted;
      for (const PendingOp& op : ops)
        if (op.p2p) op.run(posted);
      for (const PendingOp& op : ops)
        if (!op.p2p) op.run(posted);
      if (posted.requests.empty()) return;
      std::vector<MPI_Status> statuses(posted.requests.size());
      mpi_ok(MPI_Waitall(static_cast<int>(posted.requests.size()), posted.requests.data(),
                         statuses.data()),
             "the group's sends and receives (MPI_Waitall)");
      for (size_t i = 0; i < statuses.size(); ++i) {
        if (posted.expected[i] < 0) continue;
        int got = 0;
        mpi_ok(MPI_Get_count(&statuses[i], posted.types[i], &got), "MPI_Get_count");
        if (got != posted.expected[i])
          throw std::runtime_error(
              fmt::format("{} of {} elements got {}: the send and the "
                          "receive of a pair must have the same count",
                          posted.names[i], posted.expected[i], got));
      }
    } catch (const std::exception& e) {
      std::string names;
      for (const PendingOp& op : ops) names += (names.empty() ? "" : ", ") + op.what;
      const std::string message = fmt::format("emulated NCCL ({}) failed: {}", names, e.what());
      for (const PendingOp& op : ops) {
        std::lock_guard lock(op.comm->mutex);
        if (op.comm->async == ncclSuccess) {
          op.comm->async = ncclSystemError;
          op.comm->async_message = message;
        }
      }
      throw std::runtime_error(message);
    }
  });
}

ncclResult_t submit(PendingOp op) {
  {
    std::lock_guard lock(op.comm->mutex);
    if (!op.comm->has_stream) {
      op.comm->stream = op.stream;
      op.comm->has_stream = true;
    } else if (op.comm->stream != op.stream) {
      return fail(ncclInvalidUsage,
                  fmt::format("{} on another stream than this communicator's earlier operations: "
                              "the emulation needs one stream per communicator (MPI orders a "
                              "communicator's collectives by their issue order)",
                              op.what));
    }
  }
  if (t_group_depth > 0) {
    t_group_ops.push_back(std::move(op));
    return ncclSuccess;
  }
  std::vector<PendingOp> one;
  one.push_back(std::move(op));
  run_group(std::move(one));
  return ncclSuccess;
}

// ---- argument checks ----

struct Type {
  MPI_Datatype mpi;
  size_t size;
  const char* name;
};

bool type_of(ncclDataType_t t, Type* out) {
  switch (t) {
    case ncclInt8:
      *out = {MPI_INT8_T, 1, "ncclInt8"};
      return true;
    case ncclUint8:
      *out = {MPI_UINT8_T, 1, "ncclUint8"};
      return true;
    case ncclInt32:
      *out = {MPI_INT32_T, 4, "ncclInt32"};
      return true;
    case ncclUint32:
      *out = {MPI_UINT32_T, 4, "ncclUint32"};
      return true;
    case ncclInt64:
      *out = {MPI_INT64_T, 8, "ncclInt64"};
      return true;
    case ncclUint64:
      *out = {MPI_UINT64_T, 8, "ncclUint64"};
      return true;
    case ncclFloat16:  // moved as bytes; its sum is not emulated (tsp has no fp16)
      *out = {MPI_UINT16_T, 2, "ncclFloat16"};
      return true;
    case ncclFloat32:
      *out = {MPI_FLOAT, 4, "ncclFloat32"};
      return true;
    case ncclFloat64:
      *out = {MPI_DOUBLE, 8, "ncclFloat64"};
      return true;
    case ncclBfloat16:  // summed by bf16_sum
      *out = {MPI_UINT16_T, 2, "ncclBfloat16"};
      return true;
  }
  return false;
}

// bf16 sum, as NCCL computes it: each pairwise sum in fp32, rounded to bf16 (nearest-even) with
// the library's own rounding (tsp::bf16).
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i)
    b[i] = tsp::bf16::from_float(tsp::bf16::to_float(a[i]) + tsp::bf16::to_float(b[i]));
}

MPI_Op bf16_sum_op() {
  static std::once_flag once;
  static MPI_Op op = MPI_OP_NULL;
  std::call_once(once, [] { MPI_Op_create(&bf16_sum, /*commute=*/1, &op); });
  return op;
}

// The MPI reduction of (op, type), or a failed call's result.
ncclResult_t sum_of(ncclRedOp_t op, ncclDataType_t t, const char* call, MPI_Op* out) {
  if (op != ncclSum)
    return fail(ncclInvalidArgument, fmt::format("{}: reduction {} is not emulated (only ncclSum)",
                                                 call, static_cast<int>(op)));
  if (t == ncclFloat16)
    return fail(ncclInvalidArgument, fmt::format("{}: the ncclFloat16 sum is not emulated", call));
  *out = t == ncclBfloat16 ? bf16_sum_op() : MPI_SUM;
  return ncclSuccess;
}

// The checks every data call starts with: the communicator, the type, the count (MPI counts are
// ints; bytes, also times the rank count, must fit in size_t).
ncclResult_t check_common(const char* call, ncclComm_t comm, ncclDataType_t datatype, size_t count,
                          Type* type) {
  if (comm == nullptr || !comm->state)
    return fail(ncclInvalidArgument, fmt::format("{}: the communicator is null", call));
  if (!type_of(datatype, type))
    return fail(ncclInvalidArgument,
                fmt::format("{}: unknown datatype {}", call, static_cast<int>(datatype)));
  const size_t n = static_cast<size_t>(comm->state->size);
  if (count > SIZE_MAX / type->size / n)
    return fail(ncclInvalidArgument, fmt::format("{}: {} elements of {} overflow a byte count",
                                                 call, count, type->name));
  if (count > static_cast<size_t>(INT_MAX))
    return fail(ncclInvalidArgument,
                fmt::format("{}: {} elements: the emulation's MPI counts stop at {}", call, count,
                            INT_MAX));
  return ncclSuccess;
}

ncclResult_t check_device(const char* call, const char* which, const void* p, size_t bytes) {
  if (bytes == 0 || tsp::emu::is_device_range(p, bytes)) return ncclSuccess;
  return fail(ncclInvalidArgument,
              fmt::format("{}: {} {} ({} bytes) is not inside one device allocation (NCCL "
                          "moves device memory only)",
                          call, which, p, bytes));
}

ncclResult_t check_rank(const char* call, const char* which, int r, const CommState& s) {
  if (r >= 0 && r < s.size) return ncclSuccess;
  return fail(ncclInvalidArgument,
              fmt::format("{}: {} {} out of range ({} ranks)", call, which, r, s.size));
}

bool overlap(const void* a, size_t an, const void* b, size_t bn) {
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return an > 0 && bn > 0 && x < y + bn && y < x + an;
}

ncclResult_t check_disjoint(const char* call, const void* send, size_t send_bytes, const void* recv,
                            size_t recv_bytes, const char* in_place_form) {
  if (!overlap(send, send_bytes, recv, recv_bytes)) return ncclSuccess;
  return fail(ncclInvalidArgument,
              fmt::format("{}: sendbuff {} ({} bytes) and recvbuff {} ({} bytes) overlap, and "
                          "not in NCCL's in-place form ({}): NCCL's result is undefined",
                          call, send, send_bytes, recv, recv_bytes, in_place_form));
}

#define NCCL_EMU_TRY(call)            \
  do {                                \
    const ncclResult_t r_ = (call);   \
    if (r_ != ncclSuccess) return r_; \
  } while (0)

std::atomic<uint64_t> g_ids{0};
constexpr char kIdMagic[] = "tsp-emulated-nccl-id";

}  // namespace

// ---- errors ----

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "no error";
    case ncclUnhandledCudaError:
      return "unhandled cuda error";
    case ncclSystemError:
      return "unhandled system error";
    case ncclInternalError:
      return "internal error";
    case ncclInvalidArgument:
      return "invalid argument";
    case ncclInvalidUsage:
      return "invalid usage";
    case ncclRemoteError:
      return "remote process exited or there was a network error";
    case ncclInProgress:
      return "NCCL operation in progress";
  }
  return "unknown result code";
}

// This thread's last failed call; else the communicator's asynchronous error.
const char* ncclGetLastError(ncclComm_t comm) {
  if (!t_last_error.empty() || comm == nullptr || !comm->state) return t_last_error.c_str();
  thread_local std::string async;
  std::lock_guard lock(comm->state->mutex);
  async = comm->state->async_message;
  return async.c_str();
}

// ---- communicators ----

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  if (id == nullptr) return fail(ncclInvalidArgument, "ncclGetUniqueId: null id");
  std::memset(id->internal, 0, sizeof id->internal);
  std::memcpy(id->internal, kIdMagic, sizeof kIdMagic);
  std::random_device rd;
  uint32_t random[4];
  for (uint32_t& w : random) w = rd();
  const uint64_t serial = g_ids.fetch_add(1);
  std::memcpy(id->internal + 32, random, sizeof random);
  std::memcpy(id->internal + 48, &serial, sizeof serial);
  // Where the members meet: this process (ncclCommInitRank's rendezvous, below).
  int world_rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  std::memcpy(id->internal + 56, &world_rank, sizeof world_rank);
  return ncclSuccess;
}

// Collective over the ranks of the id only, as NCCL's: each member tells the process that made the
// id (its world rank is in the id) its NCCL rank and world rank, over MPI_COMM_WORLD with a tag of
// the id (the library's own traffic is on duplicates of the world); that process checks that the
// ranks 0..nranks-1 each came once and answers every member with the list of world ranks in NCCL
// rank order, or with a refusal; then the members make their communicator with
// MPI_Comm_create_group, collective over them alone. A single rank needs nobody.
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  t_last_error.clear();
  if (comm == nullptr) return fail(ncclInvalidArgument, "ncclCommInitRank: null comm pointer");
  *comm = nullptr;
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return fail(ncclInvalidArgument,
                fmt::format("ncclCommInitRank: rank {} of {} ranks", rank, nranks));
  if (std::memcmp(id.internal, kIdMagic, sizeof kIdMagic) != 0)
    return fail(ncclInvalidArgument,
                "ncclCommInitRank: the id was not made by ncclGetUniqueId (broadcast it from the "
                "rank that made it)");
  int initialized = 0, provided = MPI_THREAD_SINGLE;
  MPI_Initialized(&initialized);
  if (!initialized) return fail(ncclInvalidUsage, "ncclCommInitRank: MPI is not initialised");
  MPI_Query_thread(&provided);
  if (provided < MPI_THREAD_MULTIPLE)
    return fail(ncclInvalidUsage,
                fmt::format("ncclCommInitRank: the emulated NCCL calls MPI from the streams' "
                            "threads, which needs MPI_THREAD_MULTIPLE; MPI granted level {}",
                            provided));
  uint64_t h = 1469598103934665603ull;  // FNV-1a of the id
  for (char c : id.internal) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  const int tag = 20000 + static_cast<int>(h % 10000);  // below MPI's guaranteed 32767
  int root = -1, me = -1, world_size = 0;
  std::memcpy(&root, id.internal + 56, sizeof root);
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  if (root < 0 || root >= world_size)
    return fail(ncclInvalidArgument, "ncclCommInitRank: the id names no process of this job");
  auto state = std::make_shared<CommState>();
  try {
    if (nranks == 1) {
      mpi_ok(MPI_Comm_dup(MPI_COMM_SELF, &state->ctrl), "ncclCommInitRank: MPI_Comm_dup");
    } else {
      // members[r]: the world rank of NCCL rank r; a leading -1 is a refusal.
      std::vector<int> members(nranks, -1);
      if (me == root) {
        members[rank] = me;
        bool valid = true;
        std::vector<int> callers;  // every process that called gets an answer, valid or not
        for (int i = 1; i < nranks; ++i) {
          int got[2] = {-1, -1};  // NCCL rank, world rank
          mpi_ok(MPI_Recv(got, 2, MPI_INT, MPI_ANY_SOURCE, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE),
                 "ncclCommInitRank: MPI_Recv");
          callers.push_back(got[1]);
          if (got[0] < 0 || got[0] >= nranks || members[got[0]] != -1)
            valid = false;
          else
            members[got[0]] = got[1];
        }
        if (!valid) members.assign(nranks, -1);
        for (int caller : callers)
          mpi_ok(MPI_Send(members.data(), nranks, MPI_INT, caller, tag, MPI_COMM_WORLD),
                 "ncclCommInitRank: MPI_Send");
      } else {
        const int mine[2] = {rank, me};
        mpi_ok(MPI_Send(mine, 2, MPI_INT, root, tag, MPI_COMM_WORLD), "ncclCommInitRank: MPI_Send");
        mpi_ok(
            MPI_Recv(members.data(), nranks, MPI_INT, root, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE),
            "ncclCommInitRank: MPI_Recv");
      }
      if (members[0] < 0)
        return fail(ncclInvalidUsage,
                    fmt::format("ncclCommInitRank: rank {} of {}: the ranks 0..{} must each call "
                                "once with the same id and nranks (a rank came twice or is out "
                                "of range)",
                                rank, nranks, nranks - 1));
      MPI_Group world_group = MPI_GROUP_NULL, group = MPI_GROUP_NULL;
      mpi_ok(MPI_Comm_group(MPI_COMM_WORLD, &world_group), "MPI_Comm_group");
      mpi_ok(MPI_Group_incl(world_group, nranks, members.data(), &group), "MPI_Group_incl");
      const int made = MPI_Comm_create_group(MPI_COMM_WORLD, group, tag, &state->ctrl);
      MPI_Group_free(&group);
      MPI_Group_free(&world_group);
      mpi_ok(made, "ncclCommInitRank: MPI_Comm_create_group");
    }
    mpi_ok(MPI_Comm_set_errhandler(state->ctrl, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    mpi_ok(MPI_Comm_size(state->ctrl, &state->size), "MPI_Comm_size");
    mpi_ok(MPI_Comm_rank(state->ctrl, &state->rank), "MPI_Comm_rank");
    if (state->size != nranks || state->rank != rank)
      return fail(ncclInternalError, "ncclCommInitRank: the communicator made is not the id's");
    mpi_ok(MPI_Comm_dup(state->ctrl, &state->data), "MPI_Comm_dup");
  } catch (const std::exception& e) {
    return fail(ncclSystemError, e.what());
  }
  *comm = new ncclComm{std::move(state)};
  return ncclSuccess;
}

ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t* newcomm,
                           ncclConfig_t* config) {
  t_last_error.clear();
  if (newcomm == nullptr) return fail(ncclInvalidArgument, "ncclCommSplit: null newcomm");
  *newcomm = nullptr;
  if (comm == nullptr || !comm->state)
    return fail(ncclInvalidArgument, "ncclCommSplit: the communicator is null");
  if (config != nullptr)
    return fail(ncclInvalidArgument,
                "ncclCommSplit: a configuration is not emulated (pass null: the parent's)");
  if (color < 0 && color != NCCL_SPLIT_NOCOLOR)
    return fail(
        ncclInvalidArgument,
        fmt::format("ncclCommSplit: colour {} (non-negative, or NCCL_SPLIT_NOCOLOR)", color));
  const CommState& parent = *comm->state;
  auto state = std::make_shared<CommState>();
  try {
    // NCCL's order is MPI's: by key, ties by the parent's rank.
    mpi_ok(MPI_Comm_split(parent.ctrl, color == NCCL_SPLIT_NOCOLOR ? MPI_UNDEFINED : color, key,
                          &state->ctrl),
           "ncclCommSplit: MPI_Comm_split");
    if (state->ctrl == MPI_COMM_NULL) return ncclSuccess;  // NCCL_SPLIT_NOCOLOR: no communicator
    mpi_ok(MPI_Comm_size(state->ctrl, &state->size), "MPI_Comm_size");
    mpi_ok(MPI_Comm_rank(state->ctrl, &state->rank), "MPI_Comm_rank");
    mpi_ok(MPI_Comm_dup(state->ctrl, &state->data), "MPI_Comm_dup");
  } catch (const std::exception& e) {
    return fail(ncclSystemError, fmt::format("{} ({} of the parent)", e.what(), describe(parent)));
  }
  *newcomm = new ncclComm{std::move(state)};
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  if (comm == nullptr || !comm->state || rank == nullptr)
    return fail(ncclInvalidArgument, "ncclCommUserRank: null communicator or rank pointer");
  *rank = comm->state->rank;
  return ncclSuccess;
}

// The operations already queued keep the state (and its MPI communicators) until they ran.
ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (comm == nullptr) return fail(ncclInvalidArgument, "ncclCommDestroy: null communicator");
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (comm == nullptr) return fail(ncclInvalidArgument, "ncclCommAbort: null communicator");
  comm->state->aborted = true;  // freeing could wait for peers that never come: leak instead
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async_error) {
  if (comm == nullptr || !comm->state || async_error == nullptr)
    return fail(ncclInvalidArgument, "ncclCommGetAsyncError: null communicator or result pointer");
  t_last_error.clear();  // ncclGetLastError(comm) now gives the asynchronous error's message
  std::lock_guard lock(comm->state->mutex);
  *async_error = comm->state->async;
  return ncclSuccess;
}

// ---- groups ----

ncclResult_t ncclGroupStart() {
  if (t_group_depth == 0) {
    t_group_ops.clear();
    t_group_error = ncclSuccess;
  }
  ++t_group_depth;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  if (t_group_depth == 0)
    return fail(ncclInvalidUsage, "ncclGroupEnd without a ncclGroupStart on this thread");
  if (--t_group_depth > 0) return ncclSuccess;
  std::vector<PendingOp> ops = std::move(t_group_ops);
  t_group_ops.clear();
  if (t_group_error != ncclSuccess) {
    // A call in the group failed (ncclGetLastError says which): nothing of it runs, as in NCCL.
    const ncclResult_t r = t_group_error;
    t_group_error = ncclSuccess;
    t_last_error = std::move(t_group_message);  // the later calls of the group cleared it
    return r;
  }
  for (const PendingOp& op : ops) {
    if (op.stream != ops.front().stream)
      return fail(ncclInvalidUsage,
                  fmt::format("ncclGroupEnd: the group's operations are on different streams ({} "
                              "and {}); the emulation runs a group as one operation of one stream",
                              ops.front().what, op.what));
  }
  run_group(std::move(ops));
  return ncclSuccess;
}

// ---- collectives ----

ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, int root, ncclComm_t comm,
                           cudaStream_t stream) {
  constexpr const char* call = "ncclBroadcast";
  t_last_error.clear();
  Type type{};
  NCCL_EMU_TRY(check_common(call, comm, datatype, count, &type));
  const std::shared_ptr<CommState>& s = comm->state;
  NCCL_EMU_TRY(check_rank(call, "root", root, *s));
  const size_t bytes = count * type.size;
  const bool is_root = s->rank == root;
  if (is_root) {  // sendbuff is read on the root only
    NCCL_EMU_TRY(check_device(call, "sendbuff", sendbuff, bytes));
    if (sendbuff != recvbuff)
      NCCL_EMU_TRY(check_disjoint(call, sendbuff, bytes, recvbuff, bytes, "sendbuff == recvbuff"));
  }
  NCCL_EMU_TRY(check_device(call, "recvbuff", recvbuff, bytes));
  if (count == 0) return ncclSuccess;
  return submit({s, stream, false, fmt::format("ncclBroadcast from rank {}", root),
                 [s, sendbuff, recvbuff, count, bytes, type, root, is_root](auto&) {
                   if (is_root && sendbuff != recvbuff) std::memcpy(recvbuff, sendbuff, bytes);
                   mpi_ok(MPI_Bcast(recvbuff, static_cast<int>(count), type.mpi, root, s->data),
                          "MPI_Bcast");
                 }});
}

ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
                           ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream) {
  constexpr const char* call = "ncclAllGather";
  t_last_error.clear();
  Type type{};
  NCCL_EMU_TRY(check_common(call, comm, datatype, sendcount, &type));
  const std::shared_ptr<CommState>& s = comm->state;
  const size_t bytes = sendcount * type.size, total = bytes * s->size;
  // In place when sendbuff is this rank's block of recvbuff: MPI's in-place all-gather is the
  // same form (this rank's contribution read from its block of the receive buffer).
  const bool in_place = sendbuff == static_cast<const char*>(recvbuff) + s->rank * bytes;
  NCCL_EMU_TRY(check_device(call, "sendbuff", sendbuff, bytes));
  NCCL_EMU_TRY(check_device(call, "recvbuff", recvbuff, total));
  if (!in_place)
    NCCL_EMU_TRY(check_disjoint(call, sendbuff, bytes, recvbuff, total,
                                "sendbuff == recvbuff + rank * sendcount"));
  if (sendcount == 0) return ncclSuccess;
  return submit({s, stream, false, "ncclAllGather",
                 [s, sendbuff, recvbuff, sendcount, type, in_place](auto&) {
                   const int n = static_cast<int>(sendcount);
                   mpi_ok(MPI_Allgather(in_place ? MPI_IN_PLACE : sendbuff, n, type.mpi, recvbuff,
                                        n, type.mpi, s->data),
                          "MPI_Allgather");
                 }});
}

ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount,
                               ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                               cudaStream_t stream) {
  constexpr const char* call = "ncclReduceScatter";
  t_last_error.clear();
  Type type{};
  NCCL_EMU_TRY(check_common(call, comm, datatype, recvcount, &type));
  MPI_Op mpi_op = MPI_OP_NULL;
  NCCL_EMU_TRY(sum_of(op, datatype, call, &mpi_op));
  const std::shared_ptr<CommState>& s = comm->state;
  const size_t bytes = recvcount * type.size, total = bytes * s->size;
  // NCCL's in-place form: recvbuff is this rank's block of sendbuff. (MPI's puts the result at
  // the start of the buffer instead, so it is not used: the result goes through a temporary.)
  const bool in_place = recvbuff == static_cast<const char*>(sendbuff) + s->rank * bytes;
  NCCL_EMU_TRY(check_device(call, "sendbuff", sendbuff, total));
  NCCL_EMU_TRY(check_device(call, "recvbuff", recvbuff, bytes));
  if (!in_place)
    NCCL_EMU_TRY(check_disjoint(call, sendbuff, total, recvbuff, bytes,
                                "recvbuff == sendbuff + rank * recvcount"));
  if (recvcount == 0) return ncclSuccess;
  return submit({s, stream, false, "ncclReduceScatter",
                 [s, sendbuff, recvbuff, recvcount, bytes, type, mpi_op, in_place](auto&) {
                   std::vector<unsigned char> tmp(in_place ? bytes : 0);
                   void* out = in_place ? tmp.data() : recvbuff;
                   mpi_ok(MPI_Reduce_scatter_block(sendbuff, out, static_cast<int>(recvcount),
                                                   type.mpi, mpi_op, s->data),
                          "MPI_Reduce_scatter_block");
                   if (in_place) std::memcpy(recvbuff, tmp.data(), bytes);
                 }});
}

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream) {
  constexpr const char* call = "ncclAllReduce";
  t_last_error.clear();
  Type type{};
  NCCL_EMU_TRY(check_common(call, comm, datatype, count, &type));
  MPI_Op mpi_op = MPI_OP_NULL;
  NCCL_EMU_TRY(sum_of(op, datatype, call, &mpi_op));
  const std::shared_ptr<CommState>& s = comm->state;
  const size_t bytes = count * type.size;
  const bool in_place = sendbuff == recvbuff;
  NCCL_EMU_TRY(check_device(call, "sendbuff", sendbuff, bytes));
  NCCL_EMU_TRY(check_device(call, "recvbuff", recvbuff, bytes));
  if (!in_place)
    NCCL_EMU_TRY(check_disjoint(call, sendbuff, bytes, recvbuff, bytes, "sendbuff == recvbuff"));
  if (count == 0) return ncclSuccess;
  return submit({s, stream, false, "ncclAllReduce",
                 [s, sendbuff, recvbuff, count, type, mpi_op, in_place](auto&) {
                   mpi_ok(MPI_Allreduce(in_place ? MPI_IN_PLACE : sendbuff, recvbuff,
                                        static_cast<int>(count), type.mpi, mpi_op, s->data),
                          "MPI_Allreduce");
                 }});
}

ncclResult_t ncclReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype,
                        ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream) {
  constexpr const char* call = "ncclReduce";
  t_last_error.clear();
  Type type{};
  NCCL_EMU_TRY(check_common(call, comm, datatype, count, &type));
  MPI_Op mpi_op = MPI_OP_NULL;
  NCCL_EMU_TRY(sum_of(op, datatype, call, &mpi_op));
  const std::shared_ptr<CommState>& s = comm->state;
  NCCL_EMU_TRY(check_rank(call, "root", root, *s));
  const size_t bytes = count * type.size;
  const bool is_root = s->rank == root, in_place = is_root && sendbuff == recvbuff;
  NCCL_EMU_TRY(check_device(call, "sendbuff", sendbuff, bytes));
  if (is_root) {  // recvbuff is written on the root only
    NCCL_EMU_TRY(check_device(call, "recvbuff", recvbuff, bytes));
    if (!in_place)
      NCCL_EMU_TRY(check_disjoint(call, sendbuff, bytes, recvbuff, bytes, "sendbuff == recvbuff"));
  }
  if (count == 0) return ncclSuccess;
  return submit({s, stream, false, fmt::format("ncclReduce to rank {}", root),
                 [s, sendbuff, recvbuff, count, type, mpi_op, root, is_root, in_place](auto&) {
                   mpi_ok(
                       MPI_Reduce(in_place ? MPI_IN_PLACE : sendbuff, is_root ? recvbuff : nullptr,
                                  static_cast<int>(count), type.mpi, mpi_op, root, s->data),
                       "MPI_Reduce");
                 }});
}

// ---- point to point: matched per peer in issue order (MPI's non-overtaking rule on one
// communicator and tag is NCCL's matching rule) ----

ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  constexpr const char* call = "ncclSend";
  t_last_error.clear();
  Type type{};
  NCCL_EMU_TRY(check_common(call, comm, datatype, count, &type));
  const std::shared_ptr<CommState>& s = comm->state;
  NCCL_EMU_TRY(check_rank(call, "peer", peer, *s));
  NCCL_EMU_TRY(check_device(call, "sendbuff", sendbuff, count * type.size));
  if (count == 0) return ncclSuccess;
  return submit({s, stream, true, fmt::format("ncclSend to rank {}", peer),
                 [s, sendbuff, count, type, peer](Requests& posted) {
                   MPI_Request r = MPI_REQUEST_NULL;
                   mpi_ok(
                       MPI_Isend(sendbuff, static_cast<int>(count), type.mpi, peer, 0, s->data, &r),
                       "MPI_Isend");
                   posted.add(r, -1, type.mpi, "ncclSend");
                 }});
}

ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  constexpr const char* call = "ncclRecv";
  t_last_error.clear();
  Type type{};
  NCCL_EMU_TRY(check_common(call, comm, datatype, count, &type));
  const std::shared_ptr<CommState>& s = comm->state;
  NCCL_EMU_TRY(check_rank(call, "peer", peer, *s));
  NCCL_EMU_TRY(check_device(call, "recvbuff", recvbuff, count * type.size));
  if (count == 0) return ncclSuccess;
  return submit({s, stream, true, fmt::format("ncclRecv from rank {}", peer),
                 [s, recvbuff, count, type, peer](Requests& posted) {
                   MPI_Request r = MPI_REQUEST_NULL;
                   mpi_ok(
                       MPI_Irecv(recvbuff, static_cast<int>(count), type.mpi, peer, 0, s->data, &r),
                       "MPI_Irecv");
                   posted.add(r, static_cast<int>(count), type.mpi,
                              fmt::format("ncclRecv from rank {} ({})", peer, describe(*s)));
                 }});
}
