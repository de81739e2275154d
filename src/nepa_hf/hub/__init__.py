"""Hub tools: model cards and publishing (assemble, validate, upload). Conversion of the authors' checkpoints lives
with the model: `python -m nepa_hf.models.nepa.convert_nepa`."""
