"""Out-of-core pruning: prune a safetensors checkpoint one decoder block at a time, never holding the model's weights.

    report = prune_checkpoint("llama-dir", "out-dir", calib_ids, method="sparsegpt", pattern="2:4", tokenizer=tok)
    # == prune_model(model_loaded_from("llama-dir"), calib_ids, ...) then the CLI's save (sparsify + save_pretrained),
    #    with the same masks and weights, bit for bit; `sparsekern prune --low-memory` runs it

How: the model is built on the meta device (accelerate's init_empty_weights: no weight allocated; buffers such as
rotary tables are real); the tensors outside the decoder blocks (embeddings, final norm, head: needed to capture the
calibration inputs) are read; then for each block: its tensors are read from the checkpoint with plain file reads
(not memory-mapped: a mapping would keep every page read so far resident until the file is closed), the block is
pruned exactly as prune_model prunes it (the same _PruneRun stages: statistics, pruning, re-run to produce the next
block's inputs), its 2:4 linears become SparseLinear layers (dense=False), its tensors are written to their own
safetensors shard with a CRC-32 per tensor, and the block is dropped. The shards, the index, config.json (with
sparsekern's quantization_config), the generation config and the tokenizer go into a hidden sibling folder renamed
into place at the end: an interrupted run leaves nothing under the output name. The output is the folder
sparsekern.save_pretrained writes (AutoModelForCausalLM.from_pretrained loads it once sparsekern is imported).

Peak memory = the tensors outside the blocks + one block (its dense weights, and its compressed copy while it is
written) + the calibration activations (nsamples x seqlen x hidden, twice) + one group's statistics; independent of
the number of blocks.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._ckptio import ST_DTYPES
from .config import PruneConfig, make_config
from .errors import PipelineError
from .dist import DistContext, was_reported
from .report import PruneReport
from .run import _PruneRun, run_blocks, start_run


class ShardReader:
    """Tensors of a safetensors checkpoint folder (model.safetensors, or shards + model.safetensors.index.json) read
    one at a time with plain reads into fresh memory: nothing is memory-mapped, so nothing read stays resident after
    its tensor is dropped."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise PipelineError(f"{index}: not a safetensors index ({exc})") from None
        elif single.is_file():
            files = [single.name]
        else:
            others = sorted(p.name for p in self.directory.glob("*.bin")) if self.directory.is_dir() else []
            raise PipelineError(f"low_memory needs a safetensors checkpoint folder (model.safetensors or "
                                f"model.safetensors.index.json); {self.directory} has "
                                f"{'only ' + ', '.join(others[:3]) if others else 'neither'}")
        self.entries: dict[str, tuple[Path, torch.dtype, list[int], int, int]] = {}
        for name in files:
            path = self.directory / name
            if "/" in name or not path.is_file():
                raise PipelineError(f"{self.directory}: the index names {name!r}, which is not a file there")
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise PipelineError(f"{path}: truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > 100 * 2**20:
                    raise PipelineError(f"{path}: safetensors header of {n} bytes; the file is corrupt")
                try:
                    header = json.loads(f.read(n))
                except ValueError as exc:
                    raise PipelineError(f"{path}: unreadable safetensors header ({exc})") from None
            size = path.stat().st_size
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype = ST_DTYPES.get(info.get("dtype"))
                begin, end = info.get("data_offsets", (0, -1))
                if dtype is None or not 0 <= begin <= end or 8 + n + end > size:
                    raise PipelineError(f"{path}: tensor {key!r} has an unsupported dtype or lies past the end of "
                                        "the file (truncated)")
                self.entries[key] = (path, dtype, list(info["shape"]), 8 + n + begin, end - begin)

    def keys(self):
        return self.entries.keys()

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        path, stored, shape, offset, nbytes = self.entries[key]
        buf = bytearray(nbytes)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf) != nbytes:
                raise PipelineError(f"{path}: tensor {key!r} is truncated")
        t = torch.frombuffer(buf, dtype=torch.uint8).view(stored).reshape(shape) if nbytes else \
            torch.empty(shape, dtype=stored)
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


def _skeleton(src: Path, dtype: torch.dtype):
    """(model on the meta device, its config): weights unallocated, buffers real."""
    import transformers
    from accelerate import init_empty_weights

    try:
        config = transformers.AutoConfig.from_pretrained(str(src), local_files_only=True)
    except Exception as exc:  # noqa: BLE001  (transformers raises many types for a bad folder)
        raise PipelineError(f"{src}: not a Hugging Face model folder ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        raise PipelineError(f"{src}: low_memory prunes dense checkpoints; this one is already quantised or sparse "
                            f"({qc.get('quant_method') if isinstance(qc, dict) else type(qc).__name__})")
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # on the meta device the tied entries (lm_head = embeddings) are not tied yet
    return model.eval(), config


class _LowMemRun(_PruneRun):
    """prune_model's run whose blocks are read from a checkpoint and written to output shards (module doc)."""

    def __init__(self, model, calibration, cfg: PruneConfig, reader: ShardReader, tmp: Path | None,
                 dtype: torch.dtype, dense: bool, store_quant: str | None, dist: DistContext | None = None):
        # tmp None: a rank other than 0 across ranks, which prunes its share but writes nothing
        super().__init__(model, calibration, cfg, dist)
        self.reader, self.tmp, self.dtype, self.dense, self.store_quant = reader, tmp, dtype, dense, store_quant
        self.nshards = len(self.layers) + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.sparse_specs: dict[str, dict] = {}
        self.n, self.m = (int(v) for v in cfg.pattern.split(":"))

    def prepare(self) -> None:
        pass  # blocks are read by load_block; the rest was read before the run

    def fingerprint(self) -> dict:
        """prune_model's, plus a digest of the checkpoint itself: the block tensors are not loaded yet (the model's
        digest sees their shapes only), so every entry's name, dtype, shape and first 256 bytes are hashed."""
        import hashlib

        fp = super().fingerprint()
        h = hashlib.sha256()
        for key in sorted(self.reader.entries):
            path, dtype, shape, offset, nbytes = self.reader.entries[key]
            h.update(f"{key} {dtype} {shape} {nbytes}".encode())
            with open(path, "rb") as f:
                f.seek(offset)
                h.update(f.read(min(nbytes, 256)))
        fp["checkpoint tensors"] = h.hexdigest()[:16]
        return fp

    def load_block(self, i: int, layer: nn.Module) -> nn.Module:
        prefix = f"{self.layers_path}.{i}."
        want = set(layer.state_dict().keys())
        sd = {}
        for key in want:
            if prefix + key not in self.reader.entries:
                raise PipelineError(f"{self.reader.directory}: the checkpoint has no {prefix + key!r}")
            sd[key] = self.reader.read(prefix + key, self.dtype)
        layer.load_state_dict(sd, strict=True, assign=True)
        return layer.to(self.device)

    def unload_block(self, i: int, layer: nn.Module, names: list[str]) -> None:
        from .._modules import replace_module
        from ..linear import SparseLinear

        if self.tmp is None:  # not the writing rank
            self.layers[i] = nn.Module()
            _release_free_memory()
            return
        if not self.dense and (self.n, self.m) == (2, 4):
            for name in names:
                new = SparseLinear.from_linear(layer.get_submodule(name), quant=self.store_quant, name=name)
                replace_module(layer, name, new)
                self.sparse_specs[f"{self.layers_path}.{i}.{name}"] = _spec(new)
        tensors = {f"{self.layers_path}.{i}.{k}": v.detach().to("cpu").contiguous()
                   for k, v in layer.state_dict().items()}
        self._write_shard(i + 1, tensors)
        self.layers[i] = nn.Module()  # drop the block: its tensors are on disk now
        del tensors
        _release_free_memory()

    def _write_shard(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        from .._ckptio import tensor_checksum
        from .._hfbase import CHECKSUMS_KEY

        name = f"model-{k:05d}-of-{self.nshards:05d}.safetensors"
        meta = {"format": "pt", CHECKSUMS_KEY: json.dumps({key: tensor_checksum(t) for key, t in tensors.items()})}
        try:
            save_file(tensors, str(self.tmp / name), metadata=meta)
        except OSError as exc:
            raise PipelineError(f"writing {name} failed ({exc}); nothing was written under the output name") from exc
        self.weight_map.update({key: name for key in tensors})
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())


def _release_free_memory() -> None:
    """Give the block's freed memory back to the OS (glibc keeps freed heap chunks for reuse: with blocks of tens
    to hundreds of MB read, converted and serialised in turn, that retained memory is most of the run's growth).
    A no-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _spec(m) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
            "dtype": str(m.dense_dtype).removeprefix("torch."), "quant": m.quant, "weight_layout": m.weight_layout}


def _outside_blocks(model: nn.Module, layers_path: str) -> dict[str, torch.Tensor]:
    """The model's state-dict entries that are not in a decoder block, tied entries once (the first name)."""
    seen: set[int] = set()
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key.startswith(layers_path + ".") or id(t) in seen:
            continue
        seen.add(id(t))
        out[key] = t
    return out


def _write_config(tmp: Path, hf_config, architecture: str, dtype: torch.dtype, sparse_specs: dict, meta) -> None:
    """config.json of the output: the source's, with sparsekern's quantization_config when layers are 2:4."""
    cfg_dict = hf_config.to_dict()
    cfg_dict["architectures"] = [architecture]
    cfg_dict["dtype"] = str(dtype).removeprefix("torch.")
    if sparse_specs:
        from .. import __version__
        from .._hfbase import HF_FORMAT_VERSION, QUANT_METHOD
        from ..weight import FORMAT_VERSION

        cfg_dict["quantization_config"] = {
            "quant_method": QUANT_METHOD, "format_version": HF_FORMAT_VERSION,
            "portable_format_version": FORMAT_VERSION, "sparsekern_version": __version__,
            "layers": sparse_specs, "metadata": meta}
    (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")


def prune_checkpoint(src: str | os.PathLike, out: str | os.PathLike, calibration: Any = None,
                     config: PruneConfig | None = None, *, dense: bool = False, store_quant: str | None = ...,
                     dtype: torch.dtype = torch.float32, overwrite: bool = False, metadata=None,
                     **options) -> PruneReport:
    """Prune the safetensors checkpoint folder `src` block by block into `out` (module doc), never holding the whole
    model. calibration / config / options: as prune_model (calibration token ids, or a text with `tokenizer`).
    dense: write the pruned dense weights (a plain checkpoint) instead of SparseLinear layers (2:4 only).
    store_quant: the SparseLinear layers' W8A8 quantisation (sparsify's quant=; default: the config's quant, the
    grid SparseGPT optimised on).
    dtype: the float dtype the weights are pruned and written in (prune_model's model dtype; default float32, as
    sparsekern.data.load_model). metadata: a JSON-serialisable dict, or a callable(PruneReport) returning one
    (for a report of the run), stored as the checkpoint's metadata (`model.sparsekern_metadata` after loading) and
    as prune_report.json, as `sparsekern prune --out` does. out must not exist unless overwrite=True.
    Returns the PruneReport (its `low_memory` field set)."""
    from .._fsutil import atomic_write
    from ..serialization import _check_user_metadata

    t_start, cpu_start = time.perf_counter(), time.process_time()
    cfg = make_config(config, options)
    tokenizer = cfg.tokenizer
    if store_quant is ...:
        store_quant = cfg.quant
    if cfg.offload:
        raise PipelineError("low_memory reads one block at a time already; offload=True does not apply")
    if not callable(metadata):
        metadata = _check_user_metadata(metadata)
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    if not src.is_dir():
        raise PipelineError(f"low_memory needs a checkpoint folder; {src} is not one")
    reader = ShardReader(src)
    model, hf_config = _skeleton(src, dtype)
    from .structure import find_decoder_layers

    layers_path, _ = find_decoder_layers(model)
    outside = _outside_blocks(model, layers_path)
    missing = [k for k in outside if k not in reader.entries]
    if missing:
        raise PipelineError(f"{src}: the checkpoint has no {missing[:5]}")
    model.load_state_dict({k: reader.read(k, dtype) for k in outside}, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    report: list[PruneReport] = []
    dist = DistContext.detect(cfg.distributed)

    def prune_blocks(tmp: Path | None) -> tuple[_LowMemRun, PruneReport]:
        run = start_run(lambda: _LowMemRun(model, calibration, cfg, reader, tmp, dtype, dense, store_quant, dist),
                        dist)
        return run, run_blocks(run, t_start, cpu_start)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        run, rep = prune_blocks(tmp)
        run._write_shard(run.nshards, {k: t.detach().to("cpu").contiguous()
                                       for k, t in _outside_blocks(model, layers_path).items()})
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": run.total_size}, "weight_map": run.weight_map}, indent=2) + "\n")
        meta = _check_user_metadata(metadata(rep) if callable(metadata) else metadata)
        if meta is not None:
            (tmp / "prune_report.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _write_config(tmp, hf_config, type(model).__name__, dtype, run.sparse_specs, meta)
        if (src / "generation_config.json").is_file():
            from transformers import GenerationConfig

            GenerationConfig.from_pretrained(str(src)).save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        rep.low_memory = True
        report.append(rep)

    if dist is None:
        atomic_write(out, write, overwrite=overwrite)
        return report[0]
    # Across ranks: rank 0 writes; the others prune their share, then learn whether rank 0's output landed.
    err = None
    try:
        if dist.rank == 0:
            atomic_write(out, write, overwrite=overwrite)
        else:
            _, rep = prune_blocks(None)
            rep.low_memory = True
            report.append(rep)
    except Exception as exc:
        if was_reported(exc):
            raise
        err = exc
    dist.check(err, f"writing {out}")
    return report[0]
