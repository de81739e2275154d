"""EMA of the model weights, shared by pretraining (Accelerate) and fine-tuning (Trainer): timm's `ModelEmaV3`.

The authors keep an EMA copy (decay 0.9999) beside the online weights in both recipes, updated once per optimizer
step, in float32 whatever the training dtype, starting from the initial weights. `create_ema` builds exactly that
(an `nn.Module`, so `accelerator.register_for_checkpointing` saves and restores it); the helpers below add the
file format of our checkpoints (`ema.safetensors`, the model's own key names) and a swap for evaluation.
"""

from __future__ import annotations

import contextlib
import os

import torch
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3
from torch import nn


def sharded_parameter_name(model: nn.Module) -> str | None:
    """The name of a parameter that holds a shard of the weights rather than all of them (FSDP2's DTensor, FSDP1's
    flat parameter, DeepSpeed ZeRO-3's partitioned parameter), or None when every process has full weights."""
    for name, parameter in model.named_parameters():
        dtensor, fsdp1_flat, zero3_partitioned = (hasattr(parameter, "device_mesh"),
                                                  getattr(parameter, "_is_flat_param", False),
                                                  hasattr(parameter, "ds_id"))
        if dtensor or fsdp1_flat or zero3_partitioned:
            return name
    return None


def create_ema(model: nn.Module, decay: float = 0.9999, device=None) -> ModelEmaV3:
    """An fp32 EMA copy of `model` (default: on the model's device; "cpu" saves accelerator memory).

    Call `ema.update(model)` once per optimizer step: `ema = decay * ema + (1 - decay) * weights`.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
    if (sharded := sharded_parameter_name(model)) is not None:
        raise ValueError(
            f"Cannot keep an EMA of a sharded model (parameter {sharded!r} holds only this process's shard, as under "
            "FSDP or DeepSpeed ZeRO-3): the EMA copies and averages full weights. Train without the EMA "
            "(--ema_decay 0, or leave --ema_decay out in pretraining), or with DDP or DeepSpeed ZeRO-2."
        )
    return ModelEmaV3(model, decay=decay, device=device, dtype=torch.float32)


def save_ema(ema: ModelEmaV3, path: str | os.PathLike) -> None:
    """Write the EMA weights as safetensors with the model's key names (loadable into the model itself)."""
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in ema.module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "ema_decay": str(ema.decay)})


def load_ema(ema: ModelEmaV3, path: str | os.PathLike) -> None:
    """Read EMA weights written by `save_ema` (every tensor of the model must be present)."""
    state = load_file(str(path))
    missing = set(ema.module.state_dict()) - set(state)
    if missing:
        raise KeyError(f"{path} lacks EMA tensors for {sorted(missing)[:5]} ({len(missing)} in all).")
    ema.module.load_state_dict(state)


@contextlib.contextmanager
def ema_weights(ema: ModelEmaV3, model: nn.Module):
    """Temporarily run `model` with the EMA weights (e.g. to evaluate them), restoring the online ones after."""
    backup = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(ema.module.state_dict())
    try:
        yield model
    finally:
        model.load_state_dict(backup)


__all__ = ["create_ema", "ema_weights", "load_ema", "save_ema", "sharded_parameter_name"]
