"""Training: NEPA pretraining pieces (objective, data wrappers, checkpoints, monitoring), the fine-tuning recipe for
`transformers.Trainer`, optimizer groups and schedules, and the EMA of the weights."""
