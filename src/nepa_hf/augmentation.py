"""Fine-tuning augmentation of the reference recipe (§8), batched on the training device, without torchvision.

The reference fine-tunes with timm's pipeline: RandomResizedCrop + flip (per sample), RandAugment
"rand-m9-mstd0.5-inc1", random erasing (p 0.25, per-pixel noise), then Mixup 0.8 / CutMix 1.0 (switch prob 0.5)
with label smoothing 0.1 on the batch. Here the per-sample crop/flip stays in the DataLoader workers
(`nepa_hf.transforms.RandomResizedCropTransform`) and everything else runs on whole batches on the device:

    uint8 batch -> [0, 1] -> RandAugment -> normalise -> random erasing -> Mixup/CutMix (soft targets)

`ClassificationBatchTransform` chains them; `AugmentationArguments` builds the lot from command-line flags.
Every op draws its randomness per sample (as timm does per image) from torch's global generator.

Differences from timm, by construction: the ops work on float images instead of PIL uint8 images (posterize,
solarize and equalize quantise to 8 bits internally, so they match), geometric ops always use bilinear
resampling (timm picks bilinear or bicubic at random), and Mixup/CutMix run in timm's "batch" mode only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Magnitudes are on timm's 0..10 scale ("m9" = 9 / 10 of each op's range).
MAGNITUDE_SCALE = 10.0

RAND_AUGMENT_OPS = (
    "auto_contrast",
    "equalize",
    "invert",
    "rotate",
    "posterize",
    "solarize",
    "solarize_add",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)


# ----------------------------------------------------------------------------------------------------------------
# Image ops on float batches in [0, 1], shape (B, C, H, W); per-sample arguments are (B,) tensors.
# ----------------------------------------------------------------------------------------------------------------


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (PIL's "L" conversion), (B, 1, H, W)."""
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped to [0, 1]."""
    factor = factor.view(-1, 1, 1, 1)
    return (degenerate + factor * (images - degenerate)).clamp_(0.0, 1.0)


def _to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    return (images * 255.0).round_().clamp_(0, 255).to(torch.int32)


def auto_contrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to the full [0, 1] range (channels with one value are left alone)."""
    low = images.amin(dim=(2, 3), keepdim=True)
    high = images.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(high > low, 1.0 / (high - low).clamp_min(1e-12), torch.ones_like(high))
    offset = torch.where(high > low, low, torch.zeros_like(low))
    return ((images - offset) * scale).clamp_(0.0, 1.0)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation on 8-bit levels (PIL's ImageOps.equalize)."""
    from kornia.enhance import equalize as kornia_equalize

    return kornia_equalize(images.clamp(0.0, 1.0))


def invert(images: torch.Tensor) -> torch.Tensor:
    return 1.0 - images


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the `bits` most significant bits of each 8-bit value (0 bits gives black, as PIL does)."""
    bits = bits.to(torch.int32).clamp(0, 8).view(-1, 1, 1, 1)
    mask = (255 << (8 - bits)) & 255
    return (_to_uint8_levels(images) & mask).to(images.dtype) / 255.0


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert every 8-bit value >= threshold (threshold in 0..256; 256 leaves the image unchanged)."""
    levels = _to_uint8_levels(images)
    threshold = threshold.to(torch.int32).view(-1, 1, 1, 1)
    return torch.where(levels >= threshold, 255 - levels, levels).to(images.dtype) / 255.0


def solarize_add(images: torch.Tensor, addition: torch.Tensor, threshold: int = 128) -> torch.Tensor:
    """Add `addition` (8-bit units) to every value below `threshold`, saturating at 255."""
    levels = _to_uint8_levels(images)
    addition = addition.to(torch.int32).view(-1, 1, 1, 1)
    return torch.where(levels < threshold, (levels + addition).clamp_max(255), levels).to(images.dtype) / 255.0


def adjust_color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Color: blend with the grayscale image."""
    return _blend(_grayscale(images), images, factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Contrast: blend with the image's mean gray level."""
    mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(mean, images, factor)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Brightness: blend with black."""
    return _blend(torch.zeros_like(images[:, :1, :1, :1]), images, factor)


def adjust_sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Sharpness: blend with the image smoothed by PIL's SMOOTH kernel (borders kept)."""
    channels = images.shape[1]
    kernel = images.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = kernel.expand(channels, 1, 3, 3)
    smoothed = images.clone()
    if images.shape[-1] > 2 and images.shape[-2] > 2:
        smoothed[..., 1:-1, 1:-1] = F.conv2d(images, kernel, groups=channels)
    return _blend(smoothed, images, factor)


def affine_warp(images: torch.Tensor, inverse_matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Warp each image with a (B, 2, 3) matrix mapping OUTPUT pixel coordinates to INPUT ones (PIL's AFFINE data).

    Coordinates are continuous: the image covers [0, W] x [0, H], pixel centres at +0.5. Pixels that map outside
    the input take the `fill` colour (C,).
    """
    batch, _, height, width = images.shape
    dtype = images.dtype
    # normalised [-1, 1] (align_corners=False) <-> pixel coordinates
    to_pixels = images.new_tensor([[width / 2.0, 0.0, width / 2.0], [0.0, height / 2.0, height / 2.0], [0, 0, 1]])
    to_normalised = images.new_tensor([[2.0 / width, 0.0, -1.0], [0.0, 2.0 / height, -1.0], [0, 0, 1]])
    full = torch.cat([inverse_matrix.to(dtype), images.new_tensor([0.0, 0.0, 1.0]).expand(batch, 1, 3)], dim=1)
    theta = (to_normalised @ full @ to_pixels)[:, :2]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(
        torch.ones_like(images[:, :1]), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped + (1.0 - inside) * fill.to(dtype).view(1, -1, 1, 1)


def _affine(batch: int, device, dtype, a=0.0, b=0.0, c=0.0, d=0.0, e=0.0, f=0.0) -> torch.Tensor:
    """(B, 2, 3) matrices [[1 + a, b, c], [d, 1 + e, f]] from scalars or (B,) tensors."""

    def column(value):
        return torch.as_tensor(value, device=device, dtype=dtype).expand(batch)

    first = torch.stack([1.0 + column(a), column(b), column(c)], dim=-1)
    second = torch.stack([column(d), 1.0 + column(e), column(f)], dim=-1)
    return torch.stack([first, second], dim=1)


def rotate(images: torch.Tensor, degrees: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Rotate counter-clockwise by `degrees` about the image centre (PIL's Image.rotate)."""
    batch, _, height, width = images.shape
    angle = -torch.deg2rad(degrees.to(images.dtype))
    cos, sin = angle.cos(), angle.sin()
    center_x, center_y = width / 2.0, height / 2.0
    # input = M (output - centre) + centre, M = [[cos, sin], [-sin, cos]]
    matrix = torch.stack(
        [
            torch.stack([cos, sin, center_x - cos * center_x - sin * center_y], dim=-1),
            torch.stack([-sin, cos, center_y + sin * center_x - cos * center_y], dim=-1),
        ],
        dim=1,
    )
    return affine_warp(images, matrix, fill)


def shear_x(images: torch.Tensor, factor: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    batch = images.shape[0]
    return affine_warp(images, _affine(batch, images.device, images.dtype, b=factor), fill)


def shear_y(images: torch.Tensor, factor: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    batch = images.shape[0]
    return affine_warp(images, _affine(batch, images.device, images.dtype, d=factor), fill)


def translate_x(images: torch.Tensor, fraction: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Shift by `fraction` of the width (positive moves the content left, as timm's TranslateXRel)."""
    batch, width = images.shape[0], images.shape[-1]
    return affine_warp(images, _affine(batch, images.device, images.dtype, c=fraction * width), fill)


def translate_y(images: torch.Tensor, fraction: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    batch, height = images.shape[0], images.shape[-2]
    return affine_warp(images, _affine(batch, images.device, images.dtype, f=fraction * height), fill)


# ----------------------------------------------------------------------------------------------------------------
# RandAugment
# ----------------------------------------------------------------------------------------------------------------


class RandAugment(nn.Module):
    """Batched RandAugment with timm's semantics, drawn independently for every image.

    For each of `num_ops` layers every image picks one of the 15 ops uniformly (with replacement across layers)
    and applies it with probability `prob`, at a magnitude drawn from N(magnitude, magnitude_std) clipped to
    [0, magnitude_max] (uniform in [0, magnitude] when magnitude_std is inf). Magnitudes are on the 0..10 scale.
    Ranges at magnitude 10: rotate 30 deg, shear 0.3, translate `translate_pct` of the size, enhance factors
    1 -/+ 0.9, solarize-add 110 levels. With `increasing` (timm's "inc1", the reference), posterize and solarize
    get stronger with the magnitude and the enhance ops move away from 1 in a random direction.

    Input and output: float images in [0, 1], (B, C, H, W). Active only in training mode.

    Args:
        num_ops: ops per image ("n").
        magnitude: "m", 0..10.
        magnitude_std: "mstd"; 0 for a fixed magnitude, inf for uniform sampling.
        prob: probability of applying each chosen op (timm: 0.5).
        increasing: timm's "inc1" op variants.
        fill: colour of pixels uncovered by geometric ops, per channel in [0, 1] (timm: the normalisation mean).
        magnitude_max: upper clip of the sampled magnitude ("mmax").
        translate_pct: translation at magnitude 10, as a fraction of the image size.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        increasing: bool = True,
        fill: Sequence[float] = (0.5, 0.5, 0.5),
        magnitude_max: float = MAGNITUDE_SCALE,
        translate_pct: float = 0.45,
    ):
        super().__init__()
        if num_ops < 1:
            raise ValueError(f"num_ops must be >= 1, got {num_ops}.")
        if not 0 <= magnitude <= magnitude_max:
            raise ValueError(f"magnitude must be in [0, {magnitude_max}], got {magnitude}.")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}.")
        self.num_ops = num_ops
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.prob = prob
        self.increasing = increasing
        self.magnitude_max = float(magnitude_max)
        self.translate_pct = translate_pct
        self.register_buffer("fill", torch.tensor(fill, dtype=torch.float32), persistent=False)

    @classmethod
    def from_config_str(cls, config: str, **kwargs) -> "RandAugment":
        """Build from a timm-style string, e.g. "rand-m9-mstd0.5-inc1" (sections m, n, mstd, mmax, inc, p)."""
        sections = config.split("-")
        if sections[0] != "rand":
            raise ValueError(f"RandAugment config must start with 'rand', got {config!r} (e.g. 'rand-m9-mstd0.5-inc1').")
        options = {"increasing": False}
        names = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "mmax": "magnitude_max", "p": "prob"}
        for section in sections[1:]:
            match = re.fullmatch(r"([a-z]+)([0-9.]+|inf)", section)
            if match is None or match.group(1) not in (*names, "inc"):
                raise ValueError(f"Unknown RandAugment config section {section!r} in {config!r}.")
            key, value = match.groups()
            if key == "inc":
                options["increasing"] = bool(int(value))
            elif key == "n":
                options["num_ops"] = int(value)
            else:
                number = float(value)
                options[names[key]] = math.inf if key == "mstd" and number > 100 else number
        return cls(**{**options, **kwargs})

    def extra_repr(self) -> str:
        return (f"num_ops={self.num_ops}, magnitude={self.magnitude}, magnitude_std={self.magnitude_std}, "
                f"prob={self.prob}, increasing={self.increasing}")

    def _sample_magnitudes(self, count: int, device) -> torch.Tensor:
        if math.isinf(self.magnitude_std):
            levels = torch.rand(count, device=device) * self.magnitude
        elif self.magnitude_std > 0:
            levels = self.magnitude + self.magnitude_std * torch.randn(count, device=device)
        else:
            levels = torch.full((count,), self.magnitude, device=device)
        return levels.clamp(0.0, self.magnitude_max) / MAGNITUDE_SCALE

    def _enhance_factor(self, level: torch.Tensor) -> torch.Tensor:
        if self.increasing:
            return (1.0 + _random_sign(level) * level * 0.9).clamp_min(0.1)
        return level * 1.8 + 0.1

    def apply_op(self, name: str, images: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Apply op `name` to every image of the batch at per-image levels in [0, 1] (magnitude / 10)."""
        fill = self.fill.to(images.device)
        if name == "auto_contrast":
            return auto_contrast(images)
        if name == "equalize":
            return equalize(images)
        if name == "invert":
            return invert(images)
        if name == "rotate":
            return rotate(images, _random_sign(level) * level * 30.0, fill)
        if name == "posterize":
            bits = (level * 4).floor()
            return posterize(images, 4 - bits if self.increasing else bits)
        if name == "solarize":
            threshold = (level * 256).floor()
            return solarize(images, 256 - threshold if self.increasing else threshold)
        if name == "solarize_add":
            return solarize_add(images, (level * 110).floor())
        if name == "color":
            return adjust_color(images, self._enhance_factor(level))
        if name == "contrast":
            return adjust_contrast(images, self._enhance_factor(level))
        if name == "brightness":
            return adjust_brightness(images, self._enhance_factor(level))
        if name == "sharpness":
            return adjust_sharpness(images, self._enhance_factor(level))
        if name == "shear_x":
            return shear_x(images, _random_sign(level) * level * 0.3, fill)
        if name == "shear_y":
            return shear_y(images, _random_sign(level) * level * 0.3, fill)
        if name == "translate_x":
            return translate_x(images, _random_sign(level) * level * self.translate_pct, fill)
        if name == "translate_y":
            return translate_y(images, _random_sign(level) * level * self.translate_pct, fill)
        raise ValueError(f"Unknown RandAugment op {name!r}; ops are {RAND_AUGMENT_OPS}.")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return images
        _check_unit_images(images, "RandAugment")
        images = images.clone()
        batch = images.shape[0]
        for _ in range(self.num_ops):
            choice = torch.randint(len(RAND_AUGMENT_OPS), (batch,), device=images.device)
            applied = torch.rand(batch, device=images.device) < self.prob
            levels = self._sample_magnitudes(batch, images.device)
            for index, name in enumerate(RAND_AUGMENT_OPS):
                selected = ((choice == index) & applied).nonzero().flatten()
                if selected.numel() > 0:
                    images[selected] = self.apply_op(name, images[selected], levels[selected])
        return images


def _random_sign(like: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.rand_like(like) < 0.5, 1.0, -1.0).to(like.dtype)


def _check_unit_images(images: torch.Tensor, who: str) -> None:
    if not images.is_floating_point() or images.ndim != 4:
        raise ValueError(f"{who} expects float images in [0, 1] of shape (B, C, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}.")


# ----------------------------------------------------------------------------------------------------------------
# Random erasing
# ----------------------------------------------------------------------------------------------------------------


class RandomErasing(nn.Module):
    """Erase one random rectangle per image with probability `prob` (timm's RandomErasing, count 1), batched.

    Runs on NORMALISED images. The rectangle covers a fraction of the area drawn from U(scale) with a log-uniform
    aspect ratio in `ratio` (up to 10 tries, as timm); it is filled with per-pixel N(0, 1) noise ("pixel", the
    reference), one N(0, 1) value per channel ("rand") or zeros ("const").
    """

    def __init__(self, prob: float = 0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), mode: str = "pixel",
                 max_attempts: int = 10):
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}.")
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}.")
        self.prob, self.scale, self.ratio, self.mode, self.max_attempts = prob, tuple(scale), tuple(ratio), mode, max_attempts

    def extra_repr(self) -> str:
        return f"prob={self.prob}, scale={self.scale}, ratio={self.ratio}, mode={self.mode!r}"

    def sample_boxes(self, batch: int, height: int, width: int, device=None) -> torch.Tensor:
        """(B, 4) boxes (top, left, box_height, box_width); a zero-size box means "not erased"."""
        tries = self.max_attempts
        area = torch.empty(batch, tries, device=device).uniform_(*self.scale) * height * width
        log_ratio = torch.empty(batch, tries, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        box_h = (area * log_ratio.exp()).sqrt().round().long()
        box_w = (area / log_ratio.exp()).sqrt().round().long()
        valid = (box_h < height) & (box_w < width) & (box_h > 0) & (box_w > 0)
        first = torch.where(valid.any(dim=1), valid.float().argmax(dim=1), torch.full((batch,), -1, device=device))
        erase = (torch.rand(batch, device=device) < self.prob) & (first >= 0)
        rows = torch.arange(batch, device=device)
        pick = first.clamp_min(0)
        box_h = torch.where(erase, box_h[rows, pick], 0)
        box_w = torch.where(erase, box_w[rows, pick], 0)
        top = (torch.rand(batch, device=device) * (height - box_h + 1)).floor().long().clamp_max(height - 1)
        left = (torch.rand(batch, device=device) * (width - box_w + 1)).floor().long().clamp_max(width - 1)
        return torch.stack([top, left, box_h, box_w], dim=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0:
            return images
        batch, channels, height, width = images.shape
        boxes = self.sample_boxes(batch, height, width, images.device)
        ys = torch.arange(height, device=images.device).view(1, height, 1)
        xs = torch.arange(width, device=images.device).view(1, 1, width)
        top, left, box_h, box_w = (boxes[:, i].view(-1, 1, 1) for i in range(4))
        mask = ((ys >= top) & (ys < top + box_h) & (xs >= left) & (xs < left + box_w)).unsqueeze(1)
        if self.mode == "pixel":
            noise = torch.randn_like(images)
        elif self.mode == "rand":
            noise = torch.randn(batch, channels, 1, 1, device=images.device, dtype=images.dtype).expand_as(images)
        else:
            noise = torch.zeros_like(images)
        return torch.where(mask, noise, images)


# ----------------------------------------------------------------------------------------------------------------
# Mixup / CutMix
# ----------------------------------------------------------------------------------------------------------------


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, generator=None) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the standard CutMix box: sides sqrt(1 - lam) of the image's, random centre, clipped."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    center_y = int(torch.randint(0, height, (1,), generator=generator))
    center_x = int(torch.randint(0, width, (1,), generator=generator))
    y0, y1 = min(max(center_y - cut_h // 2, 0), height), min(max(center_y + cut_h // 2, 0), height)
    x0, x1 = min(max(center_x - cut_w // 2, 0), width), min(max(center_x + cut_w // 2, 0), width)
    return y0, y1, x0, x1


class Mixup(nn.Module):
    """Mixup / CutMix on a batch with soft targets (timm's "batch" mode, the reference setting).

    With probability `prob` the batch is mixed with itself reversed (`images.flip(0)`): CutMix with probability
    `switch_prob` when both are enabled, else Mixup. lam ~ Beta(alpha, alpha); for CutMix lam is then corrected to
    the uncovered area. Targets are `lam * y + (1 - lam) * y.flip(0)` with smoothed one-hot y, i.e. the float
    (batch, num_labels) soft targets `NepaForImageClassification` trains on with soft-target cross-entropy. With
    both alphas 0 it only produces smoothed one-hot targets.

    Args:
        num_classes: number of labels.
        mixup_alpha: Beta parameter of Mixup (0 disables it).
        cutmix_alpha: Beta parameter of CutMix (0 disables it).
        prob: probability of mixing a batch at all.
        switch_prob: probability of CutMix instead of Mixup when both are enabled.
        label_smoothing: smoothing of the one-hot targets before mixing.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"Mixup needs num_classes >= 2, got {num_classes}.")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}.")
        if not (0.0 <= prob <= 1.0 and 0.0 <= switch_prob <= 1.0 and 0.0 <= label_smoothing < 1.0):
            raise ValueError("prob and switch_prob must be in [0, 1] and label_smoothing in [0, 1).")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
                f"prob={self.prob}, switch_prob={self.switch_prob}, label_smoothing={self.label_smoothing}")

    @property
    def mixes(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def sample_params(self) -> tuple[float, bool]:
        """(lam, use_cutmix) for one batch; lam 1.0 means no mixing."""
        if not self.mixes or torch.rand(1).item() >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or torch.rand(1).item() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        return lam, use_cutmix

    @torch.no_grad()
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(
                f"Mixup expects integer class labels of shape (batch,), got {labels.dtype} {tuple(labels.shape)}."
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"Labels must be in [0, {self.num_classes}); got values in "
                             f"[{int(labels.min())}, {int(labels.max())}].")
        lam, use_cutmix = self.sample_params() if self.training else (1.0, False)
        if lam < 1.0:
            if use_cutmix:
                y0, y1, x0, x1 = cutmix_box(images.shape[-2], images.shape[-1], lam)
                images = images.clone()
                images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(images.shape[-2] * images.shape[-1])
            else:
                images = images * lam + images.flip(0) * (1.0 - lam)
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        targets = targets * lam + targets.flip(0) * (1.0 - lam)
        return images, targets


# ----------------------------------------------------------------------------------------------------------------
# The whole batched pipeline
# ----------------------------------------------------------------------------------------------------------------


class ClassificationBatchTransform(nn.Module):
    """Batched, on-device image-classification pipeline for a batch dict {"pixel_values", "labels"}.

    Training mode: uint8 (or [0, 1] float) images -> optional flip -> RandAugment -> normalise -> random erasing ->
    Mixup/CutMix (labels become soft targets). Eval mode: normalise only. `NepaTrainer(batch_transform=...)` runs
    it in training and prediction steps; with a plain Trainer call it from your collate function instead.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], hflip_prob: float = 0.0,
                 rand_augment: RandAugment | None = None, random_erasing: RandomErasing | None = None,
                 mixup: Mixup | None = None, image_key: str = "pixel_values", label_key: str = "labels"):
        super().__init__()
        self.hflip_prob = hflip_prob
        self.rand_augment = rand_augment
        self.random_erasing = random_erasing
        self.mixup = mixup
        self.image_key, self.label_key = image_key, label_key
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        if images.is_floating_point():
            if images.numel() and (images.min() < 0 or images.max() > 1):
                raise ValueError(
                    f"{type(self).__name__} expects uint8 images or float images in [0, 1] (it normalises them "
                    f"itself), but got values in [{images.min():.3g}, {images.max():.3g}]: the images look already "
                    "normalised. Produce uint8 tensors with nepa_hf.transforms.RandomResizedCropTransform / "
                    "ResizeTransform instead of the image processor."
                )
            return images.float()
        raise ValueError(f"pixel_values must be uint8 or float, got {images.dtype}.")

    @torch.no_grad()
    def forward(self, batch: Mapping) -> dict:
        if self.image_key not in batch:
            raise KeyError(f"The batch has no {self.image_key!r} entry (keys: {sorted(batch)}).")
        batch = dict(batch)
        images = self.to_unit_range(batch[self.image_key])
        if self.training:
            if self.hflip_prob > 0:
                flip = torch.rand(images.shape[0], device=images.device) < self.hflip_prob
                images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            if self.rand_augment is not None:
                images = self.rand_augment(images)
        images = (images - self.mean.to(images.device)) / self.std.to(images.device)
        if self.training:
            if self.random_erasing is not None:
                images = self.random_erasing(images)
            if self.mixup is not None and batch.get(self.label_key) is not None:
                images, batch[self.label_key] = self.mixup(images, batch[self.label_key])
        batch[self.image_key] = images
        return batch


@dataclass
class AugmentationArguments:
    """Fine-tuning augmentation flags (defaults: the reference recipe, reference §8)."""

    crop_scale_min: float = field(default=0.08, metadata={"help": "RandomResizedCrop minimum area fraction."})
    hflip_prob: float = field(default=0.5, metadata={"help": "Horizontal flip probability (per sample)."})
    interpolation: str = field(default="bicubic", metadata={"help": "Resampling of crops and eval resizes."})
    rand_augment: str | None = field(
        default="rand-m9-mstd0.5-inc1",
        metadata={"help": "timm-style RandAugment config ('rand-m9-mstd0.5-inc1'); 'none' disables it."},
    )
    random_erasing_prob: float = field(default=0.25, metadata={"help": "Random erasing probability (0 disables)."})
    random_erasing_mode: str = field(default="pixel", metadata={"help": "Erase fill: pixel, rand or const."})
    mixup_alpha: float = field(default=0.8, metadata={"help": "Mixup Beta alpha (0 disables Mixup)."})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix Beta alpha (0 disables CutMix)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of CutMix instead of Mixup."})
    eval_crop_pct: float = field(
        default=0.875,
        metadata={"help": "Eval: resize the short side to size / crop_pct, centre-crop size (1.0: resize only)."},
    )

    def __post_init__(self):
        if isinstance(self.rand_augment, str) and self.rand_augment.lower() in ("", "none", "off"):
            self.rand_augment = None
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}.")
        if not 0 < self.eval_crop_pct <= 1:
            raise ValueError(f"eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}.")

    def train_sample_transform(self, size: int | tuple[int, int]):
        """Per-sample train transform (DataLoader workers): RandomResizedCrop + flip -> uint8 tensor."""
        from .transforms import RandomResizedCropTransform

        return RandomResizedCropTransform(size, scale=(self.crop_scale_min, 1.0), interpolation=self.interpolation,
                                          hflip_prob=self.hflip_prob)

    def eval_resize_size(self, size: int) -> int | None:
        return None if self.eval_crop_pct >= 1.0 else int(round(size / self.eval_crop_pct))

    def eval_sample_transform(self, size: int):
        """Per-sample eval transform: shortest edge to size / crop_pct, centre crop (the reference protocol)."""
        from .transforms import ResizeTransform

        return ResizeTransform(size, resize_size=self.eval_resize_size(size), interpolation=self.interpolation)

    def batch_transform(self, mean, std, num_labels: int, label_smoothing: float = 0.0) -> ClassificationBatchTransform:
        """The on-device part; `label_smoothing` goes into the (mixed) soft targets."""
        rand_augment = RandAugment.from_config_str(self.rand_augment, fill=tuple(mean)) if self.rand_augment else None
        erasing = RandomErasing(self.random_erasing_prob, mode=self.random_erasing_mode) if self.random_erasing_prob > 0 else None
        mixing = self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)
        mixup = None
        if mixing or label_smoothing > 0:
            mixup = Mixup(num_labels, mixup_alpha=self.mixup_alpha if mixing else 0.0,
                          cutmix_alpha=self.cutmix_alpha if mixing else 0.0, prob=self.mixup_prob,
                          switch_prob=self.mixup_switch_prob, label_smoothing=label_smoothing)
        return ClassificationBatchTransform(mean, std, hflip_prob=0.0, rand_augment=rand_augment,
                                            random_erasing=erasing, mixup=mixup)


__all__ = [
    "AugmentationArguments",
    "ClassificationBatchTransform",
    "Mixup",
    "RAND_AUGMENT_OPS",
    "RandAugment",
    "RandomErasing",
    "cutmix_box",
    "smooth_one_hot",
]
