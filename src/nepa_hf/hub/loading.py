# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Model loading for the command-line tools: `from_pretrained` with a damaged weight file named.

A truncated or corrupt `.safetensors` file (an interrupted download, copy or save) makes safetensors raise
`SafetensorError: Error while deserializing header: incomplete metadata, file not fully covered`, which names neither
the file nor the fix. The scripts load through `load_pretrained`, which does.
"""

from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers.utils import cached_file


def _weight_files(source, subfolder: str = "", **hub_kwargs) -> list[Path]:
    """The .safetensors files of a local folder, or of a Hub model's cached snapshot (no download)."""
    folder = Path(source) / subfolder
    if not folder.is_dir():
        config_file = cached_file(
            source, "config.json", subfolder=subfolder, local_files_only=True,
            _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
            **{key: hub_kwargs[key] for key in ("cache_dir", "revision") if key in hub_kwargs},
        )  # fmt: skip
        if config_file is None:
            return []
        folder = Path(config_file).parent
    return sorted(folder.glob("*.safetensors"))


def damaged_weight_files(source, **hub_kwargs) -> list[str]:
    """'<path> (<size> bytes): <safetensors error>' for each .safetensors file of `source` that does not open."""
    damaged = []
    for path in _weight_files(source, **hub_kwargs):
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as error:
            damaged.append(f"{path} ({path.stat().st_size:,} bytes): {error}")
    return damaged


def load_pretrained(model_class, source, **kwargs):
    """`model_class.from_pretrained(source, **kwargs)`; a damaged weight file raises an OSError naming it and the fix."""
    try:
        return model_class.from_pretrained(source, **kwargs)
    except SafetensorError as error:
        damaged = "; ".join(damaged_weight_files(source, **kwargs)) or f"a .safetensors file of {source}"
        raise OSError(
            f"Cannot load the weights of {source}: {damaged}. The file is incomplete or corrupt (e.g. an interrupted "
            "download, copy or save): download it again (force_download=True for a Hub model) or save the model "
            "again."
        ) from error


__all__ = ["damaged_weight_files", "load_pretrained"]
