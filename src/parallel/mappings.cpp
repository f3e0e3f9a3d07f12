#include "parallel/mappings.h"

namespace tsp {

void gather_sequence(Backend& be, Communicator& comm, const LocalTokens& t, TensorView local,
                     TensorView full, Tensor& staging) {
  finish_gather_sequence(be, t, start_gather_sequence(be, comm, t, local, full, staging), full,
                         staging);
}

RequestPtr start_gather_sequence(Backend& be, Communicator& comm, const LocalTokens& t,
                                 TensorView local, TensorView full, Tensor& staging) {
  const int parts = comm.size();
  const bool in_place = gather_sequence_in_place(t);
  TSP_CHECK(parts == t.parts &&
                ((full.empty() && !in_place) ||
                 (local.dtype() == full.dtype() && full.numel() == local.numel() * parts)),
            "gather_sequence: {} {} of {} tokens into {} over {} ranks ({} parts)",
            dtype_name(local.dtype()), shape_str(local.shape()), t.n, shape_str(full.shape()),
            parts, t.parts);
  const int64_t block = local.numel();  // B·nl·c
  // [parts, 1, nl, c] is already [1, S, c]; with one part [1, B, nl·c] is [B, 1, nl·c]. One part
  // still goes through the communicator (a copy there, 0 bytes counted), so a layout makes the
  // same calls at every D.
  if (in_place) return comm.iall_gather(local.data(), full.data(), block, local.dtype());
  if (staging.empty() || staging.numel() < parts * block || staging.dtype() != local.dtype())
    staging = Tensor({parts * block}, local.dtype(), MemCategory::Comm, be.device());
  return comm.iall_gather(local.data(), staging.data(), block, local.dtype());
}

void finish_gather_sequence(Backend& be, const LocalTokens& t, RequestPtr request, TensorView full,
                            const Tensor& staging) {
  if (request) request->wait();
  if (gather_sequence_in_place(t)) return;
  TSP_CHECK(full.dtype() == staging.dtype() && full.numel() <= staging.numel(),
            "finish_gather_sequence: {} {} from a {} staging buffer of {} elements",
            dtype_name(full.dtype()), shape_str(full.shape()), dtype_name(staging.dtype()),
            staging.numel());
  // [parts, B, nl·c] -> [B, parts, nl·c]: each row's keys contiguous.
  const int64_t row = full.numel() / (t.parts * t.B);
  be.swap_leading_dims(staging.window(0, {t.parts, t.B, row}), full.reshape({t.B, t.parts, row}));
}

void reduce_scatter_sequence(Backend& be, Communicator& comm, const LocalTokens& t,
                             TensorView full_grad, TensorView local, Tensor& staging) {
  const int parts = comm.size();
  TSP_CHECK(parts == t.parts && full_grad.dtype() == DType::F32 && local.dtype() == DType::F32 &&
                full_grad.numel() == local.numel() * parts,
            "reduce_scatter_sequence: {} {} into {} {} over {} ranks ({} parts)",
            dtype_name(full_grad.dtype()), shape_str(full_grad.shape()), dtype_name(local.dtype()),
            shape_str(local.shape()), parts, t.parts);
  const int64_t block = local.numel();
  TensorView send = full_grad;
  // [B, parts, nl·c] -> [parts, B, nl·c]: each rank's tokens contiguous (nothing to do for one
  // row or one part).
  if (t.B > 1 && parts > 1) {
    if (staging.empty() || staging.numel() < parts * block || staging.dtype() != DType::F32)
      staging = Tensor::f32({parts * block}, MemCategory::Comm, be.device());
    const int64_t row = block / t.B;
    send = staging.window(0, {parts, t.B, row});
    be.swap_leading_dims(full_grad.reshape({t.B, parts, row}), send);
  }
  comm.reduce_scatter(send.data(), local.data(), block, DType::F32);
}

void all_reduce_sum(Backend& be, Communicator& comm, TensorView t) {
  if (comm.size() == 1) return;
  if (t.dtype() == DType::F32) {
    comm.all_reduce(t.data(), t.numel(), DType::F32);
    return;
  }
  Tensor wide = Tensor::f32(t.shape(), MemCategory::Comm, be.device());
  be.copy(t, wide.view());
  comm.all_reduce(wide.data(), wide.numel(), DType::F32);
  be.copy(wide.view(), t);
}

}  // namespace tsp
