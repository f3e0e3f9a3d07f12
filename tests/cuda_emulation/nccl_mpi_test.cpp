// tsp-test-ranks: 2
//
// The emulated NCCL's own checks (nccl.cpp beside this file), called directly: what it refuses,
// and with which message, so that a tsp bug NCCL would reject (or leave undefined) fails the
// emulated tests instead of passing silently; that a failed call in a group fails the group and
// runs none of it; that communicator set-up with inconsistent arguments fails on every rank
// instead of hanging; NCCL_SPLIT_NOCOLOR; and the bf16 sum's rounding. The operations' results
// are tested through NcclCommunicator by tests/comm/cuda_collectives_mpi_test.cpp.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "mpi_test_util.h"
#include "tsp/core/bf16.h"

namespace tsp {
namespace {

using test::world;

// A communicator of the whole world (collective).
ncclComm_t make_comm() {
  ncclUniqueId id{};
  if (world().rank() == 0) {
    EXPECT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  }
  world().broadcast(&id, sizeof id / 8, DType::I64, 0);  // host memory: plain MPI
  ncclComm_t comm = nullptr;
  EXPECT_EQ(ncclCommInitRank(&comm, world().size(), id, world().rank()), ncclSuccess)
      << ncclGetLastError(nullptr);
  return comm;
}

struct DeviceBuffer {
  explicit DeviceBuffer(size_t bytes) { EXPECT_EQ(cudaMalloc(&p, bytes), cudaSuccess); }
  ~DeviceBuffer() { cudaFree(p); }
  template <typename T>
  T* as() {
    return static_cast<T*>(p);
  }
  void* p = nullptr;
};

// The call failed with `want`, and ncclGetLastError names the reason.
void expect_refused(ncclResult_t got, ncclResult_t want, ncclComm_t comm, const std::string& why) {
  EXPECT_EQ(got, want) << ncclGetErrorString(got);
  const std::string last = ncclGetLastError(comm);
  EXPECT_NE(last.find(why), std::string::npos) << "last error: '" << last << "'";
}

TEST(EmulatedNccl, RefusesWhatNcclRejectsOrLeavesUndefined) {
  ncclComm_t comm = make_comm();
  ASSERT_NE(comm, nullptr);
  const int n = world().size();
  cudaStream_t s = nullptr;
  DeviceBuffer d(64 * sizeof(float));
  std::vector<float> host(64);

  expect_refused(ncclAllReduce(host.data(), host.data(), 4, ncclFloat32, ncclSum, comm, s),
                 ncclInvalidArgument, comm, "not inside one device allocation");
  // 65 floats from a 64-float allocation: past its end.
  expect_refused(ncclAllReduce(d.p, d.p, 65, ncclFloat32, ncclSum, comm, s), ncclInvalidArgument,
                 comm, "not inside one device allocation");
  expect_refused(ncclSend(d.p, 1, ncclFloat32, n, comm, s), ncclInvalidArgument, comm,
                 "peer " + std::to_string(n) + " out of range");
  expect_refused(ncclRecv(d.p, 1, ncclFloat32, -1, comm, s), ncclInvalidArgument, comm,
                 "peer -1 out of range");
  expect_refused(ncclBroadcast(d.p, d.p, 1, ncclFloat32, n, comm, s), ncclInvalidArgument, comm,
                 "root " + std::to_string(n) + " out of range");
  expect_refused(ncclAllReduce(d.p, d.p, 1, ncclFloat32, ncclSum, nullptr, s), ncclInvalidArgument,
                 nullptr, "communicator is null");
  expect_refused(ncclAllReduce(d.p, d.p, SIZE_MAX / 2, ncclFloat32, ncclSum, comm, s),
                 ncclInvalidArgument, comm, "overflow a byte count");
  // Overlapping, but not NCCL's in-place form (which is sendbuff == recvbuff here).
  expect_refused(ncclAllReduce(d.as<float>(), d.as<float>() + 1, 8, ncclFloat32, ncclSum, comm, s),
                 ncclInvalidArgument, comm, "overlap");
  // All-gather's in-place form is sendbuff == recvbuff + rank·count; any other overlap is refused.
  const int wrong_block = (world().rank() + 1) % n;
  expect_refused(ncclAllGather(d.as<float>() + wrong_block * 4, d.p, 4, ncclFloat32, comm, s),
                 ncclInvalidArgument, comm, "overlap");
  expect_refused(ncclGroupEnd(), ncclInvalidUsage, nullptr, "without a ncclGroupStart");
  // Nothing was queued, so the ranks are still in step: a valid call works.
  ASSERT_EQ(cudaMemset(d.p, 0, 4 * sizeof(float)), cudaSuccess);
  EXPECT_EQ(ncclAllReduce(d.p, d.p, 4, ncclFloat32, ncclSum, comm, s), ncclSuccess);
  EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  ncclResult_t async = ncclInternalError;
  EXPECT_EQ(ncclCommGetAsyncError(comm, &async), ncclSuccess);
  EXPECT_EQ(async, ncclSuccess);
  EXPECT_EQ(ncclCommDestroy(comm), ncclSuccess);
}

TEST(EmulatedNccl, AFailedCallFailsItsGroupAndNothingOfItRuns) {
  ncclComm_t comm = make_comm();
  ASSERT_NE(comm, nullptr);
  cudaStream_t s = nullptr;
  DeviceBuffer d(4 * sizeof(float));
  const std::vector<float> ones(4, 1.f);
  ASSERT_EQ(cudaMemcpy(d.p, ones.data(), sizeof(float) * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(ncclGroupStart(), ncclSuccess);
  EXPECT_EQ(ncclSend(d.p, 4, ncclFloat32, -1, comm, s), ncclInvalidArgument);
  // A valid call after the failed one: queued with the group, and nothing of the group runs.
  EXPECT_EQ(ncclAllReduce(d.p, d.p, 4, ncclFloat32, ncclSum, comm, s), ncclSuccess);
  expect_refused(ncclGroupEnd(), ncclInvalidArgument, comm, "peer -1 out of range");
  EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  std::vector<float> got(4);
  ASSERT_EQ(cudaMemcpy(got.data(), d.p, sizeof(float) * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(got, ones) << "the group's all-reduce ran";
  EXPECT_EQ(ncclCommDestroy(comm), ncclSuccess);
}

TEST(EmulatedNccl, OneStreamPerCommunicatorAndPerGroup) {
  ncclComm_t a = make_comm(), b = make_comm();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  cudaStream_t other = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_NE(other, nullptr);
  DeviceBuffer d(4 * sizeof(float));
  ASSERT_EQ(cudaMemset(d.p, 0, 4 * sizeof(float)), cudaSuccess);
  // A group over two communicators, each on its own stream: refused as a whole.
  ASSERT_EQ(ncclGroupStart(), ncclSuccess);
  EXPECT_EQ(ncclAllReduce(d.p, d.p, 4, ncclFloat32, ncclSum, a, nullptr), ncclSuccess);
  EXPECT_EQ(ncclAllReduce(d.p, d.p, 4, ncclFloat32, ncclSum, b, other), ncclSuccess);
  expect_refused(ncclGroupEnd(), ncclInvalidUsage, nullptr, "different streams");
  // a's operations are on the null stream from now on: another stream is refused.
  expect_refused(ncclAllReduce(d.p, d.p, 4, ncclFloat32, ncclSum, a, other), ncclInvalidUsage, a,
                 "another stream");
  EXPECT_EQ(ncclAllReduce(d.p, d.p, 4, ncclFloat32, ncclSum, a, nullptr), ncclSuccess);
  EXPECT_EQ(cudaStreamSynchronize(nullptr), cudaSuccess);
  EXPECT_EQ(ncclCommDestroy(a), ncclSuccess);
  EXPECT_EQ(ncclCommDestroy(b), ncclSuccess);
  cudaStreamDestroy(other);
}

TEST(EmulatedNccl, InconsistentInitFailsOnEveryRank) {
  ncclUniqueId id{};
  if (world().rank() == 0) {
    EXPECT_EQ(ncclGetUniqueId(&id), ncclSuccess);  // not ASSERT: the others wait for the id
  }
  world().broadcast(&id, sizeof id / 8, DType::I64, 0);  // host memory: plain MPI
  // Every rank claims rank 0 of world().size(). Every rank must return (a rank that went on into
  // the communicator's set-up would wait for the others forever). (Fewer callers than nranks
  // wait forever, on a GPU too: NCCL cannot tell a late rank from a missing one.)
  ncclComm_t comm = nullptr;
  expect_refused(ncclCommInitRank(&comm, world().size(), id, 0), ncclInvalidUsage, nullptr,
                 "must each call once");
  EXPECT_EQ(comm, nullptr);
  ncclUniqueId forged{};
  expect_refused(ncclCommInitRank(&comm, world().size(), forged, world().rank()),
                 ncclInvalidArgument, nullptr, "not made by ncclGetUniqueId");
}

// The set-up involves the id's ranks only: rank 0 makes a communicator of itself alone while the
// others do not take part (as `tsp bench` does for its single-rank rows).
TEST(EmulatedNccl, ACommunicatorOfSomeRanksNeedsOnlyThem) {
  if (world().rank() == 0) {
    ncclUniqueId id{};
    ASSERT_EQ(ncclGetUniqueId(&id), ncclSuccess);
    ncclComm_t comm = nullptr;
    ASSERT_EQ(ncclCommInitRank(&comm, 1, id, 0), ncclSuccess) << ncclGetLastError(nullptr);
    int r = -1;
    EXPECT_EQ(ncclCommUserRank(comm, &r), ncclSuccess);
    EXPECT_EQ(r, 0);
    EXPECT_EQ(ncclCommDestroy(comm), ncclSuccess);
  }
  world().barrier();
}

TEST(EmulatedNccl, SplitWithNoColourGivesNoCommunicator) {
  ncclComm_t comm = make_comm();
  ASSERT_NE(comm, nullptr);
  const int r = world().rank();
  ncclComm_t sub = reinterpret_cast<ncclComm_t>(&comm);  // not null: the call must set it
  // Rank 0 alone in colour 5; the others in none.
  ASSERT_EQ(ncclCommSplit(comm, r == 0 ? 5 : NCCL_SPLIT_NOCOLOR, 0, &sub, nullptr), ncclSuccess);
  if (r == 0) {
    ASSERT_NE(sub, nullptr);
    int sub_rank = -1;
    EXPECT_EQ(ncclCommUserRank(sub, &sub_rank), ncclSuccess);
    EXPECT_EQ(sub_rank, 0);
    EXPECT_EQ(ncclCommDestroy(sub), ncclSuccess);
  } else {
    EXPECT_EQ(sub, nullptr);
  }
  // Keys order the ranks: reversed here.
  ASSERT_EQ(ncclCommSplit(comm, 0, -r, &sub, nullptr), ncclSuccess);
  int sub_rank = -1;
  EXPECT_EQ(ncclCommUserRank(sub, &sub_rank), ncclSuccess);
  EXPECT_EQ(sub_rank, world().size() - 1 - r);
  EXPECT_EQ(ncclCommDestroy(sub), ncclSuccess);
  EXPECT_EQ(ncclCommDestroy(comm), ncclSuccess);
}

// bf16 sums in fp32 rounded to bf16, nearest-even: 1 + 2^-8 lies halfway between 1 and the next
// bf16 value, 1 + 2^-7, and rounds to 1 (even); 1 + 3·2^-8 rounds to 1 + 2^-6 (even). With two
// ranks there is one addition, so the order MPI sums in cannot matter.
TEST(EmulatedNccl, Bf16SumRoundsToNearestEven) {
  ASSERT_EQ(world().size(), 2);
  ncclComm_t comm = make_comm();
  ASSERT_NE(comm, nullptr);
  const float mine[2] = {world().rank() == 0 ? 1.f : 0x1p-8f, world().rank() == 0 ? 1.f : 0x3p-8f};
  const uint16_t in[2] = {bf16::from_float(mine[0]), bf16::from_float(mine[1])};
  DeviceBuffer d(sizeof in);
  ASSERT_EQ(cudaMemcpy(d.p, in, sizeof in, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(ncclAllReduce(d.p, d.p, 2, ncclBfloat16, ncclSum, comm, nullptr), ncclSuccess);
  ASSERT_EQ(cudaStreamSynchronize(nullptr), cudaSuccess);
  uint16_t out[2] = {};
  ASSERT_EQ(cudaMemcpy(out, d.p, sizeof out, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(bf16::to_float(out[0]), 1.f);
  EXPECT_EQ(bf16::to_float(out[1]), 1.f + 0x1p-6f);
  EXPECT_EQ(ncclCommDestroy(comm), ncclSuccess);
}

}  // namespace
}  // namespace tsp
