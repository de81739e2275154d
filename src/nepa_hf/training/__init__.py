"""Training: the NEPA pretraining objective (`objective`), optimizer groups, learning rates and schedules with the one
weight-decay rule (`optimization`), run monitoring and a JSON-lines tracker (`monitoring`), the pretraining script's
metrics bookkeeping (`pretraining_metrics`) and precision rule (`precision`), kill-safe checkpoints on Accelerate
(`checkpointing`), preemption and non-finite-step guards (`long_runs`; for the Trainer, `trainer_callbacks`), the
fine-tuning recipe for `transformers.Trainer` (`finetuning`), the EMA of the weights (`ema`) and the scripts'
`--config_overrides` parser (`config_overrides`). The pretraining data pipeline is in `nepa_hf.data.pretraining`."""
