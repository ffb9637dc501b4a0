"""bench.search_quality: typed, validated search.* overrides (bad keys/values are named); within-run curve points."""
import pytest

from bench.search_quality import overrides
from pgprune.config import SearchParams
from pgprune.errors import ConfigError


def test_overrides_are_typed_and_validated():
    base = SearchParams()
    upd = overrides(["init_free_heads=0", "lr_heads=0.2", "granularity=[\"heads\"]", "select=last"], base)
    assert upd == {"init_free_heads": 0.0, "lr_heads": 0.2, "granularity": ["heads"], "select": "last"}
    assert isinstance(upd["init_free_heads"], float)
    with pytest.raises(ConfigError, match="'foo=1'.*init_free_heads"):
        overrides(["foo=1"], base)
    with pytest.raises(Exception, match="init_free_heads"):
        overrides(["init_free_heads=1.5"], base)


def test_curve_points_pick_every_nth_validation():
    from pgprune.eval.evaluate import curve_points

    traj = [{"step": s, "forward_passes": 2 * s, "val_loss": 5.0 - s / 100, "elapsed_s": float(s), "masks": s}
            for s in range(0, 101, 10)]
    pts = curve_points(traj, lambda m: 1000.0 + m, 50)
    assert [p["step"] for p in pts] == [0, 50, 100]
    assert pts[1] == {"step": 50, "forward_passes": 100, "val_loss": 4.5, "elapsed_s": 50.0, "ppl": 1050.0}
    assert curve_points(traj, lambda m: 0.0, 0) == []
    assert curve_points([{k: v for k, v in t.items() if k != "elapsed_s"} for t in traj[:2]], lambda m: 1.0) == [
        {"step": 0, "forward_passes": 0, "val_loss": 5.0, "ppl": 1.0}, {"step": 10, "forward_passes": 20, "val_loss": 4.9, "ppl": 1.0}]


def test_llamacpp_uniform_cell_is_the_pipelines_or_pruned_here(tmp_path):
    """bench.llamacpp_speed (bench._common.cell_model): a uniform cell uses the pipeline's masks when they keep the
    same widths in every layer, else prunes with the method in the uniform layout (a stock model, MLP widths in
    --round-to blocks); a cell the pipeline did not compute is pruned here too."""
    import types

    import torch
    import yaml
    from conftest import make_tiny_model

    from bench._common import cell_model
    from bench.llamacpp_speed import pruned_model
    from pgprune.core.adapters import get_adapter
    from pgprune.core.allocation import masks_from_scores
    from pgprune.core.handoff import MethodResult, save_masks

    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=3, ffn=32)
    lay = get_adapter(model).layout()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"seq_len": 16, "calib_blocks": 8}, "init": {"nsamples": 8,
                                                                                         "batch_size": 4},
                                      "refit": {"blocks": 8, "batch_size": 4}}))
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 300, (8, 16), generator=g)
    scores = {"heads": torch.rand(sum(lay.kv_heads), generator=g),
              "channels": torch.rand(sum(lay.intermediate), generator=g)}
    for alloc, want in (("global", False), ("uniform", True)):
        masks = masks_from_scores(lay, scores, 0.5, allocation=alloc, layout_kind="heterogeneous")
        save_masks(tmp_path / alloc / "flap_refit" / "s0.5", MethodResult("flap", 0.5, masks, None), lay)
        widths = {int(c.sum()) for c in masks.channels}
        pipeline = want and len(widths) == 1
        assert pipeline == want  # the uniform allocation keeps one width: both branches run
        pruned, note = cell_model(model, "flap_refit", 0.5, tmp_path / alloc, lambda: calib, str(params),
                                  layout="uniform", round_to=8)
        assert type(pruned).__name__ == "LlamaForCausalLM"
        if pipeline:  # the pipeline's masks themselves
            assert note is None
            assert [layer.mlp.down_proj.in_features for layer in pruned.model.layers] == \
                [int(c.sum()) for c in masks.channels]
        else:
            assert note.startswith("pruned here (the uniform layout;")
    args = types.SimpleNamespace(masks_dir=str(tmp_path / "none"), round_to=8, params=str(params), synthetic=None)
    pruned = pruned_model(model, "flap_refit", 0.5, "uniform", args, lambda: calib)
    assert type(pruned).__name__ == "LlamaForCausalLM"
    inter = {layer.mlp.down_proj.in_features for layer in pruned.model.layers}
    assert len(inter) == 1 and next(iter(inter)) % 8 == 0 and next(iter(inter)) < 32
    _, note = cell_model(model, "flap_refit", 0.5, tmp_path / "none", lambda: calib, str(params), layout="uniform",
                         round_to=8)
    assert note.startswith("pruned here (not in the pipeline's masks;")
