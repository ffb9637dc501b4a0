"""The search's own settings (a pydantic schema; no torch), extended by the pipeline's ``search`` section
(:class:`pgprune.config.SearchParams`)."""
from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pgprune.errors import ConfigError, format_validation


class SearchSettings(BaseModel):
    """Settings of the mask search itself (validated; unknown fields are rejected). The pipeline's ``search``
    section (pgprune.config.SearchParams) extends this class with the model-side settings: one declaration each."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    steps: int = Field(100, ge=1, description="total number of search steps T")
    samples: int = Field(2, ge=1, description="mask samples K per step")
    estimator: Literal["exact", "loo", "reference", "disarm"] = Field(
        "loo", description="loo: exact score, leave-one-out baseline (needs K >= 2); exact: the paper's estimator "
        "with an EMA baseline; reference: the reference code (sqrt denominator, needs K >= 2); disarm: antithetic "
        "pairs with the DisARM estimator (needs an even K)")
    baseline: Literal["ema", "none"] = "ema"
    ema_window: float = Field(5.0, ge=1.0, description="EMA window W (coefficient 1/W)")
    lr_schedule: Literal["cosine", "const", "linear", "poly", "exp", "step"] = "cosine"
    lr_milestones: list[int] = Field(default_factory=list,
                                     description="lr_schedule: step: steps at which the lr is multiplied by 0.1")
    lr_power: float = Field(0.9, gt=0, description="lr_schedule: poly: exponent")
    lr_gamma: float = Field(0.995, gt=0, description="lr_schedule: exp: factor per step")
    penalty_init: float = Field(-1.0, description="entropy-penalty weight at step 0; < 0 turns it off")
    penalty_final: float = 0.0
    eps: float = Field(1e-4, gt=0, lt=0.5, description="clamp of s in the exact score's denominator")
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints (0: only when interrupted)")
    max_consecutive_nan_steps: int = Field(20, ge=1)
    patience: int = Field(3, ge=0, description="early stop: the search ends once this many validations in a row "
                          "have not beaten the best validated loss (the best mask is kept; 0: run every step; "
                          "only with periodic validation: val_blocks and validate_every > 0)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.estimator in ("loo", "reference") and self.samples < 2:
            raise ValueError(f"samples={self.samples}: estimator {self.estimator!r} needs samples >= 2 "
                             "(set samples: 2 or more, or estimator: exact)")
        if self.estimator == "disarm" and (self.samples < 2 or self.samples % 2):
            raise ValueError(f"samples={self.samples}: estimator 'disarm' samples antithetic pairs and needs an even "
                             "number of samples >= 2")
        if self.lr_schedule == "step":
            bad = [m for m in self.lr_milestones if not 0 < m < self.steps]
            if not self.lr_milestones or bad:
                raise ValueError(f"lr_schedule 'step' needs lr_milestones: a non-empty list of steps in "
                                 f"(0, steps={self.steps}); got {self.lr_milestones}")
        elif self.lr_milestones:
            raise ValueError(f"lr_milestones={self.lr_milestones} is only used by lr_schedule 'step' "
                             f"(lr_schedule is {self.lr_schedule!r}); remove it")
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> "SearchSettings":
        """Validate a mapping, raising ConfigError that names each bad field."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise ConfigError(f"invalid search settings: {format_validation(e)}") from None
