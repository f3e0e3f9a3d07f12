// What the flash attention kernels execute, counted by the CUDA emulation (README.md,
// "Counting"): the numbers that decide their speed on a GPU and that no timing here can show.
//   - Their ldmatrix reads are free of shared-memory bank conflicts: the tiles' leading dimension
//     D + 8 puts the eight 16-byte rows of each phase in eight different groups of banks.
//   - Their tensor-core work is exactly their schedule's: the products of every tile pair that
//     meets the causal triangle, and no others (the tiles skipped are skipped). The expected
//     counts are derived below from each kernel's tile shapes (attention_flash.cu, _v2.cu).
// It prints, per kernel, the shared-memory and global traffic per tensor-core instruction
// (docs/benchmarks.md quotes the table). The emulation exists only in CPU builds, so does this
// test: it is not a GPU test.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/attention_kernels.h"
#include "test_util.h"
#include "tsp/core/bf16.h"

namespace tsp::emu {
namespace {

namespace attn = tsp::cuda::attn;

// A device buffer of n elements of T, from host values.
template <class T>
struct Device {
  T* p = nullptr;
  explicit Device(const std::vector<T>& host) {
    EXPECT_EQ(cudaMalloc(&p, host.size() * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  ~Device() { cudaFree(p); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
};

// Values in [-1, 1) as bf16 bits.
std::vector<uint16_t> random_bf16(int64_t n, std::mt19937& rng) {
  std::vector<uint16_t> v(n);
  const std::vector<float> f = test::uniform_values(n, rng);
  for (int64_t i = 0; i < n; ++i) v[i] = tsp::bf16::from_float(f[i]);
  return v;
}

// Causal self-attention over positions 0 .. S-1 (queries and keys), bf16 q/k/v/o.
struct Problem {
  int64_t S;
  int hq, hkv, d;
  std::mt19937 rng{7};
  std::vector<int64_t> positions;
  Device<uint16_t> q, k, v, o;
  Device<int64_t> pos;
  Device<float> lse, dout, dq, dk, dv;
  Problem(int64_t S_, int hq_, int hkv_, int d_)
      : S(S_),
        hq(hq_),
        hkv(hkv_),
        d(d_),
        positions(iota(S_)),
        q(random_bf16(S * hq * d, rng)),
        k(random_bf16(S * hkv * d, rng)),
        v(random_bf16(S * hkv * d, rng)),
        o(std::vector<uint16_t>(S * hq * d)),
        pos(positions),
        lse(std::vector<float>(S * hq)),
        dout(test::uniform_values(S * hq * d, rng)),
        dq(std::vector<float>(S * hq * d)),
        dk(std::vector<float>(S * hkv * d)),
        dv(std::vector<float>(S * hkv * d)) {}
  static std::vector<int64_t> iota(int64_t n) {
    std::vector<int64_t> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = i;
    return v;
  }
  attn::Shape shape() const { return {S, S, hq, hkv, d}; }
  attn::Fwd fwd() const {
    attn::Fwd f;
    f.sh = shape();
    f.bf16 = true;
    f.q = q.p, f.k = k.p, f.v = v.p, f.o = o.p;
    f.q_pos = f.k_pos = pos.p;
    f.lse = lse.p;
    f.scale = 0.125f;
    return f;
  }
  attn::Bwd bwd() const {
    attn::Bwd b;
    b.sh = shape();
    b.bf16 = true;
    b.q = q.p, b.k = k.p, b.v = v.p, b.o = o.p;
    b.q_pos = b.k_pos = pos.p;
    b.lse = lse.p, b.dout = dout.p;
    b.dq = dq.p, b.dk = dk.p, b.dv = dv.p;
    b.scale = 0.125f;
    return b;
  }
};

// Tile pairs (query tile of br rows, key tile of bc) that meet the causal triangle of positions
// 0 .. S-1: the smallest key position of the key tile is at most the largest query position of
// the query tile (tile_needed of attention_tile_rules.h, without documents).
int64_t causal_tile_pairs(int64_t S, int br, int bc) {
  int64_t pairs = 0;
  for (int64_t q0 = 0; q0 < S; q0 += br)
    for (int64_t k0 = 0; k0 < S; k0 += bc) pairs += k0 <= std::min(S, q0 + br) - 1;
  return pairs;
}

// The kernels' schedules (attention_flash.cu, attention_flash_v2.cu): the query rows and keys of
// one tile pair, and how many GEMMs of [br × bc × d] each pair computes: the forward two (S = Q·Kᵀ,
// O += P·V), the backward five (Sᵀ, dPᵀ, dV, dK, dQ). One mma.sync.m16n8k16 is 16·8·16
// multiply-adds.
struct Schedule {
  const char* kernel;  // the name TSP_LAUNCH gives it, up to the template arguments
  int br, bc, gemms;
};
int64_t expected_mma(const Schedule& s, const Problem& p) {
  return p.hq * causal_tile_pairs(p.S, s.br, s.bc) * s.gemms * (int64_t{s.br} * s.bc * p.d) /
         (16 * 8 * 16);
}

const KernelCounts* find(const std::vector<KernelCounts>& all, const std::string& prefix) {
  for (const KernelCounts& k : all)
    if (k.name.rfind(prefix, 0) == 0) return &k;
  return nullptr;
}

void print(const KernelCounts& k, const Problem& p, double useful_mma) {
  const double mma = static_cast<double>(k.mma);
  std::printf(
      "  %-26s d=%3d  %4u threads %6.1f KB smem  mma %9llu (causal work %5.1f%%)  per mma: "
      "ldmatrix %6.1f B, cp.async %6.1f B, atomics %5.2f, barriers %6.4f  wavefronts/ldmatrix "
      "%.2f\n",
      k.name.substr(0, k.name.find('<')).c_str(), p.d, k.block.x * k.block.y * k.block.z,
      k.dynamic_shared / 1024.0, static_cast<unsigned long long>(k.mma), 100.0 * useful_mma / mma,
      512.0 * k.ldmatrix / mma, k.cp_async_bytes / mma, k.atomics / mma, k.barriers / mma,
      k.ldmatrix ? static_cast<double>(k.ldmatrix_wavefronts) / k.ldmatrix : 0.0);
}

// One launcher's counts: ldmatrix conflict-free and exactly the schedule's tensor-core work.
void check(const char* what, cudaError_t (*launch)(const Problem&), const Schedule& s,
           const Problem& p) {
  SCOPED_TRACE(std::string(what) + " d=" + std::to_string(p.d));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  reset_kernel_counts();
  ASSERT_EQ(launch(p), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<KernelCounts> all = kernel_counts();
  const KernelCounts* k = find(all, s.kernel);
  ASSERT_NE(k, nullptr) << "no launch of " << s.kernel;
  EXPECT_GT(k->ldmatrix, 0u);
  EXPECT_EQ(k->ldmatrix_wavefronts, 4 * k->ldmatrix) << "ldmatrix with bank conflicts";
  EXPECT_EQ(static_cast<int64_t>(k->mma), expected_mma(s, p))
      << "tensor-core work other than the tiles meeting the causal triangle";
  for (const KernelCounts& other : all) {
    if (&other == k) continue;
    EXPECT_EQ(other.mma, 0u) << other.name << " also uses tensor cores";
  }
  // The products the causal triangle needs (each visible pair: a d-long dot product per GEMM).
  const double pairs = static_cast<double>(p.S) * (p.S + 1) / 2 * p.hq;
  print(*k, p, pairs * s.gemms * p.d / (16 * 8 * 16));
}

cudaError_t v1_forward(const Problem& p) {
  return attn::flash_forward(p.fwd(), nullptr);
}
cudaError_t v2_forward(const Problem& p) {
  return attn::flash_forward_v2(p.fwd(), nullptr);
}
cudaError_t v1_backward(const Problem& p) {
  return attn::flash_backward(p.bwd(), nullptr);
}
cudaError_t v2_backward(const Problem& p) {
  return attn::flash_backward_v2(p.bwd(), nullptr);
}

// S = 512 causal, 4 query heads on 2 kv heads: 8 query tiles of 64 keys' width under v2's
// forward, several tiles per block in every kernel, full tiles only (S divides every tile).
TEST(KernelCounts, FlashKernelsAreConflictFreeAndComputeOnlyNeededTiles) {
  std::printf("flash kernels, causal S = 512, 4 query heads / 2 kv heads, bf16:\n");
  for (int d : {64, 128}) {
    Problem p(512, 4, 2, d);
    // v1: forward 8 warps × 16 query rows, keys in tiles of 64; backward 4 warps × 16 keys,
    // query tiles of 32 at d = 128 and 64 at d = 64 (the template argument BR).
    check("v1 forward", v1_forward, {"flash_forward_kernel", 128, 64, 2}, p);
    check("v1 backward", v1_backward, {"flash_backward_kernel", d == 128 ? 32 : 64, 64, 5}, p);
    // v2: forward 4 warps × 32 query rows, keys in tiles of 64; backward 8 warps × 16 keys,
    // query tiles of 32.
    check("v2 forward", v2_forward, {"flash_forward_v2_kernel", 128, 64, 2}, p);
    check("v2 backward", v2_backward, {"flash_backward_v2_kernel", 32, 128, 5}, p);
  }
}

// The wavefront rule itself, on a kernel whose rows are laid out on purpose (row r of phase m at
// r·row_bytes + 16·m): 128 or 256 bytes apart (an unpadded leading dimension of 64 or 128 bf16),
// all eight rows of a phase fall in one group of banks, 8 wavefronts per phase; 144 bytes apart
// (D + 8 at d = 64) they are conflict-free; 64 bytes apart, four rows share each of two groups (4
// per phase); one address for all 32 lanes is a broadcast.
__global__ void ldmatrix_rows_kernel(int row_bytes, uint32_t* out) {
  TSP_DYNAMIC_SHARED(smem);
  for (int i = threadIdx.x; i < 4096; i += 32) smem[i] = static_cast<unsigned char>(i);
  __syncwarp(0xffffffffu);
  uint32_t r[4];
  ldmatrix_x4(r, smem + (threadIdx.x % 8) * row_bytes + (threadIdx.x / 8) * 16 * (row_bytes > 0),
              false);
  out[threadIdx.x] = r[0] ^ r[1] ^ r[2] ^ r[3];
}

TEST(KernelCounts, LdmatrixWavefronts) {
  uint32_t* out = nullptr;
  ASSERT_EQ(cudaMalloc(&out, 32 * sizeof(uint32_t)), cudaSuccess);
  const struct {
    int row_bytes;
    uint64_t wavefronts;
  } cases[] = {{128, 4 * 8}, {16 * 9, 4}, {0, 4}, {256, 4 * 8}, {64, 4 * 4}};
  for (const auto& c : cases) {
    reset_kernel_counts();
    TSP_LAUNCH(1, 32, 4096, nullptr, ldmatrix_rows_kernel)(c.row_bytes, out);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<KernelCounts> all = kernel_counts();
    ASSERT_EQ(all.size(), 1u);
    EXPECT_EQ(all[0].ldmatrix, 1u);
    EXPECT_EQ(all[0].ldmatrix_wavefronts, c.wavefronts) << "rows " << c.row_bytes << " bytes apart";
    EXPECT_EQ(all[0].launches, 1u);
    EXPECT_EQ(all[0].blocks, 1u);
  }
  cudaFree(out);
}

}  // namespace
}  // namespace tsp::emu
