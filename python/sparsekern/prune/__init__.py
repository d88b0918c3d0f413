"""The pruning engine: magnitude, Wanda, SparseGPT, the least-squares refit and ADMM for N:M ("2:4", "4:8", any "n:m") and unstructured sparsity.

    from sparsekern.prune import magnitude, wanda, sparsegpt, HessianStats, ActScaleStats
    r = sparsegpt(layer.weight, stats.value, "2:4")        # PruneResult(weight, mask, loss)

W is [out_features, in_features]; N:M groups run along in_features; masks are bool with True = kept. The math
and the reference behaviour reproduced here are in docs/pruning.md; the kernels are sparsekern.ops.prune.
"""

from .magnitude import magnitude
from .permute import kept_importance, search_permutation
from .refit import RefitSolver, admm_gradual, refit
from .pattern import Pattern, PruneResult, parse_pattern
from .sparsegpt import minmax_quantizer, sparsegpt
from .stats import ActScaleStats, HessianStats
from .wanda import wanda

__all__ = [
    "ActScaleStats",
    "RefitSolver",
    "admm_gradual",
    "kept_importance",
    "refit",
    "search_permutation",
    "HessianStats",
    "Pattern",
    "PruneResult",
    "magnitude",
    "minmax_quantizer",
    "parse_pattern",
    "sparsegpt",
    "wanda",
]
