"""The recovery's settings (a pydantic schema; no torch): LoRA shape, loss, optimiser, schedule, data. One
declaration each: `pgprune recover`'s flags and :func:`pgprune.api.recover`'s keyword arguments are generated from
these fields (:func:`cli_flags`), their defaults are the defaults."""
from __future__ import annotations

from typing import Any, Literal, Mapping, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pgprune.errors import ConfigError, format_validation

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RecoverSettings(BaseModel):
    """Settings of a LoRA recovery run (validated; unknown fields are rejected)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    steps: int = Field(75, ge=1, description="optimizer steps")
    loss: Literal["lm", "kd"] = Field("kd", description="lm: next-token cross-entropy; kd: KL divergence to the "
                                      "dense teacher's next-token distribution (Hinton's T^2-scaled KL)")
    temperature: float = Field(1.0, gt=0, description="kd: softmax temperature of teacher and student")
    teacher_topk: int = Field(0, ge=0, description="kd: distil from the teacher's k most likely tokens (+ the rest "
                              "of its mass as one event), computed once per training block before the first step "
                              "(the pipeline shares them between its recovery cells: stage teacher) instead of "
                              "running the teacher every step; 0: the live teacher's whole distribution")
    rank: int = Field(16, ge=1, description="LoRA rank r")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout on the adapters' input")
    target_modules: list[Literal[PROJECTIONS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(PROJECTIONS), description="projections that get adapters (a layer's "
        "projection with no kept input or output unit gets none)")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the adapters")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate schedule after "
                                                               "the warm-up (to 0 at the last step)")
    warmup_ratio: float = Field(0.05, ge=0, le=0.5, description="linear warm-up over this fraction of the steps")
    batch_size: int = Field(8, ge=1, description="blocks per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    seq_len: int = Field(128, ge=8, description="tokens per training block")
    max_blocks: int = Field(4096, ge=1, description="training blocks taken from the text (consecutive, "
                            "non-overlapping; the first ones); epochs repeat them in a new order")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0: none)")
    seed: int = Field(0, description="seed of the adapters' initialisation, the data order and dropout")
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints (0: only when interrupted)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less "
                                         "memory, ~30% more time)")
    autocast: Literal["auto", "none", "bfloat16"] = Field("auto", description="auto: bfloat16 autocast on CUDA, "
                                                          "none on CPU")
    teacher_autocast: Literal["auto", "none", "bfloat16"] = Field(
        "auto", description="the live kd teacher's forward: bfloat16 autocast, none (the teacher's dtype), or auto: "
        "bfloat16 where the device computes it natively (CUDA with bf16; a CPU with AMX or AVX512-BF16), else none; "
        "its logits enter the KL in float32 (the top-k cache, teacher_topk, runs the teacher in its dtype)")

    @model_validator(mode="after")
    def _consistent(self):
        if not self.target_modules:
            raise ValueError(f"target_modules is empty; allowed: a non-empty subset of {', '.join(PROJECTIONS)}")
        return self

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_ratio * self.steps)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None = None, **overrides) -> "RecoverSettings":
        """Validate a mapping plus keyword overrides (None values are skipped), raising ConfigError that names
        each bad field, its value and what is allowed."""
        merged = {**dict(data or {}), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return cls.model_validate(merged)
        except ValidationError as e:
            raise ConfigError(f"invalid recovery settings: {format_validation(e)}") from None


def cli_flags() -> list[tuple[str, dict]]:
    """(flag, argparse keyword arguments) of every setting: `pgprune recover` adds exactly these (default None:
    the setting's default applies). Lists take several values; booleans take true/false."""
    out = []
    for name, f in RecoverSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not None else f.default
        kw: dict[str, Any] = {"dest": f"rec_{name}", "default": None,  # argparse formats help with %
                              "help": f"{f.description} (default {default})".replace("%", "%%")}
        ann = f.annotation
        literal = get_args(get_args(ann)[0] if get_origin(ann) is list else ann)
        if literal and all(isinstance(x, str) for x in literal):
            kw["choices"] = literal
        if ann is bool:
            kw["type"] = _bool
            kw["metavar"] = "true|false"
        elif isinstance(default, list):
            kw["nargs"] = "+"
            kw["metavar"] = "NAME"
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            kw["type"] = type(default)
            kw["metavar"] = "N" if isinstance(default, int) else "X"
        out.append((flag, kw))
    return out


def _bool(v: str) -> bool:
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise ValueError(v)


def from_cli(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The settings given on the command line ({field: value}) from an argparse namespace's vars."""
    return {name: namespace[f"rec_{name}"] for name in RecoverSettings.model_fields
            if namespace.get(f"rec_{name}") is not None}


__all__ = ["PROJECTIONS", "RecoverSettings", "cli_flags", "from_cli"]
