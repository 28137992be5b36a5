#pragma once

#include <string>

namespace sp_kernels {

// JSON object describing this build: what was compiled, and against which torch and CUDA.
std::string build_info_json();

}  // namespace sp_kernels
