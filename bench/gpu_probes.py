#!/usr/bin/env python3
"""Targeted GPU probes of the pre-flight review's findings 1-4 and 6 (issue 17), a few seconds each.

Each probe prints one JSON line {"finding", "title", "ok", "verdict", "detail", "seconds"}:
  ok       True when sparsekern behaves correctly on this GPU (the finding is fixed or does not occur here);
           False when the probe shows the bug (the finding is confirmed) or the probe itself failed;
  verdict  one sentence: what the numbers say about the finding;
  detail   the numbers.
A probe never aborts the others: they run in a child process, and when a probe hangs, crashes the process or leaves
the CUDA context broken (a sticky error), that probe is recorded as failed and a new child runs the rest.

    python bench/gpu_probes.py [--only 1,2,3,4,6] [--out probes.json] [--probe-timeout 60]
    python bench/gpu_probes.py --check-build     the extension loads and is the CUDA build (exit 1 otherwise)

Exit status: 0 when every probe is ok, 1 otherwise (2: bad arguments). --out is rewritten after every probe.
The probes use the public Python API only (sparsekern.ops.cslt, sparsekern.linear.SparseLinear, layer.weight24).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

FINDINGS = {
    1: "compressed size: cuSPARSELt's own size vs the 9/16 (10/16) formula, at the smallest shapes",
    2: "CUDA graph replay after clear_cache() and search(): no stale workspace, output equals eager",
    3: "int8 inputs, fp16/bf16/int32 outputs, fused bias: matches a float64 reference",
    4: "epilogue fallback: int8 -> int32 with bias + GELU does not raise and matches the reference",
    6: "torch.save / torch.load(map_location) of a SparseLinear on CUDA: the cuSPARSELt buffer is rebuilt",
}
FORMAT = "sparsekern-gpu-probes"
DEV = "cuda"  # the device probed (a CPU harness with faked cuSPARSELt ops can exercise the code paths with "cpu")
STARTUP_TIMEOUT = 120.0  # seconds for the child's imports and CUDA start, and between two probes


# =================================================================================================== child side
# Everything below runs in the child process, which imports torch and sparsekern.

def _torch():
    import torch

    return torch


def _prune24(w):
    """Plain-PyTorch 2:4 magnitude pruning along the last dim (independent of sparsekern's kernels)."""
    torch = _torch()
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return (g * keep).reshape(rows, cols).to(w.dtype)


def _weight(n, k, dtype, dev=None):
    dev = dev or DEV
    torch = _torch()
    if dtype == torch.int8:
        return _prune24(torch.randint(-8, 9, (n, k), device=dev, dtype=torch.int8).float()).to(torch.int8)
    if dtype == torch.float8_e4m3fn:
        return _prune24(torch.randint(-4, 5, (n, k), device=dev).float()).to(dtype)
    return _prune24(torch.randn(n, k, device=dev, dtype=torch.float32)).to(dtype)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:400]


def _rel(y, ref) -> float:
    y, ref = y.double(), ref.double()
    return float((y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30))


def _dtname(dt) -> str:
    return str(dt).replace("torch.", "")


def _stats():
    from sparsekern.ops import cslt

    try:
        return cslt.cache_stats()
    except Exception:  # noqa: BLE001 - statistics are informative only
        return {}


def _delta(after: dict, before: dict, key: str):
    return after.get(key, 0) - before.get(key, 0) if key in after else None


def _sk_size_query(n, k, dtype):
    """cuSPARSELt's own size as the extension reports it (cusparseLtSpMMACompressedSize2), if it exposes a query."""
    from sparsekern import _ext

    fn = getattr(_ext._C, "cslt_compressed_size", None) if _ext.available() else None
    if fn is None:
        return None, "the extension has no cslt_compressed_size query"
    for arg in (_dtname(dtype), dtype):
        try:
            return int(fn(n, k, arg)), None
        except Exception as e:  # noqa: BLE001 - try the other argument form, then report
            last = _err(e)
    return None, last


def _fake_size(n, k, dtype):
    """What the fake kernel (torch.compile / FakeTensor tracing) says cslt_compress returns."""
    torch = _torch()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(n, k, dtype=dtype, device=DEV)
        return int(torch.ops.sparsekern.cslt_compress(w).numel())


def probe_1():
    """Finding 1: cuSPARSELt pads small matrices beyond the formula size."""
    torch = _torch()
    from sparsekern.ops import cslt

    cap = torch.cuda.get_device_capability()
    cases = [(torch.float16, 16, 16), (torch.float16, 16, 32), (torch.float16, 32, 16), (torch.float16, 32, 32),
             (torch.bfloat16, 16, 16), (torch.float16, 64, 64), (torch.int8, 32, 32), (torch.int8, 32, 64),
             (torch.int8, 64, 32)]
    if cap >= (8, 9):
        cases.append((torch.float8_e4m3fn, 32, 32))
    cases.append((torch.float16, 256, 256))  # a control: large enough that no padding is expected
    torch_ok = torch.backends.cusparselt.is_available()
    torch_ver = torch.backends.cusparselt.version() if torch_ok else None
    sk_ver = cslt.runtime_version()
    try:  # PyTorch reports CUSPARSELT_VERSION = major * 1000 + minor * 100 + patch (0.8.1 -> 801)
        major, minor, patch = (int(v) for v in sk_ver.split(".")[:3])
        same_lib = torch_ver is not None and int(torch_ver) == major * 1000 + minor * 100 + patch
    except ValueError:
        same_lib = False
    rows, padded, bad = [], [], []
    for dt, n, k in cases:
        row = {"dtype": _dtname(dt), "n": n, "k": k,
               "formula": n * k * 10 // 16 if dt.itemsize == 1 else n * k * 2 * 9 // 16}
        try:
            row["compressed_nbytes"] = int(cslt.compressed_nbytes(n, k, dt))
        except Exception as e:  # noqa: BLE001
            row["compressed_nbytes"] = _err(e)
        row["query"], why = _sk_size_query(n, k, dt)
        if why and row["query"] is None:
            row["query_error"] = why
        w = _weight(n, k, dt)
        if torch_ok:
            try:
                row["torch"] = int(torch._cslt_compress(w).numel())
            except Exception as e:  # noqa: BLE001 - PyTorch's limits are not ours
                row["torch"] = None
                row["torch_error"] = _err(e)
        try:
            row["fake"] = _fake_size(n, k, dt)
        except Exception as e:  # noqa: BLE001
            row["fake"] = None
            row["fake_error"] = _err(e)
        try:
            buf = cslt.cslt_compress(w)
            row["buffer"] = int(buf.numel())
            # y = I @ W^T = W^T: the multiply with the identity round-trips the weight exactly (decompress-compare)
            if dt == torch.float8_e4m3fn:
                eye, out = torch.eye(k, device=DEV).to(dt), torch.float32
            else:
                eye, out = torch.eye(k, device=DEV, dtype=dt), (torch.int32 if dt == torch.int8 else None)
            y = cslt.cslt_linear(eye, buf, n, k, out_dtype=out)
            torch.cuda.synchronize()
            row["roundtrip_exact"] = bool(torch.equal(y.float(), w.float().t()))
        except Exception as e:  # noqa: BLE001
            row["buffer"] = None
            row["error"] = _err(e)
        real = [v for v in (row.get("buffer"), row.get("query"), row.get("torch")) if isinstance(v, int)]
        if real and max(real) > row["formula"]:
            padded.append(f"{n}x{k} {row['dtype']}: {max(real)} B vs {row['formula']} B by the formula")
        problems = []
        if row.get("error"):
            problems.append(row["error"])
        elif not row.get("roundtrip_exact"):
            problems.append("identity product does not reproduce the weight")
        if isinstance(row.get("query"), int) and row.get("buffer") is not None and row["buffer"] != row["query"]:
            problems.append(f"buffer {row['buffer']} B != cuSPARSELt's query {row['query']} B")
        if isinstance(row.get("torch"), int) and row.get("buffer") is not None and row["buffer"] != row["torch"]:
            # reported, not failed: PyTorch may describe the matrix differently (its own layout / orientation)
            row["differs_from_torch"] = True
        if isinstance(row.get("fake"), int) and row.get("buffer") is not None and row["fake"] != row["buffer"]:
            row["fake_mismatch"] = True  # reported, not failed: a documented bound may differ
        if problems:
            bad.append(f"{n}x{k} {row['dtype']}: " + "; ".join(problems))
        rows.append(row)
    fake_mm = [f"{r['n']}x{r['k']} {r['dtype']}" for r in rows if r.get("fake_mismatch")]
    verdict = ("finding 1 confirmed: cuSPARSELt pads beyond the formula (" + "; ".join(padded[:3]) + ")"
               if padded else "finding 1 refuted here: cuSPARSELt's sizes equal the formula at every probed shape")
    verdict += (". sparsekern handles every probed shape" if not bad else
                ". sparsekern FAILS: " + " | ".join(bad[:4]))
    if fake_mm:
        verdict += f". The fake kernel's size differs from the real buffer at {', '.join(fake_mm[:4])}"
    torch_diff = [f"{r['n']}x{r['k']} {r['dtype']}" for r in rows if r.get("differs_from_torch")]
    if torch_diff:
        verdict += f". PyTorch's buffer has another size at {', '.join(torch_diff[:4])}"
    return not bad, verdict, {"cusparselt_sparsekern": sk_ver, "cusparselt_torch": torch_ver,
                              "same_library_version": same_lib, "shapes": rows}


def _cslt_fp16_layer(n: int, k: int):
    """(a float16 nn.Linear [n, k] with a 2:4 weight and a bias on the GPU, its SparseLinear forced to cuSPARSELt)."""
    torch = _torch()
    import torch.nn as nn

    from sparsekern.linear import SparseLinear

    lin = nn.Linear(k, n, bias=True, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.copy_(_prune24(lin.weight))
    layer = SparseLinear.from_linear(lin)
    layer.set_kernel("cslt")
    return lin, layer


def probe_2():
    """Finding 2: a captured graph replays into workspace memory freed by clear_cache()/search()."""
    torch = _torch()
    from sparsekern.ops import cslt

    n, k, m = 128, 256, 16
    lin, layer = _cslt_fp16_layer(n, k)
    detail = {"shape": f"{m}x{n}x{k} float16", "kernel": layer.kernel_for(m)}
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        s0 = _stats()
        layer(x)  # warm-up on the default stream (the old plan key held the stream: capture then built new plans)
        torch.cuda.synchronize()
        s1 = _stats()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y_static = layer(x)
        torch.cuda.synchronize()
        s2 = _stats()
        detail["plans_created_by_warmup"] = _delta(s1, s0, "plans_created")
        detail["plans_created_inside_capture"] = _delta(s2, s1, "plans_created")
        # Everything that used to free a workspace a graph still points at: clear_cache, a search (new epoch: the
        # default plans are rebuilt), and new plans / allocations that may land on freed memory.
        cslt.clear_cache()
        try:
            rec = cslt.search(x, layer.cslt_buffer, n, k, bias=layer.bias)
            detail["search"] = {key: rec.get(key) for key in ("alg_id", "split_k", "split_k_mode")}
            cslt.clear_search_results()  # a second invalidation; and eager below runs the captured (default) algorithm
        except Exception as e:  # noqa: BLE001
            detail["search_error"] = _err(e)
        canaries = [torch.full((1 << 20,), 7, dtype=torch.int32, device=DEV) for _ in range(8)]
        for mm in (1, 3, 33, 100):
            layer(torch.randn(mm, k, device=DEV, dtype=torch.float16))
        canaries += [torch.full((1 << 20,), 7, dtype=torch.int32, device=DEV) for _ in range(8)]
        torch.cuda.synchronize()
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        y_eager = layer(x)
        torch.cuda.synchronize()
    ref = x.double() @ layer.weight24.dense().double().t() + layer.bias.double()
    detail["replay_bitwise_equals_eager"] = bool(torch.equal(y_static, y_eager))
    detail["replay_rel_err_vs_eager"] = _rel(y_static, y_eager)
    detail["replay_rel_err_vs_fp64"] = _rel(y_static, ref)
    detail["canaries_intact"] = bool(all(bool((c == 7).all()) for c in canaries))
    del canaries
    if torch.cuda.get_device_capability() >= (8, 9):
        detail["fp8_out"] = _graph_fp8_out()  # the FP8 output path (its C buffer) through the same sequence
    detail["stats_after"] = {key: v for key, v in _stats().items()
                             if key in ("plans_created", "entries", "evictions", "searches", "epilogue_fallbacks")}
    fp8 = detail.get("fp8_out") or {"ok": True}
    wrong = []
    if detail["replay_rel_err_vs_eager"] > 2e-3 or detail["replay_rel_err_vs_fp64"] > 1e-2:
        wrong.append(f"the replayed output is wrong (rel. err {detail['replay_rel_err_vs_eager']:.2g} vs eager, "
                     f"{detail['replay_rel_err_vs_fp64']:.2g} vs float64)")
    if not detail["canaries_intact"]:
        wrong.append("memory allocated after clear_cache() was overwritten by the replay (a stale workspace)")
    if not fp8["ok"]:
        wrong.append(f"fp8 output: {fp8.get('error') or 'the replay is wrong or overwrote fresh memory'}")
    inside = detail["plans_created_inside_capture"]
    if not wrong:
        verdict = ("no stale memory seen: the replay after clear_cache() + search() matches eager and wrote no "
                   "freed memory" + (" (fp16 and fp8 output)" if "fp8_out" in detail else ""))
    else:
        verdict = "finding 2 confirmed: " + "; ".join(wrong)
    if inside:
        verdict += f"; {inside} plan(s) were created inside the capture (the warm-up did not warm the captured key)"
    return not wrong, verdict, detail


def _graph_fp8_out() -> dict:
    """cslt_linear float8 -> float8 (cuSPARSELt's C buffer) captured, then clear_cache() and churn, then replayed."""
    torch = _torch()
    from sparsekern.ops import cslt

    n, k, m = 64, 128, 16
    out = {}
    try:
        w = _weight(n, k, torch.float8_e4m3fn)
        buf = cslt.cslt_compress(w)
        x = torch.randint(-2, 3, (m, k), device=DEV).float().to(torch.float8_e4m3fn)
        bias = torch.randint(-4, 5, (n,), device=DEV).to(torch.float16)
        call = lambda: cslt.cslt_linear(x, buf, n, k, bias=bias, out_dtype=torch.float8_e4m3fn)  # noqa: E731
        call()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y_static = call()
        cslt.clear_cache()
        canaries = [torch.full((1 << 20,), 7, dtype=torch.int32, device=DEV) for _ in range(8)]
        for mm in (1, 33):
            cslt.cslt_linear(x[:1].repeat(mm, 1), buf, n, k, bias=bias, out_dtype=torch.float8_e4m3fn)
        x.copy_(torch.randint(-2, 3, (m, k), device=DEV).float().to(torch.float8_e4m3fn))
        g.replay()
        torch.cuda.synchronize()
        y_eager = call()
        torch.cuda.synchronize()
        out["rel_err_vs_eager"] = _rel(y_static.float(), y_eager.float())
        out["canaries_intact"] = bool(all(bool((c == 7).all()) for c in canaries))
        out["ok"] = out["rel_err_vs_eager"] <= 0.07 and out["canaries_intact"]  # e4m3: 3 mantissa bits
    except Exception as e:  # noqa: BLE001
        out["ok"], out["error"] = False, _err(e)
    return out


def probe_3():
    """Finding 3: the fused bias dtype for int8 inputs with fp16/bf16/int32 outputs."""
    torch = _torch()
    from sparsekern.ops import cslt

    n, k = 64, 128
    w = _weight(n, k, torch.int8)
    buf = cslt.cslt_compress(w)
    cases, bad = [], []
    for m in (1, 16, 33):
        x = torch.randint(-8, 9, (m, k), device=DEV, dtype=torch.int8)
        acc = x.double() @ w.double().t()
        for out in (torch.float16, torch.bfloat16, torch.int32):
            bias_dtypes = [torch.float32] + ([out] if out.is_floating_point else [])
            for bdt in bias_dtypes:
                if out == torch.int32:  # integer-valued: the int32 result is exact whatever the rounding
                    bias = torch.randint(-100, 101, (n,), device=DEV).to(bdt)
                else:
                    bias = (torch.randn(n, device=DEV) * 10).to(bdt)
                ref = acc + bias.double()
                case = {"m": m, "out": _dtname(out), "bias": _dtname(bdt)}
                s0 = _stats()
                try:
                    y = cslt.cslt_linear(x, buf, n, k, bias=bias, out_dtype=out)
                    torch.cuda.synchronize()
                    case["fallback"] = _delta(_stats(), s0, "epilogue_fallbacks")
                    if out == torch.int32:
                        case["max_abs_err"] = float((y.double() - ref).abs().max().item())
                        case["ok"] = bool(torch.equal(y.double(), ref))
                    else:
                        case["rel_err"] = _rel(y, ref)
                        case["ok"] = case["rel_err"] <= (1e-2 if out == torch.bfloat16 else 2e-3)
                except Exception as e:  # noqa: BLE001
                    case["ok"], case["error"] = False, _err(e)
                cases.append(case)
                if not case["ok"]:
                    bad.append(f"M={m} out={case['out']} bias={case['bias']}: "
                               + (case.get("error") or f"err {case.get('rel_err', case.get('max_abs_err'))}"))
    verdict = ("fixed: every int8 case with a bias matches the float64 reference" if not bad else
               "finding 3 confirmed: " + " | ".join(bad[:4]))
    return not bad, verdict, {"shape": f"{n}x{k} int8", "cases": cases}


def probe_4():
    """Finding 4: the epilogue fallback for int8 -> int32 (int8) with bias and GELU."""
    torch = _torch()
    import torch.nn.functional as F

    from sparsekern.ops import cslt

    n, k, m = 64, 128, 16
    w = _weight(n, k, torch.int8)
    buf = cslt.cslt_compress(w)
    x = torch.randint(-8, 9, (m, k), device=DEV, dtype=torch.int8)
    acc = x.double() @ w.double().t()
    bias = torch.randint(-100, 101, (n,), device=DEV).float()
    alpha = torch.rand(n, device=DEV) + 0.5
    variants = [("int32 bias+gelu", torch.int32, dict(bias=bias, activation="gelu"), F.gelu(acc + bias.double())),
                ("int32 alpha+bias+gelu", torch.int32, dict(bias=bias, alpha=alpha, activation="gelu"),
                 F.gelu(acc * alpha.double() + bias.double())),
                ("int32 bias+relu", torch.int32, dict(bias=bias, activation="relu"), F.relu(acc + bias.double())),
                ("int8 bias+gelu", torch.int8, dict(bias=bias, activation="gelu"),
                 F.gelu(acc + bias.double()).round().clamp(-128, 127))]
    cases, bad = [], []
    for name, out, kw, ref in variants:
        case = {"case": name}
        s0 = _stats()
        try:
            y = cslt.cslt_linear(x, buf, n, k, out_dtype=out, **kw)
            torch.cuda.synchronize()
            case["fallback"] = _delta(_stats(), s0, "epilogue_fallbacks")
            # rounding of the float epilogue to integers (half-even or toward zero), GELU's tanh form:
            # within 1 + 1e-3 |ref|
            err = (y.double() - ref).abs()
            case["max_abs_err"] = float(err.max().item())
            case["ok"] = bool((err <= 1.0 + 1e-3 * ref.abs()).all())
        except Exception as e:  # noqa: BLE001
            case["ok"], case["error"] = False, _err(e)
        cases.append(case)
        if not case["ok"]:
            bad.append(f"{name}: " + (case.get("error") or f"max abs err {case['max_abs_err']}"))
    verdict = ("fixed: int8 -> int32/int8 with bias and an activation runs (fallback where cuSPARSELt cannot fuse) "
               "and matches the reference" if not bad else "finding 4 confirmed: " + " | ".join(bad[:4]))
    return not bad, verdict, {"shape": f"{m}x{n}x{k} int8", "cases": cases}


def probe_6():
    """Finding 6: the arch-specific cuSPARSELt buffer survives torch.save/torch.load(map_location)."""
    torch = _torch()
    import io

    from sparsekern.linear import SparseLinear
    from sparsekern.ops import cslt

    n, k, m = 128, 256, 16
    lin, layer = _cslt_fp16_layer(n, k)
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        y0 = layer(x)
    cur = tuple(cslt.buffer_tag(x.device))
    detail = {"current_tag": list(cur), "original_tag": list(layer.weight24.cslt_tag or ()),
              "original_has_buffer": layer.weight24.cslt is not None}
    blob = io.BytesIO()
    torch.save(layer, blob)
    detail["pickle_bytes"] = blob.tell()
    detail["portable_bytes"] = layer.weight24.nbytes
    blob.seek(0)
    on_cpu = torch.load(blob, map_location="cpu", weights_only=False)
    detail["cpu_load_has_cslt"] = on_cpu.weight24.cslt is not None or on_cpu.cslt_buffer is not None
    blob.seek(0)
    loaded = torch.load(blob, map_location=DEV, weights_only=False)
    with torch.no_grad():
        y1 = loaded(x)
    torch.cuda.synchronize()
    w24 = loaded.weight24
    detail["loaded_tag"] = list(w24.cslt_tag) if w24.cslt_tag is not None else None
    detail["loaded_kernel"] = loaded.kernel_for(m)
    detail["loaded_output_equals_original"] = bool(torch.equal(y0, y1))
    moved = on_cpu.to(DEV)
    with torch.no_grad():
        y2 = moved(x)
    detail["cpu_load_then_cuda_equals"] = bool(torch.equal(y0, y2))
    detail["cpu_load_then_cuda_tag"] = list(moved.weight24.cslt_tag) if moved.weight24.cslt_tag is not None else None
    # A buffer tagged for another arch (what a checkpoint from an A100 would bring to an H100) must be rebuilt.
    try:
        old = w24.cslt
        w24._cslt_tag = (cur[0], "sm80" if cur[1] != "sm80" else "sm90", cur[2])
        w24.build_cslt()
        detail["stale_tag_rebuilt"] = tuple(w24.cslt_tag) == cur and w24.cslt is not old
    except Exception as e:  # noqa: BLE001 - the internals may have moved; reported, not failed
        detail["stale_tag_rebuilt"] = None
        detail["stale_tag_error"] = _err(e)
    sd = {kk: v for kk, v in layer.state_dict().items()}
    fresh = SparseLinear(k, n, bias=True, dtype=torch.float16, device=DEV)
    fresh.load_state_dict(sd)
    fresh.set_kernel("cslt")
    with torch.no_grad():
        detail["state_dict_round_trip_equals"] = bool(torch.equal(y0, fresh(x)))
    checks = {
        "loaded layer's buffer is tagged for this GPU": detail["loaded_tag"] is not None
        and tuple(detail["loaded_tag"]) == cur,
        "loaded output equals the original": detail["loaded_output_equals_original"],
        "no cuSPARSELt buffer after a CPU load": not detail["cpu_load_has_cslt"],
        "CPU load moved to CUDA equals the original": detail["cpu_load_then_cuda_equals"],
        "state_dict round trip equals the original": detail["state_dict_round_trip_equals"],
        "a buffer tagged for another arch is rebuilt": detail["stale_tag_rebuilt"] is not False,
    }
    failed = [c for c, good in checks.items() if not good]
    detail["checks"] = checks
    verdict = ("fixed: pickled layers come back without the old buffer and rebuild it for this GPU (tag "
               f"{cur[1]}, cuSPARSELt {cur[2]})" if not failed else "finding 6 confirmed: " + "; ".join(failed))
    return not failed, verdict, detail


PROBES = {1: probe_1, 2: probe_2, 3: probe_3, 4: probe_4, 6: probe_6}


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _context_ok() -> str | None:
    """None when the CUDA context still works after a probe; else the error (a sticky error poisons it)."""
    torch = _torch()
    try:
        torch.cuda.synchronize()
        t = torch.ones(4, device=DEV) * 2
        if float(t.sum().item()) != 8.0:
            return "a trivial kernel returned a wrong result"
        return None
    except Exception as e:  # noqa: BLE001
        return _err(e)


def run_child(findings: list[int]) -> int:
    why = None
    try:
        torch = _torch()
        import sparsekern  # noqa: F401  (loads the extension, registers the ops and fake kernels)
        from sparsekern import _ext

        if not torch.cuda.is_available():
            why = "torch sees no CUDA GPU"
        elif not _ext.available():
            why = f"the sparsekern extension did not load: {_ext.load_error()}"
        elif not _ext.build_info().get("with_cuda"):
            why = "the sparsekern extension is the CPU-only build"
    except Exception as e:  # noqa: BLE001
        why = f"import failed: {_err(e)}"
    for f in findings:
        if why:
            _emit({"event": "result", "finding": f, "ok": False, "verdict": f"probe not run: {why}",
                   "detail": {"error": why}, "seconds": 0.0})
            continue
        _emit({"event": "start", "finding": f})
        t0 = time.perf_counter()
        torch.manual_seed(f)
        try:
            ok, verdict, detail = PROBES[f]()
        except Exception as e:  # noqa: BLE001 - a probe's failure is its result
            ok, verdict = False, f"probe error: {_err(e)}"
            detail = {"error": _err(e), "traceback": traceback.format_exc().splitlines()[-12:]}
        broken = _context_ok()
        if broken:
            detail = dict(detail, cuda_context_broken=broken)
        _emit({"event": "result", "finding": f, "ok": bool(ok), "verdict": verdict, "detail": detail,
               "seconds": round(time.perf_counter() - t0, 2)})
        if broken:
            return 3  # the parent starts a fresh process for the remaining probes
    return 0


def check_build() -> int:
    import sparsekern  # noqa: F401
    from sparsekern import _ext

    info = _ext.build_info() if _ext.available() else {}
    print(json.dumps(info, default=str, indent=1))
    if not _ext.available():
        print(f"gpu_probes --check-build: the extension did not load: {_ext.load_error()}", file=sys.stderr)
        return 1
    if not info.get("with_cuda"):
        print("gpu_probes --check-build: the extension is the CPU-only build (SPARSEKERN_CUDA=1 was not honoured?)",
              file=sys.stderr)
        return 1
    return 0


# ================================================================================================== parent side


def _write(path: str | None, results: list[dict], started: str) -> None:
    if not path:
        return
    doc = {"format": FORMAT, "version": 1, "created": started, "findings": FINDINGS,
           "probes": sorted(results, key=lambda r: r["finding"])}
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _finish(rec: dict) -> dict:
    rec = {k: v for k, v in rec.items() if k != "event"}
    rec["title"] = FINDINGS.get(rec["finding"], "")
    return {k: rec.get(k) for k in ("finding", "title", "ok", "verdict", "detail", "seconds")}


def run_parent(findings: list[int], out: str | None, probe_timeout: float, child_cmd: list[str]) -> int:
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results: list[dict] = []
    remaining = list(findings)
    while remaining:
        err = tempfile.TemporaryFile(mode="w+")
        before = len(results)
        proc = subprocess.Popen(child_cmd + ["--child", ",".join(map(str, remaining))], stdout=subprocess.PIPE,
                                stderr=err)
        fd = proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        # deadlines: the child's start (imports, CUDA context), each probe, and the step from one probe to the next
        current, deadline, hung, pending, eof = None, time.monotonic() + STARTUP_TIMEOUT, False, b"", False
        while not eof:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                hung = True
                proc.kill()
                break
            chunk = os.read(fd, 65536)  # raw reads: a buffered reader could hold a line the selector never reports
            eof = not chunk
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                try:
                    msg = json.loads(line)
                except ValueError:
                    sys.stderr.write(line + "\n")  # something printed to stdout that is not ours: keep it in the log
                    continue
                if msg.get("event") == "start":
                    current, deadline = msg["finding"], time.monotonic() + probe_timeout
                elif msg.get("event") == "result":
                    rec = _finish(msg)
                    results.append(rec)
                    print(json.dumps(rec, default=str), flush=True)
                    _write(out, results, started)
                    remaining.remove(rec["finding"])
                    current, deadline = None, time.monotonic() + STARTUP_TIMEOUT
        sel.close()
        proc.stdout.close()
        rc = proc.wait()
        err.seek(0)
        tail = err.read()
        err.close()
        sys.stderr.write(tail)
        sys.stderr.flush()
        if current is not None:  # the probe in flight never reported: hung, or took the process down
            why = (f"did not finish within {probe_timeout:g} s (killed)" if hung else
                   f"the process died (exit status {rc}) during the probe")
            rec = _finish({"finding": current, "ok": False, "verdict": f"probe error: {why}",
                           "detail": {"error": why, "stderr_tail": tail[-1500:]}, "seconds": None})
            results.append(rec)
            print(json.dumps(rec, default=str), flush=True)
            _write(out, results, started)
            remaining.remove(current)
        elif remaining and (hung or rc not in (0, 3) or len(results) == before):
            # hung or died between probes (e.g. at import), or ended without progress: record the rest as not run
            # rather than loop forever
            why = f"the probe process hung for {STARTUP_TIMEOUT:g} s outside a probe" if hung else \
                f"the probe process exited with {rc} before reporting"
            for f in list(remaining):
                rec = _finish({"finding": f, "ok": False, "verdict": f"probe not run: {why}",
                               "detail": {"error": why, "stderr_tail": tail[-1500:]},
                               "seconds": None})
                results.append(rec)
                print(json.dumps(rec, default=str), flush=True)
                remaining.remove(f)
            _write(out, results, started)
    _write(out, results, started)
    ok = sum(1 for r in results if r["ok"])
    print(f"gpu_probes: {ok}/{len(results)} probes ok", file=sys.stderr)
    return 0 if ok == len(results) else 1


def _finding_list(text: str) -> list[int]:
    out = []
    for t in text.split(","):
        t = t.strip()
        if not t:
            continue
        if not t.isdigit() or int(t) not in PROBES:
            raise argparse.ArgumentTypeError(f"{t!r} is not a probed finding (probed: {', '.join(map(str, PROBES))})")
        out.append(int(t))
    if not out:
        raise argparse.ArgumentTypeError("empty list of findings")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", type=_finding_list, default=list(PROBES), metavar="LIST",
                    help="findings to probe, e.g. 1,6 (default: 1,2,3,4,6)")
    ap.add_argument("--out", metavar="FILE", help="JSON file with every probe's result (rewritten after each)")
    ap.add_argument("--probe-timeout", type=float, default=60.0, metavar="S",
                    help="seconds one probe may take before it is killed and recorded as failed (default 60)")
    ap.add_argument("--check-build", action="store_true", help="only check that the extension is the CUDA build")
    ap.add_argument("--child", type=_finding_list, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.check_build:
        return check_build()
    if args.child:
        return run_child(args.child)
    return run_parent(args.only, args.out, args.probe_timeout, [sys.executable, os.path.abspath(__file__)])


if __name__ == "__main__":
    sys.exit(main())
