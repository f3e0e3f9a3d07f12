#include "parallel/mappings.h"

namespace tsp {

void gather_sequence(Backend& be, Communicator& comm, const LocalTokens& t, TensorView local,
                     TensorView full, Tensor& staging) {
  const int parts = comm.size();
  TSP_CHECK(parts == t.parts && local.dtype() == full.dtype() &&
                full.numel() == local.numel() * parts,
            "gather_sequence: {} {} of {} tokens into {} over {} ranks ({} parts)",
            dtype_name(local.dtype()), shape_str(local.shape()), t.n, shape_str(full.shape()),
            parts, t.parts);
  if (parts == 1) {
    be.copy(local, full);
    return;
  }
  const int64_t block = local.numel();  // B·nl·c
  if (t.B == 1) {  // [parts, 1, nl, c] is already [1, S, c]
    comm.all_gather(local.data(), full.data(), block, local.dtype());
    return;
  }
  if (staging.empty() || staging.numel() < parts * block || staging.dtype() != local.dtype())
    staging = Tensor({parts * block}, local.dtype(), MemCategory::Comm, be.device());
  comm.all_gather(local.data(), staging.data(), block, local.dtype());
  // [parts, B, nl·c] -> [B, parts, nl·c]: each row's keys contiguous.
  const int64_t row = block / t.B;
  be.swap_leading_dims(staging.window(0, {parts, t.B, row}), full.reshape({t.B, parts, row}));
}

void reduce_scatter_sequence(Backend& be, Communicator& comm, const LocalTokens& t,
                             TensorView full_grad, TensorView local, Tensor& staging) {
  const int parts = comm.size();
  TSP_CHECK(parts == t.parts && full_grad.dtype() == DType::F32 && local.dtype() == DType::F32 &&
                full_grad.numel() == local.numel() * parts,
            "reduce_scatter_sequence: {} {} into {} {} over {} ranks ({} parts)",
            dtype_name(full_grad.dtype()), shape_str(full_grad.shape()),
            dtype_name(local.dtype()), shape_str(local.shape()), parts, t.parts);
  if (parts == 1) {
    be.copy(full_grad, local);
    return;
  }
  const int64_t block = local.numel();
  TensorView send = full_grad;
  if (t.B > 1) {  // [B, parts, nl·c] -> [parts, B, nl·c]: each rank's tokens contiguous
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
