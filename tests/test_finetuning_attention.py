"""Issue 14 item 2: one attention rule for every fine-tuning model, with no constructor changing the config.

`config.is_causal` is the attention of NepaModel / NepaForPreTraining; `config.finetuning_is_causal` (bidirectional
unless set) that of NepaForImageClassification, NepaForSemanticSegmentation, NepaBackbone and the trunk inside them.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoBackbone, AutoModel, AutoModelForImageClassification, AutoModelForSemanticSegmentation

from nepa_hf import (
    NepaBackbone,
    NepaConfig,
    NepaForImageClassification,
    NepaForPreTraining,
    NepaForSemanticSegmentation,
    NepaModel,
)
from nepa_hf.models.nepa.convert_nepa import convert_reference_checkpoint, convert_to_reference_checkpoint

LABELS = {0: "a", 1: "b", 2: "c"}


def small_config(**overrides) -> NepaConfig:
    base = dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, patch_size=4,
        image_size=16, layerscale_value=1.0, qk_norm_affine=True,
    )  # fmt: skip
    base.update(overrides)
    return NepaConfig(**base)


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def logits_bidirectional_and_causal(model, pixels):
    with torch.no_grad():
        return model(pixels).logits, model(pixels, is_causal=False).logits, model(pixels, is_causal=True).logits


def assert_bidirectional(model, pixels):
    default, bidirectional, causal = logits_bidirectional_and_causal(model, pixels)
    assert torch.equal(default, bidirectional) and not torch.allclose(default, causal)


PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("build", ["constructor", "auto_from_config"])
def test_classifier_from_a_config_is_bidirectional_and_leaves_the_config_alone(build):
    config = small_config(id2label=LABELS)  # is_causal=True: the NepaConfig default, the pretraining setting
    torch.manual_seed(0)
    if build == "constructor":
        model = NepaForImageClassification(config)
    else:
        model = AutoModelForImageClassification.from_config(config)
    model = randomize_(model).eval()
    assert config.is_causal is True and config.finetuning_is_causal is False  # not mutated
    assert model.default_is_causal is False and model.nepa.default_is_causal is False
    assert_bidirectional(model, PIXELS)
    # The trunk inside the head attends as the head does (feature extraction from a classifier).
    with torch.no_grad():
        assert torch.equal(model.nepa(PIXELS).pooler_output, model.nepa(PIXELS, is_causal=False).pooler_output)


def test_causal_fine_tuning_is_one_config_field_and_per_call_still_overrides():
    model = randomize_(NepaForImageClassification(small_config(id2label=LABELS, finetuning_is_causal=True))).eval()
    default, bidirectional, causal = logits_bidirectional_and_causal(model, PIXELS)
    assert torch.equal(default, causal) and not torch.allclose(default, bidirectional)


def test_classifier_from_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(0)
    pretrain = randomize_(NepaForPreTraining(small_config()))
    pretrain.save_pretrained(tmp_path / "pretrain")
    saved_before = (tmp_path / "pretrain" / "config.json").read_text()
    classifier = NepaForImageClassification.from_pretrained(tmp_path / "pretrain", id2label=LABELS).eval()
    assert classifier.config.is_causal is True and classifier.config.finetuning_is_causal is False
    with torch.no_grad():
        classifier.classifier.weight.normal_(0, 0.5)
    assert_bidirectional(classifier, PIXELS)
    # The pretraining model from the same folder keeps its causal attention, and the folder is unchanged.
    base = NepaModel.from_pretrained(tmp_path / "pretrain").eval()
    with torch.no_grad():
        assert torch.equal(base(PIXELS).last_hidden_state, base(PIXELS, is_causal=True).last_hidden_state)
    assert (tmp_path / "pretrain" / "config.json").read_text() == saved_before

    # Fine-tuned folder: saved and reloaded bit-exact, still bidirectional.
    classifier.save_pretrained(tmp_path / "finetuned")
    saved = json.loads((tmp_path / "finetuned" / "config.json").read_text())
    assert saved["finetuning_is_causal"] is False and saved["is_causal"] is True
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "finetuned").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(PIXELS).logits, classifier(PIXELS).logits)
    assert reloaded.default_is_causal is False


def test_bare_model_from_a_fine_tuned_folder_warns_about_its_attention(tmp_path, caplog):
    NepaForImageClassification(small_config(id2label=LABELS)).save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        base = AutoModel.from_pretrained(tmp_path)
    assert base.default_is_causal is True  # the rule: NepaModel reads is_causal
    assert "finetuning_is_causal=False" in caplog.text and "is_causal=False" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        base = AutoModel.from_pretrained(tmp_path, is_causal=False)  # the fix the warning names
    assert base.default_is_causal is False and "finetuning_is_causal" not in caplog.text


@pytest.mark.parametrize("saved_is_causal", [False, True])
def test_fine_tuned_folders_saved_before_the_field_compute_what_they_did(tmp_path, saved_is_causal):
    """Old classifier folders have no `finetuning_is_causal`: their `is_causal` was the classifier's attention."""
    model = randomize_(NepaForImageClassification(small_config(id2label=LABELS, finetuning_is_causal=saved_is_causal)))
    model.eval().save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    del saved["finetuning_is_causal"]
    saved["is_causal"] = saved_is_causal
    config_file.write_text(json.dumps(saved))
    reloaded = NepaForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.finetuning_is_causal is saved_is_causal
    with torch.no_grad():
        assert torch.equal(reloaded(PIXELS).logits, model(PIXELS).logits)


def test_segmentation_and_backbone_follow_the_same_rule(tmp_path):
    config = small_config(id2label=LABELS)
    torch.manual_seed(0)
    segmenter = randomize_(NepaForSemanticSegmentation(config)).eval()
    backbone = randomize_(AutoBackbone.from_config(small_config())).eval()
    assert config.is_causal is True and config.finetuning_is_causal is False  # not mutated
    assert segmenter.default_is_causal is False and segmenter.nepa.default_is_causal is False
    assert type(backbone) is NepaBackbone and backbone.default_is_causal is False
    with torch.no_grad():
        assert torch.equal(segmenter(PIXELS).logits, segmenter(PIXELS, is_causal=False).logits)
        assert not torch.allclose(segmenter(PIXELS).logits, segmenter(PIXELS, is_causal=True).logits)
        maps = backbone(PIXELS).feature_maps[-1]
        assert torch.equal(maps, backbone(PIXELS, is_causal=False).feature_maps[-1])
        assert not torch.allclose(maps, backbone(PIXELS, is_causal=True).feature_maps[-1])

    # From a pretraining checkpoint, and a causal backbone keeps its choice through save/load.
    NepaForPreTraining(small_config()).save_pretrained(tmp_path / "pretrain")
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "pretrain", id2label=LABELS)
    assert loaded.default_is_causal is False and loaded.config.is_causal is True
    causal = NepaBackbone.from_pretrained(tmp_path / "pretrain", finetuning_is_causal=True)
    causal.save_pretrained(tmp_path / "causal-backbone")
    assert NepaBackbone.from_pretrained(tmp_path / "causal-backbone").default_is_causal is True


def test_converter_writes_the_attention_a_classifier_fine_tuned_here_computes(tmp_path):
    """Fine-tuned from a pretraining checkpoint: is_causal=True (NepaModel), finetuning_is_causal=False (the head).
    The authors' classifier has one `is_causal`: it gets the head's attention, and the way back is bidirectional too.
    (The authors' sft and causal fine-tuning configs round-trip bit-exact: VARIANTS in test_convert.py.)"""
    torch.manual_seed(0)
    NepaForPreTraining(small_config()).save_pretrained(tmp_path / "pretrain")
    classifier = randomize_(NepaForImageClassification.from_pretrained(
        tmp_path / "pretrain", id2label=LABELS, label2id={name: index for index, name in LABELS.items()}
    ))  # fmt: skip
    classifier.eval().save_pretrained(tmp_path / "finetuned")
    convert_to_reference_checkpoint(tmp_path / "finetuned", tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert theirs["architectures"] == ["ViTNepaForImageClassification"] and theirs["is_causal"] is False
    convert_reference_checkpoint(tmp_path / "theirs", tmp_path / "again")
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "again").eval()
    assert again.config.finetuning_is_causal is False
    with torch.no_grad():
        assert torch.equal(again(PIXELS).logits, classifier(PIXELS).logits)
    pretraining = json.loads((tmp_path / "pretrain" / "config.json").read_text())
    convert_to_reference_checkpoint(tmp_path / "pretrain", tmp_path / "theirs-pretrain")
    assert pretraining["is_causal"] is True
    assert json.loads((tmp_path / "theirs-pretrain" / "config.json").read_text())["is_causal"] is True


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    sys.modules["nepa_hf"] = None  # nepa_hf is not installed
    from transformers import AutoConfig, AutoModelForImageClassification
    folder = sys.argv[1]
    pixels = torch.randn(2, 3, 16, 16)
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, num_labels=3).eval()
    assert "nepa_hf" not in type(model).__module__
    assert model.config.is_causal is True and model.default_is_causal is False
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
        assert torch.equal(model(pixels).logits, model(pixels, is_causal=False).logits)
        assert not torch.allclose(model(pixels).logits, model(pixels, is_causal=True).logits)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    fresh = AutoModelForImageClassification.from_config(config, trust_remote_code=True)
    assert fresh.default_is_causal is False and config.is_causal is True
    print("remote ok")
    """
)


@pytest.mark.slow
def test_remote_code_classifier_from_a_pretraining_folder_is_bidirectional(tmp_path):
    randomize_(NepaForPreTraining(small_config())).save_pretrained(tmp_path / "pretrain")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "pretrain")],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout
