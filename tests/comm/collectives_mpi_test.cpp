// Multi-rank tests of the MPI Communicator: every blocking and non-blocking op at several sizes,
// dtypes and roots, on the world and on split sub-groups (parity, pairs, a TP x SP 2D grid),
// byte counters against the convention of communicator.h, sendrecv rings (untagged, matched in
// posting order), the control API and its separate counter, the validation of every op's
// arguments, and progress of large non-blocking transfers (progress() between compute chunks,
// and the progress thread).
//
// All data are integer-valued coordinate hashes, so every comparison is exact: f32 sums of up to
// 8 values below 2^17 stay below 2^24 (exact in f32); bf16 is moved as raw 16-bit words.
#include <gtest/gtest.h>

#include <chrono>
#include <climits>
#include <cstring>
#include <functional>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include <fmt/ranges.h>

#include "mpi_test_util.h"
#include "tsp/comm/mpi.h"

namespace tsp {
namespace {

using test::world;

// ---- data: value of element i of rank r's buffer, per dtype ----

int64_t hash_value(int r, int64_t i, int salt) {
  return ((r + 1) * 1000003LL + i * 7919LL + salt * 104729LL) % 100003;  // < 2^17
}

// The value as stored in dtype dt (i64 spreads into high bits; bf16 is a raw 16-bit pattern).
int64_t as_dtype(DType dt, int64_t v) {
  switch (dt) {
    case DType::F32:
      return v;
    case DType::BF16:
      return v & 0xFFFF;
    case DType::I32:
      return v - 50000;  // negative values too
    case DType::I64:
    case DType::F64:  // moved as its 64-bit pattern
      return (v << 24) - 7;
  }
  return 0;
}

int64_t value(DType dt, int r, int64_t i, int salt) {
  return as_dtype(dt, hash_value(r, i, salt));
}

class Buf {
 public:
  Buf(DType dt, int64_t n) : dt_(dt), n_(n), bytes_(n * dtype_size(dt) + 1) {}  // +1: never null
  void* data() { return bytes_.data(); }
  void* at(int64_t i) { return bytes_.data() + i * dtype_size(dt_); }
  int64_t size() const { return n_; }
  void set(int64_t i, int64_t v) {
    switch (dt_) {
      case DType::F32:
        store(i, static_cast<float>(v));
        break;
      case DType::BF16:
        store(i, static_cast<uint16_t>(v));
        break;
      case DType::I32:
        store(i, static_cast<int32_t>(v));
        break;
      case DType::I64:
      case DType::F64:
        store(i, v);
        break;
    }
  }
  int64_t get(int64_t i) const {
    switch (dt_) {
      case DType::F32:
        return static_cast<int64_t>(load<float>(i));
      case DType::BF16:
        return load<uint16_t>(i);
      case DType::I32:
        return load<int32_t>(i);
      case DType::I64:
      case DType::F64:
        return load<int64_t>(i);
    }
    return 0;
  }
  // Fill with rank r's data; salt distinguishes the buffers of one test.
  void fill(int r, int salt) {
    for (int64_t i = 0; i < n_; ++i) set(i, value(dt_, r, i, salt));
  }

 private:
  template <typename T>
  void store(int64_t i, T v) {
    std::memcpy(at(i), &v, sizeof v);
  }
  template <typename T>
  T load(int64_t i) const {
    T v;
    std::memcpy(&v, bytes_.data() + i * sizeof(T), sizeof v);
    return v;
  }
  DType dt_;
  int64_t n_;
  std::vector<unsigned char> bytes_;
};

// Exact comparison of buf[0, n) with want(i); reports the first mismatches only, so a wrong
// 1M-element buffer does not flood the log.
template <typename Want>
void expect_buf(const Buf& buf, int64_t n, Want&& want, const std::string& what) {
  int64_t wrong = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t w = want(i);
    if (buf.get(i) != w && ++wrong <= 3) {
      ADD_FAILURE() << what << ": element " << i << " is " << buf.get(i) << ", want " << w;
    }
  }
  EXPECT_EQ(wrong, 0) << what;
}

const std::vector<int64_t> kSizes = {0, 1, 7, 1000, 1 << 20};
constexpr int64_t kSmall = 1000;
const std::vector<DType> kAllTypes = {DType::F32, DType::BF16, DType::I32, DType::I64};
const std::vector<DType> kSumTypes = {DType::F32, DType::I32, DType::I64};

// The big size (1M elements: rendezvous and segmented algorithms) runs in f32 only, on the world
// communicator only (`big`), with one non-zero root and no in-place variant: the dtypes, roots and
// buffer aliasing are covered by the small sizes, and at 8 ranks on 2 cores every big repeat costs
// seconds of CI time.
bool skip_size(DType dt, int64_t n, bool big) {
  return n > kSmall && (dt != DType::F32 || !big);
}
bool skip_variant(int64_t n, int root, int D, bool in_place) {
  return n > kSmall && (in_place || root != D - 1);
}

std::string label(std::string_view op, DType dt, int64_t n, bool nb, int root = -1) {
  std::string s = fmt::format("{}{} {} n={}", nb ? "i" : "", op, dtype_name(dt), n);
  if (root >= 0) s += fmt::format(" root={}", root);
  return s;
}

// ---- byte accounting: the convention of communicator.h, restated independently ----

struct Traffic {
  int64_t sent, received;
};

void expect_traffic(const CommStats& d, CommOp op, Traffic want, const std::string& what) {
  for (int k = 0; k < kNumCommOps; ++k) {
    const CommOp o = static_cast<CommOp>(k);
    if (o == op) continue;
    EXPECT_EQ(d[o].calls, 0) << what << ": unexpected " << comm_op_name(o);
  }
  EXPECT_EQ(d[op].calls, 1) << what;
  EXPECT_EQ(d[op].bytes_sent, want.sent) << what;
  EXPECT_EQ(d[op].bytes_received, want.received) << what;
}

Traffic bcast_traffic(int D, bool root, int64_t B) {
  if (D == 1) return {0, 0};
  return root ? Traffic{B, 0} : Traffic{0, B};
}
Traffic reduce_traffic(int D, bool root, int64_t B) {
  if (D == 1) return {0, 0};
  return root ? Traffic{0, B} : Traffic{B, 0};
}
Traffic ring_traffic(int D, int64_t B) {
  return {(D - 1) * B, (D - 1) * B};
}
Traffic all_reduce_traffic(int D, int64_t B) {
  return {2 * (D - 1) * B / D, 2 * (D - 1) * B / D};
}

// Run op either blocking or as its non-blocking twin. For the twin, the counters must already be
// right when the op has only been started, and completion uses test() polling or wait().
template <typename Blocking, typename Start>
CommStats run_op(Communicator& c, bool nonblocking, Blocking&& blocking, Start&& start) {
  const CommStats before = c.stats();
  if (!nonblocking) {
    blocking();
    return c.stats() - before;
  }
  RequestPtr req = start();
  const CommStats at_start = c.stats() - before;
  if (c.rank() % 2 == 0) {
    req->wait();
  } else {
    while (!req->test()) {
    }
  }
  EXPECT_TRUE(req->test());  // stays complete
  return at_start;
}

// ---- ops on a given communicator; `id(r)` maps its ranks to the data owner's identity ----

void check_broadcast(Communicator& c, bool nb, int salt, bool big) {
  const int D = c.size(), me = c.rank();
  for (DType dt : kAllTypes) {
    for (int64_t n : kSizes) {
      if (skip_size(dt, n, big)) continue;
      for (int root = 0; root < D; ++root) {
        if (skip_variant(n, root, D, false)) continue;
        const std::string what = label("broadcast", dt, n, nb, root);
        Buf b(dt, n);
        if (me == root) b.fill(root, salt);
        const CommStats d = run_op(
            c, nb, [&] { c.broadcast(b.data(), n, dt, root); },
            [&] { return c.ibroadcast(b.data(), n, dt, root); });
        expect_buf(
            b, n, [&](int64_t i) { return value(dt, root, i, salt); }, what);
        expect_traffic(d, CommOp::Broadcast, bcast_traffic(D, me == root, n * dtype_size(dt)),
                       what);
      }
    }
  }
}

void check_all_gather(Communicator& c, bool nb, int salt, bool big) {
  const int D = c.size(), me = c.rank();
  for (DType dt : kAllTypes) {
    for (int64_t n : kSizes) {
      if (skip_size(dt, n, big)) continue;
      for (bool in_place : {false, true}) {
        if (skip_variant(n, D - 1, D, in_place)) continue;
        const std::string what = label("all_gather", dt, n, nb) + (in_place ? " in-place" : "");
        Buf send(dt, n), recv(dt, n * D);
        send.fill(me, salt);
        const void* s = send.data();
        if (in_place) {
          std::memcpy(recv.at(me * n), send.data(), n * dtype_size(dt));
          s = recv.at(me * n);
        }
        const CommStats d = run_op(
            c, nb, [&] { c.all_gather(s, recv.data(), n, dt); },
            [&] { return c.iall_gather(s, recv.data(), n, dt); });
        expect_buf(
            recv, n * D, [&](int64_t i) { return value(dt, static_cast<int>(i / n), i % n, salt); },
            what);
        expect_traffic(d, CommOp::AllGather, ring_traffic(D, n * dtype_size(dt)), what);
      }
    }
  }
}

void check_reduce_scatter(Communicator& c, bool nb, int salt, bool big) {
  const int D = c.size(), me = c.rank();
  for (DType dt : kSumTypes) {
    for (int64_t n : kSizes) {
      if (skip_size(dt, n, big)) continue;
      for (bool in_place : {false, true}) {
        if (skip_variant(n, D - 1, D, in_place)) continue;
        const std::string what = label("reduce_scatter", dt, n, nb) + (in_place ? " in-place" : "");
        Buf send(dt, n * D), out(dt, n);
        send.fill(me, salt);
        void* r = in_place ? send.data() : out.data();
        const CommStats d = run_op(
            c, nb, [&] { c.reduce_scatter(send.data(), r, n, dt); },
            [&] { return c.ireduce_scatter(send.data(), r, n, dt); });
        // Block `me` of everybody's send buffer, summed; in place the result is at the start.
        Buf& result = in_place ? send : out;
        expect_buf(
            result, n,
            [&](int64_t i) {
              int64_t sum = 0;
              for (int q = 0; q < D; ++q) sum += value(dt, q, me * n + i, salt);
              return sum;
            },
            what);
        expect_traffic(d, CommOp::ReduceScatter, ring_traffic(D, n * dtype_size(dt)), what);
      }
    }
  }
}

void check_all_reduce(Communicator& c, bool nb, int salt, bool big) {
  const int D = c.size(), me = c.rank();
  for (DType dt : kSumTypes) {
    for (int64_t n : kSizes) {
      if (skip_size(dt, n, big)) continue;
      const std::string what = label("all_reduce", dt, n, nb);
      Buf b(dt, n);
      b.fill(me, salt);
      const CommStats d = run_op(
          c, nb, [&] { c.all_reduce(b.data(), n, dt); },
          [&] { return c.iall_reduce(b.data(), n, dt); });
      expect_buf(
          b, n,
          [&](int64_t i) {
            int64_t sum = 0;
            for (int q = 0; q < D; ++q) sum += value(dt, q, i, salt);
            return sum;
          },
          what);
      expect_traffic(d, CommOp::AllReduce, all_reduce_traffic(D, n * dtype_size(dt)), what);
    }
  }
}

void check_reduce(Communicator& c, bool nb, int salt, bool big) {
  const int D = c.size(), me = c.rank();
  for (DType dt : kSumTypes) {
    for (int64_t n : kSizes) {
      if (skip_size(dt, n, big)) continue;
      for (int root = 0; root < D; ++root) {
        for (bool in_place : {false, true}) {
          if (skip_variant(n, root, D, in_place)) continue;
          const std::string what = label("reduce", dt, n, nb, root) + (in_place ? " in-place" : "");
          Buf send(dt, n), out(dt, n);
          send.fill(me, salt);
          // recv may be null off the root; in place (send == recv) on the root.
          void* r = me != root ? nullptr : in_place ? send.data() : out.data();
          const CommStats d = run_op(
              c, nb, [&] { c.reduce(send.data(), r, n, dt, root); },
              [&] { return c.ireduce(send.data(), r, n, dt, root); });
          if (me == root) {
            Buf& result = in_place ? send : out;
            expect_buf(
                result, n,
                [&](int64_t i) {
                  int64_t sum = 0;
                  for (int q = 0; q < D; ++q) sum += value(dt, q, i, salt);
                  return sum;
                },
                what);
          } else {
            expect_buf(
                send, n, [&](int64_t i) { return value(dt, me, i, salt); },
                what + " (send untouched)");
          }
          expect_traffic(d, CommOp::Reduce, reduce_traffic(D, me == root, n * dtype_size(dt)),
                         what);
        }
      }
    }
  }
}

// Ring exchange: send to rank+k, receive from rank-k, for every shift k (k = 0 is a self-send,
// which only the non-blocking pair can do without deadlock). Blocking: the shift splits the ranks
// into gcd(D, k) cycles; the smallest rank of each cycle (rank < gcd) sends first, every other
// rank receives first, so each cycle drains in order even for rendezvous-sized messages.
void check_send_recv(Communicator& c, bool nb, int salt, bool big) {
  const int D = c.size(), me = c.rank();
  for (DType dt : kAllTypes) {
    for (int64_t n : kSizes) {
      if (skip_size(dt, n, big)) continue;
      // Big messages: one shift (k = 1, and the self-send k = 0 when non-blocking).
      const int k_end = n > kSmall ? std::min(D, 2) : D;
      for (int k = nb ? 0 : 1; k < k_end; ++k) {
        const int dst = (me + k) % D, src = (me - k + D) % D;
        const std::string what = label("send/recv", dt, n, nb) + fmt::format(" shift={}", k);
        Buf out(dt, n), in(dt, n);
        out.fill(me, salt + k);
        const CommStats before = c.stats();
        if (nb) {
          RequestPtr r = c.irecv(in.data(), n, dt, src);
          RequestPtr s = c.isend(out.data(), n, dt, dst);
          const CommStats at_start = c.stats() - before;
          EXPECT_EQ(at_start[CommOp::Send].bytes_sent, static_cast<int64_t>(n * dtype_size(dt)));
          EXPECT_EQ(at_start[CommOp::Recv].bytes_received,
                    static_cast<int64_t>(n * dtype_size(dt)));
          s->wait();
          r->wait();
        } else if (me < std::gcd(D, k)) {
          c.send(out.data(), n, dt, dst);
          c.recv(in.data(), n, dt, src);
        } else {
          c.recv(in.data(), n, dt, src);
          c.send(out.data(), n, dt, dst);
        }
        const CommStats d = c.stats() - before;
        expect_buf(
            in, n, [&](int64_t i) { return value(dt, src, i, salt + k); }, what);
        const int64_t B = n * dtype_size(dt);
        EXPECT_EQ(d[CommOp::Send].calls, 1) << what;
        EXPECT_EQ(d[CommOp::Recv].calls, 1) << what;
        EXPECT_EQ(d[CommOp::Send].bytes_sent, B) << what;
        EXPECT_EQ(d[CommOp::Send].bytes_received, 0) << what;
        EXPECT_EQ(d[CommOp::Recv].bytes_sent, 0) << what;
        EXPECT_EQ(d[CommOp::Recv].bytes_received, B) << what;
        EXPECT_EQ(d.total_sent(), B) << what;
        EXPECT_EQ(d.total_received(), B) << what;
      }
    }
  }
}

// Ring steps as grouped pairs: send to rank+k, receive from rank-k, for every shift k (k = 0 is
// a self-pair), blocking (sendrecv) and non-blocking (isendrecv). A pair needs no ordering trick:
// both halves are posted together. Counted as one send and one recv.
void check_sendrecv(Communicator& c, bool nb, int salt, bool big) {
  const int D = c.size(), me = c.rank();
  for (DType dt : kAllTypes) {
    for (int64_t n : kSizes) {
      if (skip_size(dt, n, big)) continue;
      const int k_end = n > kSmall ? std::min(D, 2) : D;
      for (int k = 0; k < k_end; ++k) {
        const int dst = (me + k) % D, src = (me - k + D) % D;
        const std::string what = label("sendrecv", dt, n, nb) + fmt::format(" shift={}", k);
        Buf out(dt, n), in(dt, n);
        out.fill(me, salt + k);
        const CommStats d = run_op(
            c, nb, [&] { c.sendrecv(out.data(), n, dt, dst, in.data(), n, src); },
            [&] { return c.isendrecv(out.data(), n, dt, dst, in.data(), n, src); });
        expect_buf(
            in, n, [&](int64_t i) { return value(dt, src, i, salt + k); }, what);
        const int64_t B = n * dtype_size(dt);
        EXPECT_EQ(d[CommOp::Send].calls, 1) << what;
        EXPECT_EQ(d[CommOp::Recv].calls, 1) << what;
        EXPECT_EQ(d[CommOp::Send].bytes_sent, B) << what;
        EXPECT_EQ(d[CommOp::Send].bytes_received, 0) << what;
        EXPECT_EQ(d[CommOp::Recv].bytes_sent, 0) << what;
        EXPECT_EQ(d[CommOp::Recv].bytes_received, B) << what;
        EXPECT_EQ(d.total_sent(), B) << what;
        EXPECT_EQ(d.total_received(), B) << what;
      }
    }
  }
}

void check_all_ops(Communicator& c, int salt, bool big) {
  for (bool nb : {false, true}) {
    check_broadcast(c, nb, salt, big);
    check_all_gather(c, nb, salt + 1, big);
    check_reduce_scatter(c, nb, salt + 2, big);
    check_all_reduce(c, nb, salt + 3, big);
    check_reduce(c, nb, salt + 4, big);
    check_send_recv(c, nb, salt + 5, big);
    check_sendrecv(c, nb, salt + 6, big);
  }
}

TEST(Collectives, EveryOpOnWorld) {
  Communicator& w = world();
  check_all_ops(w, 0, /*big=*/true);
  const CommStats before = w.stats();
  w.barrier();
  expect_traffic(w.stats() - before, CommOp::Barrier, {0, 0}, "barrier");
}

TEST(Collectives, EveryOpInParityAndPairGroups) {
  Communicator& w = world();
  const int me = w.rank(), D = w.size();
  // color = rank % 2: ranks of one parity, in rank order.
  auto parity = w.split(me % 2, me);
  EXPECT_EQ(parity->rank(), me / 2);
  EXPECT_EQ(parity->size(), (D - me % 2 + 1) / 2);
  // color = rank / 2: pairs {0,1}, {2,3}, ...; the key reverses the order inside a pair.
  auto pairs = w.split(me / 2, -me);
  const int pair_size = std::min(2, D - 2 * (me / 2));
  EXPECT_EQ(pairs->size(), pair_size);
  EXPECT_EQ(pairs->rank(), pair_size == 2 ? 1 - me % 2 : 0);

  const CommStats world_before = w.stats();
  check_all_ops(*parity, 10, /*big=*/false);
  check_all_ops(*pairs, 20, /*big=*/false);
  // Sub-group traffic is counted on the sub-communicators, not on the world.
  EXPECT_EQ((w.stats() - world_before).total_sent(), 0);

  // A result that depends on who is in the group: the sum of the members' world ranks.
  int64_t s = me;
  parity->all_reduce(&s, 1, DType::I64);
  int64_t want = 0;
  for (int r = me % 2; r < D; r += 2) want += r;
  EXPECT_EQ(s, want);
  std::vector<int32_t> members(pairs->size());
  const int32_t mine = me;
  pairs->all_gather(&mine, members.data(), 1, DType::I32);
  if (pair_size == 2) {
    EXPECT_EQ(members, (std::vector<int32_t>{2 * (me / 2) + 1, 2 * (me / 2)}));
  } else {
    EXPECT_EQ(members, std::vector<int32_t>{me});
  }
}

// A TP x SP grid as the TP x SP layout uses it: T-groups of consecutive ranks, Sigma-groups of
// ranks with the same position in their T-group. Reduce-scatter in T, then all-gather in Sigma,
// checked against the formula on world ranks.
TEST(Collectives, TwoDimensionalGrid) {
  Communicator& w = world();
  const int me = w.rank(), D = w.size();
  const int T = D % 2 == 0 ? 2 : 1, S = D / T;
  auto tp = w.split(me / T, me % T);
  auto sp = w.split(me % T, me / T);
  ASSERT_EQ(tp->size(), T);
  ASSERT_EQ(sp->size(), S);
  EXPECT_EQ(tp->rank(), me % T);
  EXPECT_EQ(sp->rank(), me / T);

  const int64_t m = 37;  // elements per block
  Buf x(DType::I64, T * m), part(DType::I64, m), all(DType::I64, S * m);
  x.fill(me, 99);
  tp->reduce_scatter(x.data(), part.data(), m, DType::I64);
  sp->all_gather(part.data(), all.data(), m, DType::I64);
  // all[s*m + i] = sum over the T-group of Sigma-rank s of x[t_me*m + i].
  const int t_me = me % T;
  expect_buf(
      all, S * m,
      [&](int64_t i) {
        const int64_t s = i / m, j = i % m;
        int64_t sum = 0;
        for (int t = 0; t < T; ++t) sum += value(DType::I64, s * T + t, t_me * m + j, 99);
        return sum;
      },
      "tp reduce_scatter + sp all_gather");
  const int64_t B = m * 8;
  EXPECT_EQ(tp->stats()[CommOp::ReduceScatter].bytes_sent, (T - 1) * B);
  EXPECT_EQ(sp->stats()[CommOp::AllGather].bytes_received, (S - 1) * B);

  // Collectives on both axes in flight at once (non-blocking), as TSP/TP x SP overlap them.
  Buf a(DType::F32, 1000), g(DType::F32, 1000 * S);
  Buf gin(DType::F32, 1000);
  a.fill(me, 7);
  gin.fill(me, 8);
  RequestPtr ra = tp->iall_reduce(a.data(), 1000, DType::F32);
  RequestPtr rg = sp->iall_gather(gin.data(), g.data(), 1000, DType::F32);
  rg->wait();
  ra->wait();
  expect_buf(
      a, 1000,
      [&](int64_t i) {
        int64_t sum = 0;
        for (int t = 0; t < T; ++t) sum += value(DType::F32, (me / T) * T + t, i, 7);
        return sum;
      },
      "tp iall_reduce");
  expect_buf(
      g, 1000 * S,
      [&](int64_t i) {
        return value(DType::F32, static_cast<int>(i / 1000) * T + me % T, i % 1000, 8);
      },
      "sp iall_gather");
}

TEST(Collectives, ManyRequestsInFlightCompleteInAnyWaitOrder) {
  Communicator& w = world();
  const int me = w.rank(), D = w.size();
  const int64_t n = 5000;  // above the 4 KiB eager limit
  Buf b(DType::F32, n), r(DType::F32, n), g(DType::F32, n * D), in(DType::F32, n);
  if (me == 0) b.fill(0, 1);
  r.fill(me, 2);
  in.fill(me, 3);
  std::vector<RequestPtr> reqs;
  reqs.push_back(w.ibroadcast(b.data(), n, DType::F32, 0));
  reqs.push_back(w.iall_reduce(r.data(), n, DType::F32));
  reqs.push_back(w.iall_gather(in.data(), g.data(), n, DType::F32));
  for (auto it = reqs.rbegin(); it != reqs.rend(); ++it) (*it)->wait();
  EXPECT_EQ(pending_requests(w), 0);
  expect_buf(
      b, n, [&](int64_t i) { return value(DType::F32, 0, i, 1); }, "ibroadcast");
  expect_buf(
      r, n,
      [&](int64_t i) {
        int64_t sum = 0;
        for (int q = 0; q < D; ++q) sum += value(DType::F32, q, i, 2);
        return sum;
      },
      "iall_reduce");
  expect_buf(
      g, n * D, [&](int64_t i) { return value(DType::F32, static_cast<int>(i / n), i % n, 3); },
      "iall_gather");
}

TEST(Collectives, RequestDestructorWaits) {
  Communicator& w = world();
  const int me = w.rank(), D = w.size();
  const int64_t n = 100000;  // 400 KB: rendezvous protocol, not eager
  Buf out(DType::F32, n), in(DType::F32, n);
  out.fill(me, 4);
  {
    RequestPtr r = w.irecv(in.data(), n, DType::F32, (me - 1 + D) % D);
    RequestPtr s = w.isend(out.data(), n, DType::F32, (me + 1) % D);
    // Both handles go out of scope without wait(): their destructors must complete them.
  }
  EXPECT_EQ(pending_requests(w), 0);
  expect_buf(
      in, n, [&](int64_t i) { return value(DType::F32, (me - 1 + D) % D, i, 4); },
      "destructor-completed irecv");
}

TEST(Collectives, StatsArithmeticAndBlockedTime) {
  Communicator& w = world();
  w.reset_stats();
  EXPECT_EQ(w.stats().total_sent(), 0);
  EXPECT_EQ(w.stats().blocked_seconds, 0);
  std::vector<float> v(1000, 1.0f);
  w.all_reduce(v.data(), 1000, DType::F32);
  w.barrier();
  const CommStats s = w.stats();
  EXPECT_GT(s.blocked_seconds, 0);
  EXPECT_EQ(s[CommOp::AllReduce].calls, 1);
  EXPECT_EQ(s[CommOp::Barrier].calls, 1);
  EXPECT_EQ(s.total_sent(), 2 * (w.size() - 1) * 4000 / w.size());
  CommStats twice = s;
  twice += s;
  EXPECT_EQ(twice.total_sent(), 2 * s.total_sent());
  EXPECT_EQ((twice - s).total_received(), s.total_received());
  EXPECT_EQ((twice - s)[CommOp::AllReduce].calls, 1);
}

// Two rings over the same pairs of ranks, as tsp's backward ring runs them: weight shards and
// gradient accumulators both travel to rank-1, with different sizes, and a forward ring travels
// to rank+1 meanwhile. There are no tags: between two ranks, pairs match in posting order, and
// every rank posts "weights k, gradients k, forward k" in that order. Sizes straddle the eager
// limit (4 KiB) so both protocols are covered; a mismatch would be a size error or wrong data.
TEST(SendRecv, InterleavedRingsMatchInPostingOrder) {
  Communicator& w = world();
  const int me = w.rank(), D = w.size();
  const int left = (me - 1 + D) % D, right = (me + 1) % D;
  for (int64_t nw : {int64_t{3}, int64_t{3000}}) {
    const int64_t ng = nw + 5, nf = nw + 11;
    constexpr int kSteps = 3;
    std::vector<Buf> w_out, w_in, g_out, g_in, f_out, f_in;
    for (int k = 0; k < kSteps; ++k) {
      w_out.emplace_back(DType::F32, nw), w_in.emplace_back(DType::F32, nw);
      g_out.emplace_back(DType::I64, ng), g_in.emplace_back(DType::I64, ng);
      f_out.emplace_back(DType::I32, nf), f_in.emplace_back(DType::I32, nf);
      w_out[k].fill(me, 100 + k), g_out[k].fill(me, 200 + k), f_out[k].fill(me, 300 + k);
    }
    const CommStats before = w.stats();
    std::vector<RequestPtr> reqs;
    for (int k = 0; k < kSteps; ++k) {
      reqs.push_back(w.isendrecv(w_out[k].data(), nw, DType::F32, left, w_in[k].data(), nw, right));
      reqs.push_back(w.isendrecv(g_out[k].data(), ng, DType::I64, left, g_in[k].data(), ng, right));
      reqs.push_back(w.isendrecv(f_out[k].data(), nf, DType::I32, right, f_in[k].data(), nf, left));
    }
    for (auto it = reqs.rbegin(); it != reqs.rend(); ++it) (*it)->wait();  // any wait order
    const CommStats d = w.stats() - before;
    for (int k = 0; k < kSteps; ++k) {
      const std::string what = fmt::format("nw={} step {}", nw, k);
      expect_buf(
          w_in[k], nw, [&](int64_t i) { return value(DType::F32, right, i, 100 + k); },
          what + " weights");
      expect_buf(
          g_in[k], ng, [&](int64_t i) { return value(DType::I64, right, i, 200 + k); },
          what + " gradients");
      expect_buf(
          f_in[k], nf, [&](int64_t i) { return value(DType::I32, left, i, 300 + k); },
          what + " forward");
    }
    const int64_t bytes = kSteps * (nw * 4 + ng * 8 + nf * 4);
    EXPECT_EQ(d[CommOp::Send].calls, 3 * kSteps);
    EXPECT_EQ(d[CommOp::Recv].calls, 3 * kSteps);
    EXPECT_EQ(d.total_sent(), bytes);
    EXPECT_EQ(d.total_received(), bytes);
  }
}

// On the CPU join_compute() is wait(): the data are there when it returns. The compute queue is
// only recorded (the host is the queue).
TEST(SendRecv, JoinComputeCompletesOnTheCpu) {
  Communicator& w = world();
  const int me = w.rank(), D = w.size();
  EXPECT_EQ(w.compute_queue().handle, nullptr);
  int marker = 0;
  w.set_compute_queue(ComputeQueue{&marker});
  EXPECT_EQ(w.compute_queue().handle, &marker);
  const int64_t n = 100000;  // rendezvous-sized: it cannot complete at posting time
  Buf out(DType::F32, n), in(DType::F32, n);
  out.fill(me, 5);
  RequestPtr r =
      w.isendrecv(out.data(), n, DType::F32, (me + 1) % D, in.data(), n, (me - 1 + D) % D);
  r->join_compute();
  EXPECT_TRUE(r->test());
  expect_buf(
      in, n, [&](int64_t i) { return value(DType::F32, (me - 1 + D) % D, i, 5); },
      "isendrecv after join_compute");
  w.set_compute_queue(ComputeQueue{});
  EXPECT_EQ(pending_requests(w), 0);
}

// ---- the control API: values, and its traffic kept out of the data stats ----

TEST(Control, ValuesAgreeOnEveryRank) {
  Communicator& w = world();
  const int me = w.rank(), D = w.size();
  EXPECT_EQ(w.agree_max(int64_t{10} * me - 3), int64_t{10} * (D - 1) - 3);
  EXPECT_EQ(w.agree_min(int64_t{10} * me - 3), -3);
  EXPECT_EQ(w.max_host(0.5 * me), 0.5 * (D - 1));
  EXPECT_FALSE(w.any_true(false));
  EXPECT_TRUE(w.any_true(me == D - 1));
  EXPECT_TRUE(w.any_true(true));

  // sum_host adds in rank order: bit-identical on every rank and equal to the sequential sum.
  // The values make the order matter in double from 3 ranks on: the ulp of 1e16 is 2, so
  // 1e16 + 1 rounds (to even) back to 1e16 each time, while 1 + 1 + ... + 1e16 keeps the ones.
  const double mine = me == 0 ? 1e16 : 1.0;
  double want = 0;
  for (int r = 0; r < D; ++r) want += r == 0 ? 1e16 : 1.0;
  const double sum = w.sum_host(mine);
  EXPECT_EQ(sum, want);
  const std::vector<double> sums = w.gather_host(std::span(&sum, 1));
  for (double s : sums) EXPECT_EQ(std::memcmp(&s, &sum, sizeof s), 0);

  // gather_host: every rank's values in rank order.
  const std::vector<int64_t> mine3 = {me, 2 * me, -me};
  const std::vector<int64_t> all = w.gather_host(mine3);
  ASSERT_EQ(all.size(), static_cast<size_t>(3 * D));
  for (int r = 0; r < D; ++r) {
    EXPECT_EQ(all[3 * r], r);
    EXPECT_EQ(all[3 * r + 1], 2 * r);
    EXPECT_EQ(all[3 * r + 2], -r);
  }
  EXPECT_EQ(w.gather_host(int64_t{me + 7}).at(D - 1), D - 1 + 7);

  // broadcast_host: the root's value everywhere, for an integer and a string (e.g. an error
  // message found on one rank only).
  const int root = D - 1;
  EXPECT_EQ(w.broadcast_host(me == root ? int64_t{-42} : int64_t{me}, root), -42);
  const std::string text = me == root ? "token id 99 is outside the vocabulary" : "";
  EXPECT_EQ(w.broadcast_host(text, root), "token id 99 is outside the vocabulary");
  EXPECT_EQ(w.broadcast_host(std::string(), 0), "");
}

TEST(Control, TrafficIsCountedApartFromTheDataPath) {
  Communicator& w = world();
  const int me = w.rank(), D = w.size();
  const CommStats before = w.stats();
  w.check_same(7, "a value");
  w.agree_max(int64_t{me});
  w.agree_min(int64_t{me});
  w.any_true(false);
  w.sum_host(1.0);
  w.max_host(1.0);
  const std::vector<int64_t> two = {1, 2};
  w.gather_host(two);                        // 16 bytes per rank
  w.broadcast_host(int64_t{1}, 0);           // 8 bytes from rank 0
  w.broadcast_host(std::string(5, 'x'), 0);  // its length (8 bytes), then 5 bytes
  const CommStats d = w.stats() - before;
  // Nothing in the data stats the traffic formulas compare with.
  for (int k = 0; k < kNumCommOps; ++k) {
    EXPECT_EQ(d.ops[k].calls, 0) << comm_op_name(static_cast<CommOp>(k));
  }
  EXPECT_EQ(d.total_sent(), 0);
  EXPECT_EQ(d.total_received(), 0);
  // The control counter, with the data path's conventions: a gather of b bytes per rank counts
  // (D-1)·b each way; a broadcast of b bytes counts b sent on the root, b received elsewhere.
  EXPECT_EQ(d.control.calls, 7 + 3);
  const int64_t gathered = (D - 1) * (6 * 8 + 16);
  const int64_t broadcast = D == 1 ? 0 : 8 + 8 + 5;
  EXPECT_EQ(d.control.bytes_sent, gathered + (me == 0 ? broadcast : 0));
  EXPECT_EQ(d.control.bytes_received, gathered + (me == 0 ? 0 : broadcast));
  // Snapshot arithmetic carries the control counter along.
  CommStats twice = d;
  twice += d;
  EXPECT_EQ((twice - d).control.calls, d.control.calls);
  EXPECT_EQ(twice.control.bytes_sent, 2 * d.control.bytes_sent);
}

// ---- check_same and mismatched sizes ----

TEST(CheckSame, AgreeingValuesPass) {
  Communicator& w = world();
  EXPECT_NO_THROW(w.check_same(4096, "sequence length"));
  EXPECT_NO_THROW(w.check_same(-3, "a negative value"));
  // check_same is control traffic: not in the data counts (it would break exact traffic
  // formulas), one call on the control counter.
  const CommStats before = w.stats();
  w.check_same(1, "x");
  EXPECT_EQ((w.stats() - before).total_sent(), 0);
  EXPECT_EQ((w.stats() - before).control.calls, 1);
}

TEST(CheckSame, DisagreementThrowsOnEveryRankNamingTheValues) {
  Communicator& w = world();
  const int me = w.rank(), D = w.size();
  if (D == 1) {
    // One rank always agrees with itself.
    EXPECT_NO_THROW(w.check_same(me == 0 ? 1 : 2, "tokens"));
    return;
  }
  const int64_t mine = me == D - 1 ? 2048 : 4096;
  std::string message;
  try {
    w.check_same(mine, "tokens per rank");
    ADD_FAILURE() << "check_same did not throw on rank " << me;
  } catch (const Error& e) {
    message = e.message();
  }
  EXPECT_NE(message.find("tokens per rank disagree across ranks"), std::string::npos) << message;
  EXPECT_NE(message.find(fmt::format("rank {} has 2048", D - 1)), std::string::npos) << message;
  const std::string others =
      D == 2 ? "rank 0 has 4096"
             : fmt::format("ranks 0,{} have 4096", fmt::join(
                                                       [&] {
                                                         std::vector<int> r;
                                                         for (int q = 1; q < D - 1; ++q)
                                                           r.push_back(q);
                                                         return r;
                                                       }(),
                                                       ","));
  EXPECT_NE(message.find(others), std::string::npos) << message;
  // The communicator stays usable after the error.
  int32_t one = 1;
  w.all_reduce(&one, 1, DType::I32);
  EXPECT_EQ(one, D);
}

TEST(CheckSame, MismatchedShapeRaisesClearError) {
  Communicator& w = world();
  const int me = w.rank(), D = w.size();
  // Rank 0 was given a different sequence length: its activation shape differs.
  const Shape shape = {me == 0 && D > 1 ? 96 : 128, 64};
  if (D == 1) {
    EXPECT_NO_THROW(w.check_same(shape_numel(shape), "activation numel"));
    return;
  }
  try {
    w.check_same(shape_numel(shape), "activation numel of [N_local, h]");
    ADD_FAILURE() << "mismatched shapes were accepted on rank " << me;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.message()).find("rank 0 has 6144"), std::string::npos) << e.what();
    EXPECT_EQ(e.rank(), me);  // the error names the rank that raised it
  }
}

TEST(PointToPoint, MismatchedMessageSizesRaiseClearErrors) {
  Communicator& w = world();
  const int me = w.rank(), D = w.size();
  if (D == 1) {
    // Self-messages: shorter than expected, via irecv/isend.
    std::vector<float> out(7, 1.0f), in(8, 0.0f);
    RequestPtr r = w.irecv(in.data(), 8, DType::F32, 0);
    RequestPtr s = w.isend(out.data(), 7, DType::F32, 0);
    s->wait();
    EXPECT_THROW(r->wait(), Error);
    return;
  }
  std::vector<float> buf(16, 3.0f);
  if (me == 0) {
    w.send(buf.data(), 7, DType::F32, 1);  // receiver expects 8
    w.send(buf.data(), 9, DType::F32, 1);  // receiver has room for 8 only
    w.send(buf.data(), 5, DType::F32, 1);  // non-blocking receiver expects 6
  } else if (me == 1) {
    try {
      w.recv(buf.data(), 8, DType::F32, 0);
      ADD_FAILURE() << "short message accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.message()).find("got 7 elements but 8 were expected"),
                std::string::npos)
          << e.what();
    }
    try {
      w.recv(buf.data(), 8, DType::F32, 0);
      ADD_FAILURE() << "long message accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.message()).find("Recv"), std::string::npos) << e.what();
    }
    RequestPtr r = w.irecv(buf.data(), 6, DType::F32, 0);
    EXPECT_THROW(r->wait(), Error);
  }
  w.barrier();
}

TEST(Errors, InvalidArgumentsAreRejectedOnEveryRank) {
  Communicator& w = world();
  const int D = w.size(), me = w.rank();
  const CommStats before = w.stats();
  // Room for every aliasing case below (nothing is ever transferred: each call is rejected).
  std::vector<float> room(4 * D + 8);
  float* f = room.data();
  uint16_t h[4] = {};
  auto message_of = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const Error& e) {
      return e.message();
    }
    return "(no error)";
  };
  struct Case {
    std::string name, want;  // want: a part of the message
    std::function<void()> call;
  };
  const DType F = DType::F32;
  const std::vector<Case> cases = {
      // bf16 reductions: rejected before any communication, on every rank alike.
      {"all_reduce bf16", "all_reduce of bf16", [&] { w.all_reduce(h, 4, DType::BF16); }},
      {"reduce bf16", "reduce of bf16", [&] { w.reduce(h, h, 4, DType::BF16, 0); }},
      {"ireduce_scatter bf16", "reduce_scatter of bf16",
       [&] { w.ireduce_scatter(h, h, 1, DType::BF16); }},
      {"iall_reduce bf16", "bf16", [&] { w.iall_reduce(h, 4, DType::BF16); }},
      // Negative counts, per op.
      {"broadcast count", ">= 0", [&] { w.broadcast(f, -1, F, 0); }},
      {"all_gather count", "count_per_rank must be >= 0", [&] { w.all_gather(f, f, -2, F); }},
      {"reduce_scatter count", "count_out must be >= 0", [&] { w.reduce_scatter(f, f, -1, F); }},
      {"all_reduce count", ">= 0", [&] { w.all_reduce(f, -1, F); }},
      {"ireduce count", ">= 0", [&] { w.ireduce(f, f, -1, F, 0); }},
      {"send count", "send: count must be >= 0", [&] { w.send(f, -1, F, 0); }},
      {"irecv count", "recv: count must be >= 0", [&] { w.irecv(f, -1, F, 0); }},
      {"sendrecv send count", "send: count must be >= 0",
       [&] { w.sendrecv(f, -1, F, me, f + 4, 4, me); }},
      {"isendrecv recv count", "recv: count must be >= 0",
       [&] { w.isendrecv(f, 4, F, me, f + 4, -1, me); }},
      // Counts beyond MPI's int; checked before the buffer is touched.
      {"broadcast INT_MAX", "exceeds INT_MAX", [&] { w.broadcast(f, int64_t{INT_MAX} + 1, F, 0); }},
      // Roots and peers out of range.
      {"broadcast root", "root", [&] { w.broadcast(f, 4, F, D); }},
      {"ibroadcast root", "broadcast: root -1", [&] { w.ibroadcast(f, 4, F, -1); }},
      {"reduce root", "reduce: root", [&] { w.reduce(f, f, 4, F, D); }},
      {"ireduce root", "root", [&] { w.ireduce(f, f, 4, F, -1); }},
      {"send peer", "peer rank", [&] { w.send(f, 4, F, D); }},
      {"irecv peer", "peer rank", [&] { w.irecv(f, 4, F, -1); }},
      {"isend peer", "send: peer rank -1", [&] { w.isend(f, 4, F, -1); }},
      {"recv peer", "recv: peer rank", [&] { w.recv(f, 4, F, D); }},
      {"sendrecv dst", "send: peer rank", [&] { w.sendrecv(f, 4, F, D, f + 4, 4, me); }},
      {"isendrecv src", "recv: peer rank", [&] { w.isendrecv(f, 4, F, me, f + 4, 4, -1); }},
      {"broadcast_host root", "broadcast_host: root", [&] { w.broadcast_host(int64_t{1}, D); }},
      // Null buffers with a count.
      {"broadcast null", "data buffer is null", [&] { w.broadcast(nullptr, 4, F, 0); }},
      {"all_gather send null", "send buffer is null", [&] { w.all_gather(nullptr, f, 1, F); }},
      {"iall_gather recv null", "recv buffer is null", [&] { w.iall_gather(f, nullptr, 1, F); }},
      {"reduce_scatter null", "send buffer is null", [&] { w.reduce_scatter(nullptr, f, 1, F); }},
      {"all_reduce null", "null", [&] { w.all_reduce(nullptr, 4, F); }},
      {"reduce send null", "send buffer is null", [&] { w.reduce(nullptr, f, 4, F, 0); }},
      {"send null", "send: data buffer is null", [&] { w.send(nullptr, 4, F, me); }},
      {"recv null", "recv: data buffer is null", [&] { w.recv(nullptr, 4, F, me); }},
      {"isendrecv recv null", "recv: data buffer is null",
       [&] { w.isendrecv(f, 4, F, me, nullptr, 4, me); }},
      // In-place rules: equal (in place) or disjoint, never a partial overlap.
      {"all_gather overlap", "not this rank's block",
       [&] { w.all_gather(f + 4 * me + 1, f, 4, F); }},
      {"reduce_scatter overlap", "overlap without being equal",
       [&] { w.reduce_scatter(f, f + 1, 2, F); }},
      {"reduce overlap", "overlap without being equal", [&] { w.ireduce(f, f + 1, 4, F, 0); }},
      {"sendrecv overlap", "sendrecv: the send buffer",
       [&] { w.sendrecv(f, 4, F, me, f + 2, 4, me); }},
      {"split color", "color", [&] { w.split(-1, 0); }},
  };
  for (const Case& c : cases) {
    const std::string message = message_of(c.call);
    EXPECT_NE(message.find(c.want), std::string::npos)
        << c.name << ": want a message with '" << c.want << "', got: " << message;
  }
  if (D > 1) {  // the gathered buffer would exceed INT_MAX elements
    EXPECT_NE(message_of([&] {
                w.all_gather(f, f, int64_t{INT_MAX} / D + 1, F);
              }).find("count_per_rank * size"),
              std::string::npos);
  }
  // No rejected call was counted (data or control), and the communicator still works.
  const CommStats d = w.stats() - before;
  for (const CommOpStats& op : d.ops) EXPECT_EQ(op.calls, 0);
  EXPECT_EQ(d.control.calls, 0);
  int32_t one = 1;
  w.all_reduce(&one, 1, DType::I32);
  EXPECT_EQ(one, D);
}

// Errors only the root can see (recv is ignored elsewhere) are raised on the root alone; on a
// communicator of one rank that is every rank, so each rank checks them on its own.
TEST(Errors, RootOnlyReduceErrorsOnASingleRankGroup) {
  Communicator& w = world();
  auto self = w.split(w.rank(), 0);
  ASSERT_EQ(self->size(), 1);
  float f[4] = {};
  EXPECT_THROW(self->reduce(f, nullptr, 4, DType::F32, 0), Error);
  EXPECT_THROW(self->ireduce(f, nullptr, 4, DType::F32, 0), Error);
  // The allowed forms: in place on the root, and separate buffers.
  float g[4] = {};
  EXPECT_NO_THROW(self->reduce(f, f, 4, DType::F32, 0));
  EXPECT_NO_THROW(self->reduce(f, g, 4, DType::F32, 0));
  EXPECT_EQ(self->stats()[CommOp::Reduce].calls, 2);
}

// ---- progress of large non-blocking transfers ----

// A compute chunk (~tens of microseconds) standing in for a GEMM tile.
float compute_chunk(std::vector<float>& work) {
  float acc = 0;
  for (float& x : work) {
    x = x * 0.999f + 0.001f;
    acc += x;
  }
  return acc;
}

struct Exchange {
  static constexpr int64_t kCount = 8 << 20;  // 32 MiB of f32, far above the 4 KiB eager limit
  Buf out{DType::F32, kCount}, in{DType::F32, kCount};
  int peer;
  RequestPtr r, s;
  Exchange(Communicator& w) {
    // Pairs (0,1), (2,3), ...; an unpaired last rank exchanges with itself.
    const int me = w.rank();
    peer = (me ^ 1) < w.size() ? me ^ 1 : me;
    out.fill(me, 42);
    r = w.irecv(in.data(), kCount, DType::F32, peer);
    s = w.isend(out.data(), kCount, DType::F32, peer);
  }
  void check() {
    EXPECT_TRUE(r->test());
    EXPECT_TRUE(s->test());
    expect_buf(
        in, kCount, [&](int64_t i) { return value(DType::F32, peer, i, 42); }, "32 MiB exchange");
  }
};

TEST(Progress, LargeTransferCompletesThroughProgressBetweenComputeChunks) {
  Communicator& w = world();
  Exchange x(w);
  std::vector<float> work(4096, 1.0f);
  float sink = 0;
  int64_t chunks = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  // Only progress() touches MPI here: the requests must complete through it.
  while (pending_requests(w) > 0 && std::chrono::steady_clock::now() < deadline) {
    sink += compute_chunk(work);
    w.progress();
    ++chunks;
  }
  EXPECT_EQ(pending_requests(w), 0) << "after " << chunks << " chunks (sink " << sink << ")";
  x.check();
  w.barrier();
}

TEST(Progress, LargeTransferCompletesWithProgressThreadWhileComputing) {
  Communicator& w = world();
  set_progress_thread(w, true);
  set_progress_thread(w, true);  // idempotent
  int64_t chunks = 0;
  float sink = 0;
  {
    Exchange x(w);
    std::vector<float> work(4096, 1.0f);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    // No MPI call at all on this thread: only the progress thread can move the data.
    while (pending_requests(w) > 0 && std::chrono::steady_clock::now() < deadline) {
      sink += compute_chunk(work);
      ++chunks;
    }
    EXPECT_EQ(pending_requests(w), 0) << "after " << chunks << " chunks (sink " << sink << ")";
    x.check();
  }
  set_progress_thread(w, false);
  set_progress_thread(w, false);  // idempotent
  w.barrier();
}

}  // namespace
}  // namespace tsp
