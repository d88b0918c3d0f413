"""`sparsekern.doctor()` / `sparsekern doctor [--json]`: what this installation can do, and how to fix what is missing.

Reports torch, the CUDA runtime and driver, cuSPARSELt, the extension's build (CPU-only or CUDA, and the GPU archs
actually present in the binary, read from its .nv_fatbin section), and every visible GPU with its compute capability
and whether it has sparse tensor cores (sm80+). Device queries use cuda-python (cuda.bindings) when installed, and
torch.cuda otherwise. Nothing here needs a GPU: on a machine without one the report says so.

The "environment" section says what steers kernel choice in this process: every SPARSEKERN_* variable
(sparsekern.envs: name, value, default, source, who reads it), the policy table in use (its path, or "built-in
defaults") and the C++ CPU dispatch settings in effect (forced ISA / kernel family, thresholds, the CPU features
probed).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import struct
import sys
from dataclasses import asdict, dataclass, field

import torch

from . import _ext, envs
from ._version import __version__

# --------------------------------------------------------------------------------------------- fatbin reading

_FATBIN_MAGIC = 0xBA55ED50


def _elf_section(path: str, name: str) -> bytes | None:
    """Bytes of the named section of a 64-bit little-endian ELF file, or None."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size
        return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)

    strtab = header(shstrndx)
    names = data[strtab[4]: strtab[4] + strtab[5]]
    for i in range(shnum):
        h = header(i)
        end = names.find(b"\0", h[0])
        if names[h[0]:end].decode(errors="replace") == name:
            return data[h[4]: h[4] + h[5]]
    return None


def fatbin_archs(path: str) -> dict:
    """GPU code embedded in a shared object: {"sass": ["sm_80", ...], "ptx": ["compute_90", ...]}.

    Parses the .nv_fatbin section: a sequence of fat binaries (magic 0xBA55ED50, u16 version, u16 header size,
    u64 payload size), each holding entries whose header starts with u16 kind (1 = PTX, 2 = ELF/SASS), u16, u32
    header size, u64 payload size, ... and a u32 SM number at offset 28.
    """
    sec = _elf_section(path, ".nv_fatbin")
    sass, ptx = set(), set()
    if sec:
        off = 0
        while off + 16 <= len(sec):
            magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", sec, off)
            if magic != _FATBIN_MAGIC:
                off += 8  # sections are 8-byte aligned; skip padding
                continue
            entry = off + hsize
            end = entry + fsize
            while entry + 32 <= end:
                kind, _u, ehsize, psize = struct.unpack_from("<HHIQ", sec, entry)
                arch, = struct.unpack_from("<I", sec, entry + 28)
                if kind == 1:
                    ptx.add(f"compute_{arch}")
                elif kind == 2:
                    sass.add(f"sm_{arch}")
                if ehsize == 0:
                    break
                entry += ehsize + psize
            off = end
    key = lambda s: int(s.split("_")[1])  # noqa: E731
    return {"sass": sorted(sass, key=key), "ptx": sorted(ptx, key=key)}


# --------------------------------------------------------------------------------------------- the report


@dataclass
class GPU:
    index: int
    name: str
    compute_capability: str
    sparse_tensor_cores: bool
    arch_in_binary: bool | None = None


@dataclass
class Report:
    sparsekern_version: str
    python: str
    torch_version: str
    torch_cuda: str | None
    extension_loaded: bool
    extension_error: str | None
    extension_with_cuda: bool
    extension_arch_list: str
    extension_binary_archs: dict
    extension_path: str | None
    cuda_runtime_version: str | None
    cuda_driver_version: str | None
    cusparselt_built_against: str | None
    cusparselt_wheel_version: str | None
    cusparselt_library: str | None
    device_query: str
    gpus: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # each: a sentence saying what is missing and how to fix it
    # {"variables": [{name, value, default, source, doc, read_by[, error]}], "policy_table": path | "built-in
    # defaults", "cpu_dispatch": settings in effect | None, "cpu_dispatch_pending_errors": [...], "cpu_features": {}}
    environment: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _cuda_python_query():
    """(runtime version, driver version, [(name, (major, minor))], error) through cuda-python, or None if absent."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    rt = _loaded_cudart_version()
    drv = None
    gpus, err = [], None
    try:
        (e,) = driver.cuInit(0)
        if int(e) != 0:
            err = err or f"no usable NVIDIA driver/GPU (cuInit: {e.name if hasattr(e, 'name') else e})"
        else:
            e, v = driver.cuDriverGetVersion()
            drv = f"{v // 1000}.{(v % 1000) // 10}"
            e, n = driver.cuDeviceGetCount()
            A = driver.CUdevice_attribute
            for i in range(n):
                e, dev = driver.cuDeviceGet(i)
                e, raw = driver.cuDeviceGetName(256, dev)
                name = raw.split(b"\0", 1)[0].decode()
                e, major = driver.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
                e, minor = driver.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
                gpus.append((name, (major, minor)))
    except Exception as ex:  # libcuda.so missing: no driver installed
        err = err or f"no NVIDIA driver found ({ex.__class__.__name__}: {ex})"
    return rt, drv, gpus, err


def _loaded_cudart_version() -> str | None:
    """Version of the libcudart this process loaded (torch's), read through ctypes; None when none is loaded."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).cudaRuntimeGetVersion
            v = ctypes.c_int(0)
            if fn(ctypes.byref(v)) == 0:
                return f"{v.value // 1000}.{(v.value % 1000) // 10}"
        except OSError:
            continue
    return None


def _torch_query():
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            gpus.append((torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)))
    return gpus


def _arch_covered(cc: tuple, binary: dict) -> bool:
    sm = cc[0] * 10 + cc[1]
    if f"sm_{sm}" in binary["sass"]:
        return True
    # SASS runs on later minor revisions of the same major; PTX JIT-compiles for any later arch.
    if any(int(s.split("_")[1]) // 10 == cc[0] and int(s.split("_")[1]) <= sm for s in binary["sass"]):
        return True
    return any(int(p.split("_")[1]) <= sm for p in binary["ptx"])


def collect_environment() -> tuple[dict, list[str]]:
    """The "environment" section, and the problems found in it (bad variable values, an unreadable policy table)."""
    from . import policy

    problems = []
    variables = envs.describe()
    for v in variables:
        if "error" in v:
            problems.append(f"{v['error']} (read by {v['read_by']}); fix or unset it.")
    try:
        table = policy.table_in_use()
    except Exception as e:  # noqa: BLE001 - doctor must always work
        table = f"unreadable: {e}"
        problems.append(f"the policy table cannot be used ({e}); fix it, or point {policy.ENV_TABLE} elsewhere.")
    if policy._state.broken_default:
        problems.append(f"the policy table in the user cache is ignored ({policy._state.broken_default}); rewrite it "
                        "with `sparsekern bench gemm --policy PATH` or delete it.")
    pending = envs.cpu_dispatch_pending_errors()
    info = {
        "variables": variables,
        "policy_table": table,
        "cpu_dispatch": envs.cpu_dispatch_settings() or None,
        "cpu_dispatch_pending_errors": pending,
        "cpu_features": dict(_ext._C.cpu_features()) if _ext.available() else None,
    }
    return info, problems


def collect() -> Report:
    info = _ext.build_info()
    ext_path = getattr(_ext._C, "__file__", None) if _ext._C is not None else None
    binary = fatbin_archs(ext_path) if ext_path and info.get("with_cuda") else {"sass": [], "ptx": []}
    try:
        cslt_wheel = importlib.metadata.version("nvidia-cusparselt-cu13")
    except importlib.metadata.PackageNotFoundError:
        try:
            cslt_wheel = importlib.metadata.version("nvidia-cusparselt-cu12")
        except importlib.metadata.PackageNotFoundError:
            cslt_wheel = None
    cslt_lib = None
    if ext_path and info.get("with_cuda"):
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcusparseLt" in line:
                    cslt_lib = line.split()[-1]
                    break

    q = _cuda_python_query()
    if q is not None:
        rt, drv, gpu_list, qerr = q
        method = "cuda-python"
    else:
        rt, drv, qerr = _loaded_cudart_version(), None, None
        gpu_list = _torch_query()
        method = "torch.cuda (install cuda-python for driver/runtime versions)"

    rep = Report(
        sparsekern_version=__version__,
        python=sys.version.split()[0],
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        extension_loaded=_ext.available(),
        extension_error=_ext.load_error(),
        extension_with_cuda=bool(info.get("with_cuda")),
        extension_arch_list=info.get("cuda_archs", ""),
        extension_binary_archs=binary,
        extension_path=ext_path,
        cuda_runtime_version=rt,
        cuda_driver_version=drv,
        cusparselt_built_against=info.get("cusparselt_version") or None,
        cusparselt_wheel_version=cslt_wheel,
        cusparselt_library=cslt_lib,
        device_query=method,
    )
    rep.environment, env_problems = collect_environment()
    for i, (name, cc) in enumerate(gpu_list):
        g = GPU(i, name, f"{cc[0]}.{cc[1]}", cc[0] >= 8)
        if rep.extension_with_cuda:
            g.arch_in_binary = _arch_covered(cc, binary)
        rep.gpus.append(g)

    fix = rep.problems.append
    rep.problems.extend(env_problems)
    if not rep.extension_loaded:
        fix(rep.extension_error or "the compiled extension is missing: pip install --no-build-isolation .")
    elif not rep.extension_with_cuda:
        if torch.version.cuda is None:
            fix("extension built CPU-only against a CPU-only torch: GPU ops (cuSPARSELt) are unavailable; install a "
                "CUDA build of torch and rebuild sparsekern with SPARSEKERN_CUDA=1 to use a GPU.")
        else:
            fix("extension built CPU-only: GPU ops (cuSPARSELt) are unavailable; rebuild on a machine with the CUDA "
                "toolkit (nvcc) with SPARSEKERN_CUDA=1 pip install --no-build-isolation .")
    if rep.extension_with_cuda and cslt_wheel is None and rep.cusparselt_library is None:
        fix("cuSPARSELt not found: pip install nvidia-cusparselt-cu13.")
    if not rep.gpus:
        fix(f"no CUDA GPU visible{f' ({qerr})' if qerr else ''}: the CPU kernels work; GPU kernels need an NVIDIA "
            "GPU of compute capability 8.0+ (A100, A10, L4, H100) and its driver.")
    for g in rep.gpus:
        if not g.sparse_tensor_cores:
            fix(f"GPU {g.index} ({g.name}, sm{g.compute_capability}) has no sparse tensor cores; sparsekern's GPU "
                "kernels need sm80 or newer.")
        elif g.arch_in_binary is False:
            fix(f"GPU {g.index} ({g.name}, sm{g.compute_capability}) is not among the archs compiled into the "
                f"extension ({', '.join(binary['sass'] + binary['ptx']) or 'none'}); rebuild with "
                f"TORCH_CUDA_ARCH_LIST={g.compute_capability}.")
    return rep


def format_report(rep: Report) -> str:
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    lines = [
        f"sparsekern {rep.sparsekern_version} (python {rep.python})",
        f"  torch              {rep.torch_version} (CUDA {rep.torch_cuda or 'none: CPU-only build'})",
        f"  extension          {'loaded' if rep.extension_loaded else 'NOT loaded'}"
        + (f" from {rep.extension_path}" if rep.extension_path else ""),
        f"  built with CUDA    {yes(rep.extension_with_cuda)}"
        + (f" (TORCH_CUDA_ARCH_LIST={rep.extension_arch_list})" if rep.extension_with_cuda else ""),
    ]
    if rep.extension_with_cuda:
        b = rep.extension_binary_archs
        lines.append(f"  archs in binary    SASS {', '.join(b['sass']) or '-'}; PTX {', '.join(b['ptx']) or '-'}")
        lines.append(f"  cuSPARSELt         built against {rep.cusparselt_built_against}; wheel "
                     f"{rep.cusparselt_wheel_version or 'not installed'}; loaded from {rep.cusparselt_library or '?'}")
    lines += [
        f"  CUDA runtime       {rep.cuda_runtime_version or 'unknown'}",
        f"  CUDA driver        {rep.cuda_driver_version or 'none'}",
        f"  device query       {rep.device_query}",
        f"  GPUs               {len(rep.gpus)}",
    ]
    for g in rep.gpus:
        lines.append(f"    [{g.index}] {g.name}  sm{g.compute_capability}  sparse tensor cores: "
                     f"{yes(g.sparse_tensor_cores)}"
                     + ("" if g.arch_in_binary is None else f"  in binary: {yes(g.arch_in_binary)}"))
    lines += format_environment(rep.environment)
    if rep.problems:
        lines.append("What is missing, and how to fix it:")
        lines += [f"  - {p}" for p in rep.problems]
    else:
        lines.append("Everything sparsekern needs is here.")
    return "\n".join(lines)


def _value_text(v) -> str:
    return "unset" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def format_environment(env: dict) -> list[str]:
    """Text lines of the environment section (see collect_environment)."""
    if not env:
        return []
    lines = [f"  policy table       {env.get('policy_table')}"]
    cd = env.get("cpu_dispatch")
    if cd:
        feats = env.get("cpu_features") or {}
        isa = cd.get("isa") or f"auto (best: {feats.get('best_isa', '?')})"
        lines.append(f"  CPU dispatch       isa {isa}, layout {cd.get('layout')}, huge-page hint "
                     f"{'on' if cd.get('huge_page_hint') else 'off'}")
        th = ", ".join(f"{k}={'never' if v is None else v}" for k, v in cd.items()
                       if k not in ("isa", "layout", "huge_page_hint"))
        lines.append(f"    thresholds       {th}")
        if feats:
            have = [k for k in ("avx512", "avx512_bf16", "avx512_vnni", "avx512_vbmi", "avx2") if feats.get(k)]
            lines.append(f"    CPU features     {', '.join(have) or 'none of avx2 / avx512'}")
    for e in env.get("cpu_dispatch_pending_errors") or []:
        lines.append(f"    pending error    {e}")
    lines.append("  environment (SPARSEKERN_*; value [source] - read by):")
    for v in env.get("variables", []):
        where = "set" if v["source"] == "environment" else "default"
        lines.append(f"    {v['name']:<28} {_value_text(v['value']):<14} [{where}] - {v['read_by']}"
                     + (f"  ERROR: {v['error']}" if "error" in v else ""))
    return lines


def doctor(as_json: bool = False, file=None) -> Report:
    """Print what this installation can do (and how to fix what is missing); return the Report.

    as_json: print the report as one JSON object instead of text.
    """
    rep = collect()
    out = file or sys.stdout
    if as_json:
        print(json.dumps({**asdict(rep), "ok": rep.ok}, indent=2), file=out)
    else:
        print(format_report(rep), file=out)
    return rep


def _cli(args) -> int:
    doctor(as_json=args.json)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("doctor", help="report versions, build, GPUs, and how to fix what is missing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cli)


if __name__ == "__main__":  # python -m sparsekern.diagnostics
    doctor(as_json="--json" in sys.argv)
    os._exit(0)
