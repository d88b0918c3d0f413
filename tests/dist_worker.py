"""One rank of a distributed pruning run for tests/test_distributed.py (not a test module itself).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dist_worker.py SPEC.json

SPEC (JSON): {"src": model folder, "mode": "memory" | "lowmem", "out": folder, "options": prune_model options,
"calib": [nsamples, seqlen, seed] or null, "timeout": seconds, "rank_options": {rank: extra options},
"fault": {"rank": r, "kind": "die" | "raise" | "enospc", "block": i}}.
WORLD_SIZE=1 runs without a process group (the one-process reference). memory mode: every rank saves its pruned
state dict to out/rank{r}.pt and rank 0 its report to out/report.json; lowmem: prune_checkpoint into out/ckpt.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch


def _inject(fault: dict, rank: int) -> None:
    if fault is None or int(fault["rank"]) != rank:
        return
    from sparsekern.pipeline import run as run_mod

    kind, block = fault["kind"], int(fault["block"])
    if kind == "enospc":
        import safetensors.torch as st

        real = st.save_file
        calls = {"n": 0}

        def save_file(*a, **k):
            calls["n"] += 1
            if calls["n"] > block:
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
            return real(*a, **k)

        st.save_file = save_file
        return
    from sparsekern.pipeline import lowmem

    def failing(real):
        def load_block(self, i, layer):
            if i == block:
                if kind == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure in block {i}")
            return real(self, i, layer)
        return load_block

    # the in-memory run's and the low-memory run's block reader (which overrides it)
    run_mod._PruneRun.load_block = failing(run_mod._PruneRun.load_block)
    lowmem._LowMemRun.load_block = failing(lowmem._LowMemRun.load_block)


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    import torch.distributed as td

    from sparsekern.pipeline import prune_checkpoint, prune_model

    if world > 1:
        td.init_process_group("gloo", timeout=timedelta(seconds=spec.get("timeout", 60)))
    _inject(spec.get("fault"), rank)
    options = dict(spec["options"], progress=False)
    options.update(spec.get("rank_options", {}).get(str(rank), {}))
    calib = None
    if spec.get("calib"):
        n, t, seed = spec["calib"]
        calib = torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(seed))
    out = Path(spec["out"])
    try:
        if spec["mode"] == "lowmem":
            rep = prune_checkpoint(spec["src"], out / "ckpt", calib, **options)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(spec["src"], dtype=torch.float32)
            rep = prune_model(model, calib, **options)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), out / f"rank{rank}.pt")
            from sparsekern.quant import weight_grid

            grids = {name: weight_grid(m) for name, m in model.named_modules() if weight_grid(m) is not None}
            torch.save(grids, out / f"rank{rank}-grids.pt")  # the W8A8 grids (attributes, not in the state dict)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(json.dumps(rep.to_dict()))
    finally:
        if world > 1 and td.is_initialized():
            td.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
