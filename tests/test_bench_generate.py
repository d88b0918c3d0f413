"""`sparsekern bench generate`: the end-to-end generation benchmark (sparsekern.bench.generate).

Runs the real command on a tiny Llama written as a Hugging Face directory (and once on the bundled model with tiny
settings), checks the files and the document, and the clear errors for bad input. Timings are never asserted.
"""

from __future__ import annotations

import json

import pytest
import torch

from sparsekern.bench import generate as gen
from sparsekern.cli import main

VOCAB = 96


def _word_tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="[BOS]",
                                                eos_token="[EOS]")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    _word_tokenizer().save_pretrained(d)
    return d


def test_generate_on_a_hf_directory_writes_the_files(tiny_dir, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["bench", "generate", "--model", str(tiny_dir), "--prune", "magnitude", "--dtype", "fp32,bf16",
               "--prompt-lengths", "16,40", "--decode-tokens", "5", "--repeats", "2", "--out", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert {p.name for p in out.iterdir()} >= {"generate.json", "generate.csv"}
    assert json.loads((out / "generate.json").read_text())["records"] == doc["records"]
    assert doc["linears_24"] == 2 * 7 and doc["compile"] is False and doc["pruned_here"] is True
    keys = {(r["dtype"], r["variant"], r["phase"], r["tokens"]) for r in doc["records"]}
    for dtype in ("float32", "bfloat16"):
        for variant in ("dense", "sparse", "int8"):
            assert {(dtype, variant, "prefill", 16), (dtype, variant, "prefill", 40),
                    (dtype, variant, "decode", 5)} <= keys
    for r in doc["records"]:
        assert len(r["times_s"]) == 2 and r["tokens_per_s"] > 0 and r["speedup_vs_dense"] > 0
        if r["variant"] == "dense":
            assert r["speedup_vs_dense"] == 1.0
    models = {(m["dtype"], m["variant"]): m for m in doc["models"]}
    # Weight bytes: 2:4 values are half the dense weight plus 1 code byte per 8 columns; int8 a quarter plus scales.
    dense_b = models[("float32", "dense")]["weight_bytes"]
    assert models[("float32", "sparse")]["weight_bytes"] == pytest.approx(dense_b / 2 + dense_b / 4 / 8, rel=0.02)
    assert models[("float32", "sparse")]["sparse_linears"] == 14 and models[("float32", "dense")]["sparse_linears"] == 0
    assert models[("bfloat16", "int8")]["weight_bytes"] < models[("bfloat16", "sparse")]["weight_bytes"]
    assert all(isinstance(m["greedy_tokens_match_dense"], bool) for m in doc["models"])
    assert models[("float32", "dense")]["greedy_tokens_match_dense"] is True
    goals = {g["goal"] for g in doc["goals"]}
    assert any(g.startswith("decode float32") for g in goals) and any("int8" in g for g in goals)
    assert doc["environment"]["threads"] >= 1


def test_generate_table_and_contend(tiny_dir, capsys):
    rc = main(["bench", "generate", "--model", str(tiny_dir), "--prune", "magnitude", "--dtype", "fp32",
               "--variants", "sparse", "--prompt-lengths", "8", "--decode-tokens", "2", "--repeats", "1",
               "--contend"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "quiet" in text and "contended" in text and "prefill 8 tok/s" in text
    assert "contended prefill 8 float32 sparse" in text  # the ratio's fall is reported as a goal line


def test_greedy_tokens_of_sparse_fp32_match_dense():
    """The sparsified model computes the dense model's function: on a tiny fp32 model greedy decoding agrees."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base, n24 = gen.prepare_base(LlamaForCausalLM(cfg).eval(), prune=True, where="tiny")
    assert n24 == 14
    prompt = torch.randint(3, VOCAB, (1, 12))
    dense = gen.make_variant(base, "dense", torch.float32)
    sparse = gen.make_variant(base, "sparse", torch.float32)
    _, tok_dense = gen.time_decode(dense, prompt, 8)
    _, tok_sparse = gen.time_decode(sparse, prompt, 8)
    assert tok_dense == tok_sparse and len(tok_dense) == 9


def test_bundled_model_smoke(capsys):
    rc = main(["bench", "generate", "--dtype", "fp32", "--variants", "sparse", "--prompt-lengths", "8",
               "--decode-tokens", "2", "--repeats", "1", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "SmolLM2-135M-Instruct" and doc["pruned_here"] is True and doc["linears_24"] == 210


@pytest.mark.parametrize("argv,needles", [
    (["--dtype", "fp64"], ["--dtype", "unknown dtype 'fp64'", "fp32, bf16, fp16"]),
    (["--variants", "sparse,fast"], ["--variants", "unknown variant 'fast'"]),
    (["--prompt-lengths", "0"], ["--prompt-lengths", "'0' is not a positive integer"]),
    (["--decode-tokens", "-3"], ["--decode-tokens"]),
])
def test_argument_errors_name_the_argument(capsys, argv, needles):
    with pytest.raises(SystemExit) as e:
        main(["bench", "generate", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err


def test_model_without_24_linears_is_refused(tiny_dir, capsys):
    rc = main(["bench", "generate", "--model", str(tiny_dir), "--prompt-lengths", "8", "--decode-tokens", "2",
               "--repeats", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "none of its 14 decoder-block linears is 2:4" in err and "--prune magnitude" in err
    assert f"--model {tiny_dir}" in err


def test_prompt_longer_than_the_context_is_refused(tiny_dir, capsys):
    rc = main(["bench", "generate", "--model", str(tiny_dir), "--prune", "magnitude", "--prompt-lengths", "16,500",
               "--decode-tokens", "2", "--repeats", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--prompt-lengths" in err and "500 tokens is beyond the model's maximum of 128 positions" in err


def test_missing_model_directory_and_bad_out(tmp_path, capsys):
    rc = main(["bench", "generate", "--model", str(tmp_path / "nope")])
    assert rc == 2 and "no such directory" in capsys.readouterr().err
    f = tmp_path / "afile"
    f.write_text("x")
    rc = main(["bench", "generate", "--model", str(tmp_path / "nope"), "--out", str(f)])
    assert rc == 2 and "--out" in capsys.readouterr().err
