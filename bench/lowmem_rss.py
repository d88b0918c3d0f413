"""Peak memory of out-of-core pruning (`sparsekern prune --low-memory`) against the checkpoint's size.

    PYTHONPATH=python python bench/lowmem_rss.py --workdir /tmp/lowmem --hidden 2048 --intermediate 5632 --layers 24 --json
        writes a randomly initialised Llama-architecture checkpoint (float32, one shard per block, written block by
        block so the writer never holds it either), then runs `sparsekern prune --low-memory` on it in a fresh
        process and reports that process's peak RSS (VmHWM), its RSS after the imports, and its RSS before the run
        (after the same run on a 2-block model of the same vocabulary: the fixed costs, lazy imports, thread pools,
        kernel workspaces, are paid there; --no-warmup skips it), next to the checkpoint's size.

The weights are random normal (std 0.02), the tokenizer a word-level one over the calibration text's words; the
calibration is the bundled text. --method (default wanda), --nsamples, --seqlen as for `sparsekern prune`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def write_checkpoint(out: Path, *, hidden: int, intermediate: int, layers: int, vocab: int, heads: int,
                     kv_heads: int, seed: int = 0) -> int:
    """A LlamaForCausalLM checkpoint with random weights, one safetensors shard per block + one for the rest;
    returns its size in bytes."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=4096, tie_word_embeddings=False)
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(cfg)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    groups: dict[str, dict[str, tuple]] = {}
    for key, t in model.state_dict().items():
        parts = key.split(".")
        shard = f"block{int(parts[2]):05d}" if key.startswith("model.layers.") else "rest"
        groups.setdefault(shard, {})[key] = (tuple(t.shape), key.endswith("norm.weight"))
    weight_map, total = {}, 0
    names = sorted(groups)
    for k, shard in enumerate(names):
        tensors = {key: (torch.ones(shape) if is_norm else torch.randn(shape, generator=g) * 0.02)
                   for key, (shape, is_norm) in groups[shard].items()}
        fname = f"model-{k + 1:05d}-of-{len(names):05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({key: fname for key in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(str(out))
    return total


def write_tokenizer(out: Path, text: str, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: dict[str, int] = {"[UNK]": 0, "[PAD]": 1, "[BOS]": 2, "[EOS]": 3}
    for w in text.split():
        if len(words) >= vocab:
            break
        words.setdefault(w, len(words))
    tk = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                            eos_token="[EOS]").save_pretrained(str(out))


_RUNNER = r"""
import json, sys
def st():
    d = {}
    for line in open("/proc/self/status"):
        k = line.split(":")[0]
        if k in ("VmRSS", "VmHWM"):
            d[k] = int(line.split()[1]) // 1024
    return d
import torch, transformers, sparsekern, sparsekern.pipeline, sparsekern.cli  # the imports a run needs, first
import contextlib, io
imports = st()["VmRSS"]
warm, argv = json.loads(sys.argv[1]), sys.argv[2:]
if warm:  # the same run on a 2-block model first: lazy imports, thread pools, kernel workspaces (fixed costs)
    with contextlib.redirect_stdout(io.StringIO()):
        sparsekern.cli.main(warm)
base = st()["VmRSS"]
rc = sparsekern.cli.main(argv)
print("LOWMEM_RSS " + json.dumps({"rc": rc, "imports_mb": imports, "base_mb": base, "peak_mb": st()["VmHWM"]}))
"""


def run_prune(src: Path, out: Path, args, warm: Path | None = None) -> dict:
    def cli(model: Path, to: Path) -> list[str]:
        return ["prune", "--model", str(model), "--low-memory", "--out", str(to), "--method", args.method,
                "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--json"]

    argv = [sys.executable, "-c", _RUNNER, json.dumps(cli(warm, warm.parent / "warm-out") if warm else []),
            *cli(src, out)]
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    line = [x for x in r.stdout.splitlines() if x.startswith("LOWMEM_RSS ")]
    if r.returncode != 0 or not line:
        raise SystemExit(f"the low-memory prune failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return {**json.loads(line[-1][len("LOWMEM_RSS "):]), "wall_s": round(wall, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--no-warmup", action="store_true",
                    help="measure from right after the imports (default: after the same run on a 2-block model)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from sparsekern import data

    src = args.workdir / "src"
    t = time.perf_counter()
    size = write_checkpoint(src, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                            vocab=args.vocab, heads=args.heads, kv_heads=args.kv_heads)
    write_tokenizer(src, data.load_text(), args.vocab)
    made = time.perf_counter() - t
    warm = None
    if not args.no_warmup:
        warm = args.workdir / "warm"
        write_checkpoint(warm, hidden=64, intermediate=128, layers=2, vocab=args.vocab, heads=4, kv_heads=4)
        write_tokenizer(warm, data.load_text(), args.vocab)
    res = run_prune(src, args.workdir / "out", args, warm)
    result = {"checkpoint_mb": round(size / 2**20, 1), "layers": args.layers, "hidden": args.hidden,
              "intermediate": args.intermediate, "method": args.method, "nsamples": args.nsamples,
              "seqlen": args.seqlen, "write_s": round(made, 1), **res,
              "peak_increase_mb": res["peak_mb"] - res["base_mb"],
              "out_mb": round(sum(p.stat().st_size for p in (args.workdir / "out").glob("*.safetensors")) / 2**20, 1)}
    result["increase_over_checkpoint"] = round(result["peak_increase_mb"] / result["checkpoint_mb"], 4)
    print(json.dumps(result) if args.json else
          f"checkpoint {result['checkpoint_mb']} MB ({args.layers} blocks): low-memory {args.method} prune "
          f"{res['wall_s']} s, peak RSS {res['peak_mb']} MB = {res['base_mb']} MB before the run (imports: "
          f"{res['imports_mb']} MB) + "
          f"{result['peak_increase_mb']} MB ({100 * result['increase_over_checkpoint']:.1f} % of the checkpoint)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
