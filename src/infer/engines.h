// The inference engines (docs/inference.md), for the layouts to register under their names
// (parallel/registry.h, EngineRegistration): single and tp (src/infer/tensor_parallel.cpp), sp and
// tsp (src/infer/seq_sharded.cpp). Each builds over all ranks of `world` (single: every rank on its
// own) in the compute dtype on the device.
#pragma once

#include <memory>

#include "tsp/infer/engine.h"

namespace tsp::infer {

std::unique_ptr<Engine> make_single_engine(const LlamaConfig& c, Communicator& world, DType dtype,
                                           Device device);
std::unique_ptr<Engine> make_tp_engine(const LlamaConfig& c, Communicator& world, DType dtype,
                                       Device device);
std::unique_ptr<Engine> make_sp_engine(const LlamaConfig& c, Communicator& world, DType dtype,
                                       Device device);
std::unique_ptr<Engine> make_tsp_engine(const LlamaConfig& c, Communicator& world, DType dtype,
                                        Device device);

}  // namespace tsp::infer
