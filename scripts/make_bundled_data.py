#!/usr/bin/env python
"""Regenerate the small real data sets committed under data/.

* data/fashion_mnist/fashion_mnist_subset.npz - a class-balanced, seeded subset of
  Fashion-MNIST read from Debian's ``dataset-fashion-mnist`` package
  (``apt-get install -y dataset-fashion-mnist``).
* data/photos/*.jpg - public-domain / CC0 photos shipped inside scikit-image
  (``skimage.data``), downscaled and saved as JPEG.

Usage (from the repository root, with the project's venv):

    .venv/bin/python scripts/make_bundled_data.py [--train-per-class 200] [--test-per-class 100]

The output is deterministic for a given input and seed (JPEG bytes may differ across
Pillow/libjpeg versions).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data"


def _load_data_module():
    # Load src/nepa_hf/data.py directly so that the package __init__ (torch, transformers)
    # is not imported.
    path = REPO / "src" / "nepa_hf" / "data.py"
    spec = importlib.util.spec_from_file_location("_nepa_hf_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# name -> (skimage.data function, source, licence) as stated in skimage.data's docstrings.
PHOTOS = {
    "astronaut": (
        "astronaut",
        "Eileen Collins, NASA Great Images database (https://flic.kr/p/r9qvLn)",
        "Public domain (NASA; no known copyright restrictions)",
    ),
    "chelsea_cat": (
        "chelsea",
        "Chelsea the cat, photographed by Stefan van der Walt",
        "CC0 1.0 (by the photographer)",
    ),
    "coffee": (
        "coffee",
        "Coffee cup, Pikolo Espresso Bar, photographed by Rachel Michetti",
        "CC0 1.0 (by the photographer)",
    ),
    "rocket": (
        "rocket",
        "DSCOVR launch on Falcon 9, SpaceX Photos "
        "(https://www.flickr.com/photos/spacexphotos/16511594820/)",
        "Public domain (released by SpaceX)",
    ),
    "hubble_deep_field": (
        "hubble_deep_field",
        "Hubble eXtreme Deep Field, NASA / HubbleSite (2012 release 37)",
        "Public domain (NASA media guidelines)",
    ),
    "immunohistochemistry": (
        "immunohistochemistry",
        "IHC staining of colonic glands, Center for Microscopy And Molecular Imaging (CMMI)",
        "No known copyright restrictions (as stated by scikit-image)",
    ),
    "retina": (
        "retina",
        "Fundus photograph of a normal left eye, Mikael Häggström, Wikimedia Commons "
        "(https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg)",
        "CC0 1.0 Universal Public Domain Dedication",
    ),
}

MAX_SIDE = 512
MAX_BYTES = 200 * 1024


def make_fashion_mnist(train_per_class: int, test_per_class: int, seed: int, source_dir: str) -> Path:
    data = _load_data_module()
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = data.load_fashion_mnist(split, source="debian", root=source_dir)
        chosen = []
        for c in range(len(data.FASHION_MNIST_CLASSES)):
            members = np.flatnonzero(labels == c)
            chosen.append(rng.choice(members, size=per_class, replace=False))
        idx = np.sort(np.concatenate(chosen))
        arrays[f"{split}_images"] = images[idx].astype(np.uint8)
        arrays[f"{split}_labels"] = labels[idx].astype(np.uint8)
        arrays[f"{split}_source_indices"] = idx.astype(np.int32)
        print(f"fashion-mnist {split}: {len(idx)} images ({per_class}/class) from {len(labels)}")
    arrays["class_names"] = np.array(data.FASHION_MNIST_CLASSES)
    arrays["seed"] = np.array(seed, dtype=np.int64)
    out = DATA_DIR / data.BUNDLED_FASHION_MNIST_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out.relative_to(REPO)} ({out.stat().st_size / 1024:.0f} KiB)")
    _write_fashion_mnist_readme(out, train_per_class, test_per_class, seed, source_dir)
    return out


def _write_fashion_mnist_readme(npz_path: Path, train_per_class: int, test_per_class: int,
                                seed: int, source_dir: str) -> None:
    n_classes = 10
    text = f"""# Fashion-MNIST subset (bundled)

`{npz_path.name}` is a small, class-balanced subset of
[Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist) (Han Xiao, Kashif Rasul,
Roland Vollgraf, Zalando Research, 2017; arXiv:1708.07747), committed so that tests and
examples run without the full data set. Fashion-MNIST is released under the
**MIT License**, Copyright (c) 2017 Zalando SE.

## Source

The full data set's idx files as installed by Debian's `dataset-fashion-mnist` package
(`apt-get install -y dataset-fashion-mnist`) in `{source_dir}/`:
`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz` (60,000 images) and
`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz` (10,000 images).
When those files are present, `nepa_hf.data.images.load_fashion_mnist(source="auto")` uses the full
data set; otherwise it falls back to this subset.

## Selection

* train: {train_per_class} images per class x {n_classes} classes = {train_per_class * n_classes},
  drawn from the 60,000 training images;
* test: {test_per_class} images per class x {n_classes} classes = {test_per_class * n_classes},
  drawn from the 10,000 `t10k` test images.

For each split and each class (in class order 0..9, train first, then test), the indices
were drawn without replacement with `numpy.random.default_rng({seed}).choice`; the selected
indices are sorted so the original order is kept. The original positions are stored too.

## Contents of the `.npz` (`numpy.load`, no pickle needed)

| key | dtype | shape |
| --- | --- | --- |
| `train_images` | uint8 | [{train_per_class * n_classes}, 28, 28] |
| `train_labels` | uint8 | [{train_per_class * n_classes}] |
| `train_source_indices` | int32 | [{train_per_class * n_classes}] (index in the 60k train file) |
| `test_images` | uint8 | [{test_per_class * n_classes}, 28, 28] |
| `test_labels` | uint8 | [{test_per_class * n_classes}] |
| `test_source_indices` | int32 | [{test_per_class * n_classes}] (index in the 10k t10k file) |
| `class_names` | str | [10]: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot |
| `seed` | int64 | [] |

## Regenerate

```bash
apt-get install -y dataset-fashion-mnist      # if /usr/share/datasets/fashion-mnist is missing
.venv/bin/python scripts/make_bundled_data.py \\
    --train-per-class {train_per_class} --test-per-class {test_per_class} --seed {seed}
```
"""
    (npz_path.parent / "README.md").write_text(text, encoding="utf-8")


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def make_photos() -> list:
    import skimage
    import skimage.data

    out_dir = DATA_DIR / "photos"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (func, source, licence) in PHOTOS.items():
        array = getattr(skimage.data, func)()
        img = Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB")
        orig_size = img.size
        if max(img.size) > MAX_SIDE:
            scale = MAX_SIDE / max(img.size)
            img = img.resize(
                (round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS
            )
        quality = 90
        payload = _jpeg_bytes(img, quality)
        while len(payload) > MAX_BYTES and quality > 50:
            quality -= 5
            payload = _jpeg_bytes(img, quality)
        path = out_dir / f"{name}.jpg"
        path.write_bytes(payload)
        rows.append((path.name, func, orig_size, img.size, quality, len(payload), source, licence))
        print(f"wrote {path.relative_to(REPO)} {img.size[0]}x{img.size[1]} q{quality} "
              f"({len(payload) / 1024:.0f} KiB)")
    _write_photos_readme(out_dir, rows, skimage.__version__)
    return rows


def _write_photos_readme(out_dir: Path, rows: list, skimage_version: str) -> None:
    lines = [
        "# Bundled photos",
        "",
        "Real photographs used by tests and the demo (any-size RGB input for the NEPA image",
        "processor and models). They come from the sample images shipped inside",
        f"[scikit-image](https://scikit-image.org) (`skimage.data`, version {skimage_version});",
        "source and licence are as stated in the docstring of each `skimage.data` function.",
        "Only images stated there to be in the public domain, under CC0, or free of known",
        "copyright restrictions were taken (the Middlebury stereo pair, whose licence is not",
        "stated, was left out). Each was",
        f"converted to RGB, downscaled so that its longer side is at most {MAX_SIDE} px",
        "(Lanczos) and saved as JPEG (quality 90, lowered only if needed to stay under 200 KB).",
        "",
        "Regenerate with `python scripts/make_bundled_data.py` (needs scikit-image).",
        "",
        "| file | `skimage.data` function | original size | stored size | JPEG quality | bytes | source | licence |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for fname, func, orig, size, q, nbytes, source, licence in rows:
        lines.append(
            f"| `{fname}` | `{func}()` | {orig[0]}x{orig[1]} | {size[0]}x{size[1]} | {q} | "
            f"{nbytes} | {source} | {licence} |"
        )
    lines.append("")
    (out_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=20240)
    parser.add_argument("--fashion-mnist-dir", default="/usr/share/datasets/fashion-mnist",
                        help="directory with the Fashion-MNIST idx(.gz) files")
    parser.add_argument("--skip-photos", action="store_true")
    parser.add_argument("--skip-fashion-mnist", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_fashion_mnist:
        make_fashion_mnist(args.train_per_class, args.test_per_class, args.seed,
                           args.fashion_mnist_dir)
    if not args.skip_photos:
        make_photos()
    return 0


if __name__ == "__main__":
    sys.exit(main())
