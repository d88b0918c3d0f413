// What this build of the extension contains, compiled in by tools/build_config.py.
#include "build_info.h"

#ifdef SPARSEKERN_WITH_CUDA
#include <cusparseLt.h>
#endif

#ifndef SPARSEKERN_TORCH_VERSION
#define SPARSEKERN_TORCH_VERSION "unknown"
#endif
#ifndef SPARSEKERN_VERSION
#define SPARSEKERN_VERSION "unknown"
#endif

namespace sparsekern {

BuildInfo build_info() {
  BuildInfo info;
  info.version = SPARSEKERN_VERSION;
  info.torch_version = SPARSEKERN_TORCH_VERSION;
#ifdef SPARSEKERN_WITH_CUDA
  info.with_cuda = true;
  info.cuda_archs = SPARSEKERN_CUDA_ARCHS;
  info.cuda_version = SPARSEKERN_CUDA_VERSION;
  info.cusparselt_version = std::to_string(CUSPARSELT_VER_MAJOR) + "." + std::to_string(CUSPARSELT_VER_MINOR) + "." +
                            std::to_string(CUSPARSELT_VER_PATCH);
#else
  info.with_cuda = false;
#endif
#ifdef _OPENMP
  info.openmp = true;
#endif
  return info;
}

}  // namespace sparsekern
