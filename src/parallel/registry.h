// Layouts register themselves by name: each src/parallel/<layout>.cpp defines one static
//   static const LayoutRegistration reg("tsp", "one-line description", factory);
// tsp_lib is a shared library, so every layout's registrar runs when the library loads and
// make_layout() (layout_common.cpp) finds it without a central list to edit.
//
// A layout's inference engine registers under the same name, from the layout's file (optional:
// fsdp-cp and tp-sp have none; the engines themselves live in src/infer/, infer/engines.h), so
// infer::make_engine and infer::supported_layouts find it without comparing layout names.
//
// Each layout's cost and memory model (include/tsp/plan/layout_model.h) registers itself the same
// way, under the layout's name, from the layout's own file (the end of src/parallel/<layout>.cpp):
//   static const LayoutModelRegistration reg("tsp", std::make_shared<TspModel>());
// so the planner asks the registry instead of comparing layout names.
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
namespace plan {
class LayoutModel;
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
  // The layout's cost and memory model; nullptr until one is registered under the same name.
  const plan::LayoutModel* model = nullptr;
};

// The registered layouts, sorted by name. Registering a name twice throws tsp::Error.
const std::vector<LayoutInfo>& registered_layouts();
const LayoutInfo* find_layout(const std::string& name);  // nullptr when unknown
std::string layout_names_str();                          // "fsdp-cp, single, sp, ..."

struct LayoutRegistration {
  LayoutRegistration(std::string name, std::string description, LayoutFactory make);
};

// Models are registered independently of the layouts (static initialisation order across files
// is unspecified, and `tsp plan` models layouts a build may leave out); each is attached to its
// layout's LayoutInfo when both exist. Registering a model name twice throws tsp::Error.
struct LayoutModelRegistration {
  LayoutModelRegistration(std::string name, std::shared_ptr<const plan::LayoutModel> model);
};
// The model registered under `name` (nullptr when none), and the names of every model, sorted.
const plan::LayoutModel* find_registered_model(const std::string& name);
std::vector<std::string> registered_model_names();

// The inference engine of layout `name`; registering one twice throws tsp::Error. Engines are
// kept apart from the layouts until both are known (static registrars run in any order), so an
// engine is found even in a build that leaves its layout's training code out.
struct EngineRegistration {
  EngineRegistration(std::string layout, EngineFactory make);
};
const EngineFactory* find_engine(const std::string& layout);  // nullptr when none
std::string engine_layout_names_str();                        // "single, sp, tp, tsp"

}  // namespace tsp
