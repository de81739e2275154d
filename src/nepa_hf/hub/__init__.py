"""Hub tools: model cards, publishing (assemble, validate, upload; `write_remote_code`), loading for the scripts
(`loading.load_pretrained`) and `python -m nepa_hf.hub.convert`, the bundle's converter
(`nepa_hf.models.nepa.convert_nepa`) plus a model card and every head's remote code."""
