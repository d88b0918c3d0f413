"""sparsekern: 2:4 structured sparsity for PyTorch on NVIDIA GPUs (sm80+) and CPUs."""

from ._ext import ExtensionMissingError
from ._version import __version__
from . import ops
from .diagnostics import doctor

__all__ = ["__version__", "ExtensionMissingError", "doctor", "ops"]
