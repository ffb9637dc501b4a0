"""Export layouts: the uniform layout is the family's stock class (no remote code) and equals the masked forward;
the heterogeneous one loads with trust_remote_code (AutoModelForCausalLM and AutoModel); both run under the
lm-eval CLI; the folder has a model card with the given numbers and masks.json, and its bytes are reproducible."""
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from pgprune.core.masked_forward import MaskedModel
from pgprune.core.masks import Masks, sparsity_report
from pgprune.errors import PgpruneError
from pgprune.hf.export import LayoutError, build_model, kept_widths, plan_export, save_model, uniform_widths

ROOT = Path(__file__).resolve().parents[1]
CASES = [("llama", 4, 4), ("llama", 4, 2), ("mistral", 4, 2), ("qwen2", 4, 2)]
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def uniform_masks(layout, kv: int, ch: int, drop=(1,), seed: int = 0) -> Masks:
    """Random masks keeping ``kv`` KV groups and ``ch`` channels in every layer, layers ``drop`` removed."""
    g = torch.Generator().manual_seed(seed)
    m = Masks.full(layout)
    for i in range(layout.num_layers):
        m.heads[i] = torch.zeros(layout.kv_heads[i], dtype=torch.bool)
        m.heads[i][torch.randperm(layout.kv_heads[i], generator=g)[:kv]] = True
        m.channels[i] = torch.zeros(layout.intermediate[i], dtype=torch.bool)
        m.channels[i][torch.randperm(layout.intermediate[i], generator=g)[:ch]] = True
    for i in drop:
        m.layers[i] = False
    return m


def flap_means(model):
    from pgprune.scorers import compute_scores

    calib = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    return compute_scores("flap", model, calib, bias_compensation=True, progress=False)


def ids_batch():
    return torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("compensate", [False, True], ids=["plain", "compensated"])
@pytest.mark.parametrize("arch,heads,kv", CASES)
def test_uniform_export_is_stock_and_equals_masked_forward(arch, heads, kv, compensate, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from pgprune.pruning.run import compensation_biases

    model = make_tiny_model(arch, n_heads=heads, n_kv=kv)
    mm = MaskedModel(model)
    masks = uniform_masks(mm.layout, 1, 20)
    extra = None
    if compensate:
        flap = flap_means(model)
        extra = compensation_biases(model, masks, flap)
        mm.set_compensation(flap["bias"])
    ids = ids_batch()
    expected = mm.logits(ids, masks)
    assert (expected - model(input_ids=ids).logits).abs().max() > 1e-2, "masks must change the output"

    res = save_model(model, masks, tmp_path / "m", tiny_tokenizer, extra_bias=extra, layout="uniform")
    stock = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    # compensated mistral/qwen2: only Llama has o_proj/down_proj biases
    want = "LlamaForCausalLM" if compensate else stock
    assert res.plan.layout == "uniform" and res.plan.architecture == want
    assert res.plan.converted_from == (arch if compensate and arch != "llama" else None)
    files = sorted(p.name for p in res.path.iterdir())
    assert "modeling_pgprune.py" not in files
    assert {"README.md", "masks.json", "config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(files)
    cfg = json.loads((res.path / "config.json").read_text())
    assert "auto_map" not in cfg and not any(k.startswith("pgprune_") and k != "pgprune_converted_from" for k in cfg)
    assert cfg["architectures"] == [want]
    assert (cfg["num_key_value_heads"], cfg["num_attention_heads"], cfg["head_dim"]) == (1, heads // kv, 8)
    assert (cfg["intermediate_size"], cfg["num_hidden_layers"]) == (20, 2)
    if arch == "qwen2" and not compensate:
        assert cfg["layer_types"] == ["full_attention"] * 2
    if compensate:
        assert cfg["attention_bias"] and cfg["mlp_bias"]

    reloaded = AutoModelForCausalLM.from_pretrained(res.path, trust_remote_code=False).eval()
    assert type(reloaded).__name__ == want
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    n = sum(p.numel() for p in reloaded.parameters())
    assert n == res.params_after
    expected_n = mm.layout.total_params(masks)
    if compensate:  # o/down biases, plus the zero biases Llama's attention_bias/mlp_bias flags add
        kept, hd, g = 2, 8, heads // kv
        expected_n += kept * 2 * 32 + kept * 2 * 20
        if not mm.layout.qkv_bias:
            expected_n += kept * (g + 2) * hd
    assert n == expected_n
    assert reloaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    assert Masks.from_json(json.loads((res.path / "masks.json").read_text())).to_json() == masks.to_json()


def test_build_model_in_memory_picks_the_layout():
    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    mm = MaskedModel(model)
    ids = ids_batch()
    uni = uniform_masks(mm.layout, 1, 24, drop=())
    small = build_model(model, uni)
    assert type(small).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in small.parameters()) == mm.layout.total_params(uni)
    torch.testing.assert_close(small(input_ids=ids).logits, mm.logits(ids, uni), atol=1e-5, rtol=1e-5)
    het = uniform_masks(mm.layout, 1, 24, drop=())
    het.channels[0][torch.nonzero(het.channels[0]).flatten()[:3]] = False
    assert not het.is_uniform() and uni.is_uniform() and uniform_widths(uni) == (1, 24)
    small = build_model(model, het)
    assert type(small).__name__ == "PgpruneLlamaForCausalLM"
    torch.testing.assert_close(small(input_ids=ids).logits, mm.logits(ids, het), atol=1e-5, rtol=1e-5)
    assert build_model(model, uni, dtype="bfloat16").model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32, "the source model is left untouched"


def test_layout_errors_name_the_widths_and_the_alternatives(tmp_path):
    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    layout = MaskedModel(model).layout
    masks = uniform_masks(layout, 1, 24)
    masks.channels[2][torch.nonzero(masks.channels[2]).flatten()[:4]] = False
    assert kept_widths(masks) == [(0, 1, 24), (2, 1, 20)]
    with pytest.raises(LayoutError, match=r"0: \(1, 24\), 2: \(1, 20\).*layout='heterogeneous'"):
        save_model(model, masks, tmp_path / "u", layout="uniform")
    assert not (tmp_path / "u").exists()
    with pytest.raises(LayoutError, match="layout='stock' is not allowed; allowed: auto, uniform, heterogeneous"):
        plan_export(model, masks, layout="stock")
    assert plan_export(model, masks).layout == "heterogeneous"
    assert plan_export(model, uniform_masks(layout, 2, 48, drop=())).layout == "uniform"


def test_compensated_sliding_window_model_is_refused_as_uniform(tmp_path, tiny_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    from pgprune.pruning.run import compensation_biases

    base = make_tiny_model("mistral", n_heads=4, n_kv=2)
    cfg = MistralConfig(**{**base.config.to_dict(), "sliding_window": 8})
    model = MistralForCausalLM(cfg).eval()
    model.load_state_dict(base.state_dict())
    mm = MaskedModel(model)
    masks = uniform_masks(mm.layout, 1, 20)
    flap = flap_means(model)
    extra = compensation_biases(model, masks, flap)
    with pytest.raises(LayoutError, match=r"sliding-window attention \(window \[8\].*layout='heterogeneous'.*"
                                          "without mean compensation"):
        plan_export(model, masks, extra, "uniform")
    # without compensation it is a stock Mistral with its window; with it, "auto" falls back to heterogeneous
    plain = save_model(model, masks, tmp_path / "plain", tiny_tokenizer)
    assert plain.plan.architecture == "MistralForCausalLM"
    assert json.loads((plain.path / "config.json").read_text())["sliding_window"] == 8
    res = save_model(model, masks, tmp_path / "het", tiny_tokenizer, extra_bias=extra)
    assert res.plan.layout == "heterogeneous" and "sliding-window" in (res.path / "README.md").read_text()
    mm.set_compensation(flap["bias"])
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(2))  # longer than the window
    from pgprune.hf.slicing import load_pruned

    torch.testing.assert_close(load_pruned(res.path)(input_ids=ids).logits, mm.logits(ids, masks), atol=1e-5,
                               rtol=1e-5)


def test_heterogeneous_export_loads_with_auto_classes(tmp_path, tiny_tokenizer):
    from transformers import AutoModel, AutoModelForCausalLM

    from pgprune.pruning.run import compensation_biases

    model = make_tiny_model("qwen2", n_heads=4, n_kv=2)
    mm = MaskedModel(model)
    masks = uniform_masks(mm.layout, 1, 20)
    masks.heads[2][:] = True
    flap = flap_means(model)
    extra = compensation_biases(model, masks, flap)
    mm.set_compensation(flap["bias"])
    res = save_model(model, masks, tmp_path / "het", tiny_tokenizer, extra_bias=extra)
    assert res.plan.layout == "heterogeneous" and (res.path / "modeling_pgprune.py").exists()
    cfg = json.loads((res.path / "config.json").read_text())
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    ids = ids_batch()
    lm = AutoModelForCausalLM.from_pretrained(res.path, trust_remote_code=True).eval()
    torch.testing.assert_close(lm(input_ids=ids).logits, mm.logits(ids, masks), atol=1e-5, rtol=1e-5)
    base = AutoModel.from_pretrained(res.path, trust_remote_code=True).eval()
    assert type(base).__name__ == "PgpruneQwen2Model"
    hidden = mm.adapter.final_norm(mm.hidden_states(ids, masks))
    torch.testing.assert_close(base(input_ids=ids).last_hidden_state, hidden, atol=1e-5, rtol=1e-5)


def test_uniform_export_of_an_already_pruned_model(tmp_path):
    """A heterogeneous pruned model (pgprune config, o/down biases) pruned again to uniform widths is a stock
    LlamaForCausalLM without pgprune keys."""
    from pgprune.hf.export import build_model as build
    from pgprune.pruning.run import compensation_biases

    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    first_masks = uniform_masks(MaskedModel(model).layout, 2, 40, drop=())
    first_masks.channels[0][torch.nonzero(first_masks.channels[0]).flatten()[:5]] = False
    first = build(model, first_masks, compensation_biases(model, first_masks, flap_means(model)))
    assert type(first).__name__ == "PgpruneLlamaForCausalLM"
    mm = MaskedModel(first)
    masks = uniform_masks(mm.layout, 1, 30, drop=(0,))
    res = save_model(first, masks, tmp_path / "again")
    assert res.plan.architecture == "LlamaForCausalLM"
    cfg = json.loads((res.path / "config.json").read_text())
    assert not [k for k in cfg if k.startswith("pgprune")] and cfg["attention_bias"] and cfg["mlp_bias"]
    from transformers import AutoModelForCausalLM

    ids = ids_batch()
    again = AutoModelForCausalLM.from_pretrained(res.path, trust_remote_code=False)
    torch.testing.assert_close(again(input_ids=ids).logits, mm.logits(ids, masks), atol=1e-5, rtol=1e-5)


def test_model_card_holds_the_numbers(tmp_path, tiny_tokenizer):
    from huggingface_hub import ModelCard

    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    layout = MaskedModel(model).layout
    masks = uniform_masks(layout, 1, 24)
    ev = {"ppl": {"wikitext2": 12.3456}, "zero_shot": {"average": 0.4321, "metric": "acc",
                                                       "tasks": {"piqa": 0.5123, "boolq": 0.3519}},
          "dense": {"ppl": {"wikitext2": 9.8765}, "zero_shot": {"average": 0.6}}}
    cmd = "pgprune prune --model org/tiny-llama --sparsity 0.5 --layout uniform --out models/tiny-pruned"
    res = save_model(model, masks, tmp_path / "m", tiny_tokenizer, save_dtype="bfloat16",
                     card={"base_model": "org/tiny-llama", "method": "pg_uniform", "sparsity": 0.5,
                           "calibration": "wikitext2 train, 8 blocks of 16 tokens", "evaluation": ev,
                           "command": cmd, "repo_id": "models/tiny-pruned", "license": "apache-2.0"})
    card = ModelCard.load(res.path / "README.md")
    assert card.data.base_model == "org/tiny-llama" and card.data.license == "apache-2.0"
    assert card.data.tags == ["pruned", "structured-pruning", "pgprune"]
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    text = card.text
    s = sparsity_report(layout, masks)
    for want in ("PG search (uniform layout) (`pg_uniform`)", "LlamaForCausalLM", "| Requested sparsity | 50.0% |",
                 f"{100 * s['prunable_sparsity']:.1f}%", f"{100 * s['total_sparsity']:.1f}%",
                 f"{s['prunable_params_dense']:,} -> {s['prunable_params_kept']:,}",
                 f"{res.params_before:,} / {res.params_after:,}", "wikitext2 train, 8 blocks of 16 tokens",
                 "| perplexity (wikitext2) | 12.35 | 9.877 |", "| zero-shot piqa (acc) | 0.5123 | n/a |",
                 "| zero-shot average (acc) | 0.4321 | 0.6 |", cmd, "pgprune 0.1.0", "| 1 | dropped |",
                 "| 0 | 1 | 2 | 24 |", "| Weights dtype | bfloat16 |",
                 'AutoModelForCausalLM.from_pretrained("models/tiny-pruned")'):
        assert want in text, want
    assert "trust_remote_code" not in text
    assert json.loads((res.path / "config.json").read_text())["dtype"] == "bfloat16"
    # heterogeneous: loading needs remote code and the card says so for the tokenizer too
    masks.channels[0][torch.nonzero(masks.channels[0]).flatten()[:2]] = False
    het = save_model(model, masks, tmp_path / "h", tiny_tokenizer, card={"base_model": str(tmp_path / "base")})
    text = (het.path / "README.md").read_text()
    assert 'AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)' in text
    assert str(tmp_path) not in text and "base_model:" not in text, "no machine paths in the card"
    assert "Not evaluated" in text and "was not recorded" in text


def test_saved_folder_is_byte_identical(tmp_path, tiny_tokenizer):
    from pgprune.pruning.run import compensation_biases

    model = make_tiny_model("qwen2", n_heads=4, n_kv=2)
    layout = MaskedModel(model).layout
    het = uniform_masks(layout, 1, 20)
    het.heads[2][:] = True
    for name, masks in (("uniform", uniform_masks(layout, 1, 20)), ("het", het)):
        extra = compensation_biases(model, masks, flap_means(model))
        trees = []
        for run in ("a", "b", "prebuilt"):
            # "prebuilt": the in-memory model of build_model saved as it is (the Python API's result.save)
            pruned = build_model(model, masks, extra) if run == "prebuilt" else None
            out = save_model(model, masks, tmp_path / run / name, tiny_tokenizer, extra_bias=extra,
                             card={"command": "pgprune prune ..."}, pruned=pruned).path
            trees.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
        assert trees[0].keys() == trees[1].keys() == trees[2].keys() and len(trees[0]) >= 7
        for k in trees[0]:
            assert trees[0][k] == trees[1][k] == trees[2][k], f"{name}/{k} differs between saves"
    with pytest.raises(PgpruneError, match="pruned is a PgpruneQwen2ForCausalLM, but these masks"):
        save_model(model, uniform_masks(layout, 1, 20), tmp_path / "x", pruned=build_model(model, het))


def _run_in_pty(code: str, timeout: float = 60.0) -> tuple[int, str, float]:
    """Run ``python -c code`` with a terminal as stdin/stdout (where transformers would prompt [y/N])."""
    import pty

    master, slave = pty.openpty()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env=OFFLINE_ENV, cwd=ROOT)
    os.close(slave)
    out = b""
    try:
        while time.monotonic() - t0 < timeout:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    chunk = b""
                out += chunk
                if not chunk and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return proc.wait(), out.decode(errors="replace"), time.monotonic() - t0


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory, tiny_tokenizer):
    """One uniform and one heterogeneous folder of the same tiny Llama."""
    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    layout = MaskedModel(model).layout
    root = tmp_path_factory.mktemp("saved")
    uni = uniform_masks(layout, 1, 24)
    het = uniform_masks(layout, 1, 24)
    het.heads[2][:] = True
    return {"uniform": save_model(model, uni, root / "uniform", tiny_tokenizer).path,
            "heterogeneous": save_model(model, het, root / "heterogeneous", tiny_tokenizer).path}


def test_tokenizer_loads_without_prompt(saved_pair):
    """A terminal user must not meet transformers' 15 s "[y/N]" remote-code prompt when following the card: the
    uniform folder needs no remote code at all, the heterogeneous one is loaded with trust_remote_code=True."""
    for layout, trc in (("uniform", False), ("heterogeneous", True)):
        code = ("from transformers import AutoTokenizer\n"
                f"t = AutoTokenizer.from_pretrained({str(saved_pair[layout])!r}, trust_remote_code={trc})\n"
                "print('TOKENS', t('the quick brown fox')['input_ids'])")
        rc, out, took = _run_in_pty(code)
        assert rc == 0 and "TOKENS [" in out, out[-2000:]
        # the prompt prints "[y/N]" and waits 15 s for an answer; its text is the evidence (no timing assertion)
        assert "[y/N]" not in out, (layout, took, out[-2000:])
        config = json.loads((saved_pair[layout] / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"]


@pytest.mark.parametrize("layout", ["uniform", "heterogeneous"])
def test_lm_eval_cli_runs_on_the_saved_model(layout, saved_pair, tmp_path):
    from conftest import TINY_TEXT

    from pgprune.data.local_tasks import write_local_tasks

    tasks = write_local_tasks({"tiny": TINY_TEXT}, tmp_path / "tasks", n_items=4, n_choices=2, variants=("cloze",))
    args = f"pretrained={saved_pair[layout]}" + (",trust_remote_code=True" if layout == "heterogeneous" else "")
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", args, "--tasks", tasks[0],
         "--include_path", str(tmp_path / "tasks"), "--batch_size", "2", "--device", "cpu",
         "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=OFFLINE_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert len(results) == 1
    acc = results[0]["results"][tasks[0]]["acc,none"]
    assert 0.0 <= acc <= 1.0


def test_qwen2_sliding_layers_keep_their_window(tmp_path):
    """Qwen2 with sliding-window layers: the uniform export keeps each kept layer's attention type
    (layer_types cut, max_window_layers recounted); compensation is refused unless every kept layer is full."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from pgprune.pruning.run import compensation_biases

    base = make_tiny_model("qwen2", n_heads=4, n_kv=2)
    cfg = Qwen2Config(**{**base.config.to_dict(), "use_sliding_window": True, "sliding_window": 4,
                         "max_window_layers": 1, "layer_types": None})
    model = Qwen2ForCausalLM(cfg).eval()
    model.load_state_dict(base.state_dict())
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    mm = MaskedModel(model)
    ids = ids_batch()  # 13 tokens, longer than the window
    masks = uniform_masks(mm.layout, 1, 20, drop=(0,))
    res = save_model(model, masks, tmp_path / "q", layout="uniform")
    saved = json.loads((res.path / "config.json").read_text())
    assert saved["layer_types"] == ["sliding_attention"] * 2 and saved["max_window_layers"] == 0
    reloaded = AutoModelForCausalLM.from_pretrained(res.path)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, mm.logits(ids, masks), atol=1e-5, rtol=1e-5)
    flap = flap_means(model)
    with pytest.raises(LayoutError, match=r"window \[4\] on layers \[1, 2\]"):
        plan_export(model, masks, compensation_biases(model, masks, flap), "uniform")
    only_full = uniform_masks(mm.layout, 1, 20, drop=(1, 2))
    plan = plan_export(model, only_full, compensation_biases(model, only_full, flap), "uniform")
    assert plan.architecture == "LlamaForCausalLM" and plan.converted_from == "qwen2"
