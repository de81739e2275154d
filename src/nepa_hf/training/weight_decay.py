# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""The one weight-decay rule of the NEPA recipes (the authors' training code), shared by pretraining and fine-tuning.

Pretraining (the authors' Trainer rule): weight decay on every parameter EXCEPT those whose lower-cased name matches
`bias`, `layernorm`, `rmsnorm`, `layer_scale`, a module named `norm` (or `norm1`, `norm2`, ...: our blocks' norms)
or `*_norm`, and the parameters of `nn.LayerNorm` modules. So the CLS token (and a mask token), the patch-embedding
weight and every linear weight are decayed; LayerScale, every norm and every bias are not.

Fine-tuning: weight decay on the parameters with more than one dimension that the pretraining rule decays (the CLS
token `[1, 1, D]` is decayed, 1-D parameters never are).

`weight_decay_flags(model, finetuning=...)` applies the rule to a whole model (it needs the modules for the
LayerNorm check); `pretraining_param_groups` and `layer_decay_parameter_groups` both read it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# Lower-cased parameter names matching any of these take no weight decay. The authors' list is transformers'
# Trainer one (bias, layernorm, rmsnorm, `norm`, `*_norm`) plus layer_scale; `norm\d*` also names our blocks'
# `norm1`/`norm2` (LayerNorm modules, which the module check excludes anyway), so the names alone give the rule.
NO_WEIGHT_DECAY_NAMES = (
    r"bias",
    r"layernorm",
    r"rmsnorm",
    r"layer_scale",
    r"(?:^|\.)norm\d*(?:$|\.)",
    r"_norm(?:$|\.)",
)
# Parameters of these modules (or of modules inside them) take no weight decay whatever their names.
NO_WEIGHT_DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm,)

_NO_WEIGHT_DECAY_PATTERNS = tuple(re.compile(pattern) for pattern in NO_WEIGHT_DECAY_NAMES)


def decays_in_pretraining(name: str, in_norm_module: bool = False) -> bool:
    """The pretraining rule for one parameter: False when its name matches `NO_WEIGHT_DECAY_NAMES` or it belongs to
    a LayerNorm module (`in_norm_module`), True otherwise (whatever its shape)."""
    if in_norm_module:
        return False
    lowered = name.lower()
    return not any(pattern.search(lowered) for pattern in _NO_WEIGHT_DECAY_PATTERNS)


def decays_in_finetuning(name: str, parameter: torch.Tensor, in_norm_module: bool = False) -> bool:
    """The fine-tuning rule for one parameter: more than one dimension and decayed by the pretraining rule."""
    return parameter.ndim > 1 and decays_in_pretraining(name, in_norm_module)


def _norm_module_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, module in model.named_modules()
                 if name and isinstance(module, NO_WEIGHT_DECAY_MODULES))


def weight_decay_flags(model: nn.Module, finetuning: bool = False) -> dict[str, bool]:
    """`{parameter name: takes weight decay}` for every parameter of `model` (frozen ones included), with the
    pretraining rule, or the fine-tuning rule when `finetuning` (see the module docstring)."""
    norm_prefixes = _norm_module_prefixes(model)
    flags = {}
    for name, parameter in model.named_parameters():
        in_norm = isinstance(model, NO_WEIGHT_DECAY_MODULES) or name.startswith(norm_prefixes)
        flags[name] = (decays_in_finetuning(name, parameter, in_norm) if finetuning
                       else decays_in_pretraining(name, in_norm))
    return flags


__all__ = [
    "NO_WEIGHT_DECAY_MODULES",
    "NO_WEIGHT_DECAY_NAMES",
    "decays_in_finetuning",
    "decays_in_pretraining",
    "weight_decay_flags",
]
