"""Input pipelines without torchvision: per-sample decode/crop in DataLoader workers, batched ops on the device.

Per sample (cheap, CPU workers): any PIL image -> RGB -> random-resized crop (train) or resize/centre crop
(eval) -> uint8 tensor (3, H, W). uint8 keeps worker->main transfers 4x smaller than float.
Per batch (on the training device, kornia): to float in [0, 1] -> random horizontal flip -> (more augmentation
in fine-tuning) -> normalise with the image processor's mean/std.

Randomness comes from torch's generator, which DataLoader seeds per worker, so runs are reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import nn

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _resampling(name_or_value) -> Image.Resampling:
    if isinstance(name_or_value, str):
        if name_or_value not in RESAMPLING:
            raise ValueError(f"Unknown interpolation {name_or_value!r}; choose one of {sorted(RESAMPLING)}.")
        return RESAMPLING[name_or_value]
    return Image.Resampling(int(name_or_value))


def to_rgb(image) -> Image.Image:
    """Any PIL image (L, LA, P, RGBA, CMYK, I;16, I, F, ...) or HxW[xC] uint8 array -> RGB PIL image.

    16-bit and float modes are rescaled to 8 bits first (PIL's own conversion would clip them at 255).
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image or a numpy array, got {type(image).__name__}.")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        peak = 1.0 if image.mode == "F" and array.max(initial=0) <= 1.0 else (65535.0 if array.max(initial=0) > 255 else 255.0)
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator=None
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of a random crop covering `scale` of the area with aspect in `ratio`.

    The standard Inception-style sampling: 10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)), then a
    centre crop clamped to the ratio range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator).item())
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class RandomResizedCropTransform:
    """Per-sample train transform: RGB, RandomResizedCrop to `size`, optional flip -> uint8 (3, H, W) tensor.

    The reference pretraining uses scale (0.08, 1) and a horizontal flip; the flip can instead run batched on the
    device (`BatchAugment`), in which case pass `hflip_prob=0` here.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic", hflip_prob=0.0):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}.")
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = _resampling(interpolation)
        self.hflip_prob = hflip_prob

    def __call__(self, image, generator: torch.Generator | None = None) -> torch.Tensor:
        """`generator` (optional) drives the crop and flip draws, e.g. one seeded per sample so augmentations do not
        depend on worker or process count; without it torch's global (per-worker) generator is used."""
        image = to_rgb(image)
        top, left, crop_h, crop_w = random_resized_crop_box(
            image.height, image.width, self.scale, self.ratio, generator=generator
        )
        image = image.resize(
            (self.size[1], self.size[0]), self.interpolation, box=(left, top, left + crop_w, top + crop_h)
        )
        if self.hflip_prob > 0 and torch.rand(1, generator=generator).item() < self.hflip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_uint8_tensor(image)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation.name.lower()}, hflip_prob={self.hflip_prob})")


class ResizeTransform:
    """Per-sample eval transform -> uint8 (3, H, W): resize straight to `size` (the released checkpoints), or
    resize the shortest edge to `resize_size` and centre-crop `size` (the reference evaluation protocol)."""

    def __init__(self, size, resize_size: int | None = None, interpolation="bilinear"):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.resize_size = resize_size
        self.interpolation = _resampling(interpolation)

    def __call__(self, image) -> torch.Tensor:
        image = to_rgb(image)
        if self.resize_size is None:
            return pil_to_uint8_tensor(image.resize((self.size[1], self.size[0]), self.interpolation))
        short = min(image.width, image.height)
        new_w = max(1, round(image.width * self.resize_size / short))
        new_h = max(1, round(image.height * self.resize_size / short))
        image = image.resize((new_w, new_h), self.interpolation)
        top, left = (new_h - self.size[0]) // 2, (new_w - self.size[1]) // 2
        return pil_to_uint8_tensor(image.crop((left, top, left + self.size[1], top + self.size[0])))


class BatchAugment(nn.Module):
    """Batched, on-device part of the pipeline: uint8 batch -> float [0, 1] -> kornia augmentations -> normalise.

    Args:
        mean, std: normalisation (take them from the image processor: `processor.image_mean/image_std`).
        hflip_prob: probability of a horizontal flip per image (0 disables it).
        extra: more kornia augmentations on [0, 1] images, applied after the flip (e.g. RandAugment).
    """

    def __init__(self, mean, std, hflip_prob: float = 0.5, extra: list[nn.Module] | None = None):
        super().__init__()
        import kornia.augmentation as K

        ops = [K.RandomHorizontalFlip(p=hflip_prob)] if hflip_prob > 0 else []
        self.augment = nn.Sequential(*ops, *(extra or []))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if self.training and len(self.augment) > 0:
            images = self.augment(images)
        return (images - self.mean) / self.std


def batch_normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 or [0, 1] float batch -> normalised float batch (no augmentation)."""
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def processor_size(processor) -> tuple[int, int]:
    """(height, width) the image processor produces (crop size when it centre-crops)."""
    if getattr(processor, "do_center_crop", False) and processor.crop_size:
        crop = processor.crop_size
        return crop["height"], crop["width"]
    size = processor.size
    if "height" in size:
        return size["height"], size["width"]
    edge = size["shortest_edge"]
    return edge, edge


__all__ = [
    "BatchAugment",
    "RandomResizedCropTransform",
    "ResizeTransform",
    "batch_normalize",
    "pil_to_uint8_tensor",
    "processor_size",
    "random_resized_crop_box",
    "to_rgb",
]
