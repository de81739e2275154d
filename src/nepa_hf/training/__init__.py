"""Training: the NEPA pretraining objective (`objective`), optimizer groups, learning rates and schedules with the one
weight-decay rule (`optimization`), run monitoring and a JSON-lines tracker (`monitoring`), kill-safe checkpoints on
Accelerate (`checkpointing`), the fine-tuning recipe for `transformers.Trainer` (`finetuning`) and the EMA of the
weights (`ema`). The pretraining data pipeline is in `nepa_hf.data.pretraining`."""
