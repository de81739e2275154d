"""Shared pytest fixtures: bundled photos and a small Fashion-MNIST sample."""

from __future__ import annotations

import pytest
from PIL import Image

try:  # keep CPU tests light on the 2-core CI machines
    import torch

    torch.set_num_threads(2)
except ImportError:  # pragma: no cover
    torch = None

from nepa_hf.data import bundled_photo_paths, load_fashion_mnist


@pytest.fixture(scope="session")
def photo_images():
    """The bundled real photos as a list of PIL RGB images."""
    images = []
    for path in bundled_photo_paths():
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    return images


@pytest.fixture(scope="session")
def fashion_small():
    """200 bundled Fashion-MNIST train images (20/class): (uint8 [200, 28, 28], int64 [200])."""
    images, labels = load_fashion_mnist("train", source="bundled")
    keep = [i for c in range(10) for i in (labels == c).nonzero()[0][:20]]
    keep.sort()
    return images[keep], labels[keep]
