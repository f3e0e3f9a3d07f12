// The emulation's own settings, read once from the environment (tests/cuda_emulation/README.md):
//   TSP_EMU_SEED       the seed of every random choice the emulation makes: the order in which
//                      a block's warps run (simt.cpp) and the delays of queued work (runtime.cpp)
//   TSP_EMU_DELAY_US   the longest delay of work queued on an idle stream (runtime.cpp)
//   TSP_EMU_NCCL_LOSE_PEER  n > 0: this process's n-th NCCL group (or lone call) loses its peer
//                      (nccl.cpp): it never completes, and its communicators report
//                      ncclRemoteError, as real NCCL's kernels and proxy do when a peer is gone
//   TSP_EMU_NCCL_STALL_PEER n > 0: the same operation never completes, and NCCL reports nothing
//                      (a peer that is stuck, or lost where NCCL sees no error)
//   TSP_EMU_FAULT_KERNEL    n > 0: this process's n-th kernel grid faults (simt.cpp), as one that
//                      reads an illegal address: the device's sticky error
// Included by the emulation's sources only; the stand-in CUDA headers do not see it.
#pragma once

#include <cstdint>
#include <cstdlib>

namespace tsp::emu::settings {

// An unsigned integer variable, or `fallback` when unset.
inline uint32_t env_u32(const char* name, uint32_t fallback) {
  const char* v = std::getenv(name);
  return v ? static_cast<uint32_t>(std::strtoul(v, nullptr, 10)) : fallback;
}

// All of them, read at the first use of any.
struct Values {
  uint32_t seed = env_u32("TSP_EMU_SEED", 1);
  uint32_t max_delay_us = env_u32("TSP_EMU_DELAY_US", 2000);
  uint32_t nccl_lose_peer_at = env_u32("TSP_EMU_NCCL_LOSE_PEER", 0);    // 0: never
  uint32_t nccl_stall_peer_at = env_u32("TSP_EMU_NCCL_STALL_PEER", 0);  // 0: never
  uint32_t fault_kernel_at = env_u32("TSP_EMU_FAULT_KERNEL", 0);        // 0: never
};
inline const Values& values() {
  static const Values v;
  return v;
}

inline uint32_t seed() {
  return values().seed;
}
inline uint32_t max_delay_us() {
  return values().max_delay_us;
}
inline uint32_t nccl_lose_peer_at() {
  return values().nccl_lose_peer_at;
}
inline uint32_t nccl_stall_peer_at() {
  return values().nccl_stall_peer_at;
}
inline uint32_t fault_kernel_at() {
  return values().fault_kernel_at;
}

}  // namespace tsp::emu::settings
