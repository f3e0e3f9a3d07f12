// Layouts register themselves by name: each src/parallel/<layout>.cpp defines one static
//   static const LayoutRegistration reg("tsp", "one-line description", factory);
// tsp_lib is a shared library, so every layout's registrar runs when the library loads and
// make_layout() (layout_common.cpp) finds it without a central list to edit.
//
// A layout's inference engine registers under the same name (optional; src/infer/*.cpp hold
// theirs beside the engine, with an EngineRegistration), so infer::make_engine and
// infer::supported_layouts find it without comparing layout names.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tsp/core/device.h"
#include "tsp/core/tensor.h"
#include "tsp/parallel/layout.h"

namespace tsp {

namespace infer {
class Engine;
}

// Builds the layout. Called by make_layout after the common validation (config.validate(),
// world = D·R, T | D); the factory validates what is specific to its layout (heads, FFN, ...).
using LayoutFactory = std::function<std::unique_ptr<Layout>(
    const LlamaConfig& config, const ParallelConfig& parallel, Communicator& world)>;

// Builds the layout's inference engine over all ranks of `world` in a compute dtype on a device
// (infer/engine.h, make_engine). The factory validates what is specific to its engine.
using EngineFactory = std::function<std::unique_ptr<infer::Engine>(
    const LlamaConfig& config, Communicator& world, DType dtype, Device device)>;

struct LayoutInfo {
  std::string name;
  std::string description;
  LayoutFactory make;
  EngineFactory engine;  // empty when the layout has no inference engine
};

// The registered layouts, sorted by name. Registering a name twice throws tsp::Error.
const std::vector<LayoutInfo>& registered_layouts();
const LayoutInfo* find_layout(const std::string& name);  // nullptr when unknown
std::string layout_names_str();                          // "fsdp-cp, single, sp, ..."

struct LayoutRegistration {
  LayoutRegistration(std::string name, std::string description, LayoutFactory make);
};

// The inference engine of layout `name`; registering one twice throws tsp::Error. Engines are
// kept apart from the layouts until both are known (static registrars run in any order), so an
// engine is found even in a build that leaves its layout's training code out.
struct EngineRegistration {
  EngineRegistration(std::string layout, EngineFactory make);
};
const EngineFactory* find_engine(const std::string& layout);  // nullptr when none
std::string engine_layout_names_str();                          // "single, sp, tp, tsp"

}  // namespace tsp
