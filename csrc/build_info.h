#pragma once
#include <string>

namespace sparsekern {

struct BuildInfo {
  std::string version;
  std::string torch_version;       // torch the extension was compiled against
  bool with_cuda = false;
  std::string cuda_archs;          // TORCH_CUDA_ARCH_LIST at build time
  std::string cuda_version;        // nvcc version
  std::string cusparselt_version;  // cusparseLt.h version compiled against
  bool openmp = false;             // compiled with OpenMP: at::parallel_for in the CPU kernels uses the threads
};

BuildInfo build_info();

}  // namespace sparsekern
