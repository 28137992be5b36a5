// The C++ tests' one assertion helper: count, and name what failed (a ctest prints "N passed, N failed").
#pragma once

#include <cstdio>
#include <string>

namespace sp_kernels_test {

inline int g_passed = 0;
inline int g_failed = 0;

inline void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  }
}

}  // namespace sp_kernels_test
