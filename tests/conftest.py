"""Shared pytest fixtures: bundled photos, a small Fashion-MNIST sample and one-thread torch for tiny models."""

from __future__ import annotations

import os
import socket


def _hub_reachable(timeout: float = 1.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# Offline machines (CI here): make the Hugging Face libraries fail fast instead of retrying for seconds per call.
# Must happen before transformers/datasets/huggingface_hub are imported, as they read it at import time.
# Network tests check `HUB_REACHABLE` and skip themselves.
HUB_REACHABLE = os.environ.get("HF_HUB_OFFLINE", "0") != "1" and _hub_reachable()
if not HUB_REACHABLE:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# transformers' common tests (test_transformers_common_*.py) include the ones it marks @slow (run nightly there): on
# NEPA's small testers they take seconds. Read by transformers.testing_utils at import time.
os.environ.setdefault("RUN_SLOW", "1")

import pytest  # noqa: E402

# Modules that transformers' common test files import (see transformers_common.py), not tests of ours.
collect_ignore = ["transformers_stand_ins"]
from PIL import Image  # noqa: E402

try:  # keep CPU tests light on the 2-core CI machines
    import torch

    # Two threads on the 2-core CI machine; an explicit OMP_NUM_THREADS wins (on a machine busy with other jobs,
    # one thread per process is many times faster for these small models).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))
except ImportError:  # pragma: no cover
    torch = None

from nepa_hf.data.images import bundled_photo_paths, load_fashion_mnist  # noqa: E402


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


@pytest.fixture
def single_thread():
    # Tiny models run faster on one thread, especially on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
