"""What sparsekern.hf and its transformers-side implementation (_hf_impl) share without importing transformers:
the format constants, the checksum switch, and the per-file atomic save_pretrained installed on sparse models."""

from __future__ import annotations

import contextvars

from torch import nn

QUANT_METHOD = "sparsekern"
#: Version of the Hugging Face folder layout (config.json quantization_config + safetensors). Version 1 was the
#: earlier sparsekern_config.json layout, still read by sparsekern.from_pretrained.
HF_FORMAT_VERSION = 2
CHECKSUMS_KEY = "sparsekern_checksums"

#: sparsekern.from_pretrained(..., verify=False) turns the CRC-32 check off for one load.
verify_checksums: contextvars.ContextVar[bool] = contextvars.ContextVar("sparsekern_verify_checksums", default=True)


def is_transformers_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "save_pretrained") and hasattr(type(model), "save_pretrained")


_WEIGHT_FILE_PREFIXES = ("model.safetensors", "model-", "pytorch_model")


def _is_weight_file(name: str) -> bool:
    return name.startswith(_WEIGHT_FILE_PREFIXES) and (name.endswith(".safetensors") or name.endswith(".bin")
                                                       or name.endswith(".index.json"))


class AtomicSavePretrained:
    """What attach() installs as `model.save_pretrained`: atomic_save_pretrained bound to the model. An object, not a
    bound method: torch.save(model) / copy.deepcopy(model) then carry it along, bound to the copy (a bound method in
    the instance dict would pickle as a lookup of an attribute the class does not have)."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        return atomic_save_pretrained(self.model, save_directory, *args, **kwargs)


def atomic_save_pretrained(self, save_directory, *args, **kwargs):
    """transformers' save_pretrained, made atomic per file (_fsutil.atomic_update_folder): everything is written
    into a hidden sibling folder first, then renamed into `save_directory` one file at a time (config.json and the
    index after the weights), and weight files of an earlier save that the new one does not have are removed. An
    interrupted save therefore leaves no partly written file, and never a config.json describing weights that are not
    there. Other files in the folder (a tokenizer saved there) are kept. Distributed and push_to_hub saves go to
    transformers unchanged."""
    from ._fsutil import atomic_update_folder

    cls_save = type(self).save_pretrained
    if kwargs.get("push_to_hub") or not kwargs.get("is_main_process", True) or kwargs.get("distributed_checkpoint"):
        return cls_save(self, save_directory, *args, **kwargs)
    result = []
    atomic_update_folder(save_directory, lambda tmp: result.append(cls_save(self, str(tmp), *args, **kwargs)),
                         last=lambda n: n == "config.json" or n.endswith(".index.json"), stale=_is_weight_file)
    return result[0] if result else None


