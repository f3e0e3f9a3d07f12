#include "tsp/core/machine.h"

#include <cstdio>
#include <fstream>

namespace tsp {

std::string cpu_description() {
  std::ifstream in("/proc/cpuinfo");
  std::string line, name, family = "?", model = "?";
  auto value = [&line] {
    const auto colon = line.find(':');
    const auto start = colon == std::string::npos ? colon : line.find_first_not_of(' ', colon + 1);
    return start == std::string::npos ? std::string() : line.substr(start);
  };
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      name = value();
    } else if (line.rfind("cpu family", 0) == 0) {
      family = value();
    } else if (line.rfind("model", 0) == 0 && line.find("name") == std::string::npos) {
      model = value();
    } else if (line.empty() && !name.empty()) {
      break;  // first processor only
    }
  }
  if (name.empty()) return "unknown cpu";
  return name + " (family " + family + " model " + model + ")";
}

std::string git_revision() {
  FILE* f = popen("git rev-parse --short HEAD 2>/dev/null", "r");
  if (!f) return "unknown";
  char buf[64] = {0};
  const bool ok = fgets(buf, sizeof buf, f) != nullptr;
  pclose(f);
  std::string s = ok ? buf : "";
  s.erase(s.find_last_not_of(" \n") + 1);
  return s.empty() ? "unknown" : s;
}

}  // namespace tsp
