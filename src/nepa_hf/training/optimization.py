# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Optimizer groups, learning rates and schedules of the NEPA recipes, each rule written once.

- Weight decay, one rule for both recipes. Pretraining (the authors' Trainer rule): decay on every parameter EXCEPT
  those whose lower-cased name matches `bias`, `layernorm`, `rmsnorm`, `layer_scale`, a module named `norm` (or
  `norm1`, `norm2`, ...: our blocks' norms) or `*_norm`, and the parameters of `nn.LayerNorm` modules. So the CLS
  token (and a mask token), the patch-embedding weight and every linear weight are decayed; LayerScale, every norm
  and every bias are not. Fine-tuning: the parameters with more than one dimension that the pretraining rule decays
  (the CLS token `[1, 1, D]` is decayed, 1-D parameters never are). `weight_decay_flags(model, finetuning=...)`
  applies it to a whole model; `pretraining_param_groups` and the fine-tuning `layer_decay_parameter_groups` read it.
- Pretraining: AdamW (0.9, 0.95) over `pretraining_param_groups`, lr = base x global batch / 256
  (`scaled_learning_rate`), linear warmup from 0 over `warmup_steps_for(total, 0.025)` steps then cosine to 0 at the
  last step: exactly transformers' `get_cosine_schedule_with_warmup`, which the pretraining script uses.
- Fine-tuning: the authors' per-group schedule, `get_layerwise_cosine_schedule` (groups with a small layer-decay
  factor warm up longest), with their warmup length `reference_warmup_steps` (int(ratio x total)).
"""

from __future__ import annotations

import math
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


def pretraining_param_groups(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """Two AdamW groups of the authors' pretraining recipe (`weight_decay_flags`): every parameter with
    `weight_decay` (CLS/mask token, patch embedding, linear weights) except biases, norms and LayerScale, which get
    none. Frozen parameters are left out."""
    flags = weight_decay_flags(model)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if flags[name] else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_pretraining_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.05,
                                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with the authors' betas (0.9, 0.95) over `pretraining_param_groups`."""
    return torch.optim.AdamW(pretraining_param_groups(model, weight_decay), lr=learning_rate, betas=betas, eps=eps)


def scaled_learning_rate(base_learning_rate: float, global_batch_size: int, reference_batch_size: int = 256) -> float:
    """The authors' linear scaling rule: lr = base_lr x global batch / 256."""
    return base_learning_rate * global_batch_size / reference_batch_size


def warmup_steps_for(num_training_steps: int, warmup_ratio: float) -> int:
    """Pretraining warmup steps for a ratio of the run, rounded up (at least 1 when the ratio is positive)."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
    return max(1, math.ceil(warmup_ratio * num_training_steps)) if warmup_ratio > 0 else 0


def reference_warmup_steps(warmup: float, num_training_steps: int) -> int:
    """The authors' fine-tuning warmup W: `int(warmup * num_training_steps)` (rounded down) for a ratio
    `warmup < 1`, else `int(warmup)` steps. (transformers' `TrainingArguments.get_warmup_steps` rounds a ratio up: 21
    for 0.2 x 101.)"""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}.")
    return int(warmup) if warmup >= 1 else int(warmup * num_training_steps)


def layerwise_warmup_steps(num_warmup_steps: int, lr_scale: float, num_training_steps: int) -> int:
    """Warmup length of a group with lr factor f, the authors' per-group rule: max(1, W - round(W * min(f, 1))), so
    even with W = 0 (or f = 1) there is one warmup step and every lr is 0 at step 0; capped at `num_training_steps`."""
    steps = num_warmup_steps - int(round(num_warmup_steps * min(max(lr_scale, 0.0), 1.0)))
    return max(1, min(steps, num_training_steps))


def layerwise_lr_multiplier(step: int, warmup_steps: int, num_training_steps: int) -> float:
    """Linear warmup from 0 over `warmup_steps`, then cosine from 1 to 0 at `num_training_steps`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if step >= num_training_steps:
        return 0.0
    progress = (step - warmup_steps) / max(1, num_training_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def get_layerwise_cosine_schedule(
    optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_training_steps: int, last_epoch: int = -1
) -> torch.optim.lr_scheduler.LambdaLR:
    """The authors' fine-tuning schedule: each group warms up linearly from 0 over `layerwise_warmup_steps(W,
    lr_scale)` steps (deep-in-the-network groups with small factors warm up longest, the head, fc_norm and the last
    block in one step), then decays with a cosine to 0 at `num_training_steps`; every lr is 0 at step 0. Group lrs
    already include their factor (see `layer_decay_parameter_groups`); groups without `lr_scale` count as factor 1.
    W is a number of steps: `reference_warmup_steps(ratio, total)` gives their int(ratio x total)."""
    if num_training_steps <= 0:
        raise ValueError(f"num_training_steps must be > 0, got {num_training_steps}.")
    lambdas = []
    for group in optimizer.param_groups:
        warmup = layerwise_warmup_steps(num_warmup_steps, float(group.get("lr_scale", 1.0)), num_training_steps)
        lambdas.append(lambda step, warmup=warmup: layerwise_lr_multiplier(step, warmup, num_training_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas, last_epoch=last_epoch)

__all__ = [
    "NO_WEIGHT_DECAY_MODULES",
    "NO_WEIGHT_DECAY_NAMES",
    "create_pretraining_optimizer",
    "decays_in_finetuning",
    "decays_in_pretraining",
    "get_layerwise_cosine_schedule",
    "layerwise_lr_multiplier",
    "layerwise_warmup_steps",
    "pretraining_param_groups",
    "reference_warmup_steps",
    "scaled_learning_rate",
    "warmup_steps_for",
    "weight_decay_flags",
]
