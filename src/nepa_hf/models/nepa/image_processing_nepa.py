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
"""Image processor classes for NEPA, one per transformers backend, as BEiT's and Segformer's.

`NepaImageProcessor` (torchvision) and `NepaImageProcessorPil` (PIL/numpy) have the same defaults and save the same
`preprocessor_config.json`. `AutoImageProcessor.from_pretrained(folder)` returns `NepaImageProcessor` where
torchvision is installed and `NepaImageProcessorPil` where it is not (`backend="pil"` asks for it), with `nepa_hf`
imported or through `trust_remote_code=True`. The two differ by resampling arithmetic (resized pixel values by at
most 2 uint8 steps, nearest-neighbour label maps where a pixel centre falls exactly on a source pixel edge), and the
PIL one, as transformers' own, refuses float pixels in [0, 255] that are not whole numbers.

This file is copied next to saved checkpoints for `trust_remote_code=True`: it imports only transformers, torch,
numpy, PIL and the standard library.
"""

import os

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    load_image,
)
from transformers.models.beit.image_processing_pil_beit import BeitImageProcessorPil
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, is_torch_available, is_torch_tensor, is_torchvision_available

if is_torch_available():
    import torch


class NepaImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_reduce_labels (`bool`, *optional*, defaults to `self.do_reduce_labels`):
        Whether to reduce all label values of segmentation maps by 1 and map the background label 0 to 255 (the
        ignore index). Used for datasets such as ADE20K where 0 is "other" and is not one of the classes.
    """

    do_reduce_labels: bool


def _refuse_non_finite(pixels, description: str) -> None:
    """NaN or infinite pixels give NaN logits (and `score: nan` in pipelines) without any error: refuse them."""
    if not (pixels.is_floating_point() if is_torch_tensor(pixels) else pixels.dtype.kind == "f"):
        return
    # `x != x` (NaN) and `abs(x) == inf` work alike on numpy arrays and torch tensors.
    num_nan, num_inf = int((pixels != pixels).sum()), int((abs(pixels) == float("inf")).sum())
    if num_nan or num_inf:
        raise ValueError(
            f"{description} has {num_nan} NaN and {num_inf} infinite pixel values; the model would return NaN logits"
            " (and `score: nan` in pipelines). Fix the image source, or replace them, e.g. with numpy.nan_to_num /"
            " torch.nan_to_num."
        )


def convert_to_8_bit(image):
    """
    NEPA's rule for images of more than 8 bits, the same in both processor backends and the training loaders.

    16-bit images (PIL modes "I;16*", "I" images with values above 255 such as 16-bit PNGs, uint16 numpy arrays and
    torch tensors) are divided by 257 (= 65535 / 255) and rounded; "F" images with values in [0, 1] are scaled by
    255, other "I" and "F" images clipped to [0, 255]. (Pillow's `convert("RGB")` clips, which turns a 16-bit photo
    white.) Returns a mode "L" PIL image or a uint8 numpy array for those, any other image unchanged.
    """
    if isinstance(image, PIL.Image.Image):
        if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
            return image
        values = np.asarray(image, dtype=np.float64)
        _refuse_non_finite(values, f"The mode {image.mode!r} PIL image")
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max() > 255):
            values = values / 257
        elif image.mode == "F" and values.min() >= 0 and values.max() <= 1:
            values = values * 255
        return PIL.Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    if is_torch_tensor(image) and image.dtype == torch.uint16:
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray) and image.dtype == np.uint16:
        return np.round(image / 257).astype(np.uint8)
    return image


class _NepaImageProcessorMixin:
    """Defaults, the 16-bit rule, input checks and segmentation maps; placed before the backend class in the bases."""

    valid_kwargs = NepaImageProcessorKwargs

    # The released NEPA checkpoints' preprocessing: straight 224x224 bilinear resize, [-1, 1] normalisation.
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    size = {"height": 224, "width": 224}
    crop_size = None  # as ViT's: set with do_center_crop (the evaluation protocol sets both)
    do_convert_rgb = True
    do_resize = True
    do_center_crop = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_reduce_labels = False

    def preprocess(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None = None,
        **kwargs: Unpack[NepaImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        segmentation_maps (`ImageInput`, *optional*):
            One map of class indices of shape (H, W) per image, the size of its image. Returned as int64 `labels`,
            resized with nearest-neighbour sampling and cropped like the images.
        """
        return super().preprocess(images, segmentation_maps, **kwargs)

    def fetch_images(self, image_url_or_urls):
        # transformers' flattening takes no (H, W) arrays: give grayscale images (and label maps, which then read as a
        # batch of one) their channel axis.
        if getattr(image_url_or_urls, "ndim", None) == 2:
            return image_url_or_urls[None]
        if not isinstance(image_url_or_urls, str):
            return super().fetch_images(image_url_or_urls)  # lists come back here item by item
        if not os.path.isfile(image_url_or_urls):
            # A URL or base64 data. For a missing path, PIL's loader names it ("Incorrect image source ... Got
            # <path>"); the torchvision one may try it as base64 and fail without it.
            return load_image(image_url_or_urls)
        # transformers' loaders convert files to RGB (16-bit values clip, label maps gain channels) and name no file
        # when decoding fails: open local files here, keeping their mode.
        try:
            image = PIL.Image.open(image_url_or_urls)
            image.load()  # PIL decodes lazily: a truncated file would fail later, without its name
        except OSError as error:
            raise OSError(
                f"Cannot read the image file {image_url_or_urls!r}: {error}. The file is damaged, incomplete or not"
                " an image: re-download or re-export it, or leave it out."
            ) from error
        return PIL.ImageOps.exif_transpose(image)

    def process_image(self, image: ImageInput, do_convert_rgb: bool | None = None, **kwargs):
        if do_convert_rgb:  # with the RGB conversion, so never for label maps
            image = convert_to_8_bit(image)
        return super().process_image(image, do_convert_rgb=do_convert_rgb, **kwargs)

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
        # Any channel count passes, as in transformers' processors, with one mean and std per channel: the
        # torchvision backend would otherwise broadcast a grayscale float image to the mean's channels.
        image_mean = kwargs["image_mean"] if kwargs["do_normalize"] else None
        for index, image in enumerate(images):
            if 0 in image.shape:  # PIL would resize it to a blank image
                raise ValueError(f"Image {index} is empty (shape {tuple(image.shape)}, channels first).")
            _refuse_non_finite(image, f"Image {index} of the input ({tuple(image.shape)}, {image.dtype})")
            if isinstance(image_mean, tuple) and image.shape[0] != len(image_mean):
                raise ValueError(
                    f"Image {index} has {image.shape[0]} channel(s) (shape {tuple(image.shape)}, channels first) but"
                    f" image_mean and image_std have {len(image_mean)} entries. Keep `do_convert_rgb=True` to convert"
                    " grayscale, RGBA, CMYK and palette images to RGB, or pass one mean and std per channel."
                )
        data = {"pixel_values": self._preprocess(images, return_tensors=None, **kwargs)["pixel_values"]}

        if segmentation_maps is not None:
            maps = self._prepare_image_like_inputs(
                segmentation_maps, expected_ndims=2, do_convert_rgb=False, input_data_format=ChannelDimension.FIRST
            )
            if len(maps) != len(images):
                raise ValueError(f"Got {len(maps)} segmentation map(s) for {len(images)} image(s); expected one each.")
            for index, (image, label_map) in enumerate(zip(images, maps, strict=True)):
                if tuple(label_map.shape) != (1, *image.shape[-2:]):
                    raise ValueError(
                        f"Segmentation map {index} has shape {tuple(label_map.shape)} (channels first); expected"
                        f" {(1, *image.shape[-2:])}: one class index per pixel of its image."
                    )
            # int64 copies (the torchvision backend shares memory with numpy inputs), so reduced in place below.
            maps = [m.astype(np.int64) if isinstance(m, np.ndarray) else m.to(torch.int64, copy=True) for m in maps]
            if kwargs["do_reduce_labels"]:  # as BEiT's: 0 (background) -> 255 (ignored), 255 stays, others - 1
                for m in maps:
                    ignored = (m == 0) | (m == 255)
                    m -= 1
                    m[ignored] = 255
            map_kwargs = {**kwargs, "do_rescale": False, "do_normalize": False, "resample": PILImageResampling.NEAREST}
            data["labels"] = [m[0] for m in self._preprocess(maps, return_tensors=None, **map_kwargs)["pixel_values"]]

        return BatchFeature(data=data, tensor_type=return_tensors)

    def to_dict(self) -> dict:
        output = super().to_dict()
        # transformers writes the saving class into auto_map, and remote code loads exactly that class. Name both
        # backends, so that `trust_remote_code` users get the torchvision class where torchvision is installed.
        entry = output.get("auto_map", {}).get("AutoImageProcessor")
        if isinstance(entry, str) and entry.endswith((".NepaImageProcessor", ".NepaImageProcessorPil")):
            module = entry.rpartition(".")[0]
            backends = {"pil": f"{module}.NepaImageProcessorPil", "torchvision": f"{module}.NepaImageProcessor"}
            output["auto_map"]["AutoImageProcessor"] = backends
        return output

    # BEiT's, unchanged (it uses nothing of BEiT's processor): logits, bilinearly resized to `target_sizes`, to maps.
    post_process_semantic_segmentation = BeitImageProcessorPil.post_process_semantic_segmentation


class NepaImageProcessorPil(_NepaImageProcessorMixin, PilBackend):
    """
    NEPA image processor, PIL/numpy backend (no torchvision needed). The defaults are the released checkpoints'
    preprocessing: resize straight to 224x224, bilinear, no crop; rescale by 1/255; mean = std = 0.5. The reference
    evaluation protocol is `size={"shortest_edge": 256}, resample=PILImageResampling.BICUBIC, do_center_crop=True,
    crop_size={"height": 224, "width": 224}`.
    """

    def resize(self, image: np.ndarray, size, resample=None, **kwargs) -> np.ndarray:
        if not (image.dtype == np.int64 and resample == PILImageResampling.NEAREST and image.shape[0] == 1):
            return super().resize(image, size, resample=resample, **kwargs)
        if image.min() < np.iinfo(np.int32).min or image.max() > np.iinfo(np.int32).max:
            raise ValueError("Segmentation map values must fit in int32 to be resized.")
        # Label maps: transformers' PIL resize is 8-bit, so resize the 4 bytes of each int32 label as 4 channels;
        # nearest sampling takes all 4 from the same source pixel, so every class index survives.
        label_bytes = image[0].astype("<i4").view(np.uint8).reshape(*image.shape[1:], 4).transpose(2, 0, 1)
        resized = super().resize(label_bytes, size, resample=resample, **kwargs)
        return np.ascontiguousarray(resized.transpose(1, 2, 0)).view("<i4").transpose(2, 0, 1).astype(np.int64)


if is_torchvision_available():

    class NepaImageProcessor(_NepaImageProcessorMixin, TorchvisionBackend):
        """NEPA image processor, torchvision backend (the default); settings as `NepaImageProcessorPil`'s."""

else:
    NepaImageProcessor = None


__all__ = ["NepaImageProcessorKwargs", "NepaImageProcessorPil", "NepaImageProcessor", "convert_to_8_bit"]
