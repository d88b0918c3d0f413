"""Build configuration shared by setup.py (and read by tests): which variant, which sources, which flags.

Sources and flags come from csrc/build_config.json, which CMakeLists.txt reads too. Every decision here depends on
the toolkit and the installed torch, never on a live GPU. Problems raise BuildConfigError with a sentence that says
what is wrong and how to fix it; setup.py prints it instead of a compiler traceback.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

BASE_VERSION = "0.1.0"


class BuildConfigError(RuntimeError):
    """A build misconfiguration the user can fix; the message says how."""


@dataclasses.dataclass
class Config:
    with_cuda: bool
    sources: list
    include_dirs: list
    library_dirs: list
    libraries: list
    define_macros: list
    cxx_flags: list
    nvcc_flags: list
    link_args: list
    arch_list: str
    cusparselt_root: str | None
    version: str
    install_requires: list


def load_json(root: str) -> dict:
    with open(os.path.join(root, "csrc", "build_config.json")) as f:
        return json.load(f)


def expand(root: str, patterns: list) -> list:
    out = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.join(root, pat)))
        out.extend(os.path.relpath(h, root) for h in hits)
    return out


def _env_flag(name: str, env) -> bool | None:
    val = env.get(name)
    if val is None or val == "":
        return None
    if val.lower() in ("1", "true", "yes", "on"):
        return True
    if val.lower() in ("0", "false", "no", "off"):
        return False
    raise BuildConfigError(f"{name}={val!r} is not understood: use 1 (force) or 0 (disable), or leave it unset.")


def find_nvcc(env) -> str | None:
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        cand = os.path.join(home, "bin", "nvcc")
        return cand if os.path.exists(cand) else None
    path = shutil.which("nvcc", path=env.get("PATH"))
    if path:
        return path
    cand = "/usr/local/cuda/bin/nvcc"
    return cand if os.path.exists(cand) else None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise BuildConfigError(f"could not read the CUDA version from `{nvcc} --version`; is {nvcc} a working nvcc?")
    return f"{m.group(1)}.{m.group(2)}"


def find_cusparselt(env) -> str | None:
    """Root holding include/cusparseLt.h and lib/libcusparseLt.so*, or None."""
    candidates = []
    if env.get("CUSPARSELT_PATH"):
        candidates.append(env["CUSPARSELT_PATH"])  # an explicit path is the only place looked at
    for sp in [] if candidates else {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        if sp and os.path.isdir(sp):
            candidates.append(os.path.join(sp, "nvidia", "cusparselt"))
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cusparseLt.h")) and glob.glob(
            os.path.join(root, "lib", "libcusparseLt.so*")
        ):
            return os.path.abspath(root)
    if env.get("CUSPARSELT_PATH"):
        raise BuildConfigError(
            f"CUSPARSELT_PATH={env['CUSPARSELT_PATH']} does not hold include/cusparseLt.h and lib/libcusparseLt.so*; "
            "point it at a cuSPARSELt root or unset it to use the nvidia-cusparselt-cu13 wheel."
        )
    return None


def cuda_wheel_include_dirs() -> list:
    """cuBLAS/cuSPARSE headers that torch's CUDA wheels ship (nvidia/cu13/include), for toolkits without them."""
    out = []
    for sp in {sysconfig.get_paths()["purelib"], *sys.path}:
        for d in glob.glob(os.path.join(sp or "", "nvidia", "cu1*", "include")):
            if os.path.exists(os.path.join(d, "cublas_v2.h")) and d not in out:
                out.append(d)
    return out


def decide_cuda(env, torch_cuda: str | None, nvcc: str | None) -> bool:
    forced = _env_flag("SPARSEKERN_CUDA", env)
    if forced is False:
        return False
    if forced is True:
        if nvcc is None:
            raise BuildConfigError(
                "SPARSEKERN_CUDA=1 but no CUDA toolkit was found (no nvcc in $CUDA_HOME/bin, on PATH or in "
                "/usr/local/cuda/bin). Install the CUDA toolkit and set CUDA_HOME, or build the CPU-only variant "
                "with SPARSEKERN_CUDA=0."
            )
        if torch_cuda is None:
            raise BuildConfigError(
                "SPARSEKERN_CUDA=1 but the installed torch is a CPU-only build (torch.version.cuda is None). "
                "Install a CUDA build of torch (e.g. pip install torch==2.14.1 on x86_64 Linux), or build with "
                "SPARSEKERN_CUDA=0."
            )
        return True
    return nvcc is not None and torch_cuda is not None


def check_cuda_versions(torch_cuda: str, nvcc_ver: str) -> None:
    if torch_cuda.split(".")[0] != nvcc_ver.split(".")[0]:
        raise BuildConfigError(
            f"torch was built with CUDA {torch_cuda} but nvcc is CUDA {nvcc_ver}: the CUDA major versions must "
            f"match. Point CUDA_HOME at a CUDA {torch_cuda.split('.')[0]}.x toolkit, install a torch built for CUDA "
            f"{nvcc_ver.split('.')[0]}, or build the CPU-only variant with SPARSEKERN_CUDA=0."
        )


def configure(root: str, env=None) -> Config:
    env = dict(os.environ if env is None else env)
    spec = load_json(root)
    try:
        import torch
    except ImportError as e:  # pragma: no cover - pip --no-build-isolation without torch
        raise BuildConfigError(
            "torch must be installed before building sparsekern (pip install torch==2.14.1), and the build must "
            "use it: pip install --no-build-isolation ."
        ) from e

    torch_cuda = torch.version.cuda
    nvcc = find_nvcc(env)
    with_cuda = decide_cuda(env, torch_cuda, nvcc)
    debug = bool(_env_flag("SPARSEKERN_DEBUG", env))

    sources = expand(root, spec["common_sources"] + spec["cpu_sources"] + spec["python_sources"])
    include_dirs = [os.path.join(root, d) for d in spec["include_dirs"]]
    cxx = list(spec["cxx_flags"])
    nvcc_flags = list(spec["nvcc_flags"])
    if debug:
        cxx = [f for f in cxx if not f.startswith("-O")] + ["-O0", "-g"]
        nvcc_flags = [f for f in nvcc_flags if not f.startswith("-O")] + ["-O0", "-g", "-G"]
    torch_ver = torch.__version__.split("+")[0]
    macros = [("SPARSEKERN_TORCH_VERSION", f'"{torch_ver}"'), ("SPARSEKERN_VERSION", f'"{BASE_VERSION}"')]
    library_dirs, libraries, link_args = [], [], []
    if "-fopenmp" in cxx:
        link_args.append("-fopenmp")  # the kernels' at::parallel_for regions need libgomp (torch's, already loaded)
    arch_list = ""
    cusparselt_root = None
    version = BASE_VERSION

    if with_cuda:
        nvcc_ver = nvcc_version(nvcc)
        check_cuda_versions(torch_cuda, nvcc_ver)
        env_home = os.path.dirname(os.path.dirname(nvcc))
        os.environ.setdefault("CUDA_HOME", env_home)
        cusparselt_root = find_cusparselt(env)
        if cusparselt_root is None:
            raise BuildConfigError(
                "cuSPARSELt not found: the CUDA build needs include/cusparseLt.h and libcusparseLt.so. Install it "
                "with `pip install nvidia-cusparselt-cu13` (torch's CUDA wheels usually bring it), or set "
                "CUSPARSELT_PATH to its root; or build the CPU-only variant with SPARSEKERN_CUDA=0."
            )
        arch_list = env.get("TORCH_CUDA_ARCH_LIST") or spec["default_cuda_arch_list"]
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        sources += expand(root, spec["cuda_sources"])
        include_dirs += [os.path.join(cusparselt_root, "include")] + cuda_wheel_include_dirs()
        libdir = os.path.join(cusparselt_root, "lib")
        library_dirs.append(libdir)
        link_args += ["-l:" + os.path.basename(sorted(glob.glob(os.path.join(libdir, "libcusparseLt.so*")))[0])]
        # $ORIGIN/../nvidia/cusparselt/lib: the wheel's location next to an installed sparsekern package.
        link_args += ["-Wl,-rpath,$ORIGIN/../nvidia/cusparselt/lib", f"-Wl,-rpath,{libdir}"]
        macros += [
            ("SPARSEKERN_WITH_CUDA", "1"),
            ("SPARSEKERN_CUDA_ARCHS", f'"{arch_list}"'),
            ("SPARSEKERN_CUDA_VERSION", f'"{nvcc_ver}"'),
        ]
        if _env_flag("SPARSEKERN_LOCAL_VERSION", env) is not False:
            tmaj, tmin = torch_ver.split(".")[:2]
            version = f"{BASE_VERSION}+cu{torch_cuda.replace('.', '')}torch{tmaj}.{tmin}"

    install_requires = [f"torch=={torch_ver}" if with_cuda else "torch>=2.6", "numpy"]
    if with_cuda:
        install_requires.append("nvidia-cusparselt-cu13" if torch_cuda.startswith("13") else "nvidia-cusparselt-cu12")

    return Config(
        with_cuda=with_cuda,
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=libraries,
        define_macros=macros,
        cxx_flags=cxx,
        nvcc_flags=nvcc_flags,
        link_args=link_args,
        arch_list=arch_list,
        cusparselt_root=cusparselt_root,
        version=version,
        install_requires=install_requires,
    )


if __name__ == "__main__":
    try:
        cfg = configure(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except BuildConfigError as e:
        print(f"sparsekern build: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
