"""Bad inputs around the models get clear errors that name the input and the fix, each checked at its boundary
(issue 26): pixel dtype, channels and size in the model's one cheap check; damaged weight files in the loader the
scripts use (`nepa_hf.hub.loading`); class indices in the scripts' data code; the image-segmentation pipeline accepts
NepaForSemanticSegmentation without logging an error.
"""

import json

import PIL.Image
import pytest
import torch
from transformers import AutoModel, AutoModelForImageClassification, pipeline
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

from nepa_hf import (
    NepaBackbone,
    NepaForImageClassification,
    NepaForPreTraining,
    NepaForSemanticSegmentation,
    NepaModel,
)
from nepa_hf.data.segmentation import check_label_maps
from nepa_hf.hub.loading import damaged_weight_files, load_pretrained
from small_models import LABELS, save_folder, small_config


# ------------------------------------------------------------------------------------------------ pixels


@pytest.mark.parametrize("model_class", [NepaModel, NepaForPreTraining, NepaForImageClassification, NepaBackbone,
                                         NepaForSemanticSegmentation])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_pixel_values_are_refused_by_every_model(model_class, dtype):
    model = model_class(small_config()).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32)).to(dtype)
    with pytest.raises(ValueError, match=r"integer pixels are raw 0-255 values.*image processor"):
        model(pixels)
    with torch.no_grad():  # the same images, normalised, run
        model((pixels.float() / 255 - 0.5) / 0.5)


def test_pixel_channels_and_size_are_checked_in_one_place():
    model = NepaModel(small_config()).eval()
    with pytest.raises(ValueError, match=r"shape \(1, 1, 32, 32\): the model takes \(batch, 3, height, width\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="Image size 30x32 is not divisible by the patch size 8"):
        model(torch.randn(1, 3, 30, 32))


# ------------------------------------------------------------------------------------------------ weight files


@pytest.mark.parametrize("loader", [NepaForImageClassification, AutoModelForImageClassification, AutoModel])
def test_truncated_weight_file_names_the_file_and_the_fix(tmp_path, loader):
    save_folder(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert damaged_weight_files(tmp_path) and str(weights) in damaged_weight_files(tmp_path)[0]
    with pytest.raises(OSError, match=r"model\.safetensors \([\d,]+ bytes\): .*incomplete or corrupt") as info:
        load_pretrained(loader, tmp_path)
    assert "download it again" in str(info.value) and type(info.value.__cause__).__name__ == "SafetensorError"


def test_garbage_weight_file_and_other_load_errors(tmp_path):
    save_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    with pytest.raises(OSError, match=r"model\.safetensors .*save the model again"):
        load_pretrained(NepaForImageClassification, tmp_path)
    # Other errors pass through unchanged.
    with pytest.raises(OSError) as info:
        load_pretrained(NepaForImageClassification, tmp_path / "does-not-exist")
    assert "safetensors" not in str(info.value)


def test_complete_weight_file_has_no_problem(tmp_path):
    model = save_folder(tmp_path)
    assert damaged_weight_files(tmp_path) == []
    reloaded = load_pretrained(NepaForImageClassification, tmp_path)
    assert torch.equal(reloaded.classifier.bias, model.classifier.bias)


# ------------------------------------------------------------------------------------------------ labels


def test_classification_losses_for_each_label_kind():
    """Class indices (-100 ignored), soft targets (Mixup/CutMix: soft-target cross-entropy), regression. Index range
    checks live in the scripts' data code (`check_labels`, test_finetune_scripts.py); a model called directly gets
    torch's own error."""
    model = NepaForImageClassification(small_config()).eval()
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(model(pixels, labels=torch.tensor([-100, 2])).loss)
    soft = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])
    assert torch.allclose(model(pixels, labels=soft).loss, torch.tensor(3.0).log())  # zero head: uniform logits
    with pytest.raises(IndexError, match="out of bounds"):
        model(pixels, labels=torch.tensor([0, 12]))
    regression = NepaForImageClassification(small_config(id2label={0: "score"}))
    assert torch.isfinite(regression(pixels, labels=torch.randn(2)).loss)


def test_segmentation_label_maps_are_checked_in_the_data_pipeline():
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[0, 0, 0], labels[1, 0, 0] = 7, 255  # 255 is the ignore index
    message = r"outside \[0, 2\] \(num_labels=3\) other than the ignore index 255: found 7\..*--do_reduce_labels"
    with pytest.raises(ValueError, match=message):
        check_label_maps(labels, 3, ignore_index=255)
    labels[0, 0, 0] = 2
    assert check_label_maps(labels, 3, ignore_index=255) is labels


# ------------------------------------------------------------------------------------------------ pipelines


def test_segmentation_pipeline_logs_no_unsupported_model_error(tmp_path):
    save_folder(tmp_path, NepaForSemanticSegmentation)
    logger = hf_logging.get_logger("transformers.pipelines.base")
    with CaptureLogger(logger) as captured:
        segment = pipeline("image-segmentation", model=str(tmp_path))
    assert "not supported" not in captured.out, captured.out
    results = segment(PIL.Image.new("RGB", (40, 30), (90, 90, 90)))
    assert results and {r["label"] for r in results} <= set(LABELS.values())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["NepaForSemanticSegmentation"]
