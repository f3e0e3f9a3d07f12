// Shared by the multi-rank tests (*_mpi_test.cpp): the world communicator set up by mpi_main.cpp.
#pragma once

#include "tsp/comm/communicator.h"

namespace tsp::test {
Communicator& world();
}  // namespace tsp::test
