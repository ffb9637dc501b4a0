"""Recovery after pruning: a short LoRA tune (peft), with next-token loss or distillation from the dense model,
merged back into the pruned model's weights (:mod:`pgprune.recovery.lora`); the settings
(:mod:`pgprune.recovery.settings`), model folders in and out (:mod:`pgprune.recovery.folder`) and a run end to end
(:mod:`pgprune.recovery.run`). The front doors are `pgprune recover`, `pgprune prune --recover-steps` and
:func:`pgprune.api.recover`. Needs the ``recover`` extra (peft)."""
