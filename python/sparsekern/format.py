"""The portable 2:4 format's former home: everything now lives in sparsekern.weight (Sparse24Weight owns the format,
its validation, its state-dict layout and the compressed-tensors import/export). These names stay importable from
here for code written against earlier versions; the format itself (docs/format.md) has not changed."""

from .weight import (  # noqa: F401
    FORMAT_NAME,
    FORMAT_VERSION,
    Compressed24,
    Sparse24Weight,
    from_bitmask,
    to_bitmask,
)

__all__ = ["Compressed24", "Sparse24Weight", "FORMAT_VERSION", "FORMAT_NAME", "from_bitmask", "to_bitmask"]
