// pybind11 module sparsekern._C: non-tensor utilities only (build info, cuSPARSELt cache statistics and search
// persistence). The tensor ops are torch ops (csrc/registration.cpp), reached through torch.ops.sparsekern.
#include <torch/extension.h>

#include "build_info.h"

namespace sparsekern {
#ifdef SPARSEKERN_WITH_CUDA
// csrc/cusparselt/bindings.cpp
void bind_cusparselt(pybind11::module_& m);
#endif
}  // namespace sparsekern

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsekern native utilities (ops live in torch.ops.sparsekern)";
  m.def("build_info", []() {
    const auto info = sparsekern::build_info();
    pybind11::dict d;
    d["version"] = info.version;
    d["torch_version"] = info.torch_version;
    d["with_cuda"] = info.with_cuda;
    d["openmp"] = info.openmp;
    d["cuda_archs"] = info.cuda_archs;
    d["cuda_version"] = info.cuda_version;
    d["cusparselt_version"] = info.cusparselt_version;
    return d;
  });
#ifdef SPARSEKERN_WITH_CUDA
  sparsekern::bind_cusparselt(m);
#endif
}
