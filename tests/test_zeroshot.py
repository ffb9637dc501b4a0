"""Offline zero-shot: local multiple-choice tasks written from text, evaluated through lm-eval with HFLM."""
from __future__ import annotations

import json
import random
import socket

import pytest

from pgprune.data.local_tasks import LOADER_MODULE, read_items
from pgprune.errors import PgpruneError
from pgprune.eval import write_local_tasks, zero_shot

_WORDS = ("river stone light garden window morning silver people city market quiet music letter winter road "
          "bridge forest paper yellow table kitchen summer ocean mountain friend teacher story evening harbor "
          "lantern basket candle meadow village thunder orchard pocket ribbon saddle tower valley whisper").split()


def _corpus(seed: int, n_sent: int = 260) -> str:
    rng = random.Random(seed)
    paras, sents = [], []
    for i in range(n_sent):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 22))]
        sents.append(" ".join([words[0].capitalize()] + words[1:]) + rng.choice([".", ".", "!", "?"]))
        if i % 5 == 4:
            paras.append(" ".join(sents))
            sents = []
    return "\n\n".join(paras)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    names = write_local_tasks({"alpha": _corpus(1), "beta": _corpus(2)}, out, n_items=24, n_choices=4, seed=7)
    return out, names


def _norm(text: str) -> str:
    return " ".join(text.split())


def test_files_and_structure(task_dir):
    out, names = task_dir
    assert names == ["alpha_cloze", "alpha_lastword", "beta_cloze", "beta_lastword"]
    assert (out / f"{LOADER_MODULE}.py").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(names)
    for name in names:
        yaml_text = (out / f"{name}.yaml").read_text()
        assert f"task: {name}" in yaml_text and "output_type: multiple_choice" in yaml_text
        assert "metric: acc_norm" in yaml_text and str(out) not in yaml_text  # no absolute paths in the YAML
        items = read_items(out, name)
        assert len(items) == 24
        for it in items:
            assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
            assert 0 <= it["label"] < 4


def test_true_answer_is_at_label(task_dir):
    out, _ = task_dir
    for corpus, seed in (("alpha", 1), ("beta", 2)):
        text = _norm(_corpus(seed))
        for it in read_items(out, f"{corpus}_cloze"):
            true = it["choices"][it["label"]]
            assert 12 <= len(it["context"].split()) <= 20
            assert it["context"][:1].isupper()  # starts at a sentence start
            assert f"{it['context']} {true}" in text
            assert {len(c.split()) for c in it["choices"]} == {8}  # distractors of the same length in words
        for it in read_items(out, f"{corpus}_lastword"):
            true = it["choices"][it["label"]]
            assert true.isalpha()
            assert f"{it['context']} {true}" in text
            others = [c for i, c in enumerate(it["choices"]) if i != it["label"]]
            assert all(c.lower() != true.lower() for c in others)


def test_labels_spread_and_deterministic(task_dir, tmp_path):
    out, _ = task_dir
    labels = [it["label"] for it in read_items(out, "alpha_cloze")]
    assert len(set(labels)) > 1  # shuffled, not always 0
    again = tmp_path / "again"
    write_local_tasks({"alpha": _corpus(1)}, again, n_items=24, n_choices=4, seed=7)
    other = tmp_path / "other"
    write_local_tasks({"alpha": _corpus(1)}, other, n_items=24, n_choices=4, seed=8)
    for name in ("alpha_cloze", "alpha_lastword"):
        assert (again / f"{name}.jsonl").read_text() == (out / f"{name}.jsonl").read_text()
        assert (other / f"{name}.jsonl").read_text() != (out / f"{name}.jsonl").read_text()


def test_write_errors(tmp_path):
    with pytest.raises(PgpruneError, match="corpus name 'bad-name'"):
        write_local_tasks({"bad-name": _corpus(1)}, tmp_path)
    with pytest.raises(PgpruneError, match="passages"):
        write_local_tasks({"tiny": "One two three four. Five six."}, tmp_path, variants=["cloze"])
    with pytest.raises(PgpruneError, match="variant"):
        write_local_tasks({"a": _corpus(1)}, tmp_path, variants=["mystery"])
    with pytest.raises(PgpruneError, match="n_choices"):
        write_local_tasks({"a": _corpus(1)}, tmp_path, n_choices=1)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, address, *a, **k):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access attempted in an offline test: {address}")
        return real_connect(self, address, *a, **k)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_zero_shot_offline_from_any_cwd(task_dir, tiny_tokenizer, tmp_path, monkeypatch, no_network):
    from conftest import make_tiny_model

    out, names = task_dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # data paths must not depend on the working directory
    model = make_tiny_model(vocab=300)
    res = zero_shot(model, tiny_tokenizer, names, include_path=out, batch_size=8, limit=12, device="cpu",
                    offline=True)
    assert set(res["tasks"]) == set(names)
    for name in names:
        t = res["tasks"][name]
        assert 0.0 <= t["acc"] <= 1.0 and 0.0 <= t["acc_norm"] <= 1.0
        assert t["stderr"] >= 0 and t["metric_used"] == "acc"
        assert res["n_samples"][name] == 12
    assert res["metric"] == "acc"
    assert res["average"] == pytest.approx(sum(res["tasks"][n]["acc"] for n in names) / len(names))
    # averaging acc_norm instead reports it, and reuses the same per-task numbers
    res2 = zero_shot(model, tiny_tokenizer, names[:1], include_path=str(out), batch_size=4, limit=12,
                     metric="acc_norm")
    assert res2["metric"] == "acc_norm" and res2["metric_used"] == {names[0]: "acc_norm"}
    assert res2["average"] == pytest.approx(res["tasks"][names[0]]["acc_norm"])


def test_unknown_task_lists_what_was_found(task_dir, tiny_tokenizer):
    from conftest import make_tiny_model

    out, names = task_dir
    with pytest.raises(PgpruneError, match=r"'alpha_clozee'.*alpha_cloze, alpha_lastword, beta_cloze"):
        zero_shot(make_tiny_model(), tiny_tokenizer, ["alpha_clozee"], include_path=out, include_defaults=False)
    with pytest.raises(PgpruneError, match="not a directory"):
        zero_shot(make_tiny_model(), tiny_tokenizer, ["x"], include_path=out / "nope")
    with pytest.raises(PgpruneError, match="non-empty list"):
        zero_shot(make_tiny_model(), tiny_tokenizer, "alpha_cloze", include_path=out)


def test_unknown_task_suggests_builtin(task_dir, tiny_tokenizer):
    """With built-ins indexed (automatic when a name is not local), close lm-eval names are suggested."""
    from conftest import make_tiny_model

    out, _ = task_dir
    with pytest.raises(PgpruneError, match=r"'arc_esy' \(close: [^)]*arc_easy"):
        zero_shot(make_tiny_model(), tiny_tokenizer, ["arc_esy"], include_path=out)
