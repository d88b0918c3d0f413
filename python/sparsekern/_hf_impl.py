"""The transformers classes behind sparsekern.hf (imported only once transformers' quantizer registry is): the
"sparsekern" quantization config and quantizer, the compressed-tensors sparse-24-bitmask quantizer, and the load
ops that turn a layer's checkpoint entries into a SparseLinear weight. See sparsekern.hf for the design."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import _hfbase as hf
from ._modules import is_conv1d, replace_module
from ._version import __version__
from ._ckptio import ST_CODES, ST_DTYPES
from .linear import SparseLinear, dense_weight_of, is_convertible
from .weight import FORMAT_VERSION, CheckpointError, Sparse24Weight, codes_shape

_ST_FLOAT = {name: ST_CODES[name] for name in ("float32", "float16", "bfloat16")}
_ST_QUANT = {"int8": "I8", "fp8": "F8_E4M3"}
_LAYER_ENTRIES = ("values", "codes", "weight_scale", "shape", "format_version")


def _float_dtype(dtype: torch.dtype, fallback: str) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else getattr(torch, fallback)


def _check_header_dtype(key: str, want: torch.dtype, got: str, where: str) -> None:
    """A dense tensor may be stored in any float dtype when the model's is a float dtype (transformers casts it);
    anything else must be stored exactly as the model holds it (a header relabelling float bits as integers is
    refused, not loaded as numbers)."""
    floats = ("F64", "F32", "F16", "BF16")
    ok = got in floats if want.is_floating_point else ST_DTYPES.get(got) == want
    if not ok:
        raise CheckpointError(f"{where}: '{key}' is stored as {got} but the model holds it as "
                              f"{str(want).removeprefix('torch.')}")


def _first_line(exc: BaseException) -> str:
    s = str(exc)
    return s.splitlines()[0][:300] if s else type(exc).__name__


# ---------------------------------------------------------------------------------------------- sparsekern config


class SparsekernConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` for a sparsekern checkpoint:

        {"quant_method": "sparsekern", "format_version": 2, "portable_format_version": 1,
         "sparsekern_version": "...", "layers": {name: {"in_features", "out_features", "bias", "dtype", "quant",
         "weight_layout"}}, "metadata": <the JSON value passed to save_pretrained(metadata=...)> or null}

    `layers` lists the SparseLinear layers (written at save time from the model as it is then); each one's tensors
    are `<name>.values / .codes / .weight_scale (quantised) / .bias / .shape / .format_version` (docs/format.md)."""

    def __init__(self, layers: dict | None = None, format_version: int = hf.HF_FORMAT_VERSION,
                 portable_format_version: int = FORMAT_VERSION, sparsekern_version: str | None = None,
                 metadata=None, **kwargs) -> None:
        self.quant_method = hf.QUANT_METHOD
        self.format_version = format_version
        self.portable_format_version = portable_format_version
        self.sparsekern_version = sparsekern_version or __version__
        self.layers = {} if layers is None else layers  # validate() checks it is an object
        self.metadata = metadata

    def validate(self, where: str = "config.json quantization_config") -> None:
        """CheckpointError naming the field and the rule (module doc's schema)."""
        from ._ckptio import check_layer_specs

        if self.format_version != hf.HF_FORMAT_VERSION:
            raise CheckpointError(f"{where}: unknown sparsekern format_version {self.format_version!r}; this "
                                  f"sparsekern ({__version__}) reads version {hf.HF_FORMAT_VERSION} (upgrade "
                                  "sparsekern to load this checkpoint)")
        if self.portable_format_version != FORMAT_VERSION:
            raise CheckpointError(f"{where}: unknown 2:4 portable_format_version {self.portable_format_version!r}; "
                                  f"this sparsekern reads {FORMAT_VERSION}")
        check_layer_specs(self.layers, where)

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                "portable_format_version": self.portable_format_version,
                "sparsekern_version": self.sparsekern_version, "layers": self.layers,
                "metadata": self.metadata}

    def to_diff_dict(self) -> dict:
        return self.to_dict()


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """The `layers` entry describing `model`'s SparseLinear layers as they are now."""
    return {name: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                   "dtype": str(m.dense_dtype).removeprefix("torch."), "quant": m.quant,
                   "weight_layout": m.weight_layout}
            for name, m in model.named_modules() if isinstance(m, SparseLinear)}


# ---------------------------------------------------------------------------------------------- checkpoint headers


def read_headers(files, require_sums: bool = False) -> tuple[dict[str, tuple[list[int], str]], dict[str, str],
                                                              list[Path]]:
    """({key: (shape, dtype)}, {key: CRC-32 recorded}, files) from the safetensors headers alone (no tensor is read);
    a truncated or corrupt file is a CheckpointError naming it. require_sums: every file must record a CRC-32 for
    each of its tensors (sparsekern's own checkpoints always do)."""
    from ._ckptio import _safetensors_header, recorded_checksums

    heads: dict[str, tuple[list[int], str]] = {}
    sums: dict[str, str] = {}
    paths = [Path(f) for f in (files or [])]
    for path in paths:
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: sparsekern checkpoints are safetensors files, not {path.suffix}")
        h, meta = _safetensors_header(path)
        heads.update(h)
        part = recorded_checksums(path, meta)
        if part is None and require_sums:
            raise CheckpointError(f"{path}: the file's metadata has no {hf.CHECKSUMS_KEY!r}, which sparsekern "
                                  "writes into every file of its checkpoints: the file was replaced or its header "
                                  "damaged (sparsekern.from_pretrained(..., verify=False) loads it unchecked)")
        if part is not None:
            unsummed = sorted(set(h) - set(part)) if require_sums else []
            if unsummed:
                raise CheckpointError(f"{path}: tensors {unsummed[:5]} have no recorded CRC-32; sparsekern records one "
                                      "for every tensor it writes: the file's metadata was damaged or replaced")
            sums.update(part)
    return heads, sums, paths



def _file_checksums(path: Path, keys) -> dict[str, str]:
    """{key: "crc32:..."} for `keys` of a safetensors file, computed as serialization.tensor_checksum does (dtype
    name + shape, then the bytes) but streamed from the file with plain reads: no tensor is built and no page of
    the file stays mapped, so verifying adds no memory to a load."""
    import struct
    import zlib

    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        for key in keys:
            info = header.get(key)
            if not isinstance(info, dict):
                continue
            begin, end = info["data_offsets"]
            name = str(ST_DTYPES[info["dtype"]]).removeprefix("torch.") if info["dtype"] in ST_DTYPES else info["dtype"]
            crc = zlib.crc32(f"{name}{list(info['shape'])}".encode())
            f.seek(8 + n + begin)
            left = end - begin
            while left > 0:
                chunk = f.read(min(left, 1 << 22))
                if not chunk:
                    raise CheckpointError(f"{path}: tensor {key!r} runs past the end of the file (truncated)")
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            out[key] = f"crc32:{crc & 0xFFFFFFFF:08x}"
    return out


def verify_files(paths: list[Path], sums: dict[str, str]) -> None:
    """Every tensor of the files that has a recorded CRC-32 must match it."""
    bad = []
    for path in paths:
        for key, crc in _file_checksums(path, sums).items():
            if crc != sums[key]:
                bad.append((key, path.name))
    if bad:
        raise CheckpointError("checksum mismatch: " + ", ".join(f"tensor {k!r} does not match its recorded CRC-32 "
                                                                f"({file})" for k, file in bad)
                              + " (the file was changed or damaged after it was written; "
                              "sparsekern.from_pretrained(..., verify=False) skips the check)")


# ---------------------------------------------------------------------------------------------- the load ops


class _LoadOp(ConversionOps):
    """Collects one sparse layer's checkpoint entries (transformers' loader renames them all to `<layer>.values`)
    and installs the validated weight into the SparseLinear; records any failure on the quantizer instead of
    raising (the loader would only log it), and tells the loader the layer's keys are handled."""

    def __init__(self, hf_quantizer) -> None:
        self.hf_quantizer = hf_quantizer  # also tells transformers not to cast what this op reads

    def __deepcopy__(self, memo):
        # The loader deep-copies a converter per layer; every copy must report to the same quantizer.
        return type(self)(self.hf_quantizer)

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                missing_keys=None, **kwargs):
        layer = full_layer_name.rpartition(".")[0]
        entries = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module = model.get_submodule(layer) if model is not None else None
        q = self.hf_quantizer
        try:
            if not isinstance(module, SparseLinear):
                raise CheckpointError(f"{layer}: the checkpoint holds 2:4 entries {sorted(entries)} for it, but the "
                                      "quantization config does not list it as a sparse layer")
            weight = self.weight(module, entries, layer)
            module._install(weight, module._buffers["bias"], rebuild_cslt=False)
            module._is_hf_initialized = True
            q.loaded.add(layer)
        except Exception as exc:  # noqa: BLE001  (any failure is this layer's error, raised after loading)
            q.errors[layer] = f"{type(exc).__name__}: {_first_line(exc)}"
        if missing_keys is not None and isinstance(module, SparseLinear):
            for key in _LAYER_ENTRIES:
                missing_keys.discard(f"{layer}.{key}")
        return {}

    def weight(self, module: SparseLinear, entries: dict, layer: str) -> Sparse24Weight:
        raise NotImplementedError

    @property
    def reverse_op(self) -> ConversionOps:
        return _Identity()


class _Identity(ConversionOps):
    """Saving writes model.state_dict() as it is: the layer's entries are already the checkpoint's."""

    def convert(self, input_dict, **kwargs):
        return input_dict


class _LoadSparsekern(_LoadOp):
    def weight(self, module, entries, layer):
        return Sparse24Weight.from_state_dict(
            entries, "", expect_shape=(module.out_features, module.in_features), quant=module.quant,
            value_dtype=module.values.dtype if module.quant is None else None, where=layer, copy=False)


class _LoadCompressedTensors(_LoadOp):
    def weight(self, module, entries, layer):
        values, bitmask, shape = entries["compressed"], entries["bitmask"], entries["shape"]
        shape = [int(v) for v in shape.reshape(-1).tolist()]
        if shape != [module.out_features, module.in_features]:
            raise CheckpointError(f"{layer}: shape {shape} != the model's [{module.out_features}, "
                                  f"{module.in_features}]")
        if module.quant is None:
            values = values.to(module.values.dtype)
        try:
            w = Sparse24Weight.from_bitmask(values, bitmask.view(torch.uint8), shape)
        except ValueError as exc:
            raise CheckpointError(f"{layer}: not a valid 2:4 bitmask ({_first_line(exc)})") from None
        if module.quant is None:
            return w
        scale = entries.get("weight_scale")
        if scale is None:
            raise CheckpointError(f"{layer}: quantised ({module.quant}) but the checkpoint has no weight_scale")
        zp = entries.get("weight_zero_point")
        if zp is not None and bool((zp != 0).any()):
            raise CheckpointError(f"{layer}: weight_zero_point is not zero: asymmetric weights are not supported "
                                  "(SparseLinear's int8/fp8 weights are symmetric)")
        n = shape[0]
        scale = scale.to(torch.float32).reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(n)
        if scale.numel() != n:
            raise CheckpointError(f"{layer}: weight_scale holds {scale.numel()} values; per-channel needs {n} "
                                  "(or one, per-tensor)")
        return Sparse24Weight(w.values, w.codes, tuple(shape), scale=scale.contiguous().clone(), validate=True)


# ---------------------------------------------------------------------------------------------- quantizers


class _Base(HfQuantizer):
    requires_calibration = True  # loads checkpoints that are already 2:4; nothing is sparsified on the fly
    entries: tuple[str, ...] = ()
    op = _LoadOp

    def __init__(self, quantization_config, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.errors: dict[str, str] = {}
        self.loaded: set[str] = set()
        self.sums: dict[str, str] = {}
        self.paths: list[Path] = []
        self.planned: list[str] = []
        self.verify = hf.verify_checksums.get()

    @property
    def serialized_names(self):
        # Every entry of a layer is renamed to `<layer>.values` (a key of the meta SparseLinear): one op gets them all.
        return {"values": list(self.entries)}

    def get_load_operations(self) -> dict:
        return {"deserialize": self.op}

    def validate_environment(self, device_map=None, **kwargs) -> None:
        from . import _ext

        _ext.require("loading a 2:4 checkpoint into SparseLinear layers")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("device_map: sparsekern checkpoints cannot be offloaded to disk; use devices "
                             "('cpu', 'cuda', ints) or 'auto' with enough CPU memory")

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def _replace(self, model, plan: dict[str, dict]) -> None:
        """Swap the skeleton's modules for meta-device SparseLinear layers (nothing allocated)."""
        for name, spec in plan.items():
            replace_module(model, name, SparseLinear(
                spec["in_features"], spec["out_features"], spec["bias"], dtype=spec["dtype"], quant=spec["quant"],
                weight_layout=spec["weight_layout"], device="meta"))
            # transformers re-runs _init_weights on every module not marked initialised, and some models' versions
            # write their children's dense weights (GPT-2's MLP: init.normal_(c_proj.weight)), which a SparseLinear
            # has not. The parent's own tensors all come from the checkpoint, so its init is skipped.
            parent = name.rpartition(".")[0]
            model.get_submodule(parent)._is_hf_initialized = True
        self.planned = list(plan)

    @staticmethod
    def _check_dense_shapes(model, heads: dict, sparse: set[str], where: str) -> None:
        """Every dense tensor the checkpoint holds under a name of the skeleton must have the skeleton's shape,
        checked on the headers before transformers allocates anything: a forged config (vocab_size: 4,000,000)
        would otherwise allocate the tensor it describes before the mismatch is reported."""
        for key, t in model.state_dict(keep_vars=True).items():
            head = heads.get(key)
            if head is None or key.rpartition(".")[0] in sparse:
                continue
            if list(t.shape) != head[0]:
                raise CheckpointError(f"{where}: config.json gives {key} the shape {list(t.shape)} but the "
                                      f"checkpoint holds {head[0]}; the config does not match the weights")
            _check_header_dtype(key, t.dtype, head[1], where)

    def _module(self, model, name: str, where: str):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: layer {name!r} is not in {type(model).__name__}") from None
        if not is_convertible(mod):
            raise CheckpointError(f"{where}: layer {name!r} is a {type(mod).__name__}, not a Linear")
        return mod

    def _process_model_after_weight_loading(self, model, **kwargs):
        errors = dict(self.errors)
        for name in self.planned:
            mod = model.get_submodule(name)
            if name not in self.loaded and name not in errors:
                errors[name] = "its 2:4 entries were not loaded (missing from the checkpoint files)"
            elif isinstance(mod, SparseLinear) and mod.bias is not None and mod.bias.device.type == "meta":
                errors[name] = "its bias is missing from the checkpoint"
        if errors:
            raise CheckpointError(f"{len(errors)} sparse layer(s) could not be loaded: "
                                  + "; ".join(f"{k}: {v}" for k, v in sorted(errors.items())))
        # transformers fills a tensor the checkpoint lacks with a fresh initialisation and only logs it; every tensor
        # it did load carries _is_hf_initialized. A sparsekern model is a pre-built one: a missing tensor is an error.
        planned = set(self.planned)
        missing = [k for k, t in model.state_dict(keep_vars=True).items()
                   if k.rpartition(".")[0] not in planned and t is not None and t.device.type != "meta"
                   and not getattr(t, "_is_hf_initialized", False)]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs: {missing[:8]} "
                                  "(transformers would initialise them randomly; a missing shard, a renamed entry, or "
                                  "a config.json describing another model)")
        if self.verify and self.sums:
            verify_files(self.paths, self.sums)
        for name in self.planned:
            mod = model.get_submodule(name)
            mod._install(mod.weight24, mod.bias)  # the cuSPARSELt buffer and kernel choice for the final device
        # transformers keeps the converters a load used and reverses them at save time; ours are load-only (a
        # compressed-tensors one reversed would rename `<layer>.values` to `.compressed` and lose it): drop them,
        # so model.save_pretrained writes model.state_dict() in sparsekern's layout.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions
                                         if not any(isinstance(op, _LoadOp) for op in getattr(c, "operations", ()))]
        attach(model, metadata=self._metadata())
        return model

    def _metadata(self):
        return None

    def get_state_dict_and_metadata(self, model):
        """Called by transformers' save_pretrained before anything is written: describe the model as it is now (the
        layer list in config.json) and record a CRC-32 per tensor in every shard's metadata."""
        from ._ckptio import tensor_checksum

        config = model.config.quantization_config
        if not isinstance(config, SparsekernConfig):
            config = SparsekernConfig(metadata=getattr(model, "sparsekern_metadata", None))
            model.config.quantization_config = config
        config.layers = layer_specs(model)
        config.sparsekern_version = __version__
        config.metadata = getattr(model, "sparsekern_metadata", None)
        state_dict = model.state_dict()
        sums = {k: tensor_checksum(t) for k, t in state_dict.items() if t.device.type != "meta"}
        return state_dict, {hf.CHECKSUMS_KEY: json.dumps(sums)}

    def _dequantize(self, model, dtype=None):
        """transformers' model.dequantize(): every SparseLinear back to its dense layer (SparseLinear.to_linear)."""
        for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]:
            replace_module(model, name, mod.to_linear(dtype if dtype in (torch.float32, torch.float16,
                                                                         torch.bfloat16) else None))
        return model


class SparsekernHfQuantizer(_Base):
    """Loads / saves `quant_method: "sparsekern"` checkpoints (SparsekernConfig)."""

    entries = _LAYER_ENTRIES
    op = _LoadSparsekern

    def validate_environment(self, device_map=None, **kwargs) -> None:
        self.quantization_config.validate()
        super().validate_environment(device_map=device_map, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        where = "config.json quantization_config"
        heads, self.sums, self.paths = read_headers(checkpoint_files, require_sums=self.verify)
        layers = self.quantization_config.layers
        plan = {}
        for name, spec in layers.items():
            mod = self._module(model, name, where)
            n, k = spec["out_features"], spec["in_features"]
            shape = list(dense_weight_of(mod)[0].shape)
            if shape != [n, k]:
                raise CheckpointError(f"{where}: layer {name!r} is [{n}, {k}] but the model built from config.json "
                                      f"has it {shape}; the config does not match the weights")
            if is_conv1d(mod) != (spec["weight_layout"] == "conv1d"):
                raise CheckpointError(f"{where}: layer {name!r} has weight_layout {spec['weight_layout']!r} but the "
                                      f"model's layer is a {type(mod).__name__}")
            if (getattr(mod, "bias", None) is not None) != spec["bias"]:
                raise CheckpointError(f"{where}: layer {name!r} bias={spec['bias']} but the model's layer "
                                      f"{'has' if getattr(mod, 'bias', None) is not None else 'has no'} bias")
            want = {"values": ([n, k // 2], _ST_QUANT[spec["quant"]] if spec["quant"] else _ST_FLOAT[spec["dtype"]]),
                    "codes": (list(codes_shape(n, k)), "U8"), "shape": ([2], None), "format_version": ([1], None)}
            if spec["quant"]:
                want["weight_scale"] = ([n], "F32")
            if spec["bias"]:
                want["bias"] = ([n], "float")
            for entry, (eshape, edtype) in want.items():
                head = heads.get(f"{name}.{entry}")
                if head is None:
                    raise CheckpointError(f"{where} lists layer {name!r} but the checkpoint has no '{name}.{entry}' "
                                          "(missing or truncated shard)")
                dtype_ok = edtype is None or head[1] == edtype or (edtype == "float" and head[1] in
                                                                   ("F64", "F32", "F16", "BF16"))
                if edtype is None and head[1] not in ("I64", "I32"):
                    dtype_ok = False
                if head[0] != eshape or not dtype_ok:
                    raise CheckpointError(f"'{name}.{entry}' is {head[1]} {head[0]} in the checkpoint; the layer "
                                          f"needs {edtype or 'an integer tensor'} {eshape}")
            if f"{name}.weight" in heads:
                raise CheckpointError(f"the checkpoint holds both a dense '{name}.weight' and the 2:4 entries")
            # The skeleton is built in the dtype from_pretrained resolved (dtype=... or "auto": config.json's), which
            # the layer takes (float values are cast on load; quantised values keep int8/fp8, the bias follows).
            plan[name] = {**spec, "dtype": _float_dtype(dense_weight_of(mod)[0].dtype, spec["dtype"])}
        stray = sorted({key.rpartition(".")[0] for key in heads
                        if key.rpartition(".")[2] in ("values", "codes")} - set(layers))
        if stray:
            raise CheckpointError(f"the checkpoint holds 2:4 entries for {stray[:5]} but {where} does not list "
                                  "them in 'layers'")
        self._check_dense_shapes(model, heads, set(plan), "sparsekern checkpoint")
        self._replace(model, plan)

    def _metadata(self):
        return self.quantization_config.metadata


# ---------------------------------------------------------------------------------------------- compressed-tensors


class CompressedTensors24Config(QuantizationConfigMixin):
    """A compressed-tensors quantization_config whose sparsity_config has format "sparse-24-bitmask" (kept as read).
    `quant` is the W8A8 scheme its config_groups describe (None, "int8" or "fp8"), or the reason it cannot run."""

    def __init__(self, raw: dict) -> None:
        self.quant_method = "compressed-tensors"
        self.raw = raw

    @classmethod
    def is_sparse24(cls, d) -> bool:
        sp = d.get("sparsity_config") if isinstance(d, dict) else None
        return isinstance(sp, dict) and sp.get("format") == "sparse-24-bitmask"

    def to_dict(self) -> dict:
        return dict(self.raw)

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def scheme(self) -> str | None:
        """None (no quantisation) | "int8" | "fp8"; CheckpointError naming what is unsupported otherwise."""
        where = "config.json quantization_config (compressed-tensors)"
        qc = self.raw
        if qc.get("kv_cache_scheme"):
            raise CheckpointError(f"{where}: kv_cache_scheme is not supported by sparsekern")
        groups = qc.get("config_groups") or {}
        if not isinstance(groups, dict):
            raise CheckpointError(f"{where}: config_groups must be an object")
        found = set()
        for gname, g in groups.items():
            if not isinstance(g, dict):
                raise CheckpointError(f"{where}: config_groups[{gname!r}] must be an object")
            w, a = g.get("weights"), g.get("input_activations")
            if g.get("output_activations"):
                raise CheckpointError(f"{where}: config_groups[{gname!r}].output_activations is not supported")
            if not w:
                raise CheckpointError(f"{where}: config_groups[{gname!r}] quantises no weights; sparsekern runs "
                                      "int8/fp8 W8A8 only")
            kind = {"int": "int8", "float": "fp8"}.get(w.get("type", "int"))
            rules = [("weights.num_bits", w.get("num_bits"), 8), ("weights.symmetric", w.get("symmetric", True), True),
                     ("weights.dynamic", bool(w.get("dynamic", False)), False)]
            if w.get("strategy") not in ("channel", "tensor"):
                raise CheckpointError(f"{where}: config_groups[{gname!r}].weights.strategy {w.get('strategy')!r} is "
                                      "not supported (sparsekern: per-channel or per-tensor weight scales)")
            if not a:
                raise CheckpointError(f"{where}: config_groups[{gname!r}] is weight-only quantisation; sparsekern "
                                      "runs W8A8 (int8/fp8 weights and dynamic per-token activations) only")
            rules += [("input_activations.num_bits", a.get("num_bits"), 8),
                      ("input_activations.type", a.get("type", "int"), w.get("type", "int")),
                      ("input_activations.symmetric", a.get("symmetric", True), True),
                      ("input_activations.strategy", a.get("strategy"), "token"),
                      ("input_activations.dynamic", a.get("dynamic"), True)]
            if kind is None:
                raise CheckpointError(f"{where}: config_groups[{gname!r}].weights.type {w.get('type')!r} is not "
                                      "'int' or 'float'")
            for field, got, want in rules:
                if got != want:
                    raise CheckpointError(f"{where}: config_groups[{gname!r}].{field} is {got!r}; sparsekern "
                                          f"supports {want!r} (int8/fp8 W8A8: symmetric per-channel weights, "
                                          "dynamic per-token activations)")
            found.add(kind)
        if len(found) > 1:
            raise CheckpointError(f"{where}: mixes int8 and fp8 groups; sparsekern loads one scheme per model")
        return found.pop() if found else None


class CompressedTensors24Quantizer(_Base):
    """Loads compressed-tensors "sparse-24-bitmask" checkpoints (optionally int8/fp8 W8A8) into SparseLinear."""

    entries = ("compressed", "bitmask", "shape", "weight_scale", "weight_zero_point")
    op = _LoadCompressedTensors

    def validate_environment(self, device_map=None, **kwargs) -> None:
        self.quant = self.quantization_config.scheme()
        super().validate_environment(device_map=device_map, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        heads, _, self.paths = read_headers(checkpoint_files)
        where = "compressed-tensors checkpoint"
        for key in heads:
            if key.endswith(".input_scale"):
                raise CheckpointError(f"{where}: '{key}' is a static activation scale; sparsekern quantises "
                                      "activations dynamically per token")
        plan = {}
        for key in sorted(heads):
            if not key.endswith(".compressed"):
                continue
            name = key[: -len(".compressed")]
            mod = self._module(model, name, where)
            if not isinstance(mod, nn.Linear):
                raise CheckpointError(f"{where}: layer {name!r} is a {type(mod).__name__}, not nn.Linear")
            n, k = mod.out_features, mod.in_features
            vshape, vdtype = heads[key]
            for entry in ("bitmask", "shape"):
                if f"{name}.{entry}" not in heads:
                    raise CheckpointError(f"{where}: layer {name} has .compressed but no .{entry}")
            if vshape != [n, k // 2] or heads[f"{name}.bitmask"][0] != [n, (k + 7) // 8]:
                raise CheckpointError(f"{where}: layer {name}: compressed {vshape} / bitmask "
                                      f"{heads[f'{name}.bitmask'][0]} do not match the model's [{n}, {k}] "
                                      "(truncated or mismatched)")
            quant = {"I8": "int8", "F8_E4M3": "fp8"}.get(vdtype)
            if quant is not None and quant != self.quant:
                raise CheckpointError(f"{where}: layer {name} stores {vdtype} values but the quantization config "
                                      f"describes {self.quant or 'no quantisation'}")
            if quant is not None and f"{name}.weight_scale" not in heads:
                raise CheckpointError(f"{where}: layer {name} is quantised but has no weight_scale")
            if quant is None and vdtype not in _ST_FLOAT.values():
                raise CheckpointError(f"{where}: layer {name}: compressed values of dtype {vdtype} are not supported")
            plan[name] = {"in_features": k, "out_features": n, "bias": mod.bias is not None,
                          "dtype": _float_dtype(mod.weight.dtype, "float32"),
                          "quant": quant, "weight_layout": "linear"}
        dense_quant = sorted(key.rpartition(".")[0] for key in heads
                             if key.endswith(".weight_scale") and key.rpartition(".")[0] not in plan)
        if dense_quant:
            raise CheckpointError(f"{where}: layers {dense_quant[:5]} are quantised but not 2:4; sparsekern loads "
                                  "quantised weights only on 2:4 layers")
        self._check_dense_shapes(model, heads, set(plan), where)
        self._replace(model, plan)


def attach(model: nn.Module, metadata=None) -> None:
    """sparsekern.hf.attach (its doc)."""
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, SparsekernConfig):
        qc = SparsekernConfig()
    model.config.quantization_config = qc
    model.hf_quantizer = SparsekernHfQuantizer(qc, pre_quantized=True)
    # is_quantized stays False: transformers forbids .half() / .float() on "quantized" models, while SparseLinear
    # follows them (its float values are cast, int8 / fp8 ones kept). The format travels with hf_quantizer and the
    # config, which is what save_pretrained reads.
    model.is_quantized = False
    model.quantization_method = hf.QUANT_METHOD
    # model.sparsekern_metadata is the metadata's one home on a live model; each save copies it into the config.
    if metadata is not None or not hasattr(model, "sparsekern_metadata"):
        model.sparsekern_metadata = metadata if metadata is not None else qc.metadata
    if not isinstance(model.__dict__.get("save_pretrained"), hf.AtomicSavePretrained):
        model.save_pretrained = hf.AtomicSavePretrained(model)


# ---------------------------------------------------------------------------------------------- registration


def _ct_dispatch(original_config, original_quantizer):
    """Wrap transformers' compressed-tensors classes: sparse-24-bitmask configs come here, the rest go on."""

    class CompressedTensorsDispatchConfig(QuantizationConfigMixin):
        @classmethod
        def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
            d = config_dict.get("quantization_config", config_dict)
            if CompressedTensors24Config.is_sparse24(d):
                config = CompressedTensors24Config(dict(d))
                return (config, kwargs) if return_unused_kwargs else config
            return original_config.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    class CompressedTensorsDispatchQuantizer(HfQuantizer):
        def __new__(cls, quantization_config, **kwargs):
            if isinstance(quantization_config, CompressedTensors24Config):
                return CompressedTensors24Quantizer(quantization_config, **kwargs)
            return original_quantizer(quantization_config, **kwargs)

    CompressedTensorsDispatchConfig.original = original_config
    CompressedTensorsDispatchQuantizer.original = original_quantizer
    return CompressedTensorsDispatchConfig, CompressedTensorsDispatchQuantizer


def install(auto) -> None:
    """Register with transformers.quantizers.auto (called once, by sparsekern.hf.register)."""
    if hf.QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(hf.QUANT_METHOD)(SparsekernConfig)
    if hf.QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(hf.QUANT_METHOD)(SparsekernHfQuantizer)
    ct = "compressed-tensors"
    cfg, qz = auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(ct), auto.AUTO_QUANTIZER_MAPPING.get(ct)
    if cfg is not None and not hasattr(cfg, "original"):
        # register_* refuse names that exist, so the two entries are replaced directly; everything that is not
        # sparse-24-bitmask still reaches transformers' own classes.
        new_cfg, new_qz = _ct_dispatch(cfg, qz)
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[ct] = new_cfg
        auto.AUTO_QUANTIZER_MAPPING[ct] = new_qz
