// `tsp compare A B --rtol X`: compare two safetensors files tensor by tensor (e.g. the gradients
// of two `tsp grad` runs). Prints max absolute error and norm-wise relative error
// ||a - b|| / ||b|| per tensor; exits 1 when any tensor exceeds --rtol (norm-wise) or the files
// do not hold the same tensors with the same shapes. No MPI.
#include <cmath>
#include <cstdio>
#include <memory>

#include "cli/command.h"
#include "tsp/core/error.h"
#include "tsp/model/safetensors.h"

namespace tsp::cli {
namespace {

struct CompareOptions {
  std::string a, b;
  double rtol = 1e-5;
};

int run_compare(const CompareOptions& o) {
  SafetensorsReader ra(o.a), rb(o.b);
  std::printf("# tsp compare  a=%s  b=%s  rtol=%g (norm-wise ||a-b||/||b||)\n", o.a.c_str(),
              o.b.c_str(), o.rtol);
  std::printf("# %-56s %-14s %12s %12s %12s  ok\n", "tensor", "shape", "max_abs_err", "max_abs_b",
              "rel_err");
  int bad = 0;
  double worst = 0;
  for (const SafetensorInfo& ia : ra.tensors()) {
    const SafetensorInfo* ib = rb.find(ia.name);
    if (!ib) {
      std::printf("  %-56s missing in %s\n", ia.name.c_str(), o.b.c_str());
      ++bad;
      continue;
    }
    if (ia.shape != ib->shape) {
      std::printf("  %-56s shape %s in a, %s in b\n", ia.name.c_str(), shape_str(ia.shape).c_str(),
                  shape_str(ib->shape).c_str());
      ++bad;
      continue;
    }
    Tensor ta = Tensor::f32(ia.shape, MemCategory::Workspace);
    Tensor tb = Tensor::f32(ia.shape, MemCategory::Workspace);
    ra.read(ia.name, ta);
    rb.read(ia.name, tb);
    double max_abs = 0, max_b = 0, num = 0, den = 0;
    for (int64_t i = 0; i < ta.numel(); ++i) {
      const double x = ta.f32()[i], y = tb.f32()[i], d = x - y;
      max_abs = std::max(max_abs, std::abs(d));
      max_b = std::max(max_b, std::abs(y));
      num += d * d;
      den += y * y;
    }
    // Norm-wise relative error; for an all-zero b it is the norm of a (so zeros equal zeros).
    const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    const bool ok = rel <= o.rtol && std::isfinite(rel);
    worst = std::max(worst, rel);
    bad += !ok;
    std::printf("  %-56s %-14s %12.4e %12.4e %12.4e  %s\n", ia.name.c_str(),
                shape_str(ia.shape).c_str(), max_abs, max_b, rel, ok ? "yes" : "NO");
  }
  for (const SafetensorInfo& ib : rb.tensors()) {
    if (!ra.find(ib.name)) {
      std::printf("  %-56s missing in %s\n", ib.name.c_str(), o.a.c_str());
      ++bad;
    }
  }
  std::printf("# %zu tensors, worst rel_err %.4e, %d beyond tolerance or mismatched: %s\n",
              ra.tensors().size(), worst, bad, bad ? "FAIL" : "OK");
  return bad ? 1 : 0;
}

const CommandRegistration kCompare{Command{
    "compare",
    "Compare two safetensors files tensor by tensor (max abs and norm-wise relative error); "
    "exit 1 beyond --rtol",
    /*needs_mpi=*/false, [](CLI::App& sub) {
      auto o = std::make_shared<CompareOptions>();
      sub.add_option("a", o->a, "first file")->required()->check(CLI::ExistingFile);
      sub.add_option("b", o->b, "second file (the reference: relative errors divide by it)")
          ->required()
          ->check(CLI::ExistingFile);
      sub.add_option("--rtol", o->rtol, "norm-wise relative tolerance per tensor")
          ->capture_default_str();
      return [o](Communicator*) { return run_compare(*o); };
    }}};

}  // namespace
}  // namespace tsp::cli
