# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""`--config_overrides` of the example scripts: "field=value,field=value" -> `NepaConfig` constructor arguments.

transformers' `PreTrainedConfig.update_from_string` types a value like the field's current value, so it cannot set an
unset field (`pos_embed_shift=0.1`) or a list (`pool_scales`), and it changes a built config, after the constructor
has derived the backbone stages from `num_hidden_layers`. The scripts pass these values to the constructor instead.
"""

import dataclasses
import difflib
import types
import typing

from transformers import PreTrainedConfig

from ..data.images import patch_aligned_size
from ..models.nepa.configuration_nepa import NEPA_PRESETS, NepaConfig

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _typed(value: str, annotation) -> object:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = set(typing.get_args(annotation)) if union else {annotation}
    if type(None) in kinds and value.lower() in ("none", "null"):
        return None
    if any(kind in (list, tuple) or typing.get_origin(kind) in (list, tuple) for kind in kinds):
        return [int(entry) for entry in value.split(":")]
    if bool in kinds:
        if value.lower() not in _TRUE + _FALSE:
            raise ValueError(f"can't derive true or false from {value!r} (use true or false)")
        return value.lower() in _TRUE
    if float in kinds:
        return float(value)
    if int in kinds:
        return int(value)
    return value


def parse_config_overrides(text: str | None, config_class: type[PreTrainedConfig] = NepaConfig) -> dict:
    """`"hidden_size=64,pool_scales=1:2,pos_embed_shift=0.1"` -> `{"hidden_size": 64, "pool_scales": [1, 2],
    "pos_embed_shift": 0.1}`, for `NepaConfig(...)`, `from_preset` or `from_pretrained`; None or "" -> {}.

    Values are typed by the field's annotation: booleans true/false, numbers, strings, integer lists written `a:b:c`
    (`out_indices=2:4`), `none` for an optional field. The constructor then checks them. A bad item raises a
    ValueError that names it (and the closest field name for a misspelt one).
    """
    if not text:
        return {}
    # NEPA's fields are annotated with real types; PreTrainedConfig's (num_labels, problem_type, ...) with strings,
    # so those are typed by their default value, as transformers' `update_from_string` does.
    defaults = config_class()
    fields = {
        field.name: type(getattr(defaults, field.name)) if isinstance(field.type, str) else field.type
        for field in dataclasses.fields(config_class)
        if not field.name.startswith("_")
    }
    fields["out_indices"] = list[int]  # backbone stages: properties over `_out_indices`
    own_fields = sorted(set(fields) - {field.name for field in dataclasses.fields(PreTrainedConfig)})
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"Config override {item!r} is not of the form field=value.")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"Did you mean {close[0]!r}?" if close else f"NEPA's fields: {', '.join(own_fields)}."
            raise ValueError(f"Config override {item!r}: {key!r} is not a field of {config_class.__name__}. {hint}")
        try:
            overrides[key] = _typed(value, fields[key])
        except ValueError as error:
            raise ValueError(f"Config override {item!r}: {error}") from None
    return overrides


__all__ = ["parse_config_overrides"]


def preset_config(name: str, overrides: dict, image_size: int | None = None) -> NepaConfig:
    """A preset's `NepaConfig` with `overrides`; `image_size` (a script's --image_size) must be a multiple of the patch
    size the overrides give (the preset's otherwise) and is set before the config validates itself."""
    if image_size is not None and name in NEPA_PRESETS:
        patch_size = overrides.get("patch_size", NEPA_PRESETS[name]["patch_size"])
        overrides = {**overrides, "image_size": patch_aligned_size(image_size, patch_size)}
    return NepaConfig.from_preset(name, **overrides)
