// The `tsp` command's subcommands register themselves here: each src/cli/cmd_<name>.cpp defines
// a static CommandRegistration, so adding a command touches no other file.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "tsp/comm/communicator.h"

namespace tsp::cli {

struct Command {
  std::string name;
  std::string description;
  bool needs_mpi = true;  // false: runs without initialising MPI (e.g. plan)
  // Adds the subcommand's options to `sub`, returns the function to run once parsed.
  std::function<std::function<int(Communicator* world)>(CLI::App& sub)> setup;
};

std::vector<Command>& command_registry();

struct CommandRegistration {
  explicit CommandRegistration(Command c) { command_registry().push_back(std::move(c)); }
};

// For unsigned options (seeds): CLI11 converts "-1" to 2^64 - 1 without a word; refuse it.
inline const CLI::Validator kNotNegative(
    [](std::string& value) {
      return !value.empty() && value[0] == '-' ? "must be >= 0, got " + value : std::string();
    },
    "");

// For an output file written at the end of a long command (`--out`): throws tsp::Error now,
// naming the option, when it cannot be written there (a directory, or a missing or read-only
// parent directory). An existing device or pipe (/dev/stdout) is accepted: it is written in place.
void check_output_path(const std::string& path, const std::string& option);

}  // namespace tsp::cli
