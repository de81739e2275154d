# Copyright 2025 The nepa-hf authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Image processor classes for NEPA.

Two classes with the same defaults and behaviour, one per transformers image-processing backend:
`NepaImageProcessor` (torchvision; the default, as for transformers' own models) and `NepaImageProcessorPil`
(PIL/numpy; no torchvision needed). Which one a saved folder loads follows this rule:

* Both classes save the same `preprocessor_config.json`: `"image_processor_type": "NepaImageProcessor"` and, when
  registered for `AutoImageProcessor` (importing `nepa_hf` does that), an `auto_map` entry naming both backends,
  `{"AutoImageProcessor": {"pil": "image_processing_nepa.NepaImageProcessorPil", "torchvision":
  "image_processing_nepa.NepaImageProcessor"}}`, next to a copy of this file.
* `AutoImageProcessor.from_pretrained(folder)` (and every pipeline) then returns `NepaImageProcessor` where
  torchvision is installed and `NepaImageProcessorPil` where it is not, with `nepa_hf` imported or through
  `trust_remote_code=True` without it. `backend="pil"` asks for `NepaImageProcessorPil` explicitly.
* The two differ only by resampling arithmetic: resized pixel values by at most 2 uint8 steps (2/127.5 after the
  [-1, 1] normalisation) and nearest-neighbour label maps only where a pixel centre falls exactly on a source pixel
  edge (torchvision takes the exact pixel, PIL's float arithmetic sometimes the one before).

This module only imports from transformers, torch, numpy, PIL and the standard library: it is copied flat next to
saved checkpoints so that it can be loaded with `trust_remote_code=True`.
"""

import os

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_processing_utils import BatchFeature

try:
    from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
except ImportError:  # pragma: no cover - releases before it: the same fields, on its base class
    SemanticSegmentationPostProcessorOutput = BatchFeature
from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
    get_image_size_for_max_height_width,
    load_image,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, is_torch_available, is_torchvision_available, logging

if is_torch_available():
    import torch


logger = logging.get_logger(__name__)

# Value written for "ignore" pixels by `do_reduce_labels` (ADE20K convention).
SEGMENTATION_IGNORE_INDEX = 255

_VALID_CHANNELS = (1, 3, 4)

# The class of each backend, as written in a saved `auto_map` (PIL first: the fallback for an unknown backend).
_BACKEND_CLASS_NAMES = {"pil": "NepaImageProcessorPil", "torchvision": "NepaImageProcessor"}


class NepaImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_reduce_labels (`bool`, *optional*, defaults to `self.do_reduce_labels`):
        Whether to reduce all label values of segmentation maps by 1 and map the background label 0 to 255 (the
        ignore index). Used for datasets such as ADE20K where 0 is "other" and is not one of the classes.
    """

    do_reduce_labels: bool


def _is_torch_tensor(obj) -> bool:
    return is_torch_available() and isinstance(obj, torch.Tensor)


def _is_floating(image) -> bool:
    if _is_torch_tensor(image):
        return image.is_floating_point()
    return np.issubdtype(image.dtype, np.floating)


def _looks_rescaled(image) -> bool:
    """Whether `image` holds floats that all lie in [0, 1], i.e. was probably rescaled already."""
    if _is_torch_tensor(image):
        image = image.detach()  # the torchvision backend keeps tensors as given, possibly requiring grad
    return _is_floating(image) and float(image.min()) >= 0 and float(image.max()) <= 1


def _sixteen_bit_to_uint8(array: np.ndarray) -> np.ndarray:
    """
    Scale 16-bit values (0..65535) to uint8 (0..255): divide by 257 (= 65535 / 255) and round.

    The one rule for 16-bit images in both backends, applied with the RGB conversion (`do_convert_rgb`, on by
    default; segmentation maps are never converted): PIL modes "I;16*" (and "I" images with values above 255, e.g.
    16-bit PNGs) as well as uint16 numpy arrays and torch tensors.
    """
    return np.clip(np.round(np.asarray(array, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)


def _is_uint16(image) -> bool:
    if _is_torch_tensor(image):
        return image.dtype == torch.uint16
    return isinstance(image, np.ndarray) and image.dtype == np.uint16


def to_8bit_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """
    Convert 16/32-bit integer and float PIL images to 8-bit RGB.

    Pillow's `convert("RGB")` clips these modes at 255 instead of scaling them, which turns a 16-bit photo white.
    16-bit modes (and "I" images whose values exceed 255, e.g. 16-bit PNGs) go through `_sixteen_bit_to_uint8`;
    "F" images with values in [0, 1] are scaled by 255; anything else is clipped to [0, 255].
    """
    array = np.asarray(image).astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(
            f"The mode {image.mode!r} PIL image has {int(np.isnan(array).sum())} NaN and {int(np.isinf(array).sum())} "
            "infinite pixel values, which have no 8-bit value. Fix the image source, or replace them "
            "(numpy.nan_to_num)."
        )
    if image.mode.startswith("I;16") or (image.mode == "I" and array.size and array.max() > 255):
        array = _sixteen_bit_to_uint8(array)
    else:
        if image.mode == "F" and array.size and array.min() >= 0.0 and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(np.stack([array] * 3, axis=-1))


def open_image(source: str, timeout: float | None = None) -> PIL.Image.Image:
    """
    Open an image file path, URL or base64 string, with errors that name the source and the fix.

    Unlike transformers' `load_image`, a local file keeps its mode (the processor's RGB conversion, with its 16-bit
    rule, applies later; label maps stay single-channel) and is decoded here, so a damaged file fails with its name:
    `FileNotFoundError` for a path that does not exist, `OSError` for a file PIL cannot decode (truncated, not an
    image).
    """
    if source.startswith(("http://", "https://")):
        try:
            return load_image(source, timeout=timeout)
        except Exception as error:
            raise OSError(
                f"Cannot load the image at {source}: {error}. Check the URL and the network, or download the file and "
                "pass its path."
            ) from error
    if os.path.isfile(source):
        try:
            image = PIL.Image.open(source)
            image.load()  # decode now: PIL opens lazily, and a truncated file would fail later without its name
        except OSError as error:
            raise OSError(
                f"Cannot read the image file {source!r}: {error}. The file is damaged, incomplete or not an image: "
                "re-download or re-export it, or leave it out."
            ) from error
        return PIL.ImageOps.exif_transpose(image)
    try:  # transformers also takes base64-encoded images ("data:image/...;base64,..." or bare base64)
        return load_image(source, timeout=timeout)
    except Exception as error:
        raise FileNotFoundError(
            f"No image file at {source!r} (absolute path {os.path.abspath(source)!r}), and it is not a URL or base64 "
            "image data. Check the path and the working directory."
        ) from error


def _check_finite(image, index: int) -> None:
    """Refuse float images with NaN or infinite values, which would give NaN logits and scores downstream."""
    if _is_torch_tensor(image):
        image = image.detach()
        finite = bool(torch.isfinite(image).all())
    else:
        finite = bool(np.isfinite(image).all())
    if finite:
        return
    if _is_torch_tensor(image):
        num_nan, num_inf = int(torch.isnan(image).sum()), int(torch.isinf(image).sum())
    else:
        num_nan, num_inf = int(np.isnan(image).sum()), int(np.isinf(image).sum())
    raise ValueError(
        f"Image {index} of the input ({tuple(image.shape)}, {image.dtype}) has {num_nan} NaN and {num_inf} infinite "
        "pixel values; the model would return NaN logits (and `score: nan` in pipelines). Fix the image source, or "
        "replace them, e.g. with numpy.nan_to_num / torch.nan_to_num."
    )


def _reduce_labels(labels):
    """ADE20K-style label reduction on an int64 array or tensor: 0 -> 255 (ignore), 255 stays 255, others minus 1."""
    reduced = labels - 1
    reduced[labels == 0] = SEGMENTATION_IGNORE_INDEX
    reduced[labels == SEGMENTATION_IGNORE_INDEX] = SEGMENTATION_IGNORE_INDEX
    return reduced


def _resize_output_size(height: int, width: int, size: SizeDict) -> tuple[int, int]:
    """Output (height, width) for `size`, with the same rules as the transformers backends' `resize`."""
    if size.shortest_edge and size.longest_edge:
        return get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
    if size.shortest_edge:
        dummy = np.empty((1, height, width), dtype=np.uint8)
        return get_resize_output_image_size(
            dummy, size=size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
    if size.max_height and size.max_width:
        return get_image_size_for_max_height_width((height, width), size.max_height, size.max_width)
    if size.height and size.width:
        return size.height, size.width
    raise ValueError(
        "Size must contain 'height' and 'width' keys, or 'max_height' and 'max_width', or 'shortest_edge' key. Got"
        f" {size}."
    )


class _NepaImageProcessorMixin:
    """
    Defaults, input validation, segmentation-map handling and post-processing shared by both backends.

    Placed before the backend class in the bases so that its class attributes take precedence.
    """

    valid_kwargs = NepaImageProcessorKwargs

    # Preprocessing of the released NEPA checkpoints: straight 224x224 bilinear resize, [-1, 1] normalisation.
    do_convert_rgb = True
    do_resize = True
    size = {"height": 224, "width": 224}
    resample = PILImageResampling.BILINEAR
    do_center_crop = False
    crop_size = None  # as ViT's: set with do_center_crop (the evaluation protocol sets both)
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    do_reduce_labels = False

    def preprocess(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None = None,
        **kwargs: Unpack[NepaImageProcessorKwargs],
    ) -> BatchFeature:
        """
        Preprocess an image or a batch of images, and optionally their semantic segmentation maps.

        Args:
            images (`ImageInput`):
                A PIL image (any mode), a numpy array or torch tensor of shape (H, W), (H, W, C) or (C, H, W) with
                C in {1, 3, 4}, a 4-D batch of those, or a list of any of these (sizes may differ). Integer inputs
                are expected in [0, 255], except 16-bit ones (uint16 arrays and tensors, PIL modes "I;16*"), which
                the RGB conversion scales to [0, 255] by 1/257; pass `do_rescale=False` for floats in [0, 1].
            segmentation_maps (`ImageInput`, *optional*):
                One label map per image, of shape (H, W) and the same size as its image (PIL image, numpy array or
                torch tensor; a 3-D array is a batch of maps). Returned as int64 `labels` of shape (B, H, W),
                resized with nearest-neighbour sampling and cropped like the images.
            **kwargs:
                Any attribute of the processor (`size`, `resample`, `do_center_crop`, `crop_size`,
                `do_reduce_labels`, `return_tensors`, ...) to override for this call.

        Returns:
            `BatchFeature` with `pixel_values` and, if `segmentation_maps` is given, `labels`.
        """
        return super().preprocess(images, segmentation_maps, **kwargs)

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> list:
        """Flatten `images` to a list of single images, with clear errors for anything that is not one."""
        what = "images" if expected_ndims == 3 else "segmentation maps"
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError(f"Received an empty list of {what}; expected at least one.")
            flat = []
            for item in images:
                # One level of nesting (e.g. a list of per-sample lists) is accepted, as in transformers.
                for sub_item in item if isinstance(item, (list, tuple)) else [item]:
                    flat.extend(self._split_image_like(sub_item, expected_ndims, allow_batch=False))
        else:
            flat = self._split_image_like(images, expected_ndims, allow_batch=True)
        if len(flat) == 0:
            raise ValueError(f"Received no {what}; expected at least one.")
        return flat

    def _split_image_like(self, item, expected_ndims: int, allow_batch: bool) -> list:
        if isinstance(item, str):
            item = open_image(item)
        if isinstance(item, PIL.Image.Image):
            return [item]
        if not (isinstance(item, np.ndarray) or _is_torch_tensor(item)):
            raise TypeError(
                f"Expected PIL.Image.Image, numpy.ndarray, torch.Tensor or a path/URL string, got {type(item)}."
            )
        shape = tuple(item.shape)
        if expected_ndims == 2:
            if item.ndim == 2:
                batch = [item]
            elif item.ndim == 3 and allow_batch:
                batch = list(item)
            else:
                raise ValueError(
                    "Expected a segmentation map of shape (H, W), or a batch of maps of shape (B, H, W); got an array"
                    f" of shape {shape}."
                )
            for label_map in batch:
                if 0 in label_map.shape:
                    raise ValueError(f"Got an empty segmentation map of shape {tuple(label_map.shape)}.")
            return batch

        if item.ndim in (2, 3):
            batch = [item]
        elif item.ndim == 4 and allow_batch:
            batch = list(item)
        else:
            raise ValueError(
                "Expected an image of shape (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}, or a batch of images"
                f" of shape (B, H, W, C) or (B, C, H, W); got an array of shape {shape}."
            )
        for image in batch:
            image_shape = tuple(image.shape)
            if image.ndim == 3 and image_shape[0] not in _VALID_CHANNELS and image_shape[-1] not in _VALID_CHANNELS:
                context = f" (element of a batch of shape {shape})" if image_shape != shape else ""
                raise ValueError(
                    f"Expected an image with 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, in (H, W, C) or (C, H, W)"
                    f" layout; got shape {image_shape}{context}."
                )
            if 0 in image_shape:
                raise ValueError(f"Got an empty image of shape {image_shape}.")
        return batch

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs,
    ):
        if isinstance(image, PIL.Image.Image):
            if do_convert_rgb and (image.mode.startswith("I;16") or image.mode in ("I", "F")):
                image = to_8bit_rgb(image)
        else:
            if do_convert_rgb and _is_uint16(image):  # as for 16-bit PIL images; never for label maps
                image = _sixteen_bit_to_uint8(image.detach().cpu().numpy() if _is_torch_tensor(image) else image)
            if image.ndim == 2:
                # The backends' RGB conversion cannot infer the layout of a 2-D array: make the channel axis explicit.
                image = image[None]
                input_data_format = ChannelDimension.FIRST
        return super().process_image(
            image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, **kwargs
        )

    def _preprocess_image_like_inputs(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension,
        return_tensors: str | TensorType | None,
        **kwargs,
    ) -> BatchFeature:
        images = self._prepare_image_like_inputs(
            images, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, device=kwargs.get("device")
        )
        # Any channel count passes, as in every transformers processor (the model checks it against num_channels),
        # as long as normalisation has one mean and std per channel.
        image_mean = kwargs.get("image_mean") if kwargs.get("do_normalize") else None
        channels = len(image_mean) if isinstance(image_mean, (list, tuple)) else None
        for index, image in enumerate(images):
            if _is_floating(image):  # integer pixels are always finite
                _check_finite(image, index)
            if channels is not None and image.shape[0] != channels:
                raise ValueError(
                    f"Image {index} has {image.shape[0]} channel(s) (shape {tuple(image.shape)} after moving channels"
                    f" first), but image_mean and image_std have {channels} entries. Keep `do_convert_rgb=True` to"
                    " convert grayscale, RGBA, CMYK and palette images to RGB, or pass image_mean and image_std with"
                    " one entry per channel."
                )
        if kwargs.get("do_rescale") and any(_looks_rescaled(image) for image in images):
            logger.warning_once(
                "It looks like you are trying to rescale already rescaled images (float values in [0, 1]). If the"
                " input images have pixel values between 0 and 1, set `do_rescale=False` to avoid rescaling them"
                " again."
            )

        data = {"pixel_values": self._preprocess(images, return_tensors=None, **kwargs)["pixel_values"]}

        if segmentation_maps is not None:
            maps = self._prepare_image_like_inputs(
                segmentation_maps, expected_ndims=2, do_convert_rgb=False, input_data_format=ChannelDimension.FIRST
            )
            if len(maps) != len(images):
                raise ValueError(f"Got {len(maps)} segmentation map(s) for {len(images)} image(s); expected one each.")
            for index, (image, label_map) in enumerate(zip(images, maps, strict=True)):
                if label_map.shape[0] != 1:
                    raise ValueError(
                        f"Segmentation map {index} has {label_map.shape[0]} channels; expected a single-channel map of"
                        " class indices of shape (H, W) (e.g. a PIL image in mode 'L', 'P' or 'I')."
                    )
                if tuple(image.shape[-2:]) != tuple(label_map.shape[-2:]):
                    raise ValueError(
                        f"Segmentation map {index} has size {tuple(label_map.shape[-2:])} but its image has size"
                        f" {tuple(image.shape[-2:])}; expected the same (height, width)."
                    )
            data["labels"] = self._preprocess_segmentation_maps(maps, **kwargs)

        return BatchFeature(data=data, tensor_type=return_tensors)

    def _preprocess_segmentation_maps(self, maps: list, **kwargs) -> list:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """
        The processor's settings, as saved in `preprocessor_config.json`.

        Registration for `AutoImageProcessor` makes `save_pretrained` record the saving class in `auto_map`; a
        NEPA class is replaced by both (`{"pil": ...NepaImageProcessorPil, "torchvision": ...NepaImageProcessor}`),
        so that `AutoImageProcessor` picks the backend at load time (see the module docstring).
        """
        output = super().to_dict()
        auto_map = output.get("auto_map")
        entry = auto_map.get("AutoImageProcessor") if isinstance(auto_map, dict) else None
        if isinstance(entry, str):
            module_name, _, class_name = entry.rpartition(".")
            if class_name in _BACKEND_CLASS_NAMES.values():
                both = {backend: f"{module_name}.{name}" for backend, name in _BACKEND_CLASS_NAMES.items()}
                output["auto_map"] = {**auto_map, "AutoImageProcessor": both}
        return output

    def post_process_semantic_segmentation(
        self, outputs, target_sizes=None, return_segmentation_scores: bool = False
    ) -> "list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]":
        """
        Convert the logits of a semantic-segmentation model into per-image label maps.

        Args:
            outputs:
                Model output with a `logits` attribute of shape (batch_size, num_labels, height, width).
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor` of shape (batch_size, 2), *optional*):
                (height, width) of each prediction. The logits are bilinearly resized to it before the argmax. If
                unset, the argmax is taken at the logits' resolution.
            return_segmentation_scores (`bool`, *optional*, defaults to `False`):
                Also return the (resized) logits: each item is then a `SemanticSegmentationPostProcessorOutput` with
                `segmentation` (height, width) and `segmentation_scores` (num_labels, height, width).

        Returns:
            `list[torch.Tensor]`: one `torch.long` tensor of shape (height, width) per image (or the outputs above).
        """
        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        if logits.ndim != 4:
            raise ValueError(
                f"Expected logits of shape (batch_size, num_labels, height, width), got shape {tuple(logits.shape)}."
            )
        if target_sizes is None:
            scores = list(logits.unbind(0))
        else:
            if len(target_sizes) != logits.shape[0]:
                raise ValueError(
                    f"Got {len(target_sizes)} target size(s) for a batch of {logits.shape[0]} logits; expected one each."
                )
            if _is_torch_tensor(target_sizes):
                target_sizes = target_sizes.tolist()
            # float32: interpolate is not implemented for every half-precision dtype on CPU.
            scores = [
                torch.nn.functional.interpolate(
                    logits[index : index + 1].float(), size=(int(size[0]), int(size[1])), mode="bilinear",
                    align_corners=False,
                )[0]
                for index, size in enumerate(target_sizes)
            ]  # fmt: skip
        if not return_segmentation_scores:
            return [score.argmax(dim=0) for score in scores]
        return [
            SemanticSegmentationPostProcessorOutput(
                data={"segmentation": score.argmax(dim=0), "segmentation_scores": score}
            )
            for score in scores
        ]


class NepaImageProcessorPil(_NepaImageProcessorMixin, PilBackend):
    """
    Constructs a NEPA image processor (PIL/numpy backend, no torchvision needed).

    The defaults reproduce the preprocessing of the released NEPA checkpoints: resize straight to 224x224 with
    bilinear resampling (no crop), rescale by 1/255, then normalise with mean = std = (0.5, 0.5, 0.5). The reference
    evaluation protocol (short side 256, bicubic, centre crop 224) is
    `size={"shortest_edge": 256}, resample=PILImageResampling.BICUBIC, do_center_crop=True,
    crop_size={"height": 224, "width": 224}`.

    Semantic segmentation maps go through the same resize and crop with nearest-neighbour sampling and come back as
    int64 `labels`; see `preprocess` and `post_process_semantic_segmentation`.
    """

    def __init__(self, **kwargs: Unpack[NepaImageProcessorKwargs]):
        super().__init__(**kwargs)

    def process_image(self, image: ImageInput, do_convert_rgb: bool | None = None, **kwargs) -> np.ndarray:
        if _is_torch_tensor(image):
            # The backend calls `.numpy()`, which fails for tensors on an accelerator or requiring grad.
            image = image.detach().cpu().numpy()
        return super().process_image(image, do_convert_rgb=do_convert_rgb, **kwargs)

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample: "PILImageResampling | None" = None,
        reducing_gap: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """
        Resize a channels-first image with PIL.

        uint8 images take the standard transformers path (identical to resizing the PIL image). Other dtypes are
        resized channel by channel as 32-bit float PIL images: the standard path would quantise them to uint8 and
        rejects floats outside [0, 1] that are not whole numbers.
        """
        if image.dtype == np.uint8:
            return super().resize(image, size, resample=resample, reducing_gap=reducing_gap, **kwargs)
        if resample is not None and not isinstance(resample, (PILImageResampling, int)):
            resample = PILImageResampling.BILINEAR
        resample = resample if resample is not None else PILImageResampling.BILINEAR
        height, width = _resize_output_size(image.shape[-2], image.shape[-1], size)
        channels = [
            np.asarray(
                PIL.Image.fromarray(channel.astype(np.float32)).resize(
                    (width, height), resample=resample, reducing_gap=reducing_gap
                )
            )
            for channel in image
        ]
        return np.stack(channels, axis=0)

    def _preprocess_segmentation_maps(
        self,
        maps: list[np.ndarray],
        do_reduce_labels: bool,
        do_resize: bool,
        size: SizeDict,
        do_center_crop: bool,
        crop_size: SizeDict,
        **kwargs,
    ) -> list[np.ndarray]:
        processed = []
        for label_map in maps:
            label_map = label_map.astype(np.int64)
            if do_reduce_labels:
                label_map = _reduce_labels(label_map)
            if do_resize:
                height, width = _resize_output_size(label_map.shape[-2], label_map.shape[-1], size)
                if label_map.min() < np.iinfo(np.int32).min or label_map.max() > np.iinfo(np.int32).max:
                    raise ValueError("Segmentation map values must fit in int32 to be resized.")
                # PIL mode "I" (int32) keeps any label value; nearest never introduces new ones.
                resized = PIL.Image.fromarray(label_map[0].astype(np.int32)).resize(
                    (width, height), resample=PILImageResampling.NEAREST
                )
                label_map = np.asarray(resized).astype(np.int64)[None]
            if do_center_crop:
                label_map = self.center_crop(label_map, crop_size)
            processed.append(label_map[0])
        return processed


if is_torchvision_available():

    class NepaImageProcessor(_NepaImageProcessorMixin, TorchvisionBackend):
        """
        Constructs a NEPA image processor (torchvision backend).

        Same defaults and behaviour as [`NepaImageProcessorPil`]; see its docstring. This is the class that
        `AutoImageProcessor` and the pipelines load where torchvision is installed (rule in the module docstring).
        Tensor resizing rounds differently from PIL's: at most 1 uint8 step bilinear, 2 steps bicubic.
        """

        def __init__(self, **kwargs: Unpack[NepaImageProcessorKwargs]):
            super().__init__(**kwargs)

        def _preprocess_segmentation_maps(
            self,
            maps: list["torch.Tensor"],
            do_reduce_labels: bool,
            do_resize: bool,
            size: SizeDict,
            do_center_crop: bool,
            crop_size: SizeDict,
            **kwargs,
        ) -> list["torch.Tensor"]:
            processed = []
            for label_map in maps:
                label_map = label_map.to(torch.int64)
                if do_reduce_labels:
                    label_map = _reduce_labels(label_map)
                if do_resize:
                    # The backend maps NEAREST to torchvision's NEAREST_EXACT, which samples pixel centres like
                    # PIL's NEAREST. Resize a float32 copy because nearest interpolation is not implemented for
                    # int64; values up to 2**24 stay exact.
                    label_map = self.resize(label_map.to(torch.float32), size, resample=PILImageResampling.NEAREST)
                    label_map = label_map.round().to(torch.int64)
                if do_center_crop:
                    label_map = self.center_crop(label_map, crop_size)
                processed.append(label_map[0])
            return processed

else:
    NepaImageProcessor = None


__all__ = ["NepaImageProcessorKwargs", "NepaImageProcessorPil", "NepaImageProcessor", "open_image"]
