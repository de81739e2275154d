# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Semantic-segmentation data: an offline scenes task, image/mask folders, and joint image+mask augmentation.

Every source yields the ADE20K `scene_parse_150` layout: a `datasets.Dataset` with an `image` column (RGB) and an
`annotation` column (single-channel class-index map), so one training script handles all of them.

The built-in task, "Fashion-MNIST scenes", composes several real Fashion-MNIST items (bundled subset, or Debian's
full set) on crops of the bundled real photos: each item is scaled, flipped, tinted and pasted (later items occlude
earlier ones); the pixel label is the item's class + 1 where the item is visible, 0 (background) elsewhere.
Generation is deterministic given the seed.

Only numpy and PIL at module level; `datasets` is imported by the functions that build datasets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .images import FASHION_MNIST_CLASSES, bundled_photo_paths, load_fashion_mnist

__all__ = [
    "FASHION_SCENES_LABELS",
    "make_fashion_scenes",
    "fashion_scenes_dataset",
    "segmentation_folder_dataset",
    "random_scale_crop_flip",
    "check_label_maps",
]

# Label 0 is the background; item class c has label c + 1.
FASHION_SCENES_LABELS: tuple[str, ...] = ("background",) + tuple(FASHION_MNIST_CLASSES)

# Fashion-MNIST pixels above this (out of 255, after resizing) belong to the item.
_ITEM_THRESHOLD = 32
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _load_backgrounds() -> list[np.ndarray]:
    backgrounds = []
    for path in bundled_photo_paths():
        with Image.open(path) as photo:
            backgrounds.append(np.asarray(photo.convert("RGB")))
    return backgrounds


def _random_background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    height, width = photo.shape[:2]
    crop = int(rng.integers(min(size, height, width), min(height, width) + 1))
    top, left = int(rng.integers(height - crop + 1)), int(rng.integers(width - crop + 1))
    patch = Image.fromarray(photo[top : top + crop, left : left + crop]).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(patch).copy()


def make_fashion_scenes(
    num_scenes: int,
    split: str = "train",
    image_size: int = 64,
    items_per_scene: tuple[int, int] = (2, 4),
    item_size: tuple[int, int] | None = None,
    seed: int = 0,
    source: str = "bundled",
) -> tuple[np.ndarray, np.ndarray]:
    """Compose `num_scenes` scenes of Fashion-MNIST items on real-photo backgrounds.

    Args:
        num_scenes: number of scenes.
        split: Fashion-MNIST split the items come from ("train" or "test"), so train and validation scenes never
            share an item.
        image_size: side of the square scenes.
        items_per_scene: inclusive range of the number of items per scene.
        item_size: inclusive range of the side an item (28x28 originally) is resized to; default
            (5/16, 5/8) of `image_size`, i.e. (20, 40) for 64x64 scenes.
        seed: seed of all random choices; the same arguments always give the same scenes.
        source: Fashion-MNIST source, see `nepa_hf.data.images.load_fashion_mnist` ("bundled" works offline everywhere).

    Returns:
        `(images, masks)`: uint8 arrays of shape (N, image_size, image_size, 3) and (N, image_size, image_size),
        mask values in [0, 10] (0 background, c + 1 for Fashion-MNIST class c; see `FASHION_SCENES_LABELS`).
    """
    if item_size is None:
        item_size = (max(1, round(image_size * 5 / 16)), max(1, round(image_size * 5 / 8)))
    if num_scenes < 0:
        raise ValueError(f"num_scenes must be >= 0, got {num_scenes}.")
    if not 1 <= items_per_scene[0] <= items_per_scene[1]:
        raise ValueError(f"items_per_scene must be (min, max) with 1 <= min <= max, got {items_per_scene}.")
    if not 1 <= item_size[0] <= item_size[1] <= image_size:
        raise ValueError(
            f"item_size must be (min, max) with 1 <= min <= max <= image_size ({image_size}), got {item_size}."
        )
    items, item_labels = load_fashion_mnist(split, source=source)
    photos = _load_backgrounds()
    rng = np.random.default_rng(seed)

    images = np.empty((num_scenes, image_size, image_size, 3), dtype=np.uint8)
    masks = np.zeros((num_scenes, image_size, image_size), dtype=np.uint8)
    for scene in range(num_scenes):
        canvas = _random_background(rng, photos, image_size)
        mask = masks[scene]
        for _ in range(int(rng.integers(items_per_scene[0], items_per_scene[1] + 1))):
            index = int(rng.integers(len(items)))
            side = int(rng.integers(item_size[0], item_size[1] + 1))
            item = np.asarray(Image.fromarray(items[index]).resize((side, side), Image.Resampling.BILINEAR))
            if rng.random() < 0.5:
                item = item[:, ::-1]
            top, left = int(rng.integers(image_size - side + 1)), int(rng.integers(image_size - side + 1))
            tint = rng.uniform(0.35, 1.0, size=3)
            visible = item > _ITEM_THRESHOLD
            region = canvas[top : top + side, left : left + side]
            region[visible] = (item[visible, None] * tint).astype(np.uint8)
            mask[top : top + side, left : left + side][visible] = item_labels[index] + 1
        images[scene] = canvas
    return images, masks


def _segmentation_features():
    import datasets

    return datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})


def fashion_scenes_dataset(num_scenes: int, split: str = "train", seed: int = 0, **scene_kwargs):
    """`make_fashion_scenes` as a `datasets.Dataset` with `image` (RGB) and `annotation` (mode "L") columns."""
    import datasets

    images, masks = make_fashion_scenes(num_scenes, split=split, seed=seed, **scene_kwargs)
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image) for image in images], "annotation": [Image.fromarray(m) for m in masks]},
        features=_segmentation_features(),
    )


def segmentation_folder_dataset(folder, split: str | None = None):
    """Image/mask pairs from `folder/[split/]images/NAME.*` and `folder/[split/]masks/NAME.png`.

    Masks are single-channel class-index maps (PIL modes "L", "P" or "I"), the same size as their images. Returns a
    `datasets.Dataset` with `image` and `annotation` columns, sorted by name.
    """
    import datasets

    root = Path(folder) / split if split else Path(folder)
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"Expected {image_dir} and {mask_dir} (image/mask pairs with matching file names).")
    masks = {path.stem: path for path in mask_dir.iterdir() if path.suffix.lower() in _IMAGE_SUFFIXES}
    images = sorted(path for path in image_dir.iterdir() if path.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"No images ({', '.join(_IMAGE_SUFFIXES)}) in {image_dir}.")
    unmatched = [path.name for path in images if path.stem not in masks]
    if unmatched:
        raise FileNotFoundError(f"No mask in {mask_dir} for {len(unmatched)} image(s), e.g. {unmatched[:3]}.")
    return datasets.Dataset.from_dict(
        {"image": [str(path) for path in images], "annotation": [str(masks[path.stem]) for path in images]},
        features=_segmentation_features(),
    )


# --------------------------------------------------------------------------------------------------------------
# Joint image + mask training transform (mmsegmentation's, whose class-ratio-bounded crop torchvision lacks)
# --------------------------------------------------------------------------------------------------------------


def _as_pil_pair(image, mask) -> tuple[Image.Image, Image.Image]:
    from .transforms import to_rgb  # torch/torchvision: imported only when augmenting

    image = to_rgb(image if isinstance(image, Image.Image) else np.asarray(image))  # 16-bit: the processor's rule
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"A segmentation mask must be (H, W) class indices, got shape {mask.shape}.")
    if (image.height, image.width) != mask.shape:
        raise ValueError(
            f"Image size {(image.height, image.width)} and mask size {mask.shape} differ; expected the same (H, W)."
        )
    return image, Image.fromarray(mask.astype(np.int32))  # mode "I": any label value survives


def random_scale_crop_flip(
    image,
    mask,
    crop_size: tuple[int, int],
    rng: np.random.Generator,
    base_size: int | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip_probability: float = 0.5,
    cat_max_ratio: float = 0.75,
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """The standard semantic-segmentation training augmentation (mmsegmentation's ADE20K pipeline, minus colour
    jitter), applied identically to the image and its mask.

    1. Random scale: resize (keeping the aspect ratio) so the short side is `base_size * r`, r ~ U(scale_range)
       (`base_size` defaults to the short side of `crop_size`); bilinear for the image, nearest for the mask.
    2. Pad to at least `crop_size` (image with 0, mask with `ignore_index`).
    3. Random crop of `crop_size`, retried up to 10 times while one class covers more than `cat_max_ratio` of the
       labelled pixels (set 1.0 to disable).
    4. Horizontal flip with `flip_probability`.

    Returns (uint8 image (h, w, 3), int64 mask (h, w)) with (h, w) = crop_size.
    """
    image, mask = _as_pil_pair(image, mask)
    crop_h, crop_w = crop_size
    base = base_size if base_size is not None else min(crop_h, crop_w)
    scale = rng.uniform(*scale_range) * base / min(image.width, image.height)
    new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    image = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
    mask = np.asarray(mask.resize((new_w, new_h), Image.Resampling.NEAREST)).astype(np.int64)

    pad_h, pad_w = max(crop_h - new_h, 0), max(crop_w - new_w, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
        mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=ignore_index)

    height, width = mask.shape
    for _ in range(10):
        top, left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
        crop_mask = mask[top : top + crop_h, left : left + crop_w]
        _, counts = np.unique(crop_mask[crop_mask != ignore_index], return_counts=True)
        if cat_max_ratio >= 1.0 or len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    image = image[top : top + crop_h, left : left + crop_w]
    mask = crop_mask
    if rng.random() < flip_probability:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def check_label_maps(labels, num_labels: int, ignore_index: int):
    """`labels` (an array or tensor of class indices) unchanged, or a ValueError naming the values outside
    [0, num_labels) other than `ignore_index` and the fix. Run on the CPU in the data pipeline (no device sync)."""
    values = np.unique(np.asarray(labels))
    bad = values[((values < 0) | (values >= num_labels)) & (values != ignore_index)]
    if bad.size:
        shown = ", ".join(str(value) for value in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise ValueError(
            f"Segmentation labels contain class indices outside [0, {num_labels - 1}] (num_labels={num_labels}) other "
            f"than the ignore index {ignore_index}: found {shown}. Set --num_labels / --id2label_file to cover every "
            "class, or --do_reduce_labels for ADE20K-style maps where 0 means 'no label'."
        )
    return labels

