"""Model families of nepa-hf (one folder each, in transformers' `models/<family>/` layout)."""
