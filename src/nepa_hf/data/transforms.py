"""Per-sample image transforms of the NEPA recipes, built from torchvision v2 (and, for fine-tuning, timm).

* `pretraining_transform`: the authors' pretraining data pipeline: torchvision's RandomResizedCrop(size) with its
  defaults (scale 0.08-1, ratio 3/4-4/3, bilinear), a horizontal flip, then the image processor's rescale and
  normalisation; for small images, `translation_crop` (pad and random crop) instead of the resized crop.
* Fine-tuning uses timm's `create_transform` (RandAugment, random erasing, ...); see `nepa_hf.data.augmentation`.
* `ImageProcessorTransform`: evaluation preprocessing *is* the image processor (resize / centre crop / normalise),
  so what is scored during training is what `pipeline(...)` sees at inference.

Every transform here returns normalised float tensors (C, H, W). `to_rgb` brings any PIL mode to RGB first, with the
image processor's rule for 16-bit and float images; `seeded` runs a transform under a per-sample seed, so augmented
samples do not depend on the number of DataLoader workers or processes.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from torchvision.transforms import v2

from ..models.nepa.image_processing_nepa import convert_to_8_bit

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


def array_to_image(array) -> PIL.Image.Image:
    """An HxW or HxWxC (C = 1, 3, 4) numpy array -> PIL image, 16-bit arrays scaled to 8 bits by the image processor's
    rule (`convert_to_8_bit`), so every loader reads them as `NepaImageProcessor` does. Pillow has no mode for 16-bit
    colour, and `Image.fromarray` refuses it."""
    array = convert_to_8_bit(np.asarray(array))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return PIL.Image.fromarray(array)


def to_rgb(image) -> PIL.Image.Image:
    """Any PIL image (L, LA, P, RGBA, CMYK, I;16, I, F, ...) or HxW[xC] numpy array -> 8-bit RGB PIL image.

    16-bit and float images follow the image processor's rule (`convert_to_8_bit`), so training data and inference
    inputs are scaled the same way; everything else goes through PIL's own conversion.
    """
    if isinstance(image, np.ndarray):
        image = array_to_image(image)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"Expected a PIL image or a numpy array, got {type(image).__name__}.")
    image = convert_to_8_bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


@contextlib.contextmanager
def seeded(seed: int):
    """Seed Python's, NumPy's and torch's global generators for the block, then restore them.

    torchvision v2 draws from torch's generator, timm's RandAugment and Mixup from Python's `random` and NumPy: a
    per-sample seed around the transform makes the sample's augmentation a function of (seed, epoch, index) alone,
    and leaves the caller's random streams (e.g. the model's RoPE augmentation) untouched. Only the CPU generator is
    seeded: `torch.manual_seed` would also seed (or, before CUDA starts, queue a seeding call with a captured stack
    trace for) every CUDA device, which on CUDA builds of torch cost ~10 ms per sample and is not restored here.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _interpolation(name: str) -> v2.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"Unknown interpolation {name!r}; choose one of {INTERPOLATIONS}.")
    return v2.InterpolationMode(name)


def pretraining_transform(
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
    hflip_prob: float = 0.5,
    crop_padding: int = 0,
) -> v2.Compose:
    """RandomResizedCrop + horizontal flip + rescale/normalise, as the authors pretrain (torchvision's defaults).

    `crop_padding` > 0 replaces the RandomResizedCrop with `translation_crop` (small images). Takes an RGB (or, for
    grayscale models, "L") PIL image; returns a float (C, H, W) tensor normalised with `mean`/`std` (one value per
    channel).
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}.")
    if crop_padding:
        steps = translation_crop(size, crop_padding, interpolation).transforms
    else:
        steps = [v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=_interpolation(interpolation))]
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(hflip_prob))
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def per_channel(values: Sequence[float], num_channels: int, name: str) -> list[float]:
    """Normalisation statistics given on the command line: one value for every channel, or one per channel."""
    values = [float(value) for value in values]
    if len(values) == 1:
        return values * num_channels
    if len(values) != num_channels:
        raise ValueError(f"{name} has {len(values)} values for a {num_channels}-channel model: give one per channel "
                         "or a single value for all.")
    return values


def translation_crop(size: int | Sequence[int], padding: int, interpolation: str = "bilinear") -> v2.Compose:
    """Resize to `size` (the short side, for an int), zero-pad by `padding` px and take a random `size` crop: a random
    translation by up to `padding` px, the usual augmentation for 28-32 px datasets (CIFAR, Fashion-MNIST), where a
    RandomResizedCrop down to 8% of the area would leave a few pixels."""
    if padding < 0:
        raise ValueError(f"The crop padding must be >= 0 pixels, got {padding}.")
    return v2.Compose([v2.Resize(size, interpolation=_interpolation(interpolation)),
                       v2.RandomCrop(size, padding=padding)])


class ImageProcessorTransform:
    """Per-sample transform that runs a NEPA image processor: image -> normalised float (C, H, W) tensor.

    Picklable (DataLoader workers). Use it for evaluation data: the same resize, crop and normalisation that the
    saved processor applies in `pipeline(...)`.
    """

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.image_processor).__name__})"


def evaluation_image_processor(size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875,
                               interpolation: str = "bicubic"):
    """The evaluation protocol as a (torchvision-backend) image processor: resize the short side to
    int(size / crop_pct) (224 -> 256 at the default 0.875, timm's and the authors' rounding), centre-crop `size`;
    crop_pct 1 resizes straight to size x size. Saved with fine-tuned models, it is what pipelines then apply."""
    from transformers.image_utils import PILImageResampling

    from ..models.nepa.image_processing_nepa import NepaImageProcessor

    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    kwargs = dict(resample=PILImageResampling[_interpolation(interpolation).name], image_mean=list(mean),
                  image_std=list(std))
    if crop_pct >= 1.0:
        return NepaImageProcessor(size={"height": size, "width": size}, **kwargs)
    return NepaImageProcessor(size={"shortest_edge": int(size / crop_pct)}, do_center_crop=True,
                              crop_size={"height": size, "width": size}, **kwargs)


__all__ = [
    "INTERPOLATIONS",
    "ImageProcessorTransform",
    "array_to_image",
    "evaluation_image_processor",
    "per_channel",
    "pretraining_transform",
    "seeded",
    "to_rgb",
    "translation_crop",
]
