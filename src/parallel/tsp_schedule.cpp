#include "parallel/tsp_schedule.h"

namespace tsp {

int64_t Packing::total() const {
  int64_t n = 0;
  for (const Shape& s : shapes) n += shape_numel(s);
  return n;
}

Pieces Packing::split(TensorView packed) const {
  Pieces out;
  int64_t offset = 0;
  for (const Shape& s : shapes) {
    out.push_back(packed.window(offset, s));
    offset += shape_numel(s);
  }
  return out;
}

void Packing::pack(Backend& be, const Pieces& pieces, TensorView packed) const {
  const Pieces dst = split(packed);
  for (size_t i = 0; i < dst.size(); ++i) be.copy(pieces[i], dst[i]);
}

void Packing::add_into(Backend& be, const Pieces& pieces, TensorView packed) const {
  const Pieces src = split(packed);
  for (size_t i = 0; i < src.size(); ++i) be.add(pieces[i], src[i]);
}

Tensor ring_forward(const ScheduleContext& ctx, const Packing& pk, const Pieces& own,
                    bool keep_last, const ShardBody& body) {
  Communicator& c = ctx.group;
  const int D = c.size(), p = c.rank();
  if (D == 1) {
    body(p, own);
    return Tensor();
  }
  auto mod = [D](int i) { return ((i % D) + D) % D; };
  const int64_t total = pk.total();
  const DType dt = ctx.dtype;
  const Device dev = ctx.be.device();
  Tensor buf[2] = {Tensor({total}, dt, MemCategory::Comm, dev),
                   Tensor({total}, dt, MemCategory::Comm, dev)};
  pk.pack(ctx.be, own, buf[0].view());
  int cur = 0;
  for (int k = 0; k < D; ++k) {
    RequestPtr hop;  // the shard in hand to p+1, the next one from p-1
    if (k < D - 1) {
      hop = c.isendrecv(buf[cur].data(), total, dt, mod(p + 1), buf[1 - cur].data(), total,
                        mod(p - 1));
      if (!ctx.overlap) hop->wait();
    }
    body(mod(p - k), k == 0 ? own : pk.split(buf[cur].view()));
    if (hop) {
      hop->wait();
      cur = 1 - cur;
    }
  }
  // The last step used buf[cur] (no transfer flipped it).
  return keep_last ? std::move(buf[cur]) : Tensor();
}

void attention_rounds(const ScheduleContext& ctx, const Packing& pk, const Pieces& own,
                      const ShardBody& body) {
  Communicator& c = ctx.group;
  const int D = c.size(), p = c.rank();
  if (D == 1) {
    body(p, own);
    return;
  }
  const int64_t total = pk.total();
  const DType dt = ctx.dtype;
  const Device dev = ctx.be.device();
  Tensor buf[2] = {Tensor({total}, dt, MemCategory::Comm, dev),
                   Tensor({total}, dt, MemCategory::Comm, dev)};
  auto start = [&](int r) {
    Tensor& b = buf[r % 2];
    if (r == p) pk.pack(ctx.be, own, b.view());
    RequestPtr req = c.ibroadcast(b.data(), total, dt, r);
    if (!ctx.overlap) req->wait();
    return req;
  };
  RequestPtr pending = start(0);
  for (int r = 0; r < D; ++r) {
    pending->wait();
    RequestPtr next = r + 1 < D ? start(r + 1) : RequestPtr();
    body(r, r == p ? own : pk.split(buf[r % 2].view()));
    pending = std::move(next);
  }
}

}  // namespace tsp
