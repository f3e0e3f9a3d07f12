// Hardware profiles of the cost model, and the calibration of this machine (docs/cost-model.md §5).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "tsp/core/error.h"
#include "tsp/ops/gemm.h"
#include "tsp/plan/cost_model.h"

namespace tsp::plan {

Hardware hardware_profile(const std::string& name) {
  Hardware hw;
  hw.name = name;
  if (name == "mi300x") {
    hw.peak_flops = 1307.4e12;  // dense bf16, AMD MI300X data sheet
    hw.gemm_eff = 0.5;
    hw.attn_eff = 0.5;
    hw.mem_bw = 5.3e12;
    hw.mem_capacity = 192e9;
    hw.gpus_per_node = 8;
    // Infinity Fabric: a full mesh, 7 links of 64 GB/s per direction per GPU (448 GB/s).
    hw.intra = {5e-6, 64e9, true};
    // One 400 Gb/s NIC per GPU, rails-only.
    hw.inter = {10e-6, 50e9, false};
    hw.source =
        "MI300X data sheet (1307 TFLOP/s bf16 dense, 192 GB, 5.3 TB/s); IF 7x64 GB/s mesh; "
        "400 Gb/s NIC per GPU; efficiency 0.5 assumed";
  } else if (name == "h100") {
    hw.peak_flops = 989.4e12;  // dense bf16, H100 SXM data sheet
    hw.gemm_eff = 0.5;
    hw.attn_eff = 0.5;
    hw.mem_bw = 3.35e12;
    hw.mem_capacity = 80e9;
    hw.gpus_per_node = 8;
    hw.intra = {5e-6, 450e9, false};  // NVLink 4 through NVSwitch: 450 GB/s per direction
    hw.inter = {10e-6, 50e9, false};
    hw.source =
        "H100 SXM data sheet (989 TFLOP/s bf16 dense, 80 GB, 3.35 TB/s); NVSwitch 450 GB/s; "
        "400 Gb/s NIC per GPU; efficiency 0.5 assumed";
  } else if (name == "local") {
    // This machine class (docs/platform-notes.md): one CPU rank per core, f32 oneDNN GEMM
    // ≈110 GFLOP/s per core; shared-memory MPI ≈6 GB/s at large sizes; "GPUs" are cores.
    hw.peak_flops = 110e9;
    hw.gemm_eff = 1.0;  // the figure above is already a sustained rate
    hw.attn_eff = 0.5;  // blocked attention reaches about half of the GEMM rate
    hw.mem_bw = 30e9;
    hw.mem_capacity = 8e9;
    hw.gpus_per_node = 2;
    hw.intra = {1e-6, 6e9, false};
    hw.inter = {50e-6, 1e9, false};  // not present on this machine; TCP-class placeholder
    hw.source =
        "stored defaults for 2 Zen 4 cores (platform-notes.md); run with --calibrate to measure";
  } else {
    TSP_FAIL("unknown hardware profile '{}'; use mi300x, h100 or local", name);
  }
  return hw;
}

Hardware calibrate_local() {
  using clock = std::chrono::steady_clock;
  Hardware hw = hardware_profile("local");
  // GEMM rate: f32, one thread, 512^3, median of 5 after a warm-up (primitive creation).
  const int64_t n = 512;
  std::vector<float> A(n * n, 0.5f), B(n * n, 0.25f), C(n * n, 0.f);
  std::vector<double> rates;
  for (int i = 0; i < 6; ++i) {
    const auto t0 = clock::now();
    gemm(Trans::N, Trans::N, n, n, n, 1.f, A.data(), n, B.data(), n, 0.f, C.data(), n);
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    if (i > 0) rates.push_back(2.0 * n * n * n / s);
  }
  std::sort(rates.begin(), rates.end());
  hw.peak_flops = rates[rates.size() / 2];
  // Bandwidth: 64 MiB memcpy, median of 5. OpenMPI's vader transport with CMA is one such copy
  // between address spaces; the platform notes measured 5.3 GB/s for MPI at this size.
  const size_t bytes = 64u << 20;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  std::vector<double> bws;
  for (int i = 0; i < 6; ++i) {
    const auto t0 = clock::now();
    std::memcpy(dst.data(), src.data(), bytes);
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    if (i > 0) bws.push_back(bytes / s);
  }
  std::sort(bws.begin(), bws.end());
  hw.intra.bw_bytes_per_s = bws[bws.size() / 2];
  hw.mem_bw = bws[bws.size() / 2] * 2;  // a copy reads and writes
  hw.source = "calibrated: f32 GEMM 512^3 and a 64 MiB memcpy on this machine";
  return hw;
}

}  // namespace tsp::plan
