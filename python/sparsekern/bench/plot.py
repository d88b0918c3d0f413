"""PNG plot of a GEMM run: speedup over dense vs M, one panel per weight shape, one line per (contender, dtype).

matplotlib is imported lazily, with the Agg backend (no display on CI or GPU machines); where it is missing,
plot_speedup raises PlotUnavailable and callers record "plot skipped" instead of failing the run.
"""

from __future__ import annotations

import math


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed; the message says so."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise PlotUnavailable(f"matplotlib is not installed ({e}); pip install matplotlib for the PNG plot") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker

    return plt, ticker


def plot_speedup(records: list[dict], path: str, title: str = "") -> str:
    """Speedup vs dense (dense-equivalent: >1 means faster than F.linear on the same values) against M (log2).

    Only ok records of contenders other than `dense` with a speedup are drawn. Returns path. Raises
    PlotUnavailable without matplotlib, ValueError when no record has a speedup to draw.
    """
    pts = [r for r in records if r["status"] == "ok" and r["contender"] != "dense" and r.get("speedup_vs_dense")]
    if not pts:
        raise ValueError("no measured speedup vs dense to plot (was the dense contender measured?)")
    plt, ticker = _pyplot()
    shapes = list(dict.fromkeys(r["shape"] for r in pts))
    cols = min(4, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for r in pts:
            if r["shape"] == shape:
                lines.setdefault((r["contender"], r["dtype"]), []).append((r["m"], r["speedup_vs_dense"]))
        for (contender, dtype), xy in sorted(lines.items()):
            xy.sort()
            ax.plot([m for m, _ in xy], [s for _, s in xy], marker="o", markersize=3, label=f"{contender} {dtype}")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 16, 256: not 2^4
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup vs dense (×)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
