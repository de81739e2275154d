"""One attention rule (issue 26): `config.is_causal`, followed by every model class when set. Unset, NepaModel and
NepaForPreTraining attend causally and a head (classifier, segmenter, backbone) sets it to False on construction, so a
pretraining checkpoint loads into a head bidirectionally and the head's folder says what it computed.
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
def test_classifier_from_a_config_is_bidirectional(build):
    config = small_config(id2label=LABELS)  # is_causal unset: the NepaConfig default
    torch.manual_seed(0)
    if build == "constructor":
        model = NepaForImageClassification(config)
    else:
        model = AutoModelForImageClassification.from_config(config)
    model = randomize_(model).eval()
    assert model.config.is_causal is False  # the head decided, and saves it
    assert config.is_causal is None  # in its own copy: a pretraining model sharing `config` stays causal
    assert model.nepa.config is model.config
    assert_bidirectional(model, PIXELS)
    # The trunk inside the head attends as the head does (feature extraction from a classifier).
    with torch.no_grad():
        assert torch.equal(model.nepa(PIXELS).pooler_output, model.nepa(PIXELS, is_causal=False).pooler_output)


def test_unset_attention_is_causal_for_the_pretraining_models():
    config = small_config()
    for model in (NepaModel(config), NepaForPreTraining(config)):
        model = randomize_(model).eval()
        with torch.no_grad():
            default, causal = (model(PIXELS, is_causal=flag).last_hidden_state for flag in (None, True))
            assert torch.equal(default, causal)
            assert not torch.allclose(default, model(PIXELS, is_causal=False).last_hidden_state)
    assert config.is_causal is None and config.resolved_is_causal is True


def test_a_causal_pretraining_config_into_a_head_fine_tunes_causally_and_says_so(caplog):
    from transformers.utils import logging as hf_logging

    config = small_config(id2label=LABELS, is_causal=True)
    config.architectures = ["NepaForPreTraining"]
    hf_logging.enable_propagation()
    with caplog.at_level("WARNING"):
        model = NepaForImageClassification(config)
    assert model.config.is_causal is True and "fine-tunes causally (the ablation)" in caplog.text


def test_causal_fine_tuning_is_one_config_field_and_per_call_still_overrides():
    model = randomize_(NepaForImageClassification(small_config(id2label=LABELS, is_causal=True))).eval()
    default, bidirectional, causal = logits_bidirectional_and_causal(model, PIXELS)
    assert torch.equal(default, causal) and not torch.allclose(default, bidirectional)


def test_classifier_from_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(0)
    pretrain = randomize_(NepaForPreTraining(small_config()))
    pretrain.save_pretrained(tmp_path / "pretrain")
    saved_before = (tmp_path / "pretrain" / "config.json").read_text()
    assert json.loads(saved_before)["is_causal"] is None  # unset: heads built from it decide
    classifier = NepaForImageClassification.from_pretrained(tmp_path / "pretrain", id2label=LABELS).eval()
    assert classifier.config.is_causal is False
    with torch.no_grad():
        classifier.classifier.weight.normal_(0, 0.5)
    assert_bidirectional(classifier, PIXELS)
    # The pretraining model from the same folder keeps its causal attention, and the folder is unchanged.
    base = NepaModel.from_pretrained(tmp_path / "pretrain").eval()
    with torch.no_grad():
        assert torch.equal(base(PIXELS).last_hidden_state, base(PIXELS, is_causal=True).last_hidden_state)
    assert (tmp_path / "pretrain" / "config.json").read_text() == saved_before

    # Fine-tuned folder: saved and reloaded bit-exact, still bidirectional; a bare model from it attends the same.
    classifier.save_pretrained(tmp_path / "finetuned")
    assert json.loads((tmp_path / "finetuned" / "config.json").read_text())["is_causal"] is False
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "finetuned").eval()
    bare = AutoModel.from_pretrained(tmp_path / "finetuned").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(PIXELS).logits, classifier(PIXELS).logits)
        assert torch.equal(bare(PIXELS).pooler_output, classifier.nepa(PIXELS).pooler_output)


def test_segmentation_and_backbone_follow_the_same_rule(tmp_path):
    config = small_config(id2label=LABELS)
    torch.manual_seed(0)
    segmenter = randomize_(NepaForSemanticSegmentation(config)).eval()
    backbone = randomize_(AutoBackbone.from_config(small_config())).eval()
    assert segmenter.config.is_causal is False and type(backbone) is NepaBackbone and backbone.config.is_causal is False
    with torch.no_grad():
        assert torch.equal(segmenter(PIXELS).logits, segmenter(PIXELS, is_causal=False).logits)
        assert not torch.allclose(segmenter(PIXELS).logits, segmenter(PIXELS, is_causal=True).logits)
        maps = backbone(PIXELS).feature_maps[-1]
        assert torch.equal(maps, backbone(PIXELS, is_causal=False).feature_maps[-1])
        assert not torch.allclose(maps, backbone(PIXELS, is_causal=True).feature_maps[-1])

    # From a pretraining checkpoint, and a causal backbone keeps its choice through save/load.
    NepaForPreTraining(small_config()).save_pretrained(tmp_path / "pretrain")
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "pretrain", id2label=LABELS)
    assert loaded.config.is_causal is False
    causal = NepaBackbone.from_pretrained(tmp_path / "pretrain", is_causal=True)
    causal.save_pretrained(tmp_path / "causal-backbone")
    assert NepaBackbone.from_pretrained(tmp_path / "causal-backbone").config.is_causal is True


def test_converter_writes_the_attention_a_classifier_fine_tuned_here_computes(tmp_path):
    """The authors' configs have one `is_causal` too: a classifier fine-tuned here goes over bidirectional and comes
    back so; a pretraining folder (unset) goes over causal and comes back unset. (The authors' sft and causal
    fine-tuning configs round-trip bit-exact: VARIANTS in test_convert.py.)"""
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
    assert again.config.is_causal is False
    with torch.no_grad():
        assert torch.equal(again(PIXELS).logits, classifier(PIXELS).logits)
    convert_to_reference_checkpoint(tmp_path / "pretrain", tmp_path / "theirs-pretrain")
    assert json.loads((tmp_path / "theirs-pretrain" / "config.json").read_text())["is_causal"] is True
    convert_reference_checkpoint(tmp_path / "theirs-pretrain", tmp_path / "pretrain-again")
    assert NepaConfig.from_pretrained(tmp_path / "pretrain-again").is_causal is None


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
    assert model.config.is_causal is False
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
        assert torch.equal(model(pixels).logits, model(pixels, is_causal=False).logits)
        assert not torch.allclose(model(pixels).logits, model(pixels, is_causal=True).logits)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    fresh = AutoModelForImageClassification.from_config(config, trust_remote_code=True)
    assert fresh.config.is_causal is False
    print("remote ok")
    """
)


@pytest.mark.slow
def test_remote_code_classifier_from_a_pretraining_folder_is_bidirectional(tmp_path):
    from nepa_hf.hub.publish import assemble

    randomize_(NepaForPreTraining(small_config())).save_pretrained(tmp_path / "saved")
    assemble(tmp_path / "saved", tmp_path / "pretrain", repo_id="me/nepa-small")  # the Hub folder: every head's code
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "pretrain")],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout
