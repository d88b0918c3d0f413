// C++ tests of libsparsekern's CPU ops through the public C++ API (include/sparsekern/sparsekern.h), run by ctest.
// Each check has an independent reference written with plain ATen calls.
#include <ATen/ATen.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "sparsekern/sparsekern.h"

namespace {

int g_failed = 0;
int g_passed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  }
}

// Reference 2:4 pruning: keep the two largest |w| of each group of 4 (ties keep the lower index).
at::Tensor reference_prune_24(const at::Tensor& w) {
  auto g = w.reshape({w.size(0), -1, 4});
  // Rank by |w| descending, breaking ties by index: add a tiny index-dependent epsilon on a float64 copy.
  auto key = g.abs().to(at::kDouble) - at::arange(4, at::kDouble).mul(1e-9).view({1, 1, 4});
  auto idx = std::get<1>(key.topk(2, -1));
  auto mask = at::zeros_like(g, at::kBool).scatter_(-1, idx, true);
  return (g * mask).reshape(w.sizes());
}

void test_prune_and_check() {
  for (int64_t rows : {1, 7, 64}) {
    for (int64_t cols : {4, 12, 64}) {
      auto w = at::randn({rows, cols});
      auto [pruned, mask] = sparsekern::prune_nm(w, 2, 4);
      check(at::equal(pruned, reference_prune_24(w)), "prune_nm matches reference " + std::to_string(rows) + "x" +
                                                          std::to_string(cols));
      check(mask.sum().item<int64_t>() == rows * cols / 2, "prune_nm keeps half");
      check(sparsekern::is_nm(pruned, 2, 4), "pruned tensor is 2:4");
      check(!sparsekern::is_nm(w, 2, 4), "dense random tensor is not 2:4");
    }
  }
}

void test_compress_roundtrip() {
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    auto w = at::randn({33, 40}).to(dtype);
    auto pruned = std::get<0>(sparsekern::prune_nm(w, 2, 4));
    auto [values, codes] = sparsekern::compress_24(pruned);
    check(values.size(1) == 20 && codes.size(1) == 5, "compressed shapes");
    check(at::equal(sparsekern::decompress_24(values, codes, 40), pruned), "compress/decompress round trip");
  }
}

void test_spmm_against_dense() {
  auto w = std::get<0>(sparsekern::prune_nm(at::randn({24, 64}), 2, 4));
  auto [values, codes] = sparsekern::compress_24(w);
  auto bias = at::randn({24});
  for (int64_t m : {1, 3, 16}) {
    auto x = at::randn({2, m, 64});
    auto y = sparsekern::spmm_24(x, values, codes, bias, std::nullopt, "relu");
    auto ref = at::relu(at::matmul(x.to(at::kDouble), w.to(at::kDouble).t()) + bias.to(at::kDouble));
    check(y.sizes() == ref.sizes(), "spmm_24 output shape");
    check(at::allclose(y.to(at::kDouble), ref, 1e-4, 1e-4), "spmm_24 matches the fp64 reference, M=" +
                                                                std::to_string(m));
  }
}

void test_bad_input() {
  bool threw = false;
  try {
    sparsekern::compress_24(at::randn({4, 8}));
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("2:4") != std::string::npos;
  }
  check(threw, "compress_24 of a dense tensor raises an error that mentions 2:4");
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"prune_and_check", test_prune_and_check},
      {"compress_roundtrip", test_compress_roundtrip},
      {"spmm_against_dense", test_spmm_against_dense},
      {"bad_input", test_bad_input},
  };
  for (const auto& [name, fn] : tests) {
    try {
      fn();
    } catch (const std::exception& e) {
      ++g_failed;
      std::fprintf(stderr, "FAILED: %s threw %s\n", name, e.what());
    }
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
