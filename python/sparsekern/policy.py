"""Dispatch policy of SparseLinear: which kernel runs a (M, N, K, dtype, arch) matmul.

The benchmark measures, per GPU arch, weight dtype and layer shape, which kernel is fastest at each batch size M and
writes a table with `write_table(...)`; SparseLinear reads it (`load_table`, `active_table`) and asks
`choose_kernel(table=..., ...)` on every call (a dict lookup: no measurement, no I/O at run time): a pure function of
the table it is given and the layer's facts. Where nothing was measured a safe default applies (`default_kernel`).
`layer.kernel_for(M)` shows the choice; `layer.set_kernel(...)` and the `override(...)` context manager force one.
The table a process uses is `active_table()`: set_table()'s, else the file $SPARSEKERN_POLICY_TABLE, else
~/.cache/sparsekern/policy.json when it exists, else none (built-in defaults); `table_in_use()` names it, and
`sparsekern doctor` and `sparsekern bench gemm` print it.

Kernels (names used in the table; aliases on the right are accepted when reading and normalised):
  "cslt"            cuSPARSELt SpMM on the layer's cuSPARSELt buffer (CUDA; needs N, K multiples of 16 for
                    fp16/bf16, 32 for int8/fp8).
  "spmm24"          sparsekern's own kernel on the portable 2:4 format (values + 4-bit codes): the CPU kernel on
                    the CPU, the small-M decode kernel on CUDA where it is compiled.   aliases: "cpu_spmm", "decode24"
  "dense_fallback"  decompress the weight on the fly and run a dense matmul (on the CPU panel by panel, so no
                    weight-sized buffer is allocated per call). No dense copy of the weight is kept. The last resort
                    where no sparse kernel accepts the shape, and at large M where a dense GEMM beats the sparse
                    kernels even with the decompression.
  "dense_cached"    F.linear on a dense copy of the weight that the layer keeps because its user allowed the
                    memory (SparseLinear(dense_cache=True), CPU only: 1.8x (16-bit) / 2.1x (fp32) more weight
                    memory). Exactly the dense layer's speed; chosen only where the table (or the default below) says
                    dense beats the sparse kernels at that M. A layer without the copy runs "dense_fallback" instead.

Table file (JSON, UTF-8), format version 1:
  {
    "format": "sparsekern-policy",
    "version": 1,
    "entries": [
      {"arch": "sm90", "dtype": "float16", "n": 4096, "k": 4096, "m": 16, "kernel": "spmm24",
       "timings_us": {"cslt": 14.2, "spmm24": 9.8, "dense": 11.0}},      # timings_us: optional, informative
      ...
    ]
  }
  arch   "sm<major><minor>" of the GPU (torch.cuda.get_device_capability), or "cpu".
  dtype  the weight's compute dtype: "float16" | "bfloat16" | "float32" | "int8" | "float8_e4m3fn".
  n, k   out_features, in_features.
  m      the M bucket the measurement stands for: M is rounded up to a power of two (1, 2, 4, ..., 16384), so
         "m": 16 covers 9 <= M <= 16, and the last bucket (16384) covers every larger M.
  kernel_dense_cache  (optional) the choice for layers that keep a dense copy (may be "dense_cached"); layers
         without one use "kernel". Absent: "kernel" for every layer.
Optional top-level "cpu_dispatch" object: the M thresholds of the C++ CPU kernels' family choice, by name, each a
positive integer (the smallest M from which `auto` takes that kernel) or null (never; not for slab_rows), e.g.
    "cpu_dispatch": {"pairs_bf16_min_m": 64, "tokens_f32_min_m": 48}
  rows_pair_bf16_min_m (8), rows_pair_i8_min_m (32)   rows family: the unblocked row-pair kernels (bf16 with
                                                      AVX512_BF16, int8 with VNNI) instead of one row per vector
  pairs_bf16_min_m (80), pairs_i8_min_m (80),         the K-blocked row-pair family (bf16; int8 as int16 pairs;
  pairs_u8_min_m (24)                                 int8 by vpdpbusd with VNNI + VBMI)
  tokens_f32_min_m (32), tokens_bf16_min_m (null),    the token-lane family (fp32 table; bf16 pairs; int8 pairs)
  tokens_i8_min_m (256)
  slab_rows (256)                                     a call with more rows runs as slabs of this many rows
  amx_bf16_min_m (12), amx_i8_min_m (8),              the AMX family (Intel AMX: bf16 tdpbf16ps, int8 tdpbssd;
  amx_slab_rows (1024)                                weights decompressed into tile panels) and its slab size
(built-in defaults in parentheses: csrc/cpu/dispatch.cpp, with the measurements behind them). Names not given keep
their defaults. When the table becomes the active one (set_table, or its first use through active_table) these are
pushed down to the C++ dispatch (sparsekern.envs.set_cpu_thresholds); a table without the field leaves the C++
settings alone, except that it restores the defaults after a table that had one. A bad name or value is a
PolicyError naming the file, the field and the rule.
Lookup of a (arch, dtype, n, k) that was measured at other buckets uses the nearest measured bucket (in log2 M);
a shape that was never measured gets `default_kernel`. On the CPU, a bucket the table does not hold is first
measured by the layer itself (first-use calibration, sparsekern.calibrate: a few ms, once, the winner written into
the table in use with `record_entries`; SPARSEKERN_CPU_CALIBRATE=0 turns it off). A chosen kernel the layer
cannot run (no cuSPARSELt buffer, kernel not compiled for the device) is replaced by the default too, so a stale
table can never break a layer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from . import envs
from ._fsutil import FileRefused, atomic_write_text, read_json

KERNELS = ("cslt", "spmm24", "dense_fallback", "dense_cached")
_ALIASES = {"cpu_spmm": "spmm24", "decode24": "spmm24", "dense": "dense_fallback"}
TABLE_FORMAT = "sparsekern-policy"
TABLE_VERSION = 1
MAX_BUCKET = 16384
ENV_TABLE = "SPARSEKERN_POLICY_TABLE"  # declared in sparsekern.envs
BUILTIN = "built-in defaults"  # table_in_use() when no table file is in use


class PolicyError(ValueError):
    """A policy table or an override is malformed."""


def normalize_kernel(name: str) -> str:
    """Canonical kernel name for `name` (accepting the aliases), or PolicyError."""
    k = _ALIASES.get(name, name)
    if k not in KERNELS:
        raise PolicyError(f"unknown kernel {name!r}: expected one of {KERNELS} (aliases {sorted(_ALIASES)})")
    return k


def m_bucket(m: int) -> int:
    """The power-of-two bucket that holds batch size `m` (rows of x after flattening leading dims), capped."""
    if m <= 1:
        return 1
    return min(1 << (int(m) - 1).bit_length(), MAX_BUCKET)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def arch_of(device: torch.device | str) -> str:
    """"cpu" or "sm<major><minor>" of a CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@dataclass
class PolicyTable:
    """Measured choices: (arch, dtype, n, k) -> {m bucket: kernel}; `cached_choices` the same for layers that keep a
    dense copy of their weight (entries' optional "kernel_dense_cache")."""

    choices: dict[tuple[str, str, int, int], dict[int, str]] = field(default_factory=dict)
    source: str | None = None  # path it was read from, for messages
    cached_choices: dict[tuple[str, str, int, int], dict[int, str]] = field(default_factory=dict)
    cpu_dispatch: dict[str, int | None] = field(default_factory=dict)  # C++ CPU thresholds (module doc)

    def lookup(self, arch: str, dtype: str, n: int, k: int, m: int, dense_cache: bool = False) -> str | None:
        key = (arch, dtype, int(n), int(k))
        per_bucket = self.choices.get(key)
        if dense_cache and key in self.cached_choices:  # a bucket's cached choice replaces its plain one
            per_bucket = {**(per_bucket or {}), **self.cached_choices[key]}
        if not per_bucket:
            return None
        b = m_bucket(m)
        if b in per_bucket:
            return per_bucket[b]
        # Nearest measured bucket in log2 space; on a tie the larger bucket (its kernel was measured on more work).
        lb = math.log2(b)
        best = min(per_bucket, key=lambda x: (abs(math.log2(x) - lb), -x))
        return per_bucket[best]

    def has_entry(self, arch: str, dtype: str, n: int, k: int, m: int) -> bool:
        """Whether the table measured (arch, dtype, n, k) at m's own bucket (lookup() would otherwise borrow the
        nearest measured bucket, or fall back to the default)."""
        return m_bucket(m) in self.choices.get((arch, dtype, int(n), int(k)), ())

    def copy(self) -> "PolicyTable":
        return PolicyTable({key: dict(v) for key, v in self.choices.items()}, self.source,
                           {key: dict(v) for key, v in self.cached_choices.items()}, dict(self.cpu_dispatch))

    def entries(self) -> list[dict]:
        out = []
        for key, per_bucket in sorted(self.choices.items()):
            arch, dtype, n, k = key
            for m, kernel in sorted(per_bucket.items()):
                e = {"arch": arch, "dtype": dtype, "n": n, "k": k, "m": m, "kernel": kernel}
                cached = self.cached_choices.get(key, {}).get(m)
                if cached is not None:
                    e["kernel_dense_cache"] = cached
                out.append(e)
        return out


def _short(obj) -> str:
    text = repr(obj)
    return text if len(text) <= 120 else text[:117] + "..."


def _parse_entry(e: Mapping, where: str) -> tuple[tuple[str, str, int, int], int, str]:
    if not isinstance(e, Mapping):
        raise PolicyError(f"{where}: every entry must be an object with arch, dtype, n, k, m, kernel; got "
                          f"{_short(e)}")
    missing = [f for f in ("arch", "dtype", "n", "k", "m", "kernel") if f not in e]
    if missing:
        raise PolicyError(f"{where}: entry {_short(dict(e))} lacks field(s) {missing}")
    for f in ("arch", "dtype", "kernel"):
        if not isinstance(e[f], str):
            raise PolicyError(f"{where}: entry {_short(dict(e))}: '{f}' must be a string")
    vals = []
    for f in ("n", "k", "m"):
        v = e[f]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2 ** 40:
            raise PolicyError(f"{where}: entry {_short(dict(e))}: '{f}' must be a positive integer below 2^40, got "
                              f"{_short(v)}")
        vals.append(v)
    n, k, m = vals
    try:
        kernel = normalize_kernel(e["kernel"])
    except PolicyError as exc:
        raise PolicyError(f"{where}: entry {_short(dict(e))}: {exc}") from None
    return (e["arch"], e["dtype"], n, k), m_bucket(m), kernel


def _cached_kernel(e: Mapping) -> str | None:
    k = e.get("kernel_dense_cache")
    if k is not None and not isinstance(k, str):
        raise PolicyError(f"entry {_short(dict(e))}: 'kernel_dense_cache' must be a kernel name")
    return normalize_kernel(k) if k is not None else None


def table_from_entries(entries: Iterable[Mapping], where: str = "policy entries") -> PolicyTable:
    table = PolicyTable()
    for e in entries:
        key, b, kernel = _parse_entry(e, where)
        if kernel == "dense_cached":
            raise PolicyError(f"{where}: entry {dict(e)!r}: 'kernel' must be runnable by every layer; "
                              "\"dense_cached\" belongs in 'kernel_dense_cache'")
        table.choices.setdefault(key, {})[b] = kernel
        cached = _cached_kernel(e)
        if cached is not None:
            table.cached_choices.setdefault(key, {})[b] = cached
    return table


def parse_cpu_dispatch(obj, where: str) -> dict[str, int | None]:
    """The validated "cpu_dispatch" object of a table (module doc). Names are checked against the extension's
    thresholds when it is loaded; PolicyError naming `where`, the field and the rule."""
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise PolicyError(f"{where}: field 'cpu_dispatch' must be an object mapping threshold names to integers or "
                          f"null (got {type(obj).__name__})")
    known = envs.cpu_dispatch_defaults()
    out: dict[str, int | None] = {}
    for name, value in obj.items():
        if known and name not in known:
            raise PolicyError(f"{where}: field 'cpu_dispatch.{name}' is not a CPU dispatch threshold; known: "
                              f"{sorted(known)}")
        if value is None:
            if name == "slab_rows":
                raise PolicyError(f"{where}: field 'cpu_dispatch.slab_rows' must be a positive integer (got null)")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PolicyError(f"{where}: field 'cpu_dispatch.{name}' must be a positive integer (the smallest M "
                              f"from which auto takes that kernel) or null (never); got {value!r}")
        out[str(name)] = value
    return out


def load_table(path: str | os.PathLike) -> PolicyTable:
    """Read a policy table written by `write_table`. PolicyError on a malformed file or an unknown version."""
    path = Path(path)
    try:
        doc = read_json(path, "policy table")  # a regular file, size-capped, UTF-8 (no hang on a FIFO)
    except (FileRefused, FileNotFoundError) as exc:
        raise PolicyError(str(exc)) from None
    if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT:
        raise PolicyError(f"policy table {path}: field 'format' must be {TABLE_FORMAT!r}")
    if doc.get("version") != TABLE_VERSION:
        raise PolicyError(
            f"policy table {path} has version {doc.get('version')!r}; this sparsekern reads version {TABLE_VERSION}"
        )
    if not isinstance(doc.get("entries"), list):
        raise PolicyError(f"policy table {path}: 'entries' must be a list")
    table = table_from_entries(doc["entries"], str(path))
    table.cpu_dispatch = parse_cpu_dispatch(doc.get("cpu_dispatch"), f"policy table {path}")
    table.source = str(path)
    return table


def write_table(entries: Iterable[Mapping], path: str | os.PathLike | None = None, *, merge: bool = True,
                cpu_dispatch: Mapping[str, int | None] | None = None) -> Path:
    """Write (or update) a policy table. Called by the benchmark after measuring.

    entries: dicts with arch (str), dtype (str, see module doc), n, k, m (int; m is bucketed), kernel (str) and
             optionally timings_us (dict kernel -> microseconds, kept for humans).
    path:    target file; default `default_table_path()` (which SparseLinear reads when nothing else is set).
    merge:   keep the existing file's entries that these entries do not replace (same arch, dtype, n, k, m bucket),
             and its "cpu_dispatch" thresholds that `cpu_dispatch` does not replace.
    cpu_dispatch: C++ CPU thresholds to store in the table (module doc), or None.
    The file is written to a temporary file in the same folder and renamed over the target, so a reader never sees a
    half-written table. Returns the path.
    """
    path = Path(path) if path is not None else default_table_path()
    rows: dict[tuple, dict] = {}
    thresholds: dict[str, int | None] = {}
    if merge and path.exists():
        try:
            old = read_json(path, "policy table")
        except (FileRefused, FileNotFoundError) as exc:
            raise PolicyError(f"{exc}; cannot merge into it (write elsewhere, or merge=False)") from None
        if isinstance(old, dict) and old.get("format") == TABLE_FORMAT and old.get("version") == TABLE_VERSION:
            for e in old.get("entries", []):
                key, b, _ = _parse_entry(e, str(path))
                rows[key + (b,)] = dict(e)
            thresholds.update(parse_cpu_dispatch(old.get("cpu_dispatch"), f"policy table {path}"))
    thresholds.update(parse_cpu_dispatch(cpu_dispatch, "write_table(cpu_dispatch=...)"))
    for e in entries:
        key, b, kernel = _parse_entry(e, "write_table")
        if kernel == "dense_cached":
            raise PolicyError("write_table: 'kernel' must be runnable by every layer; \"dense_cached\" belongs in "
                              "'kernel_dense_cache'")
        row = {"arch": key[0], "dtype": key[1], "n": key[2], "k": key[3], "m": b, "kernel": kernel}
        cached = _cached_kernel(e)
        if cached is not None:
            row["kernel_dense_cache"] = cached
        if "timings_us" in e:
            row["timings_us"] = {str(a): float(t) for a, t in dict(e["timings_us"]).items()}
        rows[key + (b,)] = row
    doc = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "entries": [rows[k] for k in sorted(rows)]}
    if thresholds:
        doc["cpu_dispatch"] = {k: thresholds[k] for k in sorted(thresholds)}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    # Re-read on next use when this file is the one in use (set_table(path), or the default file).
    if (_state.table is not None and _state.table.source == str(path)) or \
            (not _state.explicit and path == default_table_path()):
        _state.table = None
        _state.generation += 1
    return path


def default_table_path() -> Path:
    """$SPARSEKERN_POLICY_TABLE, else $XDG_CACHE_HOME/sparsekern/policy.json (~/.cache/sparsekern/policy.json)."""
    env = envs.get(ENV_TABLE)
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sparsekern" / "policy.json"


class _State:
    table: PolicyTable | None = None  # process-wide, shared by all threads
    generation: int = 0  # bumped whenever the table in use or the override() context changes (layers' caches)
    explicit: bool = False  # set_table() was called (then the default file is not consulted)
    cpu_pushed: bool = False  # the C++ CPU thresholds hold an active table's "cpu_dispatch" values
    broken_default: str | None = None  # why the user-cache table was ignored (shown by doctor)


class _Forced:
    # override() context. Process-wide (not thread-local) on purpose: torch.compile traces forward() and reads this
    # plain global without a graph break, and guards on it so a change recompiles.
    kernel: str | None = None


_state = _State()
_forced = _Forced()
_EMPTY = PolicyTable()


def _activate(table: PolicyTable) -> PolicyTable:
    """Make `table` the one in use and push its "cpu_dispatch" thresholds down to the C++ CPU dispatch (or the
    built-in ones, after a table that had some). PolicyError (nothing changes) when the C++ side refuses a value."""
    if (table.cpu_dispatch or _state.cpu_pushed) and envs.cpu_dispatch_defaults():
        try:
            envs.set_cpu_thresholds(table.cpu_dispatch)
        except RuntimeError as exc:
            raise PolicyError(f"policy table {table.source or '(in memory)'}: field 'cpu_dispatch': {exc}") from exc
        _state.cpu_pushed = bool(table.cpu_dispatch)
    _state.table = table
    _state.generation += 1
    return table


def generation() -> int:
    """A number that changes whenever a kernel choice may change: a table becoming active, entries recorded,
    override() entered or left. SparseLinear caches its eager choices per M bucket under it."""
    return _state.generation


def record_entries(entries: Iterable[Mapping]) -> str | None:
    """Add measured entries (write_table's entry format) to the table in use and to its file: the table's own file,
    else the default file (default_table_path()); a table set in memory is updated in memory only. Returns None, or
    why the file could not be written (the entries are then kept for this process only)."""
    entries = list(entries)
    new = active_table().copy()
    added = table_from_entries(entries, "record_entries")
    for key, per_bucket in added.choices.items():
        new.choices.setdefault(key, {}).update(per_bucket)
    for key, per_bucket in added.cached_choices.items():
        new.cached_choices.setdefault(key, {}).update(per_bucket)
    path = new.source or (None if _state.explicit else str(default_table_path()))
    problem = None
    if path is not None:
        try:
            write_table(entries, path, merge=True)
            new.source = path
        except (PolicyError, OSError) as exc:
            problem = f"cannot write the policy table {path}: {exc}"
    _state.table = new  # same cpu_dispatch as before: nothing to push down
    _state.generation += 1
    return problem


def set_table(table: PolicyTable | str | os.PathLike | None) -> None:
    """Use this table (or file) from now on; None returns to the default file (read lazily)."""
    if table is None:
        _state.table, _state.explicit = None, False
        _state.generation += 1
        if _state.cpu_pushed:
            _activate(_EMPTY)
            _state.table = None
        return
    if not isinstance(table, PolicyTable):
        table = load_table(table)
    elif table.cpu_dispatch:
        table.cpu_dispatch = parse_cpu_dispatch(table.cpu_dispatch, "set_table(PolicyTable)")
    _activate(table)
    _state.explicit = True


def active_table() -> PolicyTable:
    """The table in use: set_table()'s, else the default file if it exists, else an empty table.

    A malformed table named explicitly ($SPARSEKERN_POLICY_TABLE) raises PolicyError naming the file and the rule. A
    malformed file found implicitly in the user cache (~/.cache/sparsekern/policy.json) is not allowed to break
    every SparseLinear in the process: it is reported once as a warning (and by `sparsekern doctor`) and the
    built-in defaults are used."""
    if _state.table is None:
        path = default_table_path()
        if _state.explicit or not (path.exists() or path.is_symlink()):
            return _activate(_EMPTY)
        try:
            _activate(load_table(path))
        except PolicyError as exc:
            if envs.is_set(ENV_TABLE):
                raise
            _state.broken_default = str(exc)
            warnings.warn(f"sparsekern: ignoring the policy table in the user cache ({exc}); using the built-in "
                          "defaults. Rewrite it with `sparsekern bench gemm --policy PATH` or delete it.",
                          RuntimeWarning, stacklevel=2)
            _activate(_EMPTY)
    return _state.table


def table_in_use() -> str:
    """Where the table in use comes from: its file path, "built-in defaults" when none is in use (no file, or an
    empty table), or "(in memory)" for a table given to set_table() as an object with entries."""
    table = active_table()
    if table.source:
        return table.source
    return BUILTIN if table is _EMPTY or not (table.choices or table.cpu_dispatch) else "(in memory)"


@contextlib.contextmanager
def override(kernel: str | None) -> Iterator[None]:
    """Force every SparseLinear (without its own set_kernel) to `kernel` inside the block, where it can run it."""
    prev = _forced.kernel
    _forced.kernel = normalize_kernel(kernel) if kernel is not None else None
    _state.generation += 1
    try:
        yield
    finally:
        _forced.kernel = prev
        _state.generation += 1


def forced_kernel() -> str | None:
    return _forced.kernel


def cuda_kernel_compiled(op: str) -> bool:
    """Whether sparsekern::<op> has a CUDA kernel in this build (the dispatcher knows; no GPU needed)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", "CUDA")
    except RuntimeError:  # op not registered at all (extension missing)
        return False


# Unmeasured CPU layers that keep a dense copy use it from this batch size on (a bucket, see m_bucket: M > 2048): up to
# there the CPU 2:4 kernels were at least as fast as dense F.linear on the development machine in every dtype and shape
# measured (bench/results/2026-11-24-cpu-amd-epyc-2t-largem: 11008 x 4096 and 4096 x 11008, M = 256..2048, fp32
# 1.02-1.73x, bf16 1.03-1.20x). A measured policy table (kernel_dense_cache) overrides this per shape.
CPU_DENSE_CACHE_MIN_M = 4096


def default_kernel(device_type: str, m: int, *, has_cslt: bool, has_cuda_spmm24: bool,
                   has_dense_cache: bool = False) -> str:
    """The safe choice where nothing was measured.

    CPU: the CPU 2:4 kernel; for a layer that keeps a dense copy, that copy from M > 2048 (CPU_DENSE_CACHE_MIN_M).
    CUDA: cuSPARSELt when the layer has a cuSPARSELt buffer (the shape passed its rules); else our portable-format
    kernel if it is compiled for CUDA; else the dense fallback, which is slow but correct.
    """
    if device_type != "cuda":
        return "dense_cached" if has_dense_cache and m_bucket(m) >= CPU_DENSE_CACHE_MIN_M else "spmm24"
    if has_cslt:
        return "cslt"
    if has_cuda_spmm24:
        return "spmm24"
    return "dense_fallback"


_CONTEXT = object()  # choose_kernel(forced=...) default: the override() context's kernel


def choose_kernel(
    *, device_type: str, arch: str, dtype: str, n: int, k: int, m: int, has_cslt: bool, has_cuda_spmm24: bool,
    layer_override: str | None = None, has_dense_cache: bool = False, table: PolicyTable | None = None,
    forced: str | None | object = _CONTEXT,
) -> str:
    """The kernel a layer runs for M rows: layer override > forced (the override() context) > table > default, with
    anything the layer cannot run replaced by the default ("dense_cached" without a dense copy: "dense_fallback",
    the same dense math). A pure function of its arguments when `table` and `forced` are given: plain data, no I/O,
    no device query, so torch.compile traces it without a graph break; the caller precomputes arch / has_cslt /
    has_cuda_spmm24 / has_dense_cache. table: the policy table (default: active_table()); forced: a kernel name or
    None (default: forced_kernel(), the override() context)."""
    default = default_kernel(device_type, m, has_cslt=has_cslt, has_cuda_spmm24=has_cuda_spmm24,
                             has_dense_cache=has_dense_cache)
    if table is None:
        table = active_table()
    if forced is _CONTEXT:
        forced = _forced.kernel
    choice = (layer_override or forced
              or table.lookup(arch, dtype, n, k, m, dense_cache=has_dense_cache) or default)
    if choice == "dense_fallback":
        return choice
    if choice == "dense_cached":
        return choice if has_dense_cache else "dense_fallback"
    if device_type == "cuda":
        ok = (choice == "cslt" and has_cslt) or (choice == "spmm24" and has_cuda_spmm24)
    else:
        ok = choice == "spmm24"
    return choice if ok else default
