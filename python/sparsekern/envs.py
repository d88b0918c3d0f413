"""Every SPARSEKERN_* environment variable, declared once: name, type, default, a one-line doc, and who reads it.

Python code reads these variables only through this module (`envs.get(NAME)`, or the attribute `envs.NAME`, as in
vLLM's vllm/envs.py); a value that breaks its rule raises EnvError naming the variable and the rule. Who reads each:
  "python"             read through this module when the value is needed (each use);
  "c++ (once, at load)" read once by the extension (csrc/cpu/dispatch.h; SPARSEKERN_CSLT_MAX_PLANS: at the first
                       cuSPARSELt use), never per call: set it before the process starts. A value the CPU kernels
                       cannot use does not fail the import; the first op that needs it raises. At run time the CPU
                       settings change through `cpu_dispatch(...)` below (or sparsekern._C.cpu_dispatch_set);
  "tests (conftest)"   read by the test suite (tests/conftest.py, tests/fuzz_support.py) through this module;
  "build (setup.py)"   read by the build (tools/build_config.py reads os.environ itself: setup.py must not import
                       the package); declared here so that `describe()` and `sparsekern doctor` list them.

`describe()` lists every variable with its current value and where it came from; `sparsekern doctor` prints it.

CPU dispatch settings (what the C++ CPU kernels decide by: forced ISA, forced kernel family, the huge-page hint,
and the M thresholds at which `auto` changes kernel family), as a dict:
  `cpu_dispatch_settings()`           the settings in effect ({} without the extension);
  `cpu_dispatch(**settings)`          context manager: change some, restore all on exit (for tests);
  `cpu_dispatch_defaults()`           the built-in thresholds;
  `set_cpu_thresholds(mapping|None)`  thresholds = built-in defaults overridden by `mapping` (what a policy table's
                                      "cpu_dispatch" object does when the table becomes active, sparsekern.policy).
Keys: isa (None = the best the CPU supports, "avx512", "avx512-base", "avx2", "scalar"), layout ("auto", "rows",
"pairs", "tokens", "amx"), huge_page_hint (bool), and the thresholds (int, or None = never): rows_pair_bf16_min_m,
rows_pair_i8_min_m, pairs_bf16_min_m, pairs_i8_min_m, pairs_u8_min_m, tokens_f32_min_m, tokens_bf16_min_m,
tokens_i8_min_m, slab_rows, amx_bf16_min_m, amx_i8_min_m, amx_slab_rows (csrc/cpu/dispatch.h and dispatch.cpp say
what each means and what was measured).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from . import _ext

PYTHON = "python"
CPP = "c++ (once, at load)"
BUILD = "build (setup.py)"
TESTS = "tests (conftest)"


def _shown(raw: str) -> str:
    """A value as it may appear in a message: at most 48 characters (a 100 kB variable is not echoed whole)."""
    return raw if len(raw) <= 48 else raw[:45] + "..."


class EnvError(ValueError):
    """A SPARSEKERN_* variable holds a value that breaks its rule."""


@dataclass(frozen=True)
class Variable:
    name: str
    type: str  # "path" | "choice" | "flag" | "tristate" | "int"
    default: Any  # the value in effect when unset (None: see doc)
    doc: str
    read_by: str  # PYTHON | CPP | BUILD
    choices: tuple[str, ...] = ()

    @property
    def rule(self) -> str:
        if self.type == "choice":
            return "one of " + ", ".join(self.choices) + " (or unset)"
        if self.type == "flag":
            return "unset, empty or 0 (off); anything else (on)"
        if self.type == "tristate":
            return "1/true/yes/on or 0/false/no/off (or unset)"
        if self.type == "int":
            return "a positive integer (or unset)"
        return "a path (or unset)"

    def parse(self, raw: str | None) -> Any:
        """The typed value of `raw` (None or "": the default); EnvError when it breaks the rule."""
        if raw is None or raw == "":
            return self.default
        if self.type == "path":
            return raw
        if self.type == "choice":
            if raw not in self.choices:
                raise EnvError(f"{self.name}={_shown(raw)} is not understood; use {self.rule}")
            return raw
        if self.type == "flag":
            return raw[0] != "0"
        if self.type == "tristate":
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise EnvError(f"{self.name}={_shown(raw)} is not understood; use {self.rule}")
        if self.type == "int":
            try:
                value = int(raw, 10)
            except ValueError:
                value = 0
            if value <= 0:
                raise EnvError(f"{self.name}={_shown(raw)} is not understood; use {self.rule}")
            return value
        raise AssertionError(self.type)


_VARIABLES = (
    # -------------------------------------------------------------------------------- read by Python
    Variable("SPARSEKERN_POLICY_TABLE", "path", None,
             "policy table file SparseLinear dispatches by (default: $XDG_CACHE_HOME/sparsekern/policy.json, i.e. "
             "~/.cache/sparsekern/policy.json, when that file exists)", PYTHON),
    Variable("SPARSEKERN_CACHE", "path", None,
             "folder for derived files such as the float copy of the bundled model (default: "
             "$XDG_CACHE_HOME/sparsekern, i.e. ~/.cache/sparsekern)", PYTHON),
    Variable("SPARSEKERN_CPU_CALIBRATE", "tristate", True,
             "0: no first-use calibration of CPU SparseLinear kernels (a CPU layer then follows the policy table or "
             "the built-in defaults); on (default): a (dtype, N, K, M bucket) no table covers is timed once, a few "
             "ms, and the winner cached in the policy table (sparsekern.calibrate)", PYTHON),
    Variable("SPARSEKERN_BENCH_PRUNE_THP", "choice", None,
             "internal: set by `sparsekern bench prune` on the child process it starts with a page policy "
             "(--thp); not for users", PYTHON, ("both", "none")),
    # -------------------------------------------------------------------------------- read by the C++ extension
    Variable("SPARSEKERN_CPU_ISA", "choice", None,
             "force the CPU kernels' ISA (spmm_24, wanda_prune; avx512-base: AVX-512 without the BF16/VNNI kernels); "
             "default: the best the CPU supports", CPP, ("avx512", "avx512-base", "avx2", "scalar")),
    Variable("SPARSEKERN_CPU_SPMM_LAYOUT", "choice", "auto",
             "force the CPU spmm_24 kernel family (rows, pairs, tokens, amx: Intel AMX); auto picks by M", CPP,
             ("auto", "rows", "pairs", "tokens", "amx")),
    Variable("SPARSEKERN_NO_HUGEPAGE_HINT", "flag", False,
             "1: no MADV_HUGEPAGE hint on wanda_prune's large outputs", CPP),
    Variable("SPARSEKERN_CSLT_MAX_PLANS", "int", 4096,
             "bound of the cuSPARSELt plan cache (LRU, plans per process; read at the first cuSPARSELt use)", CPP),
    # -------------------------------------------------------------------------------- read by the test suite
    Variable("SPARSEKERN_REQUIRE_CUDA", "tristate", False,
             "1: a test that needs a GPU fails (naming why) instead of skipping when it cannot run, so a GPU "
             "validation run cannot pass by skipping (tests/conftest.py)", TESTS),
    Variable("SPARSEKERN_FUZZ_EXAMPLES", "int", None,
             "examples per property-based target (tests/test_fuzz_*.py); unset: the bounded CI profile "
             "(docs/fuzzing.md)", TESTS),
    # -------------------------------------------------------------------------------- read by the build
    Variable("SPARSEKERN_CUDA", "tristate", None,
             "1: build the CUDA extension (fail if nvcc or a CUDA torch is missing), 0: CPU only; unset: CUDA when "
             "both are present", BUILD),
    Variable("SPARSEKERN_DEBUG", "tristate", False, "1: build with -O0 -g (host and device code)", BUILD),
    Variable("SPARSEKERN_LOCAL_VERSION", "tristate", True,
             "0: no local version tag (+cu130torch2.14) on CUDA builds", BUILD),
)

VARIABLES: dict[str, Variable] = {v.name: v for v in _VARIABLES}


def _variable(name: str) -> Variable:
    try:
        return VARIABLES[name]
    except KeyError:
        raise KeyError(f"{name} is not a sparsekern environment variable; declared: {sorted(VARIABLES)}") from None


def raw(name: str) -> str | None:
    """The variable's text in the environment now (None when unset)."""
    return os.environ.get(_variable(name).name)


def is_set(name: str) -> bool:
    """Whether the variable is set to a non-empty value."""
    return bool(raw(name))


def get(name: str) -> Any:
    """The variable's typed value now (its default when unset or empty); EnvError when the value breaks the rule."""
    return _variable(name).parse(raw(name))


def __getattr__(name: str) -> Any:  # envs.SPARSEKERN_CACHE, as vLLM's envs module
    if name in VARIABLES:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(VARIABLES))


def describe() -> list[dict]:
    """Every variable: {name, value, default, source ("environment" | "default"), doc, read_by}, plus "error" for a
    value that breaks its rule (then value is the raw text). Never raises: doctor must always work."""
    out = []
    for v in _VARIABLES:
        text = os.environ.get(v.name)
        row = {"name": v.name, "value": v.default, "default": v.default,
               "source": "environment" if text else "default", "doc": v.doc, "read_by": v.read_by}
        if text:
            try:
                row["value"] = v.parse(text)
            except EnvError as e:
                row["value"], row["error"] = text, str(e)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------ CPU dispatch settings


def cpu_dispatch_settings() -> dict:
    """The C++ CPU kernels' settings in effect (see the module doc), or {} when the extension is not loaded."""
    return dict(_ext._C.cpu_dispatch_get()) if _ext.available() else {}


def cpu_dispatch_defaults() -> dict:
    """The built-in thresholds (C++: csrc/cpu/dispatch.cpp), or {} when the extension is not loaded."""
    return dict(_ext._C.cpu_dispatch_defaults()) if _ext.available() else {}


def cpu_dispatch_pending_errors() -> list[str]:
    """Environment values read at load that the CPU ops will refuse when called (empty when none)."""
    return list(_ext._C.cpu_dispatch_pending_errors()) if _ext.available() else []


def set_cpu_thresholds(values: Mapping[str, int | None] | None) -> None:
    """Thresholds = the built-in defaults overridden by `values` (names as cpu_dispatch_defaults(); int >= 1, or None
    for never). RuntimeError naming the setting and its rule on a bad name or value (nothing changes then)."""
    _ext.require("sparsekern.envs.set_cpu_thresholds")
    _ext._C.cpu_dispatch_set({**_ext._C.cpu_dispatch_defaults(), **dict(values or {})})


@contextlib.contextmanager
def cpu_dispatch(**settings: Any) -> Iterator[dict]:
    """Change some CPU dispatch settings inside the block (e.g. isa="avx2", layout="rows", pairs_bf16_min_m=64) and
    restore all of them on exit. A bad name or value raises RuntimeError at entry, with the message the op would
    give (e.g. "SPARSEKERN_CPU_ISA=sse9 is not understood; use avx512, avx512-base ..."), and changes nothing.
    Process-wide, like the environment variables it stands in for: not for concurrent use from several threads.
    Yields the settings now in effect."""
    _ext.require("sparsekern.envs.cpu_dispatch")
    version = _ext._C.cpu_dispatch_version()
    _ext._C.cpu_dispatch_set(settings)
    try:
        yield cpu_dispatch_settings()
    finally:
        _ext._C.cpu_dispatch_restore(version)


def child_env(base: Mapping[str, str] | None = None, **values: str | None) -> dict[str, str]:
    """A copy of `base` (default os.environ) with declared variables set (or removed, value None): for child
    processes, which read the C++ variables at their own load."""
    env = dict(os.environ if base is None else base)
    for name, value in values.items():
        _variable(name)
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env

