"""The Python API: the README's example (also in pgprune/api.py's docstring between `# --- example ---` lines) runs on a
tiny model; calibration as a LongTensor, a text, a list of texts or a file gives the same masks for the same
blocks; the uniform layout gives a stock class equal to the masked forward; the input model is left unchanged."""
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, make_tiny_model

import pgprune
from pgprune.errors import ConfigError, PgpruneError

SMALL = {"data": {"seq_len": 16, "calib_blocks": 24, "seed": 0}, "init": {"nsamples": 8, "batch_size": 4},
         "search": {"steps": 4, "batch_size": 4, "val_blocks": 4, "validate_every": 2, "channel_group": 8}}
MARK = "# --- example ---"


def example_code() -> str:
    """The README's API example (the python block after its `<!-- api-example` comment); pgprune/api.py's docstring
    holds the same code between two `# --- example ---` lines."""
    import re
    from pathlib import Path

    import pgprune.api

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    m = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README.md needs the API example: a python block after an <!-- api-example --> comment"
    parts = pgprune.api.__doc__.split(MARK)
    assert len(parts) == 3, f"pgprune/api.py's docstring needs exactly one block between two {MARK!r} lines"
    assert m.group(1).strip("\n") == parts[1].strip("\n"), "README's API example and pgprune/api.py's differ"
    return m.group(1).strip("\n")


def test_readme_example_runs(tmp_path, monkeypatch, tiny_tokenizer):
    """The example verbatim, except the hub id -> a local tiny model and calibration="wikitext2" -> a local text
    file with a small config (offline, seconds)."""
    code = example_code()
    lines = code.splitlines()
    assert len(lines) <= 10, "the README example is ten lines"
    make_tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(TINY_TEXT * 3)
    hub_id = re.search(r'name = "([^"]+)"', code).group(1)
    swaps = {f'"{hub_id}"': repr(str(tmp_path / "tiny")),
             'calibration="wikitext2"': f'calibration={str(tmp_path / "calib.txt")!r}, config=SMALL'}
    for old, new in swaps.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    ns = {"SMALL": SMALL}
    exec(compile(code, "README example", "exec"), ns)
    result = ns["result"]
    assert isinstance(result, pgprune.PruneResult) and result.info["method"] == "pg"
    p = result.info["params"]
    assert p["decoder_linear"]["after"] < p["decoder_linear"]["before"]
    assert sum(t.numel() for t in result.model.parameters()) == p["model_after"] < p["model_before"]
    saved = tmp_path / "smollm2-pruned"
    assert {"config.json", "model.safetensors", "masks.json", "README.md", "tokenizer.json"} <= \
        {f.name for f in saved.iterdir()}
    card = (saved / "README.md").read_text()
    assert "calib.txt: 24 blocks of 16 tokens" in card and "pruned with the Python API" in card


def test_prune_calibration_forms_agree(tiny_tokenizer, tmp_path):
    from pgprune.api import build_params
    from pgprune.data import calibration_blocks

    model = make_tiny_model("llama")
    blocks = calibration_blocks(TINY_TEXT, tiny_tokenizer, 16, 24, 3)  # data.seed = seed
    by_tensor = pgprune.prune(model, sparsity=0.4, method="pg", calibration=blocks, config=SMALL, seed=3,
                              progress=False)
    by_text = pgprune.prune(model, tiny_tokenizer, sparsity=0.4, calibration=TINY_TEXT, config=SMALL, seed=3,
                            progress=False)
    assert by_tensor.masks.to_json() == by_text.masks.to_json()
    assert by_tensor.info["search"]["3"]["steps"] == 4 and "given as token ids" in by_tensor.info["calibration"]
    # a list of texts and a file are the same text
    half = len(TINY_TEXT) // 2
    parts = [TINY_TEXT[:half], TINY_TEXT[half:]]
    (tmp_path / "c.txt").write_text("\n\n".join(parts))
    a = pgprune.prune(model, tiny_tokenizer, sparsity=0.4, method="wanda_sp", calibration=parts, config=SMALL)
    b = pgprune.prune(model, tiny_tokenizer, sparsity=0.4, method="wanda_sp", calibration=tmp_path / "c.txt",
                      config=build_params(SMALL))
    assert a.masks.to_json() == b.masks.to_json()
    assert a.extra_bias is None and b.info["calibration"].startswith("text file c.txt")


def test_uniform_layout_is_a_stock_model_equal_to_the_masked_forward(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from pgprune.api import build_params, calibration_from
    from pgprune.core.masked_forward import MaskedModel
    from pgprune.scorers import compute_all_scores

    model = make_tiny_model("qwen2")
    result = pgprune.prune(model, tiny_tokenizer, sparsity=0.3, calibration=TINY_TEXT, layout="uniform",
                           config=SMALL, compensation="bias", progress=False)
    assert result.info["method"] == "pg_uniform" and result.layout == "uniform"
    # compensated Qwen2 is saved as Llama (only Llama has o_proj/down_proj biases), see pgprune.hf.export
    assert type(result.model).__name__ == "LlamaForCausalLM" and result.info["compensated"]
    params = build_params(SMALL)
    calib, _ = calibration_from(TINY_TEXT, tiny_tokenizer, params)
    scores, _ = compute_all_scores(params.init, model, calib, scorers=["flap"])
    mm = MaskedModel(model)
    mm.set_compensation(scores["flap"]["bias"])
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (result.model(input_ids=ids).logits - mm.logits(ids, result.masks)).abs().max() < 1e-4
    res = result.save(tmp_path / "u", card={"repo_id": "me/tiny-pruned"})
    assert res.plan.layout == "uniform"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "u", trust_remote_code=False).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, result.model(input_ids=ids).logits)
    assert "me/tiny-pruned" in (tmp_path / "u" / "README.md").read_text()
    # a metric baseline without compensation: the model's own stock class
    plain = pgprune.prune(model, tiny_tokenizer, sparsity=0.3, method="magnitude", calibration=TINY_TEXT,
                          layout="uniform", config=SMALL, compensation="none")
    assert type(plain.model).__name__ == "Qwen2ForCausalLM" and plain.extra_bias is None


@pytest.mark.parametrize("method", ["pg", "taylor", "flap"])
def test_input_model_is_unchanged(method, tiny_tokenizer):
    model = make_tiny_model("llama")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # flags must survive as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    result = pgprune.prune(model, tiny_tokenizer, sparsity=0.5, method=method, calibration=TINY_TEXT, config=SMALL,
                           progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert model.config.num_hidden_layers == 3 and model.model.layers[0].mlp.up_proj.weight.shape == (48, 32)
    assert not model.training
    assert result.model is not model and all(
        p.data_ptr() != q.data_ptr() for p in result.model.parameters() for q in model.parameters())


def test_bad_arguments_name_the_value(tiny_tokenizer):
    model = make_tiny_model("llama")
    with pytest.raises(ConfigError, match=r"sparsity=1\.2 is not allowed; allowed: 0 < sparsity < 1"):
        pgprune.prune(model, tiny_tokenizer, sparsity=1.2, calibration=TINY_TEXT, config=SMALL)
    with pytest.raises(ConfigError, match="unknown method 'sparsegpt'; allowed: pg, pg_uniform"):
        pgprune.prune(model, tiny_tokenizer, method="sparsegpt", calibration=TINY_TEXT, config=SMALL)
    with pytest.raises(ConfigError, match="calibration='wikitex2' is neither a corpus nor a file"):
        pgprune.prune(model, tiny_tokenizer, calibration="wikitex2", config=SMALL)
    with pytest.raises(ConfigError, match="search.steps"):
        pgprune.prune(model, tiny_tokenizer, calibration=TINY_TEXT, config=SMALL, steps=0)
    with pytest.raises(ConfigError, match="method 'pg_uniform' searches the uniform layout"):
        pgprune.prune(model, tiny_tokenizer, method="pg_uniform", layout="heterogeneous", calibration=TINY_TEXT)
    with pytest.raises(ConfigError, match="round_to=8 with the metric baseline 'wanda_sp' needs the uniform"):
        pgprune.prune(model, tiny_tokenizer, method="wanda_sp", layout="heterogeneous", round_to=8,
                      calibration=TINY_TEXT, config=SMALL)
    with pytest.raises(ConfigError, match="a tokenizer is needed"):
        pgprune.prune(model, sparsity=0.3, calibration=TINY_TEXT, config=SMALL)
    with pytest.raises(PgpruneError, match="model_type='gpt2'"):
        from transformers import GPT2Config, GPT2LMHeadModel

        pgprune.prune(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)), tiny_tokenizer,
                      method="magnitude", calibration=TINY_TEXT, config=SMALL)


def test_package_exports():
    import pgprune.api

    assert pgprune.prune is pgprune.api.prune and pgprune.PruneResult is pgprune.api.PruneResult
    assert {"prune", "PruneResult", "__version__"} <= set(pgprune.__all__) and Path(pgprune.__file__).exists()


def test_jsonl_calibration_file_is_its_text_field(tiny_tokenizer, tmp_path):
    import json

    from pgprune.api import build_params, calibration_from
    from pgprune.data.sources import read_text_file

    parts = [TINY_TEXT[:300], TINY_TEXT[300:]]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(parts)))
    assert read_text_file(tmp_path / "c.jsonl") == "\n\n".join(parts)
    params = build_params(SMALL)
    by_file, desc = calibration_from(str(tmp_path / "c.jsonl"), tiny_tokenizer, params)
    assert torch.equal(by_file, calibration_from(parts, tiny_tokenizer, params)[0]) and "c.jsonl" in desc
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(PgpruneError, match="record 2 has no string field 'text'"):
        read_text_file(tmp_path / "bad.jsonl")
    with pytest.raises(PgpruneError, match="extension '.csv'"):
        (tmp_path / "x.csv").write_text("a,b")
        read_text_file(tmp_path / "x.csv")
