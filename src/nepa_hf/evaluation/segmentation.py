# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Semantic-segmentation helpers: whole-image and sliding-window inference, layer-wise lr decay param groups.

They work with `NepaForSemanticSegmentation` and with transformers' `UperNetForSemanticSegmentation` on a
`NepaBackbone` (any model whose output has `.logits` of shape (B, num_labels, h, w)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["whole_inference", "sliding_window_inference"]


def _patch_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "backbone_config", None) or config
    patch = getattr(config, "patch_size", 1)
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


@torch.no_grad()
def whole_inference(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits for whole images at the input resolution: (B, num_labels, H, W).

    Images whose sides are not multiples of the patch size are zero-padded at the bottom/right (zero is the mean
    colour after normalisation) and the logits cropped back, so any size works.
    """
    height, width = pixel_values.shape[-2:]
    patch = _patch_size(model)
    pad_h, pad_w = (-height) % patch, (-width) % patch
    padded = F.pad(pixel_values, (0, pad_w, 0, pad_h)) if pad_h or pad_w else pixel_values
    logits = model(pixel_values=padded).logits
    logits = F.interpolate(logits.float(), size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :height, :width]


@torch.no_grad()
def sliding_window_inference(
    model: nn.Module,
    pixel_values: torch.Tensor,
    window_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits for large images from overlapping windows (mmsegmentation's "slide" mode): (B, num_labels, H, W).

    Windows of `window_size` (the training crop size, typically) move by `stride` (default: 2/3 of the window);
    the last row/column is aligned with the image border. Each window goes through `whole_inference` and the
    logits of overlapping windows are averaged. A window that covers the whole image gives exactly
    `whole_inference`.
    """
    window_h, window_w = (window_size, window_size) if isinstance(window_size, int) else window_size
    if stride is None:
        stride = (max(1, window_h * 2 // 3), max(1, window_w * 2 // 3))
    stride_h, stride_w = (stride, stride) if isinstance(stride, int) else stride
    if min(window_h, window_w, stride_h, stride_w) < 1:
        raise ValueError(f"window_size and stride must be positive, got {window_size} and {stride}.")
    height, width = pixel_values.shape[-2:]
    rows = max(height - window_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - window_w + stride_w - 1, 0) // stride_w + 1

    logits_sum, counts = None, pixel_values.new_zeros((1, 1, height, width))
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride_h + window_h, height), min(col * stride_w + window_w, width)
            top, left = max(bottom - window_h, 0), max(right - window_w, 0)
            window_logits = whole_inference(model, pixel_values[..., top:bottom, left:right])
            if logits_sum is None:
                logits_sum = window_logits.new_zeros((pixel_values.shape[0], window_logits.shape[1], height, width))
            logits_sum[..., top:bottom, left:right] += window_logits
            counts[..., top:bottom, left:right] += 1
    return logits_sum / counts


