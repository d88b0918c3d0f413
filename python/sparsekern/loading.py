"""Load a causal LM and its tokenizer from what a command line names: 'bundled', a Hugging Face checkpoint directory,
or a directory written by sparsekern (its SparseLinear layers restored). Shared by `sparsekern prune | eval | demo`
(pipeline_cli) and `sparsekern bench generate`."""

from __future__ import annotations

import os

import torch


def is_sparsekern_dir(path: str) -> bool:
    """Whether `path` holds a 2:4 checkpoint sparsekern loads into SparseLinear layers: written by sparsekern (config.json
    quantization_config "sparsekern", or the earlier sparsekern_config.json) or compressed-tensors sparse-24-bitmask."""
    from .hf import config_dict_is_sparsekern, read_config_json
    from .serialization import META_FILE, _ct_sparsity_config

    if os.path.isfile(os.path.join(path, META_FILE)):
        return True
    cfg = read_config_json(path)
    return cfg is not None and (config_dict_is_sparsekern(cfg) or _ct_sparsity_config(cfg) is not None)


def load_model_and_tokenizer(model: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for --model `model`. A directory that does not hold a loadable model and tokenizer is a
    UserError naming it; a sparsekern checkpoint that fails its checks raises CheckpointError."""
    from . import data
    from .cli import UserError
    from .weight import CheckpointError

    try:
        if model != data.BUNDLED and is_sparsekern_dir(model):
            from transformers import AutoTokenizer

            from .serialization import from_pretrained

            loaded = from_pretrained(model, device=device)
            return loaded, AutoTokenizer.from_pretrained(model, local_files_only=True)
        return data.load_model(model, dtype=dtype, device=device)
    except (CheckpointError, data.DataError):
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # transformers' errors for a corrupt / partial folder
        raise UserError(f"--model {model!r} could not be loaded with its tokenizer ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e
