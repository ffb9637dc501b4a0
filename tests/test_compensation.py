"""The compensation setting (none | bias | refit) end to end: the recipe in the masks hand-off, `pgprune.prune` and
`pgprune prune --compensation`, the evaluation of a refit cell and the export of refit models in both layouts
(loaded back, equal to the in-memory refit model)."""
import pytest
import torch
from conftest import TINY_TEXT, cli_fails, make_tiny_model

import pgprune
from pgprune.core.adapters import get_adapter
from pgprune.core.compensation import Recipe, compensated_source
from pgprune.core.handoff import MethodResult, load_masks, load_recipe, save_masks
from pgprune.core.refit import refit_model
from pgprune.errors import ConfigError, PgpruneError
from pgprune.hf.slicing import slice_model

SMALL = {"data": {"seq_len": 16, "calib_blocks": 24, "seed": 0}, "init": {"nsamples": 8, "batch_size": 4},
         "search": {"steps": 4, "batch_size": 4, "val_blocks": 4, "validate_every": 2, "channel_group": 8},
         "refit": {"blocks": 12, "batch_size": 4}}
IDS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def _calib(tok):
    from pgprune.api import build_params, calibration_from

    return calibration_from(TINY_TEXT, tok, build_params(SMALL))[0]


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_recipe_round_trip_and_bad_values(tmp_path):
    r = Recipe("refit", damp=0.05, blocks=7, batch_size=2)
    assert Recipe.from_json(r.to_json()) == r
    assert Recipe("bias").to_json() == {"kind": "bias"}
    with pytest.raises(ConfigError, match="allowed: none, bias, refit"):
        Recipe("ridge")
    with pytest.raises(PgpruneError, match="kind"):
        Recipe.from_json({"kind": "x"})
    with pytest.raises(PgpruneError, match="allowed keys"):
        Recipe.from_json({"kind": "refit", "lam": 1})
    # a masks folder written before the recipe existed: bias when it holds biases, else none
    assert load_recipe(tmp_path) == Recipe("none")
    (tmp_path / "compensation.safetensors").write_bytes(b"")
    assert load_recipe(tmp_path).kind == "bias"


@pytest.mark.parametrize("method", ["flap_refit", "pg"])
def test_prune_with_refit_equals_the_refit_of_its_masks(method, tiny_tokenizer, tmp_path):
    """prune(): the pruned model is slice(refit(masks)) on the first refit.blocks calibration blocks; saved and
    loaded back (heterogeneous layout) it computes the same."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama")
    res = pgprune.prune(model, tiny_tokenizer, sparsity=0.4, method=method, calibration=TINY_TEXT, config=SMALL,
                        progress=False)
    assert res.info["compensation"] == "refit" and res.info["compensated"]
    calib = _calib(tiny_tokenizer)
    src, extra = refit_model(model, res.masks, calib[:12], damp=0.01, batch_size=4, progress=False)
    ref = slice_model(src, res.masks, extra)
    assert torch.allclose(_logits(res.model), _logits(ref), atol=1e-5)
    # the refit changes the model: it differs from bias-only compensation of the same masks
    biased = pgprune.prune(model, tiny_tokenizer, sparsity=0.4, method=method, calibration=TINY_TEXT, config=SMALL,
                           compensation="bias", progress=False)
    assert biased.info["compensation"] == "bias" and biased.masks.to_json() == res.masks.to_json()
    assert not torch.allclose(_logits(biased.model), _logits(res.model), atol=1e-3)
    saved = res.save(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=saved.plan.trust_remote_code)
    assert torch.allclose(_logits(again.eval()), _logits(res.model), atol=1e-5)


def test_uniform_refit_export_is_a_stock_class_equal_to_the_refit_model(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model("llama")
    res = pgprune.prune(model, tiny_tokenizer, sparsity=0.3, method="flap_refit", layout="uniform",
                        calibration=TINY_TEXT, config=SMALL, progress=False)
    assert res.layout == "uniform" and type(res.model).__name__ == "LlamaForCausalLM"
    saved = res.save(tmp_path / "u")
    assert not saved.plan.trust_remote_code
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    assert torch.allclose(_logits(again), _logits(res.model), atol=1e-5)


def test_compensation_override_and_bad_value(tiny_tokenizer):
    model = make_tiny_model("llama")
    plain = pgprune.prune(model, tiny_tokenizer, sparsity=0.3, method="flap", calibration=TINY_TEXT, config=SMALL,
                          compensation="none", progress=False)
    assert plain.info["compensation"] == "none" and plain.extra_bias is None
    own = pgprune.prune(model, tiny_tokenizer, sparsity=0.3, method="flap", calibration=TINY_TEXT, config=SMALL,
                        progress=False)
    assert own.info["compensation"] == "bias" and own.extra_bias is not None
    with pytest.raises(ConfigError, match="allowed: none, bias, refit"):
        pgprune.prune(model, tiny_tokenizer, sparsity=0.3, method="flap", calibration=TINY_TEXT, config=SMALL,
                      compensation="ridge", progress=False)


def test_cli_rejects_an_unknown_compensation(tmp_path, capsys):
    cli_fails(capsys, ["prune", "--model", tmp_path, "--sparsity", "0.3", "--out", tmp_path / "o",
                       "--compensation", "ridge"], "--compensation", "refit")


def test_a_refit_cell_is_evaluated_and_exported_as_its_refit(tiny_tokenizer, tmp_path):
    """The pipeline's hand-off: a refit cell stores the recipe, not the weights; evaluate_masks and the slicing
    consumers recompute the same refit from the calibration blocks."""
    from pgprune.api import build_params
    from pgprune.eval import perplexity
    from pgprune.eval.evaluate import evaluate_masks
    from pgprune.pruning.run import method_masks
    from pgprune.scorers import compute_all_scores

    model = make_tiny_model("llama")
    params = build_params({**SMALL, "eval": {"zero_shot": False, "speed": {"enabled": False}, "curve_blocks": 0,
                                             "ppl_batch_size": 2}})
    calib = _calib(tiny_tokenizer)
    scores, _ = compute_all_scores(params.init, model, calib, scorers=["flap"], progress=False)
    res = method_masks("flap_refit", model, calib, scores, params, 0.4)
    assert isinstance(res, MethodResult) and res.recipe == Recipe("refit", 0.01, 12, 4) and res.extra_bias is None
    save_masks(tmp_path / "cell", res, get_adapter(model).layout())
    assert load_recipe(tmp_path / "cell") == res.recipe
    masks, extra = load_masks(tmp_path / "cell", get_adapter(model).layout())
    evals = {"text": calib[12:20]}
    out = evaluate_masks(model, tiny_tokenizer, tmp_path / "cell", evals, None, params, calib)
    src, extra_src = compensated_source(model, masks, extra, res.recipe, calib)
    ref = slice_model(src, masks, extra_src)
    assert out["compensation"] == "refit"
    assert out["ppl"]["text"] == pytest.approx(perplexity(ref, evals["text"], batch_size=2)["ppl"], rel=1e-6)
    with pytest.raises(PgpruneError, match="calibration blocks"):
        evaluate_masks(model, tiny_tokenizer, tmp_path / "cell", evals, None, params, None)
