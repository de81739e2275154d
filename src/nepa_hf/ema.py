"""Exponential moving average of model weights, shared by pretraining (Accelerate) and fine-tuning (Trainer).

The reference keeps an EMA copy (decay 0.9999) next to the online weights in both recipes. The shadow copy is
float32 whatever the training dtype, lives on the model's device unless told otherwise, and has the
`state_dict`/`load_state_dict` pair that `accelerator.register_for_checkpointing` and checkpoint files need.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn


class ModelEMA:
    """EMA of a model's floating-point parameters and buffers: `ema = decay * ema + (1 - decay) * weights`.

    Args:
        model: the (unwrapped) model to track.
        decay: EMA decay per update.
        warmup: if True, use `min(decay, (1 + n) / (10 + n))` for the n-th update, so early EMA weights are not
            dominated by the random init (off by default, as in the reference).
        device: where to keep the shadow copy (default: the model's device; "cpu" saves accelerator memory).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False, device=None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        self.decay = decay
        self.warmup = warmup
        self.device = device
        self.num_updates = 0
        self.shadow = {
            name: tensor.detach().to(device=device, dtype=torch.float32, copy=True)
            for name, tensor in model.state_dict().items()
            if tensor.is_floating_point()
        }

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from the model's current weights (call once per optimizer step)."""
        decay = self.current_decay()
        state = model.state_dict()
        shadow, online = [], []
        for name, ema_tensor in self.shadow.items():
            if name not in state:
                raise KeyError(f"EMA tracks {name!r} but the model has no such tensor: was the model changed?")
            shadow.append(ema_tensor)
            online.append(state[name].detach().to(device=ema_tensor.device, dtype=torch.float32))
        torch._foreach_lerp_(shadow, online, 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into `model` (cast to each tensor's dtype and device)."""
        state = model.state_dict()
        for name, ema_tensor in self.shadow.items():
            state[name].copy_(ema_tensor.to(device=state[name].device, dtype=state[name].dtype))

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module):
        """Temporarily run `model` with the EMA weights (e.g. to evaluate them), restoring the online ones after."""
        backup = {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            state = model.state_dict()
            with torch.no_grad():
                for name, tensor in backup.items():
                    state[name].copy_(tensor)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks tensors for {sorted(missing)[:5]}... ({len(missing)} in all).")
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        for name, tensor in state["shadow"].items():
            self.shadow[name] = tensor.to(device=self.device, dtype=torch.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Write the EMA weights as a safetensors file with the model's own key names."""
        from safetensors.torch import save_file

        save_file({name: tensor.contiguous().cpu() for name, tensor in self.shadow.items()}, str(path),
                  metadata={"format": "pt", "ema_decay": str(self.decay), "ema_updates": str(self.num_updates)})

    def load(self, path: str | os.PathLike) -> None:
        """Read EMA weights written by `save`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        self.load_state_dict(
            {
                "decay": float(metadata.get("ema_decay", self.decay)),
                "warmup": self.warmup,
                "num_updates": int(metadata.get("ema_updates", 0)),
                "shadow": load_file(str(path)),
            }
        )


__all__ = ["ModelEMA"]
