// `tsp compare A B --rtol X`: compare two safetensors files tensor by tensor (e.g. the gradients
// of two `tsp grad` runs). Prints max absolute error and norm-wise relative error
// ||a - b|| / ||b|| per tensor; exits 1 when any tensor exceeds --rtol (norm-wise), holds a NaN or
// Inf in either file (named on stderr), or the files do not hold the same tensors with the same
// shapes. No MPI.
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <vector>

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
  // A negative or NaN tolerance would fail every tensor (or none): say so instead.
  TSP_CHECK(std::isfinite(o.rtol) && o.rtol >= 0,
            "compare: --rtol must be a finite number >= 0 (0: bit-identical), got {}", o.rtol);
  SafetensorsReader ra(o.a), rb(o.b);
  std::printf("# tsp compare  a=%s  b=%s  rtol=%g (norm-wise ||a-b||/||b||)\n", o.a.c_str(),
              o.b.c_str(), o.rtol);
  std::printf("# %-56s %-14s %12s %12s %12s  ok\n", "tensor", "shape", "max_abs_err", "max_abs_b",
              "rel_err");
  int bad = 0;
  double worst = 0;  // NaN once any tensor holds a NaN or Inf
  std::vector<std::string> nonfinite;
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
    int64_t nonfinite_a = 0, nonfinite_b = 0;
    for (int64_t i = 0; i < ta.numel(); ++i) {
      const double x = ta.f32()[i], y = tb.f32()[i], d = x - y;
      // NaN or Inf is never "close": std::max would drop a NaN and report 0.
      nonfinite_a += !std::isfinite(x);
      nonfinite_b += !std::isfinite(y);
      max_abs = std::max(max_abs, std::abs(d));
      max_b = std::max(max_b, std::abs(y));
      num += d * d;
      den += y * y;
    }
    // Norm-wise relative error; for an all-zero b it is the norm of a (so zeros equal zeros).
    const bool finite = nonfinite_a == 0 && nonfinite_b == 0;
    const double rel = !finite   ? std::numeric_limits<double>::quiet_NaN()
                       : den > 0 ? std::sqrt(num / den)
                                 : std::sqrt(num);
    const bool ok = finite && std::isfinite(rel) && rel <= o.rtol;
    worst = std::isnan(rel) || std::isnan(worst) ? std::numeric_limits<double>::quiet_NaN()
                                                 : std::max(worst, rel);
    bad += !ok;
    if (!finite) {
      nonfinite.push_back(fmt::format("{} ({} NaN/Inf in {}, {} in {})", ia.name, nonfinite_a, o.a,
                                      nonfinite_b, o.b));
      std::printf("  %-56s %-14s %12s %12s %12s  NO: %lld NaN/Inf in a, %lld in b\n",
                  ia.name.c_str(), shape_str(ia.shape).c_str(), "nan", "nan", "nan",
                  static_cast<long long>(nonfinite_a), static_cast<long long>(nonfinite_b));
      continue;
    }
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
  for (const std::string& t : nonfinite) {
    std::fprintf(stderr, "compare: tensor %s holds non-finite values: it matches nothing\n",
                 t.c_str());
  }
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
