// Backend-independent parts of the Communicator: argument validation, byte counting and timing of
// every public call (the implementations only move bytes in their do_* hooks), the control API,
// op names and traffic-statistics arithmetic.
#include "tsp/comm/communicator.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>

#include "tsp/core/error.h"

namespace tsp {

std::string_view comm_op_name(CommOp op) {
  switch (op) {
    case CommOp::Send:
      return "send";
    case CommOp::Recv:
      return "recv";
    case CommOp::Broadcast:
      return "broadcast";
    case CommOp::Reduce:
      return "reduce";
    case CommOp::AllGather:
      return "all_gather";
    case CommOp::ReduceScatter:
      return "reduce_scatter";
    case CommOp::AllReduce:
      return "all_reduce";
    case CommOp::Barrier:
      return "barrier";
  }
  TSP_FAIL("unknown CommOp {}", static_cast<int>(op));
}

int64_t CommStats::total_sent() const {
  int64_t total = 0;
  for (const CommOpStats& s : ops) total += s.bytes_sent;
  return total;
}

int64_t CommStats::total_received() const {
  int64_t total = 0;
  for (const CommOpStats& s : ops) total += s.bytes_received;
  return total;
}

namespace {

CommOpStats difference(const CommOpStats& a, const CommOpStats& b) {
  return {a.calls - b.calls, a.bytes_sent - b.bytes_sent, a.bytes_received - b.bytes_received};
}

void accumulate(CommOpStats& a, const CommOpStats& b) {
  a.calls += b.calls;
  a.bytes_sent += b.bytes_sent;
  a.bytes_received += b.bytes_received;
}

}  // namespace

CommStats CommStats::operator-(const CommStats& earlier) const {
  CommStats d;
  for (int i = 0; i < kNumCommOps; ++i) d.ops[i] = difference(ops[i], earlier.ops[i]);
  d.control = difference(control, earlier.control);
  d.blocked_seconds = blocked_seconds - earlier.blocked_seconds;
  return d;
}

CommStats& CommStats::operator+=(const CommStats& other) {
  for (int i = 0; i < kNumCommOps; ++i) accumulate(ops[i], other.ops[i]);
  accumulate(control, other.control);
  blocked_seconds += other.blocked_seconds;
  return *this;
}

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int64_t bytes_of(int64_t count, DType dt) {
  return count * static_cast<int64_t>(dtype_size(dt));
}

struct Bytes {
  int64_t sent = 0, received = 0;
};

// ---- byte counting (the convention in communicator.h) ----

// broadcast: root sends B, others receive B. reduce (the dual): non-roots send B, root receives.
Bytes rooted_bytes(int size, int64_t bytes, bool is_root, bool root_sends) {
  if (size == 1) return {0, 0};
  return is_root == root_sends ? Bytes{bytes, 0} : Bytes{0, bytes};
}
// all_gather (B per rank) and reduce_scatter (B out): (D-1)·B each way.
Bytes ring_bytes(int size, int64_t bytes) {
  const int64_t b = (size - 1) * bytes;
  return {b, b};
}
// all_reduce: 2(D-1)·B/D each way, rounded down.
Bytes all_reduce_bytes(int size, int64_t bytes) {
  const int64_t b = 2 * (size - 1) * bytes / size;
  return {b, b};
}

// ---- validation ----

// Sums: f32 (and integers). bf16 is rejected: a bf16 sum over ranks loses precision, and MPI has
// no bf16 type at all.
void check_sum_dtype(DType dt, CommOp op) {
  TSP_CHECK(dt != DType::BF16,
            "{} of bf16 is not supported (MPI has no bf16 sum, and bf16 accumulation loses "
            "precision); convert to f32, reduce, and convert back",
            comm_op_name(op));
  TSP_CHECK(dt == DType::F32 || dt == DType::I32 || dt == DType::I64,
            "{}: reductions accept f32, i32 and i64, not dtype {}", comm_op_name(op),
            static_cast<int>(dt));
}

void check_buffer(const void* p, int64_t count, CommOp op, std::string_view name) {
  TSP_CHECK(p != nullptr || count == 0, "{}: {} buffer is null but count is {}", comm_op_name(op),
            name, count);
}

// Whether the byte ranges [a, a+an) and [b, b+bn) share a byte.
bool overlaps(const void* a, int64_t an, const void* b, int64_t bn) {
  if (an == 0 || bn == 0 || a == nullptr || b == nullptr) return false;
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + static_cast<uintptr_t>(bn) && y < x + static_cast<uintptr_t>(an);
}

}  // namespace

// The argument checks of every op, shared by its blocking and non-blocking forms; each returns
// the bytes the op counts. Nothing is counted before all checks passed.
struct Communicator::Checks {
  int rank, size;
  int64_t max_count;
  std::string_view why_max;

  void count(int64_t n, CommOp op, std::string_view what = "count") const {
    TSP_CHECK(n >= 0, "{}: {} must be >= 0, got {}", comm_op_name(op), what, n);
    TSP_CHECK(n <= max_count,
              "{}: {}={} elements exceeds {} = {} elements per call; split the transfer into "
              "smaller calls",
              comm_op_name(op), what, n, why_max, max_count);
  }
  void in_range(int r, CommOp op, std::string_view role) const {
    TSP_CHECK(r >= 0 && r < size, "{}: {} {} is out of range for a communicator of size {}",
              comm_op_name(op), role, r, size);
  }

  Bytes broadcast(const void* buf, int64_t n, DType dt, int root, CommOp op) const {
    count(n, op);
    in_range(root, op, "root");
    check_buffer(buf, n, op, "data");
    return rooted_bytes(size, bytes_of(n, dt), rank == root, /*root_sends=*/true);
  }
  Bytes all_gather(const void* send, const void* recv, int64_t n, DType dt) const {
    const CommOp op = CommOp::AllGather;
    count(n, op, "count_per_rank");
    count(n * size, op, "count_per_rank * size");
    check_buffer(send, n, op, "send");
    check_buffer(recv, n, op, "recv");
    const int64_t b = bytes_of(n, dt);
    const char* slot = static_cast<const char*>(recv) + rank * b;
    TSP_CHECK(send == slot || !overlaps(send, b, recv, size * b),
              "all_gather: the send buffer overlaps the receive buffer but is not this rank's "
              "block of it (recv + rank·count_per_rank = recv + {} elements); pass exactly that "
              "block for an in-place all_gather, or a separate buffer",
              rank * n);
    return ring_bytes(size, b);
  }
  Bytes reduce_scatter(const void* send, const void* recv, int64_t n, DType dt) const {
    const CommOp op = CommOp::ReduceScatter;
    check_sum_dtype(dt, op);
    count(n, op, "count_out");
    count(n * size, op, "count_out * size");
    check_buffer(send, n, op, "send");
    check_buffer(recv, n, op, "recv");
    const int64_t b = bytes_of(n, dt);
    TSP_CHECK(send == recv || !overlaps(send, size * b, recv, b),
              "reduce_scatter: the send and receive buffers overlap without being equal; pass "
              "send == recv (holding size·count_out elements) for an in-place reduce_scatter, or "
              "separate buffers");
    return ring_bytes(size, b);
  }
  Bytes all_reduce(const void* buf, int64_t n, DType dt) const {
    const CommOp op = CommOp::AllReduce;
    check_sum_dtype(dt, op);
    count(n, op);
    check_buffer(buf, n, op, "data");
    return all_reduce_bytes(size, bytes_of(n, dt));
  }
  Bytes reduce(const void* send, const void* recv, int64_t n, DType dt, int root) const {
    const CommOp op = CommOp::Reduce;
    check_sum_dtype(dt, op);
    count(n, op);
    in_range(root, op, "root");
    check_buffer(send, n, op, "send");
    // A null recv on the root is only seen there (recv may be null elsewhere): the other ranks
    // cannot know, so this error is raised on the root alone.
    if (rank == root) check_buffer(recv, n, op, "recv (on root)");
    // Checked wherever recv is given (not only on the root), so a caller passing the same
    // aliasing on every rank gets the error on every rank rather than a root-only failure.
    const int64_t b = bytes_of(n, dt);
    TSP_CHECK(send == recv || !overlaps(send, b, recv, b),
              "reduce: the send and receive buffers overlap without being equal; pass send == "
              "recv for an in-place reduce (on the root), or separate buffers");
    return rooted_bytes(size, bytes_of(n, dt), rank == root, /*root_sends=*/false);
  }
  int64_t p2p(const void* buf, int64_t n, DType dt, int peer, CommOp op) const {
    count(n, op);
    in_range(peer, op, "peer rank");
    check_buffer(buf, n, op, "data");
    return bytes_of(n, dt);
  }
  Bytes sendrecv(const void* send, int64_t send_n, DType dt, int dst, const void* recv,
                 int64_t recv_n, int src) const {
    const int64_t sent = p2p(send, send_n, dt, dst, CommOp::Send);
    const int64_t received = p2p(recv, recv_n, dt, src, CommOp::Recv);
    TSP_CHECK(!overlaps(send, sent, recv, received),
              "sendrecv: the send buffer ({} elements) and the receive buffer ({} elements) "
              "overlap; a ring step needs two buffers (double buffering)",
              send_n, recv_n);
    return {sent, received};
  }
};

// ---- Request ----

Request::Request(std::unique_ptr<Transfer> transfer, std::shared_ptr<CommStats> stats)
    : transfer_(std::move(transfer)), stats_(std::move(stats)) {}

bool Request::test() {
  return transfer_->test();
}

void Request::wait() {
  if (transfer_->test()) return;  // already complete: no time blocked
  const auto t0 = std::chrono::steady_clock::now();
  transfer_->wait();
  stats_->blocked_seconds += seconds_since(t0);
}

void Request::join_compute() {
  if (transfer_->test()) return;
  const auto t0 = std::chrono::steady_clock::now();
  transfer_->join_compute();  // the host only blocks where there is no compute queue (CPU)
  stats_->blocked_seconds += seconds_since(t0);
}

// ---- Communicator: validate, count, time; then the hook ----

Communicator::Communicator(int rank, int size)
    : rank_(rank), size_(size), stats_(std::make_shared<CommStats>()) {
  TSP_CHECK(size >= 1 && rank >= 0 && rank < size,
            "communicator: rank {} is not a rank of a communicator of size {}", rank, size);
}

Communicator::Checks Communicator::checks() const {
  const CountLimit limit = count_limit();
  return Checks{rank_, size_, limit.max, limit.why};
}

RequestPtr Communicator::make_request(std::unique_ptr<Transfer> t) {
  return std::make_unique<Request>(std::move(t), stats_);
}

template <typename F>
void Communicator::timed(F&& call) {
  const auto t0 = std::chrono::steady_clock::now();
  call();
  stats_->blocked_seconds += seconds_since(t0);
}

void Communicator::count(CommOp op, int64_t sent, int64_t received) {
  CommOpStats& s = (*stats_)[op];
  s.calls += 1;
  s.bytes_sent += sent;
  s.bytes_received += received;
}

std::unique_ptr<Communicator> Communicator::split(int color, int key) {
  TSP_CHECK(color >= 0, "split: color must be >= 0, got {}", color);
  std::unique_ptr<Communicator> sub;
  timed([&] { sub = do_split(color, key); });
  return sub;
}

void Communicator::broadcast(void* buf, int64_t count, DType dt, int root) {
  const Bytes b = checks().broadcast(buf, count, dt, root, CommOp::Broadcast);
  this->count(CommOp::Broadcast, b.sent, b.received);
  timed([&] { do_broadcast(buf, count, dt, root); });
}

void Communicator::all_gather(const void* send, void* recv, int64_t count_per_rank, DType dt) {
  const Bytes b = checks().all_gather(send, recv, count_per_rank, dt);
  count(CommOp::AllGather, b.sent, b.received);
  timed([&] { do_all_gather(send, recv, count_per_rank, dt); });
}

void Communicator::reduce_scatter(const void* send, void* recv, int64_t count_out, DType dt) {
  const Bytes b = checks().reduce_scatter(send, recv, count_out, dt);
  count(CommOp::ReduceScatter, b.sent, b.received);
  timed([&] { do_reduce_scatter(send, recv, count_out, dt); });
}

void Communicator::all_reduce(void* buf, int64_t count, DType dt) {
  const Bytes b = checks().all_reduce(buf, count, dt);
  this->count(CommOp::AllReduce, b.sent, b.received);
  timed([&] { do_all_reduce(buf, count, dt); });
}

void Communicator::reduce(const void* send, void* recv, int64_t count, DType dt, int root) {
  const Bytes b = checks().reduce(send, recv, count, dt, root);
  this->count(CommOp::Reduce, b.sent, b.received);
  timed([&] { do_reduce(send, recv, count, dt, root); });
}

void Communicator::send(const void* buf, int64_t count, DType dt, int dst) {
  const int64_t b = checks().p2p(buf, count, dt, dst, CommOp::Send);
  this->count(CommOp::Send, b, 0);
  timed([&] { do_send(buf, count, dt, dst); });
}

void Communicator::recv(void* buf, int64_t count, DType dt, int src) {
  const int64_t b = checks().p2p(buf, count, dt, src, CommOp::Recv);
  this->count(CommOp::Recv, 0, b);
  timed([&] { do_recv(buf, count, dt, src); });
}

void Communicator::sendrecv(const void* send, int64_t send_count, DType dt, int dst, void* recv,
                            int64_t recv_count, int src) {
  const Bytes b = checks().sendrecv(send, send_count, dt, dst, recv, recv_count, src);
  count(CommOp::Send, b.sent, 0);
  count(CommOp::Recv, 0, b.received);
  timed([&] { do_sendrecv(send, send_count, dt, dst, recv, recv_count, src); });
}

void Communicator::barrier() {
  count(CommOp::Barrier, 0, 0);
  timed([&] { do_barrier(); });
}

RequestPtr Communicator::ibroadcast(void* buf, int64_t count, DType dt, int root) {
  const Bytes b = checks().broadcast(buf, count, dt, root, CommOp::Broadcast);
  this->count(CommOp::Broadcast, b.sent, b.received);
  return make_request(do_ibroadcast(buf, count, dt, root));
}

RequestPtr Communicator::iall_gather(const void* send, void* recv, int64_t count_per_rank,
                                     DType dt) {
  const Bytes b = checks().all_gather(send, recv, count_per_rank, dt);
  count(CommOp::AllGather, b.sent, b.received);
  return make_request(do_iall_gather(send, recv, count_per_rank, dt));
}

RequestPtr Communicator::ireduce_scatter(const void* send, void* recv, int64_t count_out,
                                         DType dt) {
  const Bytes b = checks().reduce_scatter(send, recv, count_out, dt);
  count(CommOp::ReduceScatter, b.sent, b.received);
  return make_request(do_ireduce_scatter(send, recv, count_out, dt));
}

RequestPtr Communicator::iall_reduce(void* buf, int64_t count, DType dt) {
  const Bytes b = checks().all_reduce(buf, count, dt);
  this->count(CommOp::AllReduce, b.sent, b.received);
  return make_request(do_iall_reduce(buf, count, dt));
}

RequestPtr Communicator::ireduce(const void* send, void* recv, int64_t count, DType dt, int root) {
  const Bytes b = checks().reduce(send, recv, count, dt, root);
  this->count(CommOp::Reduce, b.sent, b.received);
  return make_request(do_ireduce(send, recv, count, dt, root));
}

RequestPtr Communicator::isend(const void* buf, int64_t count, DType dt, int dst) {
  const int64_t b = checks().p2p(buf, count, dt, dst, CommOp::Send);
  this->count(CommOp::Send, b, 0);
  return make_request(do_isend(buf, count, dt, dst));
}

RequestPtr Communicator::irecv(void* buf, int64_t count, DType dt, int src) {
  const int64_t b = checks().p2p(buf, count, dt, src, CommOp::Recv);
  this->count(CommOp::Recv, 0, b);
  return make_request(do_irecv(buf, count, dt, src));
}

RequestPtr Communicator::isendrecv(const void* send, int64_t send_count, DType dt, int dst,
                                   void* recv, int64_t recv_count, int src) {
  const Bytes b = checks().sendrecv(send, send_count, dt, dst, recv, recv_count, src);
  count(CommOp::Send, b.sent, 0);
  count(CommOp::Recv, 0, b.received);
  return make_request(do_isendrecv(send, send_count, dt, dst, recv, recv_count, src));
}

void Communicator::progress() {
  do_progress();
}

void Communicator::set_compute_queue(ComputeQueue queue) {
  do_set_compute_queue(queue);
  compute_queue_ = queue;
}

// ---- default blocking hooks: the non-blocking twin, then a wait ----

void Communicator::do_broadcast(void* buf, int64_t count, DType dt, int root) {
  do_ibroadcast(buf, count, dt, root)->wait();
}
void Communicator::do_all_gather(const void* send, void* recv, int64_t count_per_rank, DType dt) {
  do_iall_gather(send, recv, count_per_rank, dt)->wait();
}
void Communicator::do_reduce_scatter(const void* send, void* recv, int64_t count_out, DType dt) {
  do_ireduce_scatter(send, recv, count_out, dt)->wait();
}
void Communicator::do_all_reduce(void* buf, int64_t count, DType dt) {
  do_iall_reduce(buf, count, dt)->wait();
}
void Communicator::do_reduce(const void* send, void* recv, int64_t count, DType dt, int root) {
  do_ireduce(send, recv, count, dt, root)->wait();
}
void Communicator::do_send(const void* buf, int64_t count, DType dt, int dst) {
  do_isend(buf, count, dt, dst)->wait();
}
void Communicator::do_recv(void* buf, int64_t count, DType dt, int src) {
  do_irecv(buf, count, dt, src)->wait();
}
void Communicator::do_sendrecv(const void* send, int64_t send_count, DType dt, int dst, void* recv,
                               int64_t recv_count, int src) {
  do_isendrecv(send, send_count, dt, dst, recv, recv_count, src)->wait();
}

// ---- the control API ----

// Control traffic is counted with the data path's conventions (all_gather: (D-1)·b each way;
// broadcast: b from the root), but in CommStats::control.
void Communicator::control_gather(const void* send, void* recv, int64_t bytes_per_rank) {
  CommOpStats& s = stats_->control;
  s.calls += 1;
  s.bytes_sent += (size_ - 1) * bytes_per_rank;
  s.bytes_received += (size_ - 1) * bytes_per_rank;
  timed([&] { do_control_all_gather(send, recv, bytes_per_rank); });
}

void Communicator::control_broadcast(void* buf, int64_t bytes, int root) {
  TSP_CHECK(root >= 0 && root < size_,
            "broadcast_host: root {} is out of range for a communicator of size {}", root, size_);
  const Bytes b = rooted_bytes(size_, bytes, rank_ == root, /*root_sends=*/true);
  CommOpStats& s = stats_->control;
  s.calls += 1;
  s.bytes_sent += b.sent;
  s.bytes_received += b.received;
  timed([&] { do_control_broadcast(buf, bytes, root); });
}

std::vector<int64_t> Communicator::gather_host(std::span<const int64_t> mine) {
  std::vector<int64_t> all(mine.size() * size_);
  control_gather(mine.data(), all.data(), static_cast<int64_t>(mine.size_bytes()));
  return all;
}

std::vector<double> Communicator::gather_host(std::span<const double> mine) {
  std::vector<double> all(mine.size() * size_);
  control_gather(mine.data(), all.data(), static_cast<int64_t>(mine.size_bytes()));
  return all;
}

void Communicator::check_same(int64_t value, std::string_view what) {
  const std::vector<int64_t> all = gather_host(value);
  if (std::all_of(all.begin(), all.end(), [&](int64_t v) { return v == all[0]; })) return;
  // Every rank holds the same gathered values, so every rank throws the same message.
  std::map<int64_t, std::vector<int>> ranks_by_value;
  std::vector<int64_t> order;  // distinct values in order of their first rank
  for (int r = 0; r < size_; ++r) {
    auto& ranks = ranks_by_value[all[r]];
    if (ranks.empty()) order.push_back(all[r]);
    ranks.push_back(r);
  }
  std::string parts;
  for (int64_t v : order) {
    const auto& ranks = ranks_by_value[v];
    if (!parts.empty()) parts += ", ";
    parts += ranks.size() == 1 ? fmt::format("rank {} has {}", ranks[0], v)
                               : fmt::format("ranks {} have {}", fmt::join(ranks, ","), v);
  }
  TSP_FAIL("{} disagree across ranks: {}", what, parts);
}

int64_t Communicator::agree_max(int64_t value) {
  const std::vector<int64_t> all = gather_host(value);
  return *std::max_element(all.begin(), all.end());
}

int64_t Communicator::agree_min(int64_t value) {
  const std::vector<int64_t> all = gather_host(value);
  return *std::min_element(all.begin(), all.end());
}

double Communicator::max_host(double value) {
  const std::vector<double> all = gather_host(std::span(&value, 1));
  return *std::max_element(all.begin(), all.end());
}

bool Communicator::any_true(bool value) {
  return agree_max(int64_t{value ? 1 : 0}) != 0;
}

double Communicator::sum_host(double value) {
  double sum = 0;
  for (double v : gather_host(std::span(&value, 1))) sum += v;  // rank order on every rank
  return sum;
}

int64_t Communicator::broadcast_host(int64_t value, int root) {
  control_broadcast(&value, sizeof value, root);
  return value;
}

std::string Communicator::broadcast_host(const std::string& value, int root) {
  const int64_t length = broadcast_host(static_cast<int64_t>(value.size()), root);
  std::string out = rank_ == root ? value : std::string(length, '\0');
  control_broadcast(out.data(), length, root);
  return out;
}

}  // namespace tsp
