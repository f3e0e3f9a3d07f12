// Facts about the machine and the build, for the '#' headers of benchmark tables.
#pragma once

#include <string>

namespace tsp {

// "AMD EPYC 9R14 (family 25 model 17)" from /proc/cpuinfo (first processor), or "unknown cpu".
std::string cpu_description();
// Short git revision of the working directory's checkout, or "unknown" outside one.
std::string git_revision();

}  // namespace tsp
