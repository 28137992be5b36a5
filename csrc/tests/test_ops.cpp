// C++ test of the sp_kernels ops through the dispatcher, against hand-computed expectations.
// Built and run by CMake/ctest; no Python involved.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "check.h"

#ifndef SP_KERNELS_EXPECT_CUDA
#define SP_KERNELS_EXPECT_CUDA 0
#endif

namespace {

using sp_kernels_test::check;
using sp_kernels_test::g_failed;
using sp_kernels_test::g_passed;

using ShardPadFn = at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, double);

c10::TypedOperatorHandle<ShardPadFn> shard_pad_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("sp_kernels::shard_pad", "").typed<ShardPadFn>();
}

at::Tensor from_values(const std::vector<float>& values, at::IntArrayRef shape) {
  return at::tensor(values, at::kFloat).reshape(shape).clone();
}

bool same(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.dtype() == b.dtype() && at::equal(a, b);
}

void test_one_dim() {
  auto op = shard_pad_op();
  const auto x = from_values({10, 11, 12, 13, 14}, {5});
  check(same(op.call(x, 0, 3, 4, -1.0), from_values({13, 14, -1, -1}, {4})), "1-D straddling the end");
  check(same(op.call(x, 0, 1, 3, -1.0), from_values({11, 12, 13}, {3})), "1-D inside");
  check(same(op.call(x, 0, 7, 2, 0.5), from_values({0.5, 0.5}, {2})), "1-D past the end");
  check(op.call(x, 0, 2, 0, 0.0).numel() == 0, "length 0");
}

void test_three_dims() {
  auto op = shard_pad_op();
  // x[b][s][k] = 100 b + 10 s + k, shape [2, 3, 2]; shard rows [2, 4) of dim 1 with pad 9.
  std::vector<float> values;
  for (int b = 0; b < 2; ++b)
    for (int s = 0; s < 3; ++s)
      for (int k = 0; k < 2; ++k) values.push_back(static_cast<float>(100 * b + 10 * s + k));
  const auto x = from_values(values, {2, 3, 2});
  const auto want = from_values({20, 21, 9, 9, 120, 121, 9, 9}, {2, 2, 2});
  const auto y = op.call(x, 1, 2, 2, 9.0);
  check(same(y, want), "[2,3,2] dim 1, start 2, length 2");
  check(y.is_contiguous(), "output contiguous");
  check(y.data_ptr() != x.data_ptr(), "output is a new tensor");
  // Negative dim: the last one; rows [1, 3) of dim 2 (size 2) -> one row copied, one padded.
  const auto want_last = from_values({1, -2, 11, -2, 21, -2, 101, -2, 111, -2, 121, -2}, {2, 3, 2});
  check(same(op.call(x, -1, 1, 2, -2.0), want_last), "negative dim");
  // Non-contiguous input: transpose to [2, 2, 3] and shard dim 2 (the old dim 1).
  const auto xt = x.transpose(1, 2);
  const auto want_t = from_values({10, 20, 11, 21, 110, 120, 111, 121}, {2, 2, 2});
  check(same(op.call(xt, 2, 1, 2, 0.0), want_t), "non-contiguous input");
}

void test_dtypes() {
  auto op = shard_pad_op();
  const auto x = at::arange(12, at::kDouble).reshape({3, 4});
  for (auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kInt, at::kLong}) {
    const auto xd = x.to(dtype);
    const auto y = op.call(xd, 0, 1, 3, 7.0);
    const auto want = at::cat({xd.narrow(0, 1, 2), at::full({1, 4}, 7.0, xd.options())}, 0);
    check(same(y, want), std::string("dtype ") + c10::toString(dtype));
  }
}

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    check(false, "expected an error containing: " + needle);
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    check(msg.find(needle) != std::string::npos, "error '" + needle + "' not in: " + msg.substr(0, 200));
  }
}

void test_errors() {
  auto op = shard_pad_op();
  const auto x = at::ones({2, 5});
  expect_error([&] { op.call(x, 1, -1, 2, 0.0); }, "shard_pad: start must be >= 0, got -1");
  expect_error([&] { op.call(x, 1, 0, -3, 0.0); }, "shard_pad: length must be >= 0, got -3");
  expect_error([&] { op.call(x, 2, 0, 1, 0.0); }, "shard_pad: dim must be in [-2, 2)");
  expect_error([&] { op.call(x.to(at::kInt), 1, 0, 1, 0.5); }, "shard_pad: pad_value must be an integer");
}

void test_build_info() {
  using InfoFn = std::string();
  const auto info =
      c10::Dispatcher::singleton().findSchemaOrThrow("sp_kernels::_build_info", "").typed<InfoFn>().call();
  std::printf("build info: %s\n", info.c_str());
  check(info.find("\"build_system\": \"cmake\"") != std::string::npos, "build_info names cmake");
  check(info.find("\"cpu_kernels\": true") != std::string::npos, "build_info cpu_kernels");
  const bool cuda = info.find("\"cuda_kernels\": true") != std::string::npos;
  check(cuda == static_cast<bool>(SP_KERNELS_EXPECT_CUDA), "build_info cuda_kernels matches the configuration");
  const bool openmp = info.find("\"cpu_openmp\": true") != std::string::npos;
  check(openmp == static_cast<bool>(SP_KERNELS_EXPECT_OPENMP), "build_info cpu_openmp matches the configuration");
  const auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName("sp_kernels::shard_pad", ""));
  check(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU), "CPU kernel registered");
  check(op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CUDA) == cuda,
        "CUDA kernel registered exactly when built");
}

}  // namespace

int main() {
  const std::vector<std::pair<const char*, void (*)()>> tests = {
      {"one_dim", test_one_dim},   {"three_dims", test_three_dims}, {"dtypes", test_dtypes},
      {"errors", test_errors},     {"build_info", test_build_info},
  };
  for (const auto& [name, fn] : tests) {
    const int failed_before = g_failed;
    try {
      fn();
    } catch (const std::exception& e) {
      check(false, std::string(name) + " threw: " + e.what());
    }
    std::printf("%-12s %s\n", name, g_failed == failed_before ? "ok" : "FAILED");
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
