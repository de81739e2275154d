"""Issue 14, processor / pipeline boundary: bad images get clear errors that name the input and the fix.

Items: 3 (NaN/inf pixels), 10 (pipeline inputs: damaged or missing image files, an empty list; transformers' own
errors where its code runs before NEPA's, as the README documents).
"""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline
from transformers.utils import is_torchvision_available

from nepa_hf import (
    NepaForImageClassification,
    NepaForSemanticSegmentation,
    NepaImageProcessor,
    NepaImageProcessorPil,
)
from small_models import save_folder

PROCESSOR_CLASSES = [NepaImageProcessorPil] + ([NepaImageProcessor] if is_torchvision_available() else [])


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def damaged_jpeg(tmp_path):
    path = tmp_path / "damaged.jpg"
    path.write_bytes(jpeg_bytes()[:700])  # cut inside the scan data
    return path


# ------------------------------------------------------------------------------------------------ item 3


@pytest.mark.parametrize("processor_class", PROCESSOR_CLASSES)
def test_processor_refuses_nan_and_infinite_pixels(processor_class):
    processor = processor_class(size={"height": 32, "width": 32})
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3)).astype(np.float32)
    image[3, 4, 0] = np.nan
    with pytest.raises(ValueError, match=r"Image 0 of the input .* 1 NaN and 0 infinite pixel values.*nan_to_num"):
        processor(image, do_rescale=True)
    batch = [np.zeros((40, 30, 3), np.float32), torch.full((3, 40, 30), float("inf"))]
    with pytest.raises(ValueError, match=r"Image 1 of the input .* 0 NaN and 3600 infinite"):
        processor(batch)
    float_pil = PIL.Image.fromarray(np.full((40, 30), np.nan, dtype=np.float32))
    assert float_pil.mode == "F"
    with pytest.raises(ValueError, match=r"mode 'F' PIL image has 1200 NaN"):
        processor(float_pil)
    processor(np.nan_to_num(image))  # the fix the message names


def test_classification_pipeline_refuses_nan_pixels_instead_of_scoring_nan(tmp_path):
    save_folder(tmp_path)
    classify = pipeline("image-classification", model=str(tmp_path))
    image = np.zeros((32, 32, 3), np.float32)
    image[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"3 NaN .*`score: nan`"):
        classify(image)


# ------------------------------------------------------------------------------------------------ item 10


@pytest.mark.parametrize("processor_class", PROCESSOR_CLASSES)
def test_processor_names_missing_and_damaged_image_files(tmp_path, damaged_jpeg, processor_class):
    processor = processor_class(size={"height": 32, "width": 32})
    missing = tmp_path / "no-such-photo.jpg"
    # transformers' own error (its PIL loader, which the processor uses for strings that are not files) names it.
    with pytest.raises(ValueError, match=r"Incorrect image source.*a valid path to an image file.*no-such-photo\.jpg"):
        processor(str(missing))
    with pytest.raises(OSError, match=r"Cannot read the image file '.*damaged\.jpg': .*re-download or re-export"):
        processor(str(damaged_jpeg))
    (tmp_path / "good.jpg").write_bytes(jpeg_bytes())
    assert processor([str(tmp_path / "good.jpg")], return_tensors="pt").pixel_values.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("processor_class", PROCESSOR_CLASSES)
def test_image_files_keep_their_mode(tmp_path, processor_class):
    """transformers' loaders convert files to RGB; the processor keeps a label map's single channel and 16 bits."""
    processor = processor_class(size={"height": 3, "width": 4}, do_normalize=False)
    label_map = np.arange(12, dtype=np.uint8).reshape(3, 4)
    PIL.Image.fromarray(label_map, mode="L").save(tmp_path / "labels.png")
    sixteen_bit = np.full((3, 4), 128 * 257, dtype=np.uint16)
    PIL.Image.fromarray(sixteen_bit).save(tmp_path / "photo16.png")
    outputs = processor(str(tmp_path / "photo16.png"), segmentation_maps=str(tmp_path / "labels.png"),
                        return_tensors="pt")
    assert outputs.labels.tolist() == [label_map.tolist()]
    assert torch.allclose(outputs.pixel_values, torch.tensor(128 / 255))  # not clipped to white


@pytest.mark.parametrize("task", ["image-classification", "image-feature-extraction", "image-segmentation"])
def test_pipeline_input_errors_are_the_documented_transformers_ones(tmp_path, damaged_jpeg, task):
    """transformers' pipelines open paths (`load_image`) and inspect the input list before any NEPA code runs, so
    these errors are transformers' own; README ("Bad inputs") documents them and the fix. If this test fails,
    transformers changed them: update that table."""
    model_class = NepaForSemanticSegmentation if task == "image-segmentation" else NepaForImageClassification
    save_folder(tmp_path / "model", model_class)
    pipe = pipeline(task, model=str(tmp_path / "model"))
    missing = str(tmp_path / "no-such-photo.jpg")
    with pytest.raises(ValueError, match=r"Incorrect image source.*no-such-photo\.jpg"):
        pipe(missing)
    with pytest.raises(OSError, match="image file is truncated"):
        pipe(str(damaged_jpeg))
    with pytest.raises(IndexError):
        pipe([])


