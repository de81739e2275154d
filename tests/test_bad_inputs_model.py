"""Issue 14, model side: bad inputs get clear errors that name the input and the fix.

Items: 1 (integer pixel_values), 9 (truncated weight file), 11 (labels out of range / soft labels of the wrong
width), 15 (the image-segmentation pipeline accepts NepaForSemanticSegmentation without logging an error).
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
from nepa_hf.models.nepa.modeling_nepa import check_label_range, safetensors_file_problem
from small_models import LABELS, save_folder, small_config


# ------------------------------------------------------------------------------------------------ item 1


@pytest.mark.parametrize("model_class", [NepaModel, NepaForPreTraining, NepaForImageClassification, NepaBackbone,
                                         NepaForSemanticSegmentation])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_pixel_values_are_refused_by_every_model(model_class, dtype):
    model = model_class(small_config()).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32)).to(dtype)
    with pytest.raises(ValueError, match=r"not floating point: integer pixels are raw 0-255.*image processor"):
        model(pixels)
    with torch.no_grad():  # the same images, normalised, run
        model((pixels.float() / 255 - 0.5) / 0.5)


# ------------------------------------------------------------------------------------------------ item 9


@pytest.mark.parametrize("load", ["head", "auto", "bare"])
def test_truncated_weight_file_names_the_file_and_the_fix(tmp_path, load):
    save_folder(tmp_path)
    weights = tmp_path / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    assert "truncated" in safetensors_file_problem(str(weights))
    loader = {"head": NepaForImageClassification, "auto": AutoModelForImageClassification, "bare": AutoModel}[load]
    expected = r"model\.safetensors: .* bytes where its header describes .*\(truncated\)"
    with pytest.raises(OSError, match=expected) as info:
        loader.from_pretrained(tmp_path)
    assert str(weights) in str(info.value) and "download it again" in str(info.value)
    assert type(info.value.__cause__).__name__ == "SafetensorError"


def test_garbage_weight_file_and_other_load_errors(tmp_path):
    save_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    with pytest.raises(OSError, match=r"unreadable safetensors header.*save the model again"):
        NepaForImageClassification.from_pretrained(tmp_path)
    # Other errors pass through unchanged.
    with pytest.raises(OSError) as info:
        NepaForImageClassification.from_pretrained(tmp_path / "does-not-exist")
    assert "safetensors" not in str(info.value)


def test_complete_weight_file_has_no_problem(tmp_path):
    model = save_folder(tmp_path)
    assert safetensors_file_problem(str(tmp_path / "model.safetensors")) is None
    reloaded = NepaForImageClassification.from_pretrained(tmp_path)
    assert torch.equal(reloaded.classifier.bias, model.classifier.bias)


# ------------------------------------------------------------------------------------------------ item 11


def test_classification_labels_are_checked_against_num_labels():
    model = NepaForImageClassification(small_config()).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"outside \[0, 2\] \(num_labels=3\).*found 12.*num_labels=K"):
        model(pixels, labels=torch.tensor([0, 12]))
    with pytest.raises(ValueError, match=r"num_labels=3.*found -1"):
        model(pixels, labels=torch.tensor([-1, 0]))
    assert torch.isfinite(model(pixels, labels=torch.tensor([-100, 2])).loss)  # -100 is ignored, as in transformers
    with pytest.raises(ValueError, match=r"shape \(batch, num_labels\) = \(batch, 3\), got \(2, 10\).*num_labels=3"):
        model(pixels, labels=torch.full((2, 10), 0.1))
    with pytest.raises(ValueError, match=r"got \(2,\).*int64 labels of shape \(batch,\)"):
        model(pixels, labels=torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="labels has 3 rows for a batch of 2 images"):
        model(pixels, labels=torch.tensor([0, 1, 2]))
    multi = NepaForImageClassification(small_config(problem_type="multi_label_classification"))
    with pytest.raises(ValueError, match=r"multi-hot targets.*\(batch, 3\), got \(2, 4\)"):
        multi(pixels, labels=torch.ones(2, 4))
    regression = NepaForImageClassification(small_config(id2label={0: "score"}))
    assert torch.isfinite(regression(pixels, labels=torch.randn(2)).loss)


def test_segmentation_labels_are_checked_against_num_labels():
    model = NepaForSemanticSegmentation(small_config()).train()
    pixels, labels = torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long)
    labels[0, 0, 0], labels[1, 0, 0] = 7, 255  # 255 is the ignore index
    message = r"outside \[0, 2\] \(num_labels=3\) other than the ignore index 255: found 7\."
    with pytest.raises(ValueError, match=message):
        model(pixels, labels=labels)


def test_label_range_check_on_devices_and_under_compile_queues_a_device_assert(monkeypatch):
    """On CUDA and under torch.compile the check is `torch._assert_async` (no host sync); on the CPU that op raises
    at once, which shows the message it carries."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match=r"num_labels=3.*do_reduce_labels"):
        check_label_range(torch.tensor([0, 5]), 3, ignore_index=255, fix="... do_reduce_labels")
    check_label_range(torch.tensor([0, 2, 255]), 3, ignore_index=255, fix="")


# ------------------------------------------------------------------------------------------------ item 15


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
