"""Recovery (LoRA after pruning): merging keeps the peft model's logits, the recovered folders load as they came
(uniform without remote code), recovery lowers the loss on text it did not train on, kill and resume give the
same bytes, kd with the student as its own teacher is exactly 0, bad input is one line."""
import json

import pytest
import torch
from conftest import TINY_TEXT, cli_fails, make_tiny_model

import pgprune
from pgprune.api import recover
from pgprune.errors import PgpruneError
from pgprune.recovery import lora
from pgprune.recovery.lora import add_adapters, kd_loss, lm_loss, recover_model
from pgprune.recovery.settings import RecoverSettings

pytest.importorskip("peft")

SMALL = {"data": {"seq_len": 16, "calib_blocks": 24, "seed": 0}, "init": {"nsamples": 8, "batch_size": 4},
         "refit": {"blocks": 12, "batch_size": 4}, "eval": {"ppl_seq_len": 16, "ppl_blocks": 8}}
FAST = dict(seq_len=16, batch_size=4, warmup_ratio=0, lr=1e-2, loss="lm", max_blocks=64)


def _blocks(tokenizer, text=TINY_TEXT, seq_len=16):
    from pgprune.data import tokenize_blocks

    return tokenize_blocks(text, tokenizer, seq_len)


def _state_bytes(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def pruned_uniform(tiny_tokenizer):
    return pgprune.prune(make_tiny_model("llama"), tiny_tokenizer, sparsity=0.5, method="flap", layout="uniform",
                         calibration=TINY_TEXT, config=SMALL, progress=False)


@pytest.fixture
def pruned_hetero(tiny_tokenizer):
    return pgprune.prune(make_tiny_model("llama"), tiny_tokenizer, sparsity=0.5, method="flap",
                         layout="heterogeneous", calibration=TINY_TEXT, config=SMALL, progress=False)


def test_merged_model_equals_the_peft_model(pruned_hetero, tiny_tokenizer):
    import copy

    student = copy.deepcopy(pruned_hetero.model)
    peft_model = add_adapters(student, RecoverSettings(rank=4, alpha=8))
    with torch.no_grad():  # non-zero B: the adapters change the output
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = _blocks(tiny_tokenizer)[:3]
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        assert (unmerged - pruned_hetero.model(input_ids=ids).logits).abs().max() > 1e-3
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert (merged - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["uniform", "heterogeneous"])
def test_recovered_folder_loads_as_it_came(layout, pruned_uniform, pruned_hetero, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    res = pruned_uniform if layout == "uniform" else pruned_hetero
    assert res.layout == layout
    rec = recover(res, data=TINY_TEXT, config=SMALL, progress=False, steps=4, **{**FAST, "loss": "kd"},
                          teacher=make_tiny_model("llama"))
    saved = rec.save(tmp_path / "r")
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"config.json", "model.safetensors", "masks.json", "README.md", "recovery.json"} <= files
    assert ("modeling_pgprune.py" in files) == (layout == "heterogeneous")
    assert saved.plan.layout == layout
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert ("auto_map" in cfg) == (layout == "heterogeneous")  # the uniform layout loads without remote code
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "r", trust_remote_code=layout == "heterogeneous").eval()
    ids = _blocks(tiny_tokenizer)[:2]
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, rec.model(input_ids=ids).logits, atol=1e-5)
        assert (rec.model(input_ids=ids).logits - res.model(input_ids=ids).logits).abs().max() > 1e-4
    card = (tmp_path / "r" / "README.md").read_text()
    assert "## Recovery" in card and "distillation" in card and "4 ×" in card
    record = json.loads((tmp_path / "r" / "recovery.json").read_text())
    assert record["settings"]["steps"] == 4 and len(record["losses"]) == 4


def test_recovery_lowers_the_loss_on_text_it_did_not_train_on(pruned_hetero, tiny_tokenizer):
    from pgprune.eval.perplexity import perplexity

    words = TINY_TEXT.split()
    train_text = " ".join(words[: len(words) * 3 // 4])
    held = _blocks(tiny_tokenizer, " ".join(words[len(words) * 3 // 4:]))
    before = perplexity(pruned_hetero.model, held, progress=False)["ppl"]
    rec = recover(pruned_hetero, data=train_text, config=SMALL, progress=False, steps=30, **FAST)
    after = perplexity(rec.model, held, progress=False)["ppl"]
    assert after < 0.7 * before, (before, after)
    assert rec.info["losses"][-1] < rec.info["losses"][0]
    # the PruneResult's own model is untouched (a copy was tuned)
    assert perplexity(pruned_hetero.model, held, progress=False)["ppl"] == pytest.approx(before)


def test_kd_with_the_student_as_teacher_is_zero(pruned_hetero, tiny_tokenizer):
    import copy

    teacher = copy.deepcopy(pruned_hetero.model)
    rec = recover_model(copy.deepcopy(pruned_hetero.model), _blocks(tiny_tokenizer),
                        RecoverSettings(**{**FAST, "loss": "kd"}, steps=2, teacher_autocast="none"), teacher=teacher,
                        progress=False)
    assert rec.info["losses"][0] == 0.0
    # the teacher in bfloat16 (teacher_autocast; auto where the CPU has AMX/AVX512-BF16): the student's own
    # distribution up to bf16 rounding, so a small positive KL
    rec16 = recover_model(copy.deepcopy(pruned_hetero.model), _blocks(tiny_tokenizer),
                          RecoverSettings(**{**FAST, "loss": "kd"}, steps=2, teacher_autocast="bfloat16"),
                          teacher=teacher, progress=False)
    assert 0.0 < rec16.info["losses"][0] < 1e-2
    logits = torch.randn(2, 5, 11)
    assert kd_loss(logits, logits, 2.0).item() == 0.0
    assert kd_loss(logits, torch.randn(2, 5, 11), 2.0).item() > 0


def test_lm_loss_is_next_token_cross_entropy():
    logits = torch.zeros(1, 4, 10)  # uniform: log(10) per token
    assert lm_loss(logits, torch.tensor([[1, 2, 3, 4]])).item() == pytest.approx(torch.log(torch.tensor(10.)).item())


def test_kill_and_resume_give_the_same_bytes(pruned_hetero, tiny_tokenizer, tmp_path, monkeypatch):
    import copy

    blocks = _blocks(tiny_tokenizer)
    s = RecoverSettings(**FAST, steps=6, checkpoint_every=2, dropout=0.1)
    whole = recover_model(copy.deepcopy(pruned_hetero.model), blocks, s, progress=False)

    calls = {"n": 0}
    real = lora.lm_loss

    def dies_in_step_5(logits, ids):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(logits, ids)

    monkeypatch.setattr(lora, "lm_loss", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt, match="checkpoint at step 4"):
        recover_model(copy.deepcopy(pruned_hetero.model), blocks, s, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(lora, "lm_loss", real)
    # other settings do not take this checkpoint
    other = recover_model(copy.deepcopy(pruned_hetero.model), blocks, s.model_copy(update={"lr": 5e-3}),
                          checkpoint_dir=tmp_path, progress=False)
    assert other.info["resumed_from_step"] == 0
    resumed = recover_model(copy.deepcopy(pruned_hetero.model), blocks, s, checkpoint_dir=tmp_path, progress=False)
    assert resumed.info["resumed_from_step"] == 4
    assert resumed.info["losses"] == whole.info["losses"]
    a, b = _state_bytes(whole.model), _state_bytes(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(tmp_path.iterdir())  # the finished run removed its checkpoint


def test_nan_loss_stops_with_the_step(pruned_hetero, tiny_tokenizer):
    import copy

    def nan_teacher(ids):
        return torch.full((*ids.shape, 300), float("nan"))

    with pytest.raises(PgpruneError, match="loss is nan at step 0.*no checkpoint"):
        recover_model(copy.deepcopy(pruned_hetero.model), _blocks(tiny_tokenizer),
                      RecoverSettings(**{**FAST, "loss": "kd"}, steps=2), teacher=nan_teacher, progress=False)


def test_settings_are_validated():
    with pytest.raises(PgpruneError, match="rank"):
        RecoverSettings.parse(rank=0)
    with pytest.raises(PgpruneError, match="target_modules"):
        RecoverSettings.parse(target_modules=["lm_head"])
    with pytest.raises(PgpruneError, match="warmup_ratio"):
        RecoverSettings.parse(warmup_ratio=0.9)
    assert RecoverSettings.parse(steps=3).warmup_steps == 0 and RecoverSettings(steps=100).warmup_steps == 5


def test_cli_recovers_a_folder_and_rejects_bad_input(pruned_uniform, tiny_tokenizer, tmp_path, capsys):
    from pgprune import cli

    with pytest.raises(SystemExit) as help_exit:
        cli.main(["recover", "--help"])
    assert help_exit.value.code == 0 and "--gradient-checkpointing" in capsys.readouterr().out

    pruned_uniform.save(tmp_path / "m")
    text = tmp_path / "train.txt"
    text.write_text(TINY_TEXT)
    argv = ["recover", str(tmp_path / "m"), "--out", str(tmp_path / "r"), "--calibration", str(text), "--loss", "lm",
            "--steps", "3", "--seq-len", "16", "--batch-size", "2", "--eval-ppl", str(text),
            "--blocks", "4", "--json", "-q"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 3 and out["resumed_from_step"] == 0
    (before, after), = out["evaluation"].values()
    assert after < before
    assert "Perplexity" in (tmp_path / "r" / "README.md").read_text()
    assert not (tmp_path / "r.checkpoints").exists()
    cli_fails(capsys, ["recover", tmp_path / "nope", "--out", tmp_path / "x"], "nope", "not found")
    cli_fails(capsys, ["recover", tmp_path / "m", "--out", tmp_path / "x", "--rank", "0"], "rank")
    cli_fails(capsys, ["recover", tmp_path / "m", "--out", tmp_path / "x", "--loss", "kd", "--calibration",
                       text, "--steps", "2"], "--teacher")
    assert not (tmp_path / "x").exists()


def test_prune_then_recover_in_one_command(tiny_tokenizer, tmp_path, capsys):
    from pgprune import cli

    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    text = tmp_path / "calib.txt"
    text.write_text(TINY_TEXT)
    cfg = tmp_path / "p.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(SMALL))
    assert cli.main(["prune", "--model", str(tmp_path / "base"), "--sparsity", "0.5", "--method", "flap",
                     "--calibration", str(text), "--config", str(cfg), "--out", str(tmp_path / "o"),
                     "--recover-steps", "3", "--format", "gguf", "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["recovery"]["steps"] == 3 and summary["gguf"].endswith("model.gguf")
    assert (tmp_path / "o" / "model.gguf").stat().st_size > 0
    record = json.loads((tmp_path / "o" / "recovery.json").read_text())
    assert record["settings"]["steps"] == 3 and record["settings"]["loss"] == "kd"
    assert record["losses"][0] > 0  # the dense teacher differs from the pruned student
    assert "## Recovery" in (tmp_path / "o" / "README.md").read_text()


def test_the_config_recover_section_is_the_default_and_keywords_win(pruned_hetero):
    """params.yaml's recover section is what pgprune.recover() (and `pgprune recover`) use; a keyword overrides it."""
    import pgprune
    from pgprune.config import Params

    assert pgprune.recover is recover and pgprune.RecoverResult.__name__ == "RecoverResult" and "recover" in dir(pgprune)
    assert Params().recover.settings() == RecoverSettings()  # the schema's defaults are the settings' defaults
    cfg = {**SMALL, "recover": {"steps": 2, "rank": 2, "loss": "lm", "batch_size": 2, "seq_len": 16}}
    rec = recover(pruned_hetero, data=TINY_TEXT, config=cfg, progress=False)
    assert rec.info["steps"] == 2 and rec.info["settings"]["rank"] == 2 and rec.info["settings"]["loss"] == "lm"
    rec = recover(pruned_hetero, data=TINY_TEXT, config=cfg, progress=False, steps=1)
    assert rec.info["steps"] == 1 and len(rec.info["losses"]) == 1 and rec.info["settings"]["rank"] == 2


@pytest.mark.gpu
def test_recovery_on_gpu_with_bf16_autocast(pruned_hetero, tiny_tokenizer):
    import copy

    student = copy.deepcopy(pruned_hetero.model).to("cuda")
    teacher = copy.deepcopy(pruned_hetero.model).to("cuda")
    rec = recover_model(student, _blocks(tiny_tokenizer), RecoverSettings(**{**FAST, "loss": "kd"}, steps=3,
                        gradient_checkpointing=True), teacher=teacher, progress=False)
    assert next(rec.model.parameters()).device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(x)) for x in rec.info["losses"])


@pytest.mark.parametrize("base", ["HuggingFaceTB/SmolLM2-135M", "embedded:smollm2-135m", "/data/models/llama"])
def test_the_teacher_is_the_base_model_the_card_records(base, pruned_uniform, tmp_path):
    from pgprune.recovery.folder import base_model_of, teacher_source

    pruned_uniform.save(tmp_path / "m", card={"base_model": base})
    assert teacher_source(tmp_path / "m", "other/teacher") == "other/teacher"
    if base.startswith("/"):  # the card shows a local folder by its last part: not loadable, say so
        assert base_model_of(tmp_path / "m") == "llama"
        with pytest.raises(PgpruneError, match="'llama'.*--teacher"):
            teacher_source(tmp_path / "m", None)
    else:
        assert base_model_of(tmp_path / "m") == base == teacher_source(tmp_path / "m", None)
    pruned_uniform.save(tmp_path / "n")  # a model of no recorded name
    assert base_model_of(tmp_path / "n") is None
    with pytest.raises(PgpruneError, match="records no base model.*--teacher"):
        teacher_source(tmp_path / "n", None)
