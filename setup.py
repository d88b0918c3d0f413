"""Build script for sparsekern.

Build variables (environment):

  SPARSEKERN_CUDA        "1" forces the CUDA build (fails with a clear message if nvcc or a CUDA build of torch is
                         missing), "0" forces the CPU-only build. Unset: CUDA is built when nvcc (CUDA_HOME or PATH)
                         and a CUDA build of torch are both present. A live GPU is never consulted.
  CUDA_HOME              CUDA toolkit root (nvcc at $CUDA_HOME/bin/nvcc). Default: torch's detection.
  TORCH_CUDA_ARCH_LIST   GPU archs to compile, e.g. "8.0;9.0a". Default (releases): "8.0;8.6;8.9;9.0a;9.0+PTX",
                         i.e. SASS for A100/A10/L4/H100 plus PTX of the newest generic arch.
  CUSPARSELT_PATH        cuSPARSELt root holding include/cusparseLt.h and lib/libcusparseLt.so*. Default: the
                         nvidia-cusparselt-cu13 wheel in site-packages (nvidia/cusparselt).
  MAX_JOBS               parallel compile jobs (ninja), as with every torch extension.
  SPARSEKERN_DEBUG       "1": -O0 -g host and device code.
  SPARSEKERN_LOCAL_VERSION "0": no "+cu130torch2.14" local version tag (default: tag CUDA builds).

The extension finds cuSPARSELt at run time through an rpath relative to its own location
($ORIGIN/../nvidia/cusparselt/lib, the wheel's place in site-packages), plus the absolute directory found at build
time for in-place developer builds. No LD_LIBRARY_PATH is needed.
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import build_config  # noqa: E402  (tools/build_config.py: shared with CMake through csrc/build_config.json)


def main():
    try:
        cfg = build_config.configure(os.path.dirname(os.path.abspath(__file__)))
    except build_config.BuildConfigError as e:
        sys.exit(f"sparsekern build: {e}")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if cfg.with_cuda:
        ext = CUDAExtension(
            name="sparsekern._C",
            sources=cfg.sources,
            include_dirs=cfg.include_dirs,
            library_dirs=cfg.library_dirs,
            libraries=cfg.libraries,
            define_macros=cfg.define_macros,
            extra_compile_args={"cxx": cfg.cxx_flags, "nvcc": cfg.nvcc_flags},
            extra_link_args=cfg.link_args,
        )
    else:
        ext = CppExtension(
            name="sparsekern._C",
            sources=cfg.sources,
            include_dirs=cfg.include_dirs,
            define_macros=cfg.define_macros,
            extra_compile_args={"cxx": cfg.cxx_flags},
            extra_link_args=cfg.link_args,
        )

    setup(
        version=cfg.version,
        packages=find_packages(where="python"),
        package_dir={"": "python"},
        package_data={"sparsekern": ["data/*", "py.typed", "bench/*.json"]},
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        install_requires=cfg.install_requires,
    )


if __name__ == "__main__":
    main()
