// A libtorch program linked against libsparsekern built with its CUDA kernels (ctest sparsekern_link_cuda; registered
// only when CMake builds the CUDA kernels).
//
//  1. Always (no GPU needed): every op's CUDA kernel is registered with the dispatcher, and the checker itself can
//     fail (an op of this program registered for CPU only must be reported missing). A missing kernel fails the run.
//  2. Always: the C++ API's cuSPARSELt wrappers match their schemas (called with CPU tensors they must reach the
//     dispatcher's "no CPU kernel" error, not a signature mismatch).
//  3. Only when torch::cuda::is_available(): a small end-to-end check on the GPU - compress_24 + spmm_24 on CUDA
//     against the CPU kernels, and cslt_compress + cslt_linear on a 64x128 float16 2:4 weight against a float32
//     reference (sm80+). bench/gpu_validate.sh runs this on the GPU machine. Without a GPU it says it skipped that part.
//
// Exit status: 0 when every check ran passed, 1 otherwise.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#include <torch/cuda.h>
#include <torch/library.h>

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

// Every sparsekern op that has a CUDA kernel in csrc/cuda/ or csrc/cusparselt/.
const std::vector<std::string> kCudaOps = {
    "prune_nm",          "nm_violation",   "compress_24",           "decompress_24",
    "spmm_24",           "quantize_per_token", "cslt_compress",      "cslt_linear",
    "hessian_update_",   "act_scale_update_",  "wanda_prune",        "sparsegpt_prune_block_",
};

// "" when `qualified` has a kernel for the CUDA dispatch key, else why not.
std::string cuda_kernel_problem(const std::string& qualified) {
  auto handle = c10::Dispatcher::singleton().findOp(c10::OperatorName(qualified, ""));
  if (!handle.has_value()) return "no such op registered";
  if (!handle->hasSchema()) return "registered without a schema";
  if (!handle->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) return "no CUDA kernel registered";
  return "";
}

at::Tensor cpu_only_probe(const at::Tensor& x) { return x; }

}  // namespace

// An op of this program with a CPU kernel only: the checker must call it missing, or it proves nothing.
TORCH_LIBRARY(sparsekern_link_test, m) { m.def("cpu_only(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(sparsekern_link_test, CPU, m) { m.impl("cpu_only", &cpu_only_probe); }

namespace {

void test_registrations() {
  for (const auto& name : kCudaOps) {
    const auto problem = cuda_kernel_problem("sparsekern::" + name);
    check(problem.empty(), "sparsekern::" + name + ": " + problem);
    if (problem.empty()) std::printf("  sparsekern::%s: CUDA kernel registered\n", name.c_str());
  }
  check(cuda_kernel_problem("sparsekern_link_test::cpu_only") == "no CUDA kernel registered",
        "the registration check reports a CPU-only op as missing its CUDA kernel");
  check(cuda_kernel_problem("sparsekern::no_such_op") == "no such op registered",
        "the registration check reports an unknown op");
}

// The wrappers reach the dispatcher with the schema's signature: a CPU tensor gets "no CPU kernel".
void test_cslt_wrappers_reach_dispatcher() {
  auto expect_no_cpu_kernel = [](const char* what, const std::function<void()>& fn) {
    try {
      fn();
      check(false, std::string(what) + " on CPU tensors should have thrown");
    } catch (const c10::NotImplementedError& e) {
      const std::string msg = e.what();
      check(msg.find("CPU") != std::string::npos, std::string(what) + ": the error names the CPU backend: " + msg);
    } catch (const std::exception& e) {
      check(false, std::string(what) + ": expected the dispatcher's NotImplementedError, got: " + e.what());
    }
  };
  auto w = at::zeros({64, 128}, at::kHalf);
  expect_no_cpu_kernel("cslt_compress", [&] { sparsekern::cslt_compress(w); });
  expect_no_cpu_kernel("cslt_linear", [&] {
    sparsekern::cslt_linear(at::zeros({4, 128}, at::kHalf), at::zeros({8192}, at::kByte), 64, 128);
  });
}

bool close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol, const std::string& what) {
  const bool ok = at::allclose(got.to(at::kFloat).cpu(), want.to(at::kFloat).cpu(), rtol, atol);
  if (!ok) {
    const double err = (got.to(at::kFloat).cpu() - want.to(at::kFloat).cpu()).abs().max().item<double>();
    std::fprintf(stderr, "  %s: max abs error %g\n", what.c_str(), err);
  }
  return ok;
}

void test_gpu_portable_format() {
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const std::string tag = std::string(" (") + c10::toString(dtype) + ")";
    auto w = (at::randn({64, 128}) * 0.5).to(dtype);
    auto pruned = std::get<0>(sparsekern::prune_nm(w, 2, 4));
    auto [values_cpu, codes_cpu] = sparsekern::compress_24(pruned);
    auto [values, codes] = sparsekern::compress_24(pruned.to(at::kCUDA));
    check(values.is_cuda() && codes.is_cuda(), "compress_24 on CUDA returns CUDA tensors" + tag);
    check(at::equal(values.cpu(), values_cpu) && at::equal(codes.cpu(), codes_cpu),
          "compress_24 on CUDA matches the CPU kernel" + tag);
    check(at::equal(sparsekern::decompress_24(values, codes, 128).cpu(), pruned),
          "decompress_24 on CUDA round-trips" + tag);
    for (int64_t m : {1, 16}) {
      auto x = (at::randn({m, 128}) * 0.5).to(dtype);
      auto bias = at::randn({64}).to(dtype);
      auto y_cpu = sparsekern::spmm_24(x, values_cpu, codes_cpu, bias, std::nullopt, "relu");
      auto y = sparsekern::spmm_24(x.to(at::kCUDA), values, codes, bias.to(at::kCUDA), std::nullopt, "relu");
      const double tol = dtype == at::kFloat ? 1e-3 : 2e-2;
      check(y.is_cuda() && close(y, y_cpu, tol, tol, "spmm_24 M=" + std::to_string(m) + tag),
            "spmm_24 on CUDA matches the CPU kernel, M=" + std::to_string(m) + tag);
    }
  }
}

void test_gpu_cusparselt() {
  int major = 0;
  int device = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (major < 8) {
    std::printf("  cuSPARSELt part skipped: compute capability %d.x is below 8.0\n", major);
    return;
  }
  auto w = (at::randn({64, 128}) * 0.5).to(at::kHalf);
  auto pruned = std::get<0>(sparsekern::prune_nm(w, 2, 4));
  auto compressed = sparsekern::cslt_compress(pruned.to(at::kCUDA));
  check(compressed.is_cuda() && compressed.scalar_type() == at::kByte && compressed.dim() == 1,
        "cslt_compress returns a 1-D uint8 CUDA buffer");
  const auto w_ref = pruned.to(at::kFloat);
  for (int64_t m : {1, 16, 32}) {
    auto x = (at::randn({m, 128}) * 0.5).to(at::kHalf);
    auto ref = at::matmul(x.to(at::kFloat), w_ref.t());
    auto y = sparsekern::cslt_linear(x.to(at::kCUDA), compressed, 64, 128);
    check(y.is_cuda() && y.scalar_type() == at::kHalf && y.size(0) == m && y.size(1) == 64,
          "cslt_linear output: CUDA float16 [M, 64], M=" + std::to_string(m));
    check(close(y, ref, 1e-2, 2e-2, "cslt_linear M=" + std::to_string(m)),
          "cslt_linear matches x @ W^T in float32, M=" + std::to_string(m));
    auto bias = at::randn({64}).to(at::kHalf);
    auto yb = sparsekern::cslt_linear(x.to(at::kCUDA), compressed, 64, 128, bias.to(at::kCUDA), std::nullopt, "relu");
    check(close(yb, at::relu(ref + bias.to(at::kFloat)), 1e-2, 2e-2, "cslt_linear+bias+relu M=" + std::to_string(m)),
          "cslt_linear with bias and relu matches the reference, M=" + std::to_string(m));
  }
  check(cudaDeviceSynchronize() == cudaSuccess, "no CUDA error after the cuSPARSELt calls");
}

}  // namespace

int main() {
  at::manual_seed(0);
  std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"registrations", test_registrations},
      {"cslt_wrappers_reach_dispatcher", test_cslt_wrappers_reach_dispatcher},
  };
  const bool gpu = torch::cuda::is_available();
  if (gpu) {
    tests.push_back({"gpu_portable_format", test_gpu_portable_format});
    tests.push_back({"gpu_cusparselt", test_gpu_cusparselt});
  }
  for (const auto& [name, fn] : tests) {
    std::printf("%s\n", name);
    try {
      fn();
    } catch (const std::exception& e) {
      ++g_failed;
      std::fprintf(stderr, "FAILED: %s threw %s\n", name, e.what());
    }
  }
  if (!gpu) {
    std::printf("GPU part skipped: torch::cuda::is_available() is false (no GPU or no driver); checked the CUDA "
                "kernel registrations only\n");
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
