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
