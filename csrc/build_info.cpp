#include "sp_kernels/build_info.h"

#include <sstream>
#include <string>

#include "sp_kernels_build_config.h"

namespace sp_kernels {

namespace {

// The configured values are plain version strings and arch names; escaping keeps the JSON valid
// even if a build system hands over something unexpected.
std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string json_list(const std::string& semicolon_separated) {
  std::string out = "[";
  std::stringstream ss(semicolon_separated);
  std::string item;
  bool first = true;
  while (std::getline(ss, item, ';')) {
    if (item.empty()) {
      continue;
    }
    out += (first ? "" : ", ") + json_string(item);
    first = false;
  }
  return out + "]";
}

}  // namespace

std::string build_info_json() {
  std::ostringstream os;
  os << "{" << "\"version\": " << json_string(SP_KERNELS_VERSION) << ", "
     << "\"build_system\": " << json_string(SP_KERNELS_BUILD_SYSTEM) << ", "
     << "\"cpu_kernels\": true, "
#ifdef _OPENMP
     << "\"cpu_openmp\": true, "
#else
     << "\"cpu_openmp\": false, "
#endif
     << "\"cuda_kernels\": " << (SP_KERNELS_WITH_CUDA ? "true" : "false") << ", "
     << "\"cuda_archs\": " << json_list(SP_KERNELS_BUILT_ARCHS) << ", "
     << "\"built_with_torch\": " << json_string(SP_KERNELS_TORCH_VERSION) << ", "
     << "\"built_with_cuda\": " << (SP_KERNELS_WITH_CUDA ? json_string(SP_KERNELS_CUDA_VERSION) : "null") << "}";
  return os.str();
}

}  // namespace sp_kernels
