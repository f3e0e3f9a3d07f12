// Layouts register themselves by name: each src/parallel/<layout>.cpp defines one static
//   static const LayoutRegistration reg("tsp", "one-line description", factory);
// tsp_lib is a shared library, so every layout's registrar runs when the library loads and
// make_layout() (layout_common.cpp) finds it without a central list to edit.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tsp/parallel/layout.h"

namespace tsp {

// Builds the layout. Called by make_layout after the common validation (config.validate(),
// world = D·R, T | D); the factory validates what is specific to its layout (heads, FFN, ...).
using LayoutFactory = std::function<std::unique_ptr<Layout>(
    const LlamaConfig& config, const ParallelConfig& parallel, Communicator& world)>;

struct LayoutInfo {
  std::string name;
  std::string description;
  LayoutFactory make;
};

// The registered layouts, sorted by name. Registering a name twice throws tsp::Error.
const std::vector<LayoutInfo>& registered_layouts();
const LayoutInfo* find_layout(const std::string& name);  // nullptr when unknown
std::string layout_names_str();                          // "fsdp-cp, single, sp, ..."

struct LayoutRegistration {
  LayoutRegistration(std::string name, std::string description, LayoutFactory make);
};

}  // namespace tsp
