"""GEMM shapes for the benchmarks: model presets, custom `MxNxK` / `NxK` lists, the M sweep, dtypes.

Convention (the whole project's): a Linear layer's weight W is [N, K] = [out_features, in_features], the input x is
[M, K] (M = tokens in the batch), y = x @ W^T is [M, N]; 2:4 groups run along K.
"""

from __future__ import annotations

import dataclasses

import torch

# Powers of two from decode (M = 1) to long prefill (M = 8192).
M_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

# name -> (torch dtype, what it means in the benchmark)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "fp32": (torch.float32, "float32 activations and weights"),
    "fp16": (torch.float16, "float16 activations and weights, float32 accumulation"),
    "bf16": (torch.bfloat16, "bfloat16 activations and weights, float32 accumulation"),
    "int8": (torch.int8, "W8A8: int8 activations and weights, int32 accumulation, bf16 output"),
    "fp8": (torch.float8_e4m3fn, "W8A8: float8 e4m3 activations and weights, float32 accumulation, bf16 output"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields of a Hugging Face LlamaConfig that decide the Linear shapes of a decoder layer."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads: grouped-query attention (k/v project to fewer heads)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layers(self) -> list[tuple[str, int, int]]:
        """(layer, N = out_features, K = in_features) of one decoder layer's Linear modules."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        return [
            ("q", self.num_attention_heads * self.head_dim, h),
            ("k", kv, h),
            ("v", kv, h),
            ("o", h, self.num_attention_heads * self.head_dim),
            ("gate", i, h),
            ("up", i, h),
            ("down", h, i),
        ]


# Values of the models' config.json on the Hugging Face hub.
PRESETS: dict[str, ModelConfig] = {
    # meta-llama/Meta-Llama-3-8B: GQA with 8 KV heads of 128
    "llama3-8b": ModelConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                             num_key_value_heads=8),
    # meta-llama/Meta-Llama-3-70B: GQA with 8 KV heads of 128
    "llama3-70b": ModelConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                              num_key_value_heads=8),
    # meta-llama/Llama-2-7b-hf: plain multi-head attention
    "llama2-7b": ModelConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                             num_key_value_heads=32),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One weight shape to benchmark. `m` fixes the batch size (custom MxNxK); None means: the M sweep."""

    n: int
    k: int
    m: int | None = None
    model: str | None = None  # preset name, None for custom shapes
    layers: str | None = None  # "gate/up": the layers of `model` that share this shape

    @property
    def label(self) -> str:
        if self.model:
            return f"{self.model} {self.layers} {self.n}x{self.k}"
        return f"{self.n}x{self.k}"


def preset_shapes(name: str) -> list[Shape]:
    """The distinct (N, K) of a preset's decoder layer; layers of equal shape are measured once ("gate/up")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    by_shape: dict[tuple[int, int], list[str]] = {}
    for layer, n, k in PRESETS[name].layers():
        by_shape.setdefault((n, k), []).append(layer)
    return [Shape(n=n, k=k, model=name, layers="/".join(ls)) for (n, k), ls in by_shape.items()]


# Largest operand a benchmark point may allocate (elements): 2^31 is 8 GiB of float32, past any real layer and past what
# the GEMM kernels index with 32-bit offsets; a larger request is a typo, refused before anything is allocated.
MAX_OPERAND_ELEMENTS = 2 ** 31


def parse_shape(text: str) -> Shape:
    """'MxNxK' (fixed batch) or 'NxK' (the M sweep); K must be a multiple of 4 (2:4 groups run along K)."""
    parts = text.strip().lower().split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"shape {text!r} is not MxNxK or NxK (positive integers joined by 'x', e.g. 16x4096x4096 or 4096x11008)"
        )
    vals = [int(p) for p in parts]
    m = vals[0] if len(vals) == 3 else None
    n, k = vals[-2], vals[-1]
    if k % 4:
        raise ValueError(f"shape {text!r}: K = {k} is not a multiple of 4 (the 2:4 groups run along K)")
    for name, a, b in (("N x K (the weight)", n, k), ("M x K (the activations)", m or 1, k)):
        if a * b > MAX_OPERAND_ELEMENTS:
            raise ValueError(f"shape {text!r}: {name} has {a * b:,} elements; at most {MAX_OPERAND_ELEMENTS:,} "
                             "(2^31) per operand are benchmarked")
    return Shape(n=n, k=k, m=m)


def parse_shapes(text: str) -> list[Shape]:
    """Comma-separated parse_shape list."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("empty shape list (expected e.g. 16x4096x4096,4096x11008)")
    return [parse_shape(t) for t in items]


def parse_presets(text: str) -> list[str]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    if not names:
        raise ValueError(f"empty preset list; known presets: {', '.join(sorted(PRESETS))}")
    return names


def parse_dtypes(text: str) -> list[str]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; known dtypes: {', '.join(DTYPES)}")
    if not names:
        raise ValueError(f"empty dtype list; known dtypes: {', '.join(DTYPES)}")
    return names


def parse_m_list(text: str) -> list[int]:
    """'1,16,256' -> [1, 16, 256]; 'sweep' -> M_SWEEP."""
    if text.strip().lower() == "sweep":
        return list(M_SWEEP)
    out = []
    for t in text.split(","):
        t = t.strip()
        if not (t.isdigit() and int(t) > 0):
            raise ValueError(f"M list {text!r}: {t!r} is not a positive integer (expected e.g. 1,16,256 or 'sweep')")
        out.append(int(t))
    return sorted(set(out))
