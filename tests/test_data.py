"""Tests for nepa_hf.data.images: idx reader, Fashion-MNIST loaders, bundled photos, Datasets."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nepa_hf.data import images as nd

DEBIAN_PRESENT = nd.fashion_mnist_available(source="debian")
needs_debian = pytest.mark.skipif(
    not DEBIAN_PRESENT,
    reason=f"Debian dataset-fashion-mnist not installed in {nd.FASHION_MNIST_DEBIAN_DIR} "
    "(apt-get install -y dataset-fashion-mnist)",
)


# --------------------------------------------------------------------------- idx files


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((3, 4, 5)) * 100).astype(dtype)
    path = nd.write_idx(tmp_path / f"arr-idx3{suffix}", array)
    if suffix:
        with open(path, "rb") as fh:
            assert fh.read(2) == b"\x1f\x8b"
    back = nd.read_idx(path)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == (3, 4, 5)
    np.testing.assert_array_equal(back, array)


def test_idx_hand_written_labels_file(tmp_path):
    # magic 0x00000801 (uint8, 1-d), 4 items, big-endian count
    raw = bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + bytes([9, 0, 3, 7])
    path = tmp_path / "labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(raw)
    np.testing.assert_array_equal(nd.read_idx(path), [9, 0, 3, 7])


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "bad-idx"
    path.write_bytes(b"\x12\x34\x08\x01" + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(ValueError, match="magic"):
        nd.read_idx(path)
    path.write_bytes(b"\x00\x00\x42\x01" + (1).to_bytes(4, "big") + b"\x00")  # unknown type
    with pytest.raises(ValueError, match="magic"):
        nd.read_idx(path)


def test_idx_truncated(tmp_path):
    path = tmp_path / "short-idx"
    path.write_bytes(bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + b"\x00")
    with pytest.raises(ValueError, match="expected 4"):
        nd.read_idx(path)


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("split,per_class", [("train", 200), ("test", 100)])
def test_bundled_subset(split, per_class):
    images, labels = nd.load_fashion_mnist(split, source="bundled")
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert images.shape == (10 * per_class, 28, 28)
    assert labels.shape == (10 * per_class,)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
    assert images.max() > 200 and images.min() == 0  # real pictures, not blanks
    assert len(np.unique(images.reshape(len(images), -1), axis=0)) == len(images)


def test_bundled_class_names_match():
    path = nd.bundled_data_dir() / nd.BUNDLED_FASHION_MNIST_FILE
    with np.load(path) as npz:
        assert tuple(npz["class_names"].tolist()) == nd.FASHION_MNIST_CLASSES
    assert len(nd.FASHION_MNIST_CLASSES) == 10


def test_fashion_small_fixture(fashion_small):
    images, labels = fashion_small
    assert images.shape == (200, 28, 28) and labels.shape == (200,)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [20] * 10)


@needs_debian
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_debian_loader(split, n):
    images, labels = nd.load_fashion_mnist(split, source="debian")
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n // 10] * 10)


@needs_debian
def test_bundled_subset_is_taken_from_debian_files():
    full, full_labels = nd.load_fashion_mnist("test", source="debian")
    with np.load(nd.bundled_data_dir() / nd.BUNDLED_FASHION_MNIST_FILE) as npz:
        idx = npz["test_source_indices"]
        np.testing.assert_array_equal(full[idx], npz["test_images"])
        np.testing.assert_array_equal(full_labels[idx], npz["test_labels"])


def test_auto_falls_back_to_bundled(tmp_path):
    images, labels = nd.load_fashion_mnist("test", source="auto", root=tmp_path)
    assert images.shape == (1000, 28, 28)


def test_debian_missing_names_apt_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        nd.load_fashion_mnist("train", source="debian", root=tmp_path)


def test_neither_source_names_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv(nd.DATA_DIR_ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        nd.load_fashion_mnist("train", source="auto", root=tmp_path)


def test_custom_root_idx_files(tmp_path):
    imgs = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    nd.write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs)
    nd.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 5], dtype=np.uint8))
    images, labels = nd.load_fashion_mnist("test", source="debian", root=tmp_path)
    np.testing.assert_array_equal(images, imgs)
    assert labels.tolist() == [3, 5] and labels.dtype == np.int64


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        nd.load_fashion_mnist("validation")
    with pytest.raises(ValueError, match="source"):
        nd.load_fashion_mnist("train", source="internet")


def test_data_dir_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(nd.DATA_DIR_ENV_VAR, str(tmp_path))
    assert nd.bundled_data_dir() == tmp_path
    monkeypatch.setenv(nd.DATA_DIR_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        nd.bundled_data_dir()


# --------------------------------------------------------------------------- Datasets


def test_fashion_mnist_dataset_features():
    import datasets

    ds = nd.fashion_mnist_dataset("test", source="bundled", max_samples=50, seed=1)
    assert len(ds) == 50
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == list(nd.FASHION_MNIST_CLASSES)
    ex = ds[0]
    assert isinstance(ex["image"], Image.Image)
    assert ex["image"].mode == "L" and ex["image"].size == (28, 28)
    assert 0 <= ex["label"] < 10

    # the same seed gives the same subset, and pixels survive the (PGM) encoding exactly
    images, labels = nd.load_fashion_mnist("test", source="bundled")
    again = nd.fashion_mnist_dataset("test", source="bundled", max_samples=50, seed=1)
    assert again["label"] == ds["label"]
    keep = np.sort(np.random.default_rng(1).choice(len(labels), size=50, replace=False))
    np.testing.assert_array_equal(np.asarray(ex["image"]), images[keep[0]])
    assert ds["label"] == labels[keep].tolist()


def test_photos_dataset():
    import datasets

    ds = nd.photos_dataset()
    assert len(ds) == len(nd.bundled_photo_paths())
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[0]["image"].mode == "RGB"


# --------------------------------------------------------------------------- photos


def test_photo_paths_exist_and_open_as_rgb():
    paths = nd.bundled_photo_paths()
    assert 6 <= len(paths) <= 8
    for path in paths:
        assert isinstance(path, Path) and path.is_file()
        assert path.stat().st_size <= 200 * 1024
        with Image.open(path) as img:
            assert img.format == "JPEG"
            assert img.mode == "RGB"
            assert min(img.size) >= 128
    assert (paths[0].parent / "README.md").is_file()


def test_photo_images_fixture(photo_images):
    assert len(photo_images) >= 6
    for img in photo_images:
        arr = np.asarray(img)
        assert img.mode == "RGB" and arr.ndim == 3 and arr.shape[2] == 3
        assert arr.std() > 10  # real content


# --------------------------------------------------------------------------- the scripts' shared rules


def test_unreadable_images_are_counted_once_per_file_from_workers_and_from_batches(tmp_path, caplog):
    """One skip-and-count rule for fine-tuning/evaluation (rows flagged by the DataLoader workers) and pretraining
    (keys carried by the batches): each file counts once however often it is read; a value naming no file
    (UNKNOWN_FILE) counts each time; the count survives a resume."""
    import datasets
    import torch

    from nepa_hf.data.classification import collate_image_batch, with_image_transform
    from nepa_hf.data.transforms import pretraining_transform

    Image.new("RGB", (20, 16), (10, 200, 30)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = datasets.Dataset.from_dict({"image": [str(tmp_path / name) for name in ("good.png", "broken.png") * 3],
                                       "label": [0, 1] * 3})
    images = with_image_transform(rows, pretraining_transform(14, [0.5] * 3, [0.5] * 3), "image", "label")
    loader = torch.utils.data.DataLoader(images, batch_size=2, num_workers=2, collate_fn=collate_image_batch)
    for _ in range(2):  # two epochs in two workers: the three broken rows are read twice each
        assert sum(len(batch["labels"]) for batch in loader) == 3
    assert images.unreadable.indices() == [1, 3, 5] and images.unreadable.count() == 3
    with caplog.at_level("WARNING", logger="nepa_hf.data.images"):
        assert images[3]["pixel_values"] is None and images.unreadable.count() == 3
    assert "Skipping unreadable image #3" in caplog.text and "broken.png" in caplog.text

    counted = nd.UnreadableImages()
    counted.add([7, 7, nd.UNKNOWN_FILE])
    assert counted.count() == 2
    counted.add([7, 9, nd.UNKNOWN_FILE])
    assert counted.count() == 4  # 7 again adds nothing; 9 and the second unnamed one do
    resumed = nd.UnreadableImages()
    resumed.load_state_dict(counted.state_dict())
    resumed.add([9])
    assert resumed.count() == 4


def test_patch_aligned_size_names_the_nearest_valid_sizes_or_rounds_down(caplog):
    assert nd.patch_aligned_size(28, 7) == 28
    with pytest.raises(ValueError, match=r"^--image_size 30 must be a multiple of the patch size 7: use 28 or 35\.$"):
        nd.patch_aligned_size(30, 7)
    with pytest.raises(ValueError, match=r"--crop_size 5 must be a multiple of the patch size 7: use 7\."):
        nd.patch_aligned_size(5, 7, "--crop_size", round_down=True)  # nothing smaller fits
    with caplog.at_level("WARNING", logger="nepa_hf.data.images"):
        assert nd.patch_aligned_size(32, 7, "--crop_size", round_down=True) == 28
    assert "--crop_size 32 is not a multiple of the patch size 7: using 28" in caplog.text
