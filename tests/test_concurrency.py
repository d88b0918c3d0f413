"""Threads x shared SparseLinear layers x changes of the dispatch settings while they run (issue 16), bounded.

Worker threads call forward() on layers they share, on fixed inputs, while a mutator thread keeps changing what the
calls dispatch by: the policy's process-wide override (sparsekern.policy.override), each layer's set_kernel(), the C++
CPU dispatch settings (ISA, kernel family, M thresholds: sparsekern.envs.cpu_dispatch / set_cpu_thresholds, the
run-time form of SPARSEKERN_CPU_ISA / SPARSEKERN_CPU_SPMM_LAYOUT) and the active policy table (set_table).

Property: every result a worker gets is bit for bit one of the answers the same layer gives on the same input
single-threaded under one of the settings the mutator can choose (those answers are computed first, setting by
setting); no call raises; the settings are restored at the end. A torn read of the settings (a call that sees half
of one setting and half of another) or a data race in a kernel shows up as a result outside that set or an error.
Bounded to about 10 s (SECONDS: the mixing phase, 8 s).
"""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest
import torch

from sparsekern import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")

if _ext.available():
    from sparsekern import envs, policy
    from sparsekern.linear import SparseLinear
    from sparsekern.ops import core

SECONDS = 8.0  # the mixing phase
WORKERS = 4
KERNELS = [None, "spmm24", "dense_fallback"]
THRESHOLDS = [None, {"tokens_f32_min_m": 1, "rows_pair_bf16_min_m": 1, "slab_rows": 16},
              {"tokens_f32_min_m": None, "pairs_bf16_min_m": 2, "pairs_i8_min_m": 2, "tokens_i8_min_m": 4}]


def _layer(n: int, k: int, dtype, quant=None, seed=0) -> "SparseLinear":
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(core.prune_nm(torch.randn(n, k, generator=g), 2, 4)[0])
        lin.bias.copy_(torch.randn(n, generator=g))
    return SparseLinear.from_linear(lin.to(dtype), quant=quant)


def _dispatch_paths(layers, inputs) -> list[dict]:
    """Full CPU dispatch settings (isa, layout) every layer can run at every M here (a forced path a dtype has no
    kernel for is refused by the op, and would be a false alarm in the workers)."""
    ok = []
    for isa, layout in itertools.product([None, "scalar", "avx2", "avx512-base", "avx512"],
                                         ["auto", "rows", "pairs", "tokens"]):
        try:
            with envs.cpu_dispatch(isa=isa, layout=layout), torch.no_grad():
                for i, layer in enumerate(layers):
                    for x in inputs[i]:
                        layer(x)
            ok.append({"isa": isa, "layout": layout})
        except RuntimeError:
            continue
    return ok


def _bytes(y: torch.Tensor) -> bytes:
    """The result's exact bit pattern (numpy has no bfloat16: viewed as 16-bit integers)."""
    y = y.contiguous()
    return (y.view(torch.int16) if y.element_size() == 2 else y).numpy().tobytes()


def _answers(layers, inputs, paths) -> list[list[set[bytes]]]:
    """answers[layer][input]: the byte strings of every single-threaded result under every setting drawn below."""
    out = [[set() for _ in xs] for xs in inputs]
    defaults = envs.cpu_dispatch_defaults()
    for kernel, path, thr in itertools.product(KERNELS, paths, THRESHOLDS):
        with envs.cpu_dispatch(**path, **{**defaults, **(thr or {})}), policy.override(kernel), torch.no_grad():
            for i, layer in enumerate(layers):
                for j, x in enumerate(inputs[i]):
                    out[i][j].add(_bytes(layer(x)))
    return out


def test_threads_sharing_layers_while_settings_change_get_single_threaded_answers():
    saved_dispatch = envs.cpu_dispatch_settings()
    saved_version = _ext._C.cpu_dispatch_version()
    layers = [_layer(48, 64, torch.float32, seed=1), _layer(33, 96, torch.bfloat16, seed=2),
              _layer(40, 128, torch.float32, quant="int8", seed=3), _layer(17, 36, torch.float16, seed=4)]
    g = torch.Generator().manual_seed(5)
    ms = [1, 5, 33, 70]  # across the CPU kernel families' M thresholds
    inputs = [[torch.randn(m, layer.in_features, generator=g).to(layer.dense_dtype) for m in ms]
              for layer in layers]
    paths = _dispatch_paths(layers, inputs)
    assert {"isa": None, "layout": "auto"} in paths
    answers = _answers(layers, inputs, paths)
    # the settings change the answers (float32: the kernel families sum in different orders), so a call that mixed two
    # settings' views could be told apart from either
    assert max(len(a) for row in answers for a in row) > 1
    tables = [None, policy.table_from_entries([
        {"arch": "cpu", "dtype": "float32", "n": 48, "k": 64, "m": 1, "kernel": "dense_fallback"},
        {"arch": "cpu", "dtype": "bfloat16", "n": 33, "k": 96, "m": 64, "kernel": "spmm24"}])]

    stop = threading.Event()
    errors: list[str] = []
    counts = [0] * WORKERS
    mutations = [0]

    def worker(w: int) -> None:
        rng = random.Random(w)
        try:
            with torch.no_grad():
                while not stop.is_set():
                    i = rng.randrange(len(layers))
                    j = rng.randrange(len(inputs[i]))
                    y = layers[i](inputs[i][j])
                    if _bytes(y) not in answers[i][j]:
                        errors.append(f"worker {w}: layer {i} input {j}: a result that no single-threaded setting "
                                      f"gives (max |y| {float(y.float().abs().max()):.4g})")
                        stop.set()
                    counts[w] += 1
        except Exception as exc:  # noqa: BLE001  (any error in a worker is a failure)
            errors.append(f"worker {w}: {type(exc).__name__}: {exc}")
            stop.set()

    def mutator() -> None:
        rng = random.Random(99)
        defaults = envs.cpu_dispatch_defaults()
        try:
            while not stop.is_set():
                what = rng.randrange(4)
                if what == 0:
                    with policy.override(rng.choice(KERNELS)):
                        time.sleep(rng.random() * 0.002)
                elif what == 1:
                    rng.choice(layers).set_kernel(rng.choice(KERNELS))
                elif what == 2:
                    thr = rng.choice(THRESHOLDS) or {}
                    _ext._C.cpu_dispatch_set({**rng.choice(paths), **defaults, **thr})
                else:
                    policy.set_table(rng.choice(tables))
                mutations[0] += 1
                time.sleep(rng.random() * 0.001)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"mutator: {type(exc).__name__}: {exc}")
            stop.set()

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(WORKERS)]
    threads.append(threading.Thread(target=mutator, daemon=True))
    try:
        for t in threads:
            t.start()
        stop.wait(SECONDS)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a thread did not finish (deadlock?)"
    finally:
        stop.set()
        for layer in layers:
            layer.set_kernel(None)
        policy.set_table(None)
        _ext._C.cpu_dispatch_restore(saved_version)
    assert not errors, errors[:5]
    assert envs.cpu_dispatch_settings() == saved_dispatch
    assert policy.forced_kernel() is None
    assert sum(counts) > 100 and mutations[0] > 100, (counts, mutations)
    print(f"{sum(counts)} calls in {WORKERS} threads, {mutations[0]} setting changes, "
          f"{len(paths)} dispatch paths x {len(KERNELS)} kernels x {len(THRESHOLDS)} threshold sets")
