"""What prune_model did: PruneReport (per-linear LinearReport rows, times, re-run kernel choices) and its table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LinearReport:
    """One pruned linear: full dotted name, weight shape [out, in], loss (SparseGPT's OBS loss; with a refit or
    method "admm" the exact 1/2 (w_hat - w) H (w_hat - w)^T summed over rows; None when the method has none), fraction of zeros after pruning, seconds spent in the pruning engine."""

    layer: int
    name: str
    shape: tuple[int, int]
    loss: float | None
    sparsity: float
    seconds: float
    rank: int = 0  # the rank that pruned it (pipeline/dist.py; 0 in a one-process run)


@dataclass
class PruneReport:
    """What prune_model did. Times in seconds; `capture_seconds` covers running the calibration data up to
    block 0, `block_seconds[l]` all of block l (statistics pass, pruning, re-run)."""

    method: str
    pattern: str
    nsamples: int
    seqlen: int
    true_sequential: bool
    device: str
    offload: bool
    layers_path: str = ""
    linears: list[LinearReport] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0
    total_seconds: float = 0.0
    # CPU time of this process (all threads) over the whole call: with wall time, it shows how much a run was
    # slowed down by other processes sharing the cores.
    cpu_seconds: float = 0.0
    calib_dtype: str = "model"
    single_pass: bool = True
    # Re-run kernel requested ("dense" | "sparse" | "auto") and, per weight shape "NxK dtype", the one used;
    # with "auto" also the probe that decided it (seconds per GEMM at batch_size x seqlen rows, agreement).
    rerun_kernel: str = "dense"
    rerun_choices: dict = field(default_factory=dict)
    rerun_probes: dict = field(default_factory=dict)
    # Least-squares refit after the method's mask (None | "admm") and the solver's options (also for method "admm").
    refit: str | None = None
    refit_options: dict = field(default_factory=dict)
    # Channel permutations folded into the model (permute=...): full consumer name -> {"producers": [...], "gain":
    # relative increase of the kept importance, "seconds": search time, "perm": the consumer's column permutation}.
    permutations: dict = field(default_factory=dict)
    # Out-of-core run (pipeline/lowmem.py): blocks read from the checkpoint and written out one at a time.
    low_memory: bool = False
    # Across ranks (pipeline/dist.py): the process group's size and backend, and per rank the calibration sequences
    # [first, end) it ran and the linears it pruned. One process: world_size 1, one entry.
    world_size: int = 1
    backend: str | None = None
    ranks: list = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Zeros / weights over the pruned linears."""
        total = sum(r.shape[0] * r.shape[1] for r in self.linears)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.linears) / total if total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        return d

    def table(self, per_linear: bool = False) -> str:
        calib = (f"{self.nsamples} x {self.seqlen} calibration tokens" if self.nsamples
                 else "no calibration (data-free)")
        refit = f" + refit {self.refit}" if self.refit else ""
        lines = [f"prune_model: {self.method}{refit} {self.pattern}, {calib}, "
                 f"true_sequential={self.true_sequential}, device={self.device}, calibration dtype "
                 f"{self.calib_dtype}"
                 + (" (offload)" if self.offload else ""),
                 f"  {len(self.linears)} linears pruned in {len(self.block_seconds)} blocks of {self.layers_path}, "
                 f"sparsity {100 * self.sparsity:.2f}%, kept dense: {len(self.kept_dense)}",
                 f"  time: capture {self.capture_seconds:.1f} s, blocks {sum(self.block_seconds):.1f} s, "
                 f"total {self.total_seconds:.1f} s (process CPU time {self.cpu_seconds:.1f} s)"]
        if self.world_size > 1:
            lines.append(f"  {self.world_size} ranks ({self.backend}): " + "; ".join(
                f"rank {r['rank']} sequences {r['samples'][0]}-{r['samples'][1]}, {len(r['linears'])} linears"
                for r in self.ranks))
        if per_linear:
            lines.append(f"  {'layer':>5}  {'linear':<40} {'shape':>12} {'loss':>12} {'sparsity':>8} {'s':>6}")
            for r in self.linears:
                loss = "-" if r.loss is None else f"{r.loss:.4g}"
                lines.append(f"  {r.layer:>5}  {r.name:<40} {r.shape[0]:>5}x{r.shape[1]:<6} {loss:>12} "
                             f"{100 * r.sparsity:>7.2f}% {r.seconds:>6.2f}")
        if self.permutations:
            gains = [v["gain"] for v in self.permutations.values()]
            lines.append(f"  permuted: {len(gains)} linears, kept importance +{100 * sum(gains) / len(gains):.2f}% "
                         f"on average, {sum(v['seconds'] for v in self.permutations.values()):.1f} s of search")
        for name in self.kept_dense:
            lines.append(f"  kept dense: {name}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
