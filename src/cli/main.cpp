// The `tsp` command line: subcommands (train, generate, grad, bench, plan, ...) register in
// command_registry(). A tsp::Error on any rank prints once with its rank and aborts the whole
// MPI job, so no rank is left hanging in a collective.
#include <cstdio>
#include <memory>

#include "cli/command.h"
#include "tsp/comm/mpi.h"
#include "tsp/core/error.h"

namespace tsp::cli {
std::vector<Command>& command_registry() {
  static std::vector<Command> commands;
  return commands;
}
}  // namespace tsp::cli

int main(int argc, char** argv) {
  using namespace tsp::cli;
  CLI::App app{"tsp: Tensor and Sequence Parallel training and serving of long-context transformers"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "tsp 0.1.0");
  std::function<int(tsp::Communicator*)> run;
  bool needs_mpi = true;
  for (Command& c : command_registry()) {
    CLI::App* sub = app.add_subcommand(c.name, c.description);
    auto body = c.setup(*sub);
    sub->callback([&run, &needs_mpi, body, mpi = c.needs_mpi] {
      run = body;
      needs_mpi = mpi;
    });
  }
  CLI11_PARSE(app, argc, argv);

  if (!needs_mpi) {
    try {
      return run(nullptr);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      return 1;
    }
  }
  tsp::MpiRuntime mpi(&argc, &argv);
  try {
    return run(&mpi.world());
  } catch (const std::exception& e) {
    tsp::abort_job(e.what());
  }
}
