"""Hub text loaders (offline through local files) and token blocks."""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TINY_TEXT

from pgprune.data import calibration_blocks, load_hub_documents, load_hub_text, tokenize_blocks, tokenize_stream
from pgprune.errors import PgpruneError


def _jsonl(path, field, values):
    path.write_text("".join(json.dumps({field: v}) + "\n" for v in values), encoding="utf-8")
    return path


def test_wikitext_jsonl_joined_with_blank_lines(tmp_path):
    f = _jsonl(tmp_path / "wiki.jsonl", "text", [" = Title = \n", " First line .\n", "", " Second ."])
    text = load_hub_text("wikitext2", "test", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    assert text == " = Title = \n\n\n First line .\n\n\n\n\n Second ."


def test_c4_parquet_joined_with_space(tmp_path):
    pd = pytest.importorskip("pandas")
    f = tmp_path / "c4.parquet"
    pd.DataFrame({"text": ["doc one.", "doc two.", "doc three."], "url": ["a", "b", "c"]}).to_parquet(f)
    assert load_hub_text("c4", "validation", data_files=[f], cache_dir=str(tmp_path / "cache")) == \
        "doc one. doc two. doc three."
    assert load_hub_documents("c4", "validation", data_files=[f], cache_dir=str(tmp_path / "cache")) == \
        ["doc one.", "doc two.", "doc three."]


def test_ptb_sentence_field_and_split_mapping(tmp_path):
    tr = _jsonl(tmp_path / "tr.jsonl", "sentence", ["a b c", "d e"])
    te = _jsonl(tmp_path / "te.jsonl", "sentence", ["x y", "z <unk>"])
    files = {"train": str(tr), "test": str(te)}
    assert load_hub_text("ptb", "test", data_files=files, cache_dir=str(tmp_path / "c")) == "x y z <unk>"
    assert load_hub_text("ptb", "train", data_files=files, cache_dir=str(tmp_path / "c")) == "a b c d e"
    with pytest.raises(PgpruneError, match="validation"):
        load_hub_text("ptb", "validation", data_files=files, cache_dir=str(tmp_path / "c"))


def test_txt_files_and_max_chars(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("alpha beta\ngamma delta\nepsilon\n", encoding="utf-8")
    text = load_hub_text("c4", "train", data_files=str(f), cache_dir=str(tmp_path / "c"))
    assert text == "alpha beta gamma delta epsilon"
    assert load_hub_text("c4", "train", data_files=str(f), max_chars=13, cache_dir=str(tmp_path / "c")) == "alpha beta ga"


def test_unknown_name_and_bad_files(tmp_path):
    with pytest.raises(PgpruneError, match=r"'bookcorpus'.*c4, ptb, wikitext2"):
        load_hub_text("bookcorpus", "test")
    with pytest.raises(PgpruneError, match="not found"):
        load_hub_text("c4", "train", data_files=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "x.csvx"
    bad.write_text("a")
    with pytest.raises(PgpruneError, match=r"\.csvx"):
        load_hub_text("c4", "train", data_files=str(bad))
    f = _jsonl(tmp_path / "w.jsonl", "body", ["a"])
    with pytest.raises(PgpruneError, match="no 'text' column.*body"):
        load_hub_text("wikitext2", "test", data_files=str(f), cache_dir=str(tmp_path / "c"))


def test_hub_offline_without_cache_explains(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(PgpruneError, match=r"(?s)wikitext2.*offline.*data_files"):
        load_hub_text("wikitext2", "test", cache_dir=str(tmp_path / "empty_cache"))


def test_tokenize_blocks(tiny_tokenizer):
    ids = tiny_tokenizer(TINY_TEXT, add_special_tokens=False)["input_ids"]
    blocks = tokenize_blocks(TINY_TEXT, tiny_tokenizer, 16)
    n = (len(ids) + 1) // 16
    assert blocks.dtype == torch.long and blocks.shape == (n, 16)
    assert blocks[0, 0].item() == tiny_tokenizer.bos_token_id
    assert (blocks.flatten()[1:] == tiny_tokenizer.bos_token_id).sum() == 0  # BOS at the very start only
    assert blocks.flatten().tolist() == ([tiny_tokenizer.bos_token_id] + ids)[: n * 16]
    assert tokenize_blocks(TINY_TEXT, tiny_tokenizer, 16, max_blocks=3).shape == (3, 16)
    nobos = tokenize_blocks(TINY_TEXT, tiny_tokenizer, 16, add_bos=False)
    assert nobos.flatten().tolist() == ids[: nobos.numel()]


def test_tokenize_blocks_errors(tiny_tokenizer):
    with pytest.raises(PgpruneError, match=r"tokens, fewer than the 4096 that seq_len=4096 needs"):
        tokenize_blocks("a short text", tiny_tokenizer, 4096)
    with pytest.raises(PgpruneError, match="seq_len"):
        tokenize_blocks(TINY_TEXT, tiny_tokenizer, 1)


def test_calibration_blocks_seeded(tiny_tokenizer):
    a = calibration_blocks(TINY_TEXT, tiny_tokenizer, 32, 10, seed=3)
    b = calibration_blocks(TINY_TEXT, tiny_tokenizer, 32, 10, seed=3)
    c = calibration_blocks(TINY_TEXT, tiny_tokenizer, 32, 10, seed=4)
    assert a.shape == (10, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = tokenize_stream(TINY_TEXT, tiny_tokenizer)
    for row in a.tolist():  # every window is a contiguous slice of the token stream
        assert any(stream[i: i + 32] == row for i in range(len(stream) - 31))
    with pytest.raises(PgpruneError, match="n "):
        calibration_blocks(TINY_TEXT, tiny_tokenizer, 32, 0, seed=0)


def test_hub_calls_follow_the_protocol(monkeypatch):
    """Without data_files the hub ids/configs/shards of the paper's protocol are requested."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name, kw.get("split"), kw.get("data_files")))
        field = "sentence" if path == "ptb_text_only" else "text"
        return datasets.Dataset.from_dict({field: ["a", "b"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_hub_text("wikitext2", "test") == "a\n\nb"
    assert load_hub_text("c4", "train") == "a b"
    assert load_hub_text("c4", "test") == "a b"
    assert load_hub_text("ptb", "valid") == "a b"
    assert calls[0] == ("wikitext", "wikitext-2-raw-v1", "test", None)
    assert calls[1][0] == "allenai/c4" and calls[1][3] == {"data": "en/c4-train.00000-of-01024.json.gz"}
    assert calls[2][3] == {"data": "en/c4-validation.00000-of-00008.json.gz"}
    assert calls[3] == ("ptb_text_only", "penn_treebank", "validation", None)


def test_hf_offline_patches_and_restores(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from pgprune.data import hf_offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with hf_offline(None) as on:  # follows the environment: online here, nothing touched
        assert on is False and huggingface_hub.constants.HF_HUB_OFFLINE is False
    with hf_offline(True) as on:
        assert on and huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
        assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ
