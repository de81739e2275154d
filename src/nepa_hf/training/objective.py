# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""The NEPA pretraining objective as one module to hand to `accelerator.prepare`.

`NepaPretrainingObjective` wraps `NepaForPreTraining` (the negative-cosine next-embedding loss and its ablations:
shift, stop-gradient, causal mask, input masking, all read from the config) and optionally adds the hybrid
next-patch pixel loss of timm's NEPA task through a small MLP, `NepaPixelDecoder`. `readable_loss_weight` weights each
process's loss so that the gradient is the mean over the readable images of all processes (N processes train the
same model as one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers.utils import ModelOutput

PIXEL_DECODER_WEIGHTS = "pixel_decoder.safetensors"


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, num_patches, patch_size * patch_size * C), patches row-major like the patch embedding."""
    batch, channels, height, width = pixel_values.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation of pixel targets (zero mean, unit variance over each patch's values)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


class NepaPixelDecoder(nn.Module):
    """Small MLP that predicts the next patch's per-patch-normalised pixels from the model output at the
    previous position (timm NEPA's hybrid pixel loss). Used for training only; not part of the saved model.

    Args:
        hidden_size: NEPA hidden size.
        patch_size, num_channels: geometry of the predicted patches.
        decoder_hidden_size: width of the MLP (default: hidden_size).
        loss_type: "mse" or "l1".
    """

    def __init__(self, hidden_size: int, patch_size: int, num_channels: int = 3,
                 decoder_hidden_size: int | None = None, loss_type: str = "mse", initializer_range: float = 0.02):
        super().__init__()
        if loss_type not in ("mse", "l1"):
            raise ValueError(f"pixel loss_type must be 'mse' or 'l1', got {loss_type!r}.")
        self.patch_size = patch_size
        self.loss_type = loss_type
        decoder_hidden_size = decoder_hidden_size or hidden_size
        self.fc1 = nn.Linear(hidden_size, decoder_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(decoder_hidden_size, patch_size * patch_size * num_channels)
        for linear in (self.fc1, self.fc2):
            nn.init.trunc_normal_(linear.weight, std=initializer_range)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden_states: torch.Tensor, pixel_values: torch.Tensor, shift: bool = True) -> torch.Tensor:
        """Pixel loss for NEPA outputs `hidden_states` (B, 1 + N, D) of the images `pixel_values` (B, C, H, W).

        With `shift`, output t (CLS = 0) predicts patch t + 1, i.e. outputs 0..N-1 predict patches 1..N; without
        it each patch output predicts its own patch (the same-position ablation).
        """
        targets = normalize_patches(patchify(pixel_values.float(), self.patch_size))
        inputs = hidden_states[:, :-1] if shift else hidden_states[:, 1:]
        predictions = self.fc2(self.act(self.fc1(inputs))).float()
        if self.loss_type == "l1":
            return F.l1_loss(predictions, targets)
        return F.mse_loss(predictions, targets)


@dataclass
class NepaPretrainingObjectiveOutput(ModelOutput):
    """Output of `NepaPretrainingObjective`.

    Args:
        loss: the training loss, `embedding_loss + pixel_loss_weight * pixel_loss`.
        embedding_loss: NEPA's negative cosine next-embedding loss.
        pixel_loss: the hybrid pixel loss (None without a pixel decoder).
        last_hidden_state: the predictions `(batch, 1 + num_patches, hidden)`.
        input_embeddings: the targets.
    """

    loss: torch.FloatTensor | None = None
    embedding_loss: torch.FloatTensor | None = None
    pixel_loss: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    input_embeddings: torch.FloatTensor | None = None


class NepaPretrainingObjective(nn.Module):
    """`NepaForPreTraining` plus the optional hybrid pixel loss, as one module to hand to `accelerator.prepare`.

    The NEPA loss and its ablations (shift, stop-gradient, causal mask, input masking) come from the model's config;
    `pixel_loss_weight > 0` adds `NepaPixelDecoder`'s loss with that weight. `save_pretrained` saves the model and,
    beside it, the pixel decoder (a training-only head).
    """

    def __init__(self, model: nn.Module, pixel_loss_weight: float = 0.0, pixel_loss_type: str = "mse",
                 pixel_decoder_hidden_size: int | None = None):
        super().__init__()
        if pixel_loss_weight < 0:
            raise ValueError(f"pixel_loss_weight must be >= 0, got {pixel_loss_weight}.")
        self.model = model
        self.pixel_loss_weight = pixel_loss_weight
        config = model.config
        self.pixel_decoder = (
            NepaPixelDecoder(config.hidden_size, config.patch_size, config.num_channels, pixel_decoder_hidden_size,
                             pixel_loss_type, config.initializer_range)
            if pixel_loss_weight > 0 else None
        )
        # FSDP's transformer auto-wrap policy reads these from the root module.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    @property
    def config(self):
        return self.model.config

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
                **kwargs) -> NepaPretrainingObjectiveOutput:
        outputs = self.model(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)
        loss, pixel_loss = outputs.loss, None
        if self.pixel_decoder is not None:
            # Pixel targets stay clean whatever the input masking, like the embedding targets.
            pixel_loss = self.pixel_decoder(outputs.last_hidden_state, pixel_values,
                                            shift=self.model.config.pretraining_shift)
            loss = loss + self.pixel_loss_weight * pixel_loss
        return NepaPretrainingObjectiveOutput(
            loss=loss, embedding_loss=outputs.loss, pixel_loss=pixel_loss,
            last_hidden_state=outputs.last_hidden_state, input_embeddings=outputs.input_embeddings,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Save the model with `save_pretrained` (`AutoModelForPreTraining.from_pretrained(save_directory)` loads it)
        and the training-only pixel decoder, if any, as `pixel_decoder.safetensors` beside it. `state_dict`: the
        objective's full weights when they are not this module's own (e.g. `accelerator.get_state_dict(objective)`
        under FSDP or DeepSpeed)."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        self.model.save_pretrained(save_directory, state_dict={
            key[len("model."):]: value for key, value in state_dict.items() if key.startswith("model.")})
        if self.pixel_decoder is not None:
            save_file({key[len("pixel_decoder."):]: value.contiguous().cpu() for key, value in state_dict.items()
                       if key.startswith("pixel_decoder.")}, os.path.join(save_directory, PIXEL_DECODER_WEIGHTS))


def readable_loss_weight(valid: torch.Tensor, accelerator) -> torch.Tensor:
    """Factor for one process's mean loss over its readable images so that the gradient DDP averages over processes
    is the gradient of the mean over the readable images of the whole (global) micro-batch, as one process with
    the same global batch computes it: readable_here x num_processes / readable_everywhere.

    Without unreadable images the factor is exactly 1; a process whose images are all unreadable gets 0 (its
    placeholder forward contributes nothing). One scalar all-reduce per micro-batch, on the device (no host sync).
    """
    readable = valid.sum().to(torch.float32)
    everywhere = accelerator.reduce(readable, reduction="sum")
    return readable * accelerator.num_processes / everywhere.clamp(min=1.0)


__all__ = [
    "PIXEL_DECODER_WEIGHTS",
    "NepaPixelDecoder",
    "NepaPretrainingObjective",
    "NepaPretrainingObjectiveOutput",
    "normalize_patches",
    "patchify",
    "readable_loss_weight",
]
