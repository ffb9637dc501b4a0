"""The teacher's top-k cache (recover.teacher_topk): the coarsened KL is the full KL at k = vocabulary, 0 for a
teacher equal to the student, between 0 and the full KL otherwise; a recovery from a given cache equals one that
computes it; a cache made for other blocks or settings is refused; the file round-trips and a damaged one is one
line; the teacher stage writes it (or only teacher.json at k = 0)."""
import copy
import json

import pytest
import torch
from conftest import TINY_TEXT, make_tiny_model

from pgprune.errors import PgpruneError
from pgprune.recovery.lora import kd_loss, recover_model
from pgprune.recovery.settings import RecoverSettings
from pgprune.recovery.teacher import TeacherTopK, kd_topk_loss, teacher_topk, top_k_of

pytest.importorskip("peft")

FAST = dict(seq_len=16, batch_size=4, warmup_ratio=0, lr=1e-2, loss="kd", max_blocks=64)


def _loss(student, teacher, k, t):
    logp, idx, rest = top_k_of(teacher, k, t)
    return kd_topk_loss(student, logp, idx, rest, t)


def test_coarsened_kl_is_the_full_kl_at_full_k_zero_at_equality_and_a_lower_bound():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 40, generator=g) * 3, torch.randn(2, 5, 40, generator=g) * 3
    for temp in (1.0, 2.0):
        full = kd_loss(s, t, temp).item()
        assert _loss(s, t, 40, temp).item() == pytest.approx(full, rel=1e-5, abs=1e-6)
        assert _loss(t, t, 8, temp).item() == 0.0
        for k in (1, 4, 16, 39):
            part = _loss(s, t, k, temp).item()
            assert 0 < part <= full + 1e-6
        # coarsening is monotone: a finer partition (larger k, nested top sets) loses less
        assert _loss(s, t, 4, temp).item() <= _loss(s, t, 16, temp).item() + 1e-6
    # the rest event still penalises mass the student puts outside the teacher's top-k
    t = torch.full((1, 1, 10), -20.0)
    t[..., 0] = 10.0  # the teacher: all mass on token 0
    s = torch.zeros(1, 1, 10)  # the student: uniform
    assert _loss(s, t, 1, 1.0).item() == pytest.approx(kd_loss(s, t, 1.0).item(), rel=1e-3)


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    from pgprune.data import tokenize_blocks

    teacher = make_tiny_model("llama").eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return teacher, student, tokenize_blocks(TINY_TEXT, tiny_tokenizer, 16)


def test_a_given_cache_is_the_computed_one_and_a_foreign_one_is_refused(models, tmp_path):
    teacher, student, blocks = models
    settings = RecoverSettings(**FAST, steps=3, teacher_topk=8)
    own = recover_model(copy.deepcopy(student), blocks, settings, teacher=teacher, teacher_id="t", progress=False)
    cache = teacher_topk(teacher, blocks, 8, 1.0, teacher_id="t", progress=False)
    cache.save(tmp_path)
    loaded = TeacherTopK.load(tmp_path)
    assert torch.equal(loaded.logp, cache.logp) and torch.equal(loaded.index, cache.index)
    given = recover_model(copy.deepcopy(student), blocks, settings, teacher_cache=loaded, progress=False)
    assert given.info["losses"] == own.info["losses"] and given.info["teacher"] == "t"
    for (n, a), b in zip(own.model.state_dict().items(), given.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert own.info["losses"][0] > 0 and own.info["teacher_topk"] == 8
    with pytest.raises(PgpruneError, match="other training blocks"):
        recover_model(copy.deepcopy(student), blocks[1:], settings, teacher_cache=loaded, progress=False)
    with pytest.raises(PgpruneError, match="teacher_topk=8 \\(the run asks for 4\\)"):
        recover_model(copy.deepcopy(student), blocks, RecoverSettings(**FAST, steps=3, teacher_topk=4),
                      teacher_cache=loaded, progress=False)
    # a run of few steps computes only the blocks it visits; a block it lacks is refused, not guessed
    part = teacher_topk(teacher, blocks, 8, 1.0, progress=False, only=torch.tensor([2, 0, 2]))
    assert part.logp.shape[0] == 2 and part.rows.tolist()[:3] == [0, -1, 1]
    torch.testing.assert_close(part.batch(torch.tensor([0, 2]), "cpu")[0], cache.batch(torch.tensor([0, 2]), "cpu")[0])
    with pytest.raises(PgpruneError, match="no entry for training block"):
        part.batch(torch.tensor([1]), "cpu")
    part.save(tmp_path / "part")
    assert torch.equal(TeacherTopK.load(tmp_path / "part").rows, part.rows)
    # the student as its own teacher: exactly 0 through the cache too
    same = recover_model(copy.deepcopy(teacher), blocks, RecoverSettings(**FAST, steps=1, teacher_topk=8),
                         teacher=teacher, progress=False)
    assert same.info["losses"][0] == 0.0


def test_damaged_or_missing_cache_is_one_line(tmp_path):
    with pytest.raises(PgpruneError, match="not found"):
        TeacherTopK.load(tmp_path)
    (tmp_path / "teacher_topk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(PgpruneError, match="damaged or not a safetensors file"):
        TeacherTopK.load(tmp_path)
    with pytest.raises(PgpruneError, match="teacher_topk=0; allowed: >= 1"):
        teacher_topk(lambda ids: torch.zeros(*ids.shape, 5), torch.zeros(2, 4, dtype=torch.long), 0, 1.0)
    with pytest.raises(PgpruneError, match="larger than the vocabulary"):
        teacher_topk(lambda ids: torch.zeros(*ids.shape, 5), torch.zeros(2, 4, dtype=torch.long), 6, 1.0,
                     progress=False)


def test_settings_flag_and_info():
    from pgprune.recovery.settings import cli_flags

    assert "--teacher-topk" in [f for f, _ in cli_flags()]
    with pytest.raises(Exception):
        RecoverSettings(teacher_topk=-1)
    assert json.loads(RecoverSettings().model_dump_json())["teacher_topk"] == 0
