"""Loading the compiled part of sparsekern, and saying clearly what is missing when it is not there.

The package imports without its extension (a source checkout that was never built, a wheel next to an incompatible
torch): `import sparsekern` works, `sparsekern.doctor()` explains, and calling an op raises ExtensionMissingError
with the reason and the fix.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch


class ExtensionMissingError(RuntimeError):
    """The compiled extension (sparsekern._C) or a part of it is not available."""


_C: Any = None
_load_error: str | None = None


def _built_for_torch() -> str | None:
    """The torch major.minor an installed CUDA wheel was built for, from its local version tag (+cu130torch2.14)."""
    try:
        from importlib.metadata import version

        tag = version("sparsekern").partition("+")[2]
    except Exception:
        return None
    return tag.partition("torch")[2] or None


def _explain(exc: BaseException) -> str:
    msg = str(exc)
    built = _built_for_torch()
    running = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if built and built != running:
        return (
            f"this sparsekern wheel was built for torch {built}, but torch {torch.__version__} is installed, and the "
            f"extension cannot load ({msg}). Install torch {built}.x, or rebuild sparsekern against this torch: "
            "pip install --no-build-isolation --force-reinstall ."
        )
    if "libc10_cuda" in msg or "libtorch_cuda" in msg:
        return (
            f"sparsekern was built against a CUDA build of torch, but the installed torch {torch.__version__} has no "
            f"CUDA libraries ({msg}). Install the CUDA build of torch it was built for, or rebuild sparsekern here "
            "(SPARSEKERN_CUDA=0 pip install --no-build-isolation --force-reinstall . for CPU only)."
        )
    if "undefined symbol" in msg:
        return (
            f"sparsekern's extension does not match the installed torch {torch.__version__} ({msg}). It was built "
            "against another torch ABI: reinstall sparsekern built for this torch "
            "(pip install --no-build-isolation --force-reinstall .) or install the torch it was built for."
        )
    if "libcusparseLt" in msg:
        return (
            f"cuSPARSELt's library could not be loaded ({msg}): pip install nvidia-cusparselt-cu13 "
            "(or set CUSPARSELT_PATH and rebuild)."
        )
    if isinstance(exc, ModuleNotFoundError):
        return (
            "sparsekern's compiled extension (sparsekern._C) is not built. From a source checkout run "
            "`pip install --no-build-isolation -e .` (or `make dev`)."
        )
    return f"sparsekern's compiled extension failed to load: {msg}"


def _load() -> None:
    global _C, _load_error
    try:
        _C = importlib.import_module("sparsekern._C")
    except (ImportError, OSError) as e:
        _load_error = _explain(e)
        return
    info = _C.build_info()
    built = info["torch_version"]
    running = torch.__version__.split("+")[0]
    if built.split(".")[:2] != running.split(".")[:2]:
        _load_error = (
            f"sparsekern was built against torch {built} but torch {running} is installed; the C++ ABI differs "
            "between minor versions. Rebuild sparsekern against this torch, or install torch " + built + "."
        )


_load()


def available() -> bool:
    return _C is not None and _load_error is None


def load_error() -> str | None:
    return _load_error


def build_info() -> dict:
    """Build facts of the extension, or {} when it is not loaded."""
    return dict(_C.build_info()) if _C is not None else {}


def require(feature: str = "this operation") -> None:
    """Raise ExtensionMissingError naming `feature` when the extension is unusable."""
    if _load_error is not None:
        raise ExtensionMissingError(f"{feature} needs sparsekern's compiled extension: {_load_error}")


def require_cuda(feature: str = "this operation") -> None:
    """Raise when `feature` needs the CUDA variant of the extension and this build is CPU-only."""
    require(feature)
    if not build_info().get("with_cuda", False):
        raise ExtensionMissingError(
            f"{feature} needs the CUDA build of sparsekern, but this installation was built CPU-only. Rebuild on a "
            "machine with the CUDA toolkit (nvcc) and a CUDA build of torch: SPARSEKERN_CUDA=1 pip install "
            "--no-build-isolation ."
        )


def cslt_structured_multiple(element_size: int) -> int:
    """The multiple cuSPARSELt requires of a structured operand's dims for elements of `element_size` bytes (0 when
    it takes no such type): the number in csrc/core/cslt_shape.h, which the C++ op checks use too."""
    require("the cuSPARSELt shape rule")
    return int(_C.cslt_structured_multiple(int(element_size)))
