"""Data helpers: Fashion-MNIST (Debian package or bundled subset) and bundled photos; loading image datasets; decoding
one image, with the scripts' one skip-and-count rule for unreadable images (`UnreadableImages`); the scripts' image
size check (`patch_aligned_size`).

Only the standard library and numpy are imported at module level; PIL, torch and the Hugging Face ``datasets``
library are imported lazily by the functions that need them.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "FASHION_MNIST_DEBIAN_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "BUNDLED_FASHION_MNIST_FILE",
    "DATA_DIR_ENV_VAR",
    "read_idx",
    "write_idx",
    "load_fashion_mnist",
    "bundled_data_dir",
    "bundled_photo_paths",
    "fashion_mnist_dataset",
    "photos_dataset",
    "load_image_dataset",
    "resolve_column",
    "split_names",
    "BUILTIN_DATASETS",
    "decode_image",
    "describe_image_source",
    "transform_image",
    "without_image_decoding",
    "UNKNOWN_FILE",
    "UnreadableImages",
    "patch_aligned_size",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT_COMMAND = "apt-get update && apt-get install -y dataset-fashion-mnist"

FASHION_MNIST_CLASSES: Tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# split -> (images file, labels file), without the optional ".gz" suffix.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Relative to bundled_data_dir().
BUNDLED_FASHION_MNIST_FILE = os.path.join("fashion_mnist", "fashion_mnist_subset.npz")
BUNDLED_PHOTOS_DIR = "photos"
DATA_DIR_ENV_VAR = "NEPA_HF_DATA_DIR"

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")

# idx type code -> big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------- idx files


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_idx(path) -> np.ndarray:
    """Read an idx file (as used by MNIST / Fashion-MNIST), gzipped or plain, into numpy.

    Returns an array in native byte order with the shape stored in the file.
    Raises ``ValueError`` for a bad magic number or a truncated file.
    """
    path = Path(path)
    with _open_maybe_gzip(path) as fh:
        data = fh.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an idx file ({len(data)} bytes)")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad idx magic number 0x{data[:4].hex()} "
            "(expected 0x0000TTNN with type TT in "
            f"{sorted(hex(c) for c in _IDX_DTYPES)} and NN >= 1 dimensions)"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        raise ValueError(
            f"{path}: idx payload has {payload} bytes, expected {expected} for shape {shape}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path, array: np.ndarray, compress: Optional[bool] = None) -> Path:
    """Write ``array`` as an idx file (gzipped when ``compress`` or the name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    code = None
    for c, dt in _IDX_DTYPES.items():
        if dt.newbyteorder("=") == array.dtype.newbyteorder("="):
            code = c
            break
    if code is None:
        raise ValueError(f"dtype {array.dtype} cannot be stored in an idx file")
    if array.ndim < 1 or array.ndim > 255:
        raise ValueError("idx arrays need 1..255 dimensions")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = array.astype(_IDX_DTYPES[code], copy=False).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    opener = gzip.open if compress else open
    with opener(path, "wb") as fh:
        fh.write(header + payload)
    return path


# --------------------------------------------------------------------------- locations


def bundled_data_dir() -> Path:
    """The bundled sample data shipped inside the package (``nepa_hf/data/bundled``; ``data/`` in the repository
    links to it), or ``$NEPA_HF_DATA_DIR`` when set."""
    env = os.environ.get(DATA_DIR_ENV_VAR)
    path = Path(env).expanduser() if env else Path(__file__).resolve().parent / "bundled"
    if not path.is_dir():
        raise FileNotFoundError(
            f"{'$' + DATA_DIR_ENV_VAR + '=' + repr(env) if env else 'The bundled data folder ' + str(path)} is not a "
            "directory: reinstall nepa-hf (the package ships its sample data) or point $" + DATA_DIR_ENV_VAR +
            " at a folder holding fashion_mnist/ and photos/."
        )
    return path


def bundled_photo_paths() -> List[Path]:
    """Sorted paths of the bundled photos (``data/photos/*.jpg``)."""
    photo_dir = bundled_data_dir() / BUNDLED_PHOTOS_DIR
    if not photo_dir.is_dir():
        raise FileNotFoundError(f"No bundled photos folder at {photo_dir}")
    paths = sorted(p for p in photo_dir.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"No photos ({', '.join(PHOTO_SUFFIXES)}) in {photo_dir}")
    return paths


# --------------------------------------------------------------------------- Fashion-MNIST


def _check_split(split: str) -> str:
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    return split


def _find_idx_file(root: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _debian_files(split: str, root=None) -> Optional[Tuple[Path, Path]]:
    root = Path(root if root is not None else FASHION_MNIST_DEBIAN_DIR)
    images_stem, labels_stem = FASHION_MNIST_FILES[split]
    images, labels = _find_idx_file(root, images_stem), _find_idx_file(root, labels_stem)
    if images is None or labels is None:
        return None
    return images, labels


def _bundled_file() -> Optional[Path]:
    try:
        path = bundled_data_dir() / BUNDLED_FASHION_MNIST_FILE
    except FileNotFoundError:
        return None
    return path if path.is_file() else None


def fashion_mnist_available(source: str = "auto", root=None) -> bool:
    """Whether ``load_fashion_mnist(source=source)`` would find data for both splits."""
    debian = all(_debian_files(s, root) is not None for s in FASHION_MNIST_FILES)
    if source == "debian":
        return debian
    if source == "bundled":
        return _bundled_file() is not None
    return debian or _bundled_file() is not None


def load_fashion_mnist(
    split: str = "train", source: str = "auto", root=None
) -> Tuple[np.ndarray, np.ndarray]:
    """Load Fashion-MNIST as ``(images uint8 [N, 28, 28], labels int64 [N])``.

    source:
      * ``"debian"``  - full data set from the idx files of Debian's
        ``dataset-fashion-mnist`` package (``root`` overrides their directory,
        default :data:`FASHION_MNIST_DEBIAN_DIR`);
      * ``"bundled"`` - the small class-balanced subset committed under ``data/fashion_mnist``;
      * ``"auto"``    - Debian files when present, otherwise the bundled subset.
    """
    split = _check_split(split)
    if source not in ("auto", "debian", "bundled"):
        raise ValueError(f"source must be 'auto', 'debian' or 'bundled', got {source!r}")

    if source in ("auto", "debian"):
        files = _debian_files(split, root)
        if files is not None:
            images = read_idx(files[0])
            labels = read_idx(files[1])
            return _validated(images, labels, str(files[0]))
        if source == "debian":
            where = root if root is not None else FASHION_MNIST_DEBIAN_DIR
            raise FileNotFoundError(
                f"Fashion-MNIST idx files for split {split!r} not found in {where}. "
                f"Install them with: {FASHION_MNIST_APT_COMMAND}"
            )

    bundled = _bundled_file()
    if bundled is None:
        raise FileNotFoundError(
            "Fashion-MNIST not found: neither the Debian files in "
            f"{root if root is not None else FASHION_MNIST_DEBIAN_DIR} nor the bundled subset "
            f"data/{BUNDLED_FASHION_MNIST_FILE} (set ${DATA_DIR_ENV_VAR}) exist. "
            f"Install the full data set with: {FASHION_MNIST_APT_COMMAND}"
        )
    with np.load(bundled) as npz:
        images = npz[f"{split}_images"]
        labels = npz[f"{split}_labels"]
    return _validated(images, labels, str(bundled))


def _validated(images: np.ndarray, labels: np.ndarray, origin: str) -> Tuple[np.ndarray, np.ndarray]:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{origin}: expected images of shape [N, 28, 28], got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{origin}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images.astype(np.uint8, copy=False), labels.astype(np.int64)


def _subsample_indices(n: int, max_samples: Optional[int], seed: int) -> np.ndarray:
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    if max_samples < 0:
        raise ValueError("max_samples must be >= 0")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_samples, replace=False))


def _pgm_bytes(image: np.ndarray) -> bytes:
    """A uint8 HxW array as binary PGM: lossless, read by PIL (and so by `datasets.Image`) as mode "L". Written
    with NumPy alone: encoding 60k images as PNG through PIL took ~40 s per process, this takes well under one."""
    height, width = image.shape
    return b"P5\n%d %d\n255\n" % (width, height) + np.ascontiguousarray(image, dtype=np.uint8).tobytes()


def fashion_mnist_dataset(
    split: str = "train",
    source: str = "auto",
    max_samples: Optional[int] = None,
    seed: int = 0,
    root=None,
):
    """Fashion-MNIST as a ``datasets.Dataset`` with ``image`` (PIL "L") and ``label`` (ClassLabel).

    ``max_samples`` keeps a random subset (drawn with ``seed``, original order kept).
    """
    import datasets

    images, labels = load_fashion_mnist(split, source=source, root=root)
    keep = _subsample_indices(len(labels), max_samples, seed)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES)),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _pgm_bytes(images[i]), "path": None} for i in keep],
            "label": [int(labels[i]) for i in keep],
        },
        features=features,
        split=split,
    )


def photos_dataset(paths: Optional[Sequence] = None):
    """The bundled photos (or ``paths``) as a ``datasets.Dataset`` with ``image`` and ``name`` columns."""
    import datasets

    paths = [Path(p) for p in (paths if paths is not None else bundled_photo_paths())]
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": [str(p) for p in paths], "name": [p.stem for p in paths]},
        features=features,
    )


# Names `load_image_dataset` understands besides local folders and Hub ids.
BUILTIN_DATASETS = {
    "fashion_mnist": "Fashion-MNIST: Debian package files when installed, else the bundled subset",
    "fashion_mnist_debian": "Fashion-MNIST from the Debian package only (60k train / 10k test)",
    "bundled": "the bundled Fashion-MNIST subset (2000 train / 1000 test)",
    "bundled_photos": "the bundled real photos (no labels)",
}


def load_image_dataset(
    source: str,
    split: str = "train",
    streaming: bool = False,
    max_samples: Optional[int] = None,
    seed: int = 0,
    **load_kwargs,
):
    """One entry point for the example scripts' image data.

    ``source`` is one of :data:`BUILTIN_DATASETS`, a local folder (loaded as ``imagefolder``: class sub-folders give
    labels), or a Hugging Face Hub dataset id (``streaming=True`` for datasets too big for disk). Returns a
    ``datasets.Dataset`` (or ``IterableDataset`` when streaming). ``max_samples`` keeps a random subset.
    """
    import datasets

    if source in ("fashion_mnist", "fashion-mnist"):
        dataset = fashion_mnist_dataset(split, source="auto")
    elif source == "fashion_mnist_debian":
        dataset = fashion_mnist_dataset(split, source="debian")
    elif source in ("bundled", "bundled_fashion_mnist"):
        dataset = fashion_mnist_dataset(split, source="bundled")
    elif source == "bundled_photos":
        dataset = photos_dataset()
    elif os.path.isdir(source):
        dataset = datasets.load_dataset("imagefolder", data_dir=source, split=split, **load_kwargs)
    elif os.path.exists(source):
        raise ValueError(f"{source!r} is a file; pass a folder of images (imagefolder layout) or a dataset name.")
    else:
        try:
            dataset = datasets.load_dataset(source, split=split, streaming=streaming, **load_kwargs)
        except Exception as error:  # network, unknown name, missing split: say what was tried
            raise ValueError(
                f"Could not load dataset {source!r} (split {split!r}) from the Hugging Face Hub: {error}. Use a "
                f"local image folder or one of the built-in names {sorted(BUILTIN_DATASETS)}."
            ) from error
    if max_samples is not None:
        if streaming:
            dataset = dataset.take(max_samples)
        elif max_samples < len(dataset):
            dataset = dataset.shuffle(seed=seed).select(range(max_samples))
    return dataset


def split_names(source: str, **load_kwargs) -> List[str]:
    """The splits `load_image_dataset(source, split=...)` can load (built-in names, a local image folder, a Hub id),
    without loading any data. A plain image folder (class sub-folders) has only "train"."""
    import datasets

    if source in ("fashion_mnist", "fashion-mnist", "fashion_mnist_debian", "bundled", "bundled_fashion_mnist"):
        return list(FASHION_MNIST_FILES)
    if source == "bundled_photos":
        return ["train"]
    if "name" in load_kwargs:  # load_dataset's name is get_dataset_split_names' config_name
        load_kwargs["config_name"] = load_kwargs.pop("name")
    if os.path.isdir(source):
        return list(datasets.get_dataset_split_names("imagefolder", data_dir=source, **load_kwargs))
    try:
        return list(datasets.get_dataset_split_names(source, **load_kwargs))
    except Exception as error:  # network, unknown name: say what was tried
        raise ValueError(
            f"Could not list the splits of dataset {source!r}: {error}. Use a local image folder or one of the "
            f"built-in names {sorted(BUILTIN_DATASETS)}."
        ) from error


def resolve_column(dataset, requested: Optional[str], candidates: Sequence[str], what: str) -> str:
    """The column to use for ``what`` (e.g. "image"): ``requested`` if given, else the first present candidate.

    Raises a ValueError listing the dataset's columns when nothing fits.
    """
    columns = list(dataset.column_names or dataset.features or [])
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{what} column {requested!r} not found; the dataset has columns {columns}.")
        return requested
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(
        f"Could not find the {what} column among {columns}; pass it explicitly (e.g. --{what}_column NAME)."
    )


# --------------------------------------------------------------------------- decoding one image


def decode_image(value):
    """Decode one dataset value into a fully loaded PIL image.

    Accepts a PIL image, a ``datasets.Image(decode=False)`` dict (``{"bytes", "path"}``), raw bytes, a file path or an
    HxW[xC] array (uint16 arrays scaled to 8 bits by the image processor's rule, ``transforms.array_to_image``). The
    pixels are read here (``Image.load()``), so truncated files fail now rather than later.
    """
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        if value.get("bytes") is None and not value.get("path"):
            raise ValueError("image entry has neither bytes nor a path")
        from datasets import Image as ImageFeature

        image = ImageFeature().decode_example(value)  # handles local, archive and remote paths
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif isinstance(value, np.ndarray):
        from .transforms import array_to_image

        image = array_to_image(value)
    else:
        raise TypeError(f"Cannot decode an image from a {type(value).__name__}.")
    image.load()
    return image


def describe_image_source(value, where) -> str:
    """``where`` (e.g. a row index) plus the file path behind a dataset value when it has one, for warnings."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, os.PathLike)) else None
    return f"{where}" + (f" ({path})" if path else "")


def transform_image(transform, image, source: str):
    """`transform(image)` for an image that decoded. A failure here is a bug in the transform or the libraries under
    it, not a bad file: it is raised (never skipped as unreadable), naming the image and the transform."""
    try:
        return transform(image)
    except Exception as error:
        raise RuntimeError(
            f"The transform failed on image {source} ({image.mode}, {image.width}x{image.height}), which decoded "
            f"fine: {type(error).__name__}: {error}. This is an error in the transform or a library it uses, not in "
            f"the file. Transform: {transform!r}"
        ) from error


def without_image_decoding(dataset, image_column: str):
    """The dataset with its ``datasets.Image`` column read undecoded (``decode=False``), so decoding, and its errors,
    happen in our wrappers, which skip an unreadable file instead of ending the DataLoader."""
    features = getattr(dataset, "features", None)
    if features is None or image_column not in features:
        return dataset
    from datasets import Image as ImageFeature

    if isinstance(features[image_column], ImageFeature) and features[image_column].decode:
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


UNKNOWN_FILE = -1  # key of an unreadable image that names no file: counted each time it is read


class UnreadableImages:
    """The scripts' one rule for images that cannot be read: skipped (never ending a run), warned about naming the
    file (the first `max_warnings` per DataLoader worker), and counted once per file however often each is read
    (every epoch) and whichever worker or process reads it.

    An image is known by an integer key: its row in a map-style dataset, or, when streaming, a hash of its path or
    bytes (`data.pretraining.unreadable_file_key`); `UNKNOWN_FILE` ones cannot be told apart and count each time.
    The keys reach the count one of two ways:

    - `read` in DataLoader workers flags the rows of a map-style dataset of `num_rows` rows in shared memory
      (fine-tuning and evaluation, whose collators drop unreadable examples);
    - `add` records keys that travelled to the training process in the batches (pretraining: streamed keys are hashes,
      and Accelerate may hand a batch read by one process to another).

    `count(accelerator)` merges what every process recorded (a collective: call it on every process at the same
    point; without an accelerator, this process alone). `state_dict` / `load_state_dict` carry it across a resume.
    """

    max_warnings = 10

    def __init__(self, num_rows: int | None = None):
        import torch

        self.row_flags = torch.zeros(num_rows, dtype=torch.uint8).share_memory_() if num_rows is not None else None
        self.num_warnings = 0  # per worker copy
        self.pending: list[int] = []  # keys added in this process since the last count
        self.files: set[int] = set()
        self.unnamed = 0

    def read(self, value, where: str, key: int):
        """`decode_image(value)`, or None for an image that cannot be read (skipped: see `skip`)."""
        try:
            return decode_image(value)
        except Exception as error:  # any reading/decoding failure: skip the image, never stop a long run
            self.skip(key, describe_image_source(value, where), error)
            return None

    def skip(self, key: int, source: str, error: Exception) -> None:
        """Warn about the unreadable image `source` and, for a map-style dataset, flag its row `key`."""
        if self.row_flags is not None:
            self.row_flags[key] = 1
        self.num_warnings += 1
        if self.num_warnings <= self.max_warnings:
            logger.warning(
                "Skipping unreadable image %s: %s: %s%s", source, type(error).__name__, error,
                " (further ones in this worker are only counted)" if self.num_warnings == self.max_warnings else "",
            )

    def add(self, keys: list[int]) -> None:
        self.pending.extend(keys)

    def indices(self) -> list[int]:
        """The rows this process's DataLoader workers flagged."""
        return [] if self.row_flags is None else self.row_flags.nonzero().flatten().tolist()

    def count(self, accelerator=None) -> int:
        keys, self.pending = self.pending + self.indices(), []
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            keys = gather_object(keys)
        for key in keys:
            if key == UNKNOWN_FILE:
                self.unnamed += 1
            else:
                self.files.add(key)
        return len(self.files) + self.unnamed

    def state_dict(self) -> dict:
        return {"skipped_files": sorted(self.files), "skipped_unnamed": self.unnamed}

    def load_state_dict(self, state: dict) -> None:
        self.files, self.unnamed = set(state["skipped_files"]), state["skipped_unnamed"]


def patch_aligned_size(size: int, patch_size: int, name: str = "--image_size", round_down: bool = False) -> int:
    """`size` (an image side, given as the option `name`) when it is a multiple of the patch size. Otherwise a
    ValueError naming both and the nearest valid sizes or, with `round_down` (a default that follows the data), the
    largest multiple that fits, with a warning."""
    lower = size - size % patch_size
    if lower == size:
        return size
    if round_down and lower > 0:
        logger.warning(f"{name} {size} is not a multiple of the patch size {patch_size}: using {lower}, the largest "
                       "multiple that fits.")
        return lower
    nearest = f"{lower} or {lower + patch_size}" if lower > 0 else f"{patch_size}"
    raise ValueError(f"{name} {size} must be a multiple of the patch size {patch_size}: use {nearest}.")
