"""Model cards: committed cards match the template, metadata validates offline, usage code runs."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image
from transformers import AutoImageProcessor

from nepa_hf import (
    NepaBackbone,
    NepaConfig,
    NepaForImageClassification,
    NepaForPreTraining,
    NepaForSemanticSegmentation,
    NepaImageProcessorPil,
)
from nepa_hf.data.images import bundled_photo_paths
from nepa_hf.hub.publish import write_remote_code
from nepa_hf.hub.model_card import (
    HUB_NAMESPACE,
    PUBLISHED_CHECKPOINTS,
    card_for_conversion,
    make_model_card,
    spec_from_config,
    write_model_cards,
)

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "model_cards"
PAPER_TOP1 = {"nepa-vit-b": 83.8, "nepa-vit-l": 85.3, "nepa-vit-b-in1k": 83.8, "nepa-vit-l-in1k": 85.3}
SOURCES = {
    "nepa-vit-b": "SixAILab/nepa-base-patch14-224",
    "nepa-vit-l": "SixAILab/nepa-large-patch14-224",
    "nepa-vit-b-in1k": "SixAILab/nepa-base-patch14-224-sft",
    "nepa-vit-l-in1k": "SixAILab/nepa-large-patch14-224-sft",
}


def test_committed_cards_are_generated_by_the_script(tmp_path):
    assert sorted(p.name for p in CARDS.iterdir()) == sorted(PUBLISHED_CHECKPOINTS)
    for path in write_model_cards(tmp_path):
        committed = CARDS / path.parent.name / "README.md"
        assert committed.read_text() == path.read_text(), (
            f"{committed} differs from the template: run `python scripts/make_model_cards.py`"
        )


@pytest.mark.parametrize("name", sorted(PUBLISHED_CHECKPOINTS))
def test_card_metadata_is_valid_and_complete(name):
    card = ModelCard.load(CARDS / name / "README.md")  # parses the YAML and the model-index
    metadata = card.data.to_dict()
    ModelCardData(**metadata)  # raises on structurally bad metadata (what card.validate() checks, minus the Hub)
    is_classifier = name.endswith("-in1k")
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == ("image-classification" if is_classifier else "image-feature-extraction")
    assert metadata["datasets"] == ["ILSVRC/imagenet-1k"]
    assert metadata["base_model"] == SOURCES[name]
    assert {"nepa", "vision", "custom_code"} <= set(metadata["tags"])
    results = card.data.eval_results
    assert len(results) == 1 and card.data.model_name == name
    result = results[0]
    assert result.metric_value == PAPER_TOP1[name] and result.verified is False
    assert "reported in the paper" in result.metric_name
    assert result.source_url == "https://arxiv.org/abs/2512.16922"
    assert result.dataset_type == "ILSVRC/imagenet-1k" and result.dataset_split == "validation"


@pytest.mark.parametrize("name", sorted(PUBLISHED_CHECKPOINTS))
def test_card_text_has_usage_preprocessing_limitations_citation(name):
    text = (CARDS / name / "README.md").read_text()
    for section in ("## How to use", "## Preprocessing", "## Limitations", "## Citation", "## Conversion"):
        assert section in text, section
    assert f'from_pretrained("{HUB_NAMESPACE}/{name}", trust_remote_code=True)' in text
    assert "arXiv:2512.16922" in text
    for author in ("Xu, Sihan", "Ma, Ziqiao", "Chai, Wenhao", "Chen, Xuweiyi", "Jin, Weiyang", "Chai, Joyce",
                   "Xie, Saining", "Yu, Stella X."):  # fmt: skip
        assert author in text
    assert "mean = std = (0.5, 0.5, 0.5)" in text and "bilinear" in text
    imagenet = "[ILSVRC/imagenet-1k](https://huggingface.co/datasets/ILSVRC/imagenet-1k)"
    assert f"| Training data | ImageNet-1k ({imagenet}) |" in text
    assert f"python -m nepa_hf.models.nepa.convert_nepa --input {SOURCES[name]} --output {name}" in text
    if name.endswith("-in1k"):  # the release's own number, with its source, next to the paper's
        assert {"nepa-vit-b-in1k": "83.75", "nepa-vit-l-in1k": "85.4"}[name] in text
        assert "reported by the authors" in text


def test_published_parameter_counts_match_the_presets():
    for name, spec in PUBLISHED_CHECKPOINTS.items():
        overrides = {"num_labels": 1000} if spec.is_classifier else {}
        config = NepaConfig.from_preset(name, **overrides)
        config.architectures = [spec.architecture]
        derived = spec_from_config(name, config)
        assert derived.num_parameters == spec.num_parameters, name
        assert (derived.size, derived.is_causal, derived.architecture) == (spec.size, spec.is_causal, spec.architecture)


def test_card_names_the_processor_class_auto_image_processor_returns(tmp_path):
    """Issue 14 item 14: the card says which class `AutoImageProcessor` loads, with the fallback without torchvision."""
    from transformers.utils import is_torchvision_available

    text = (CARDS / "nepa-vit-b" / "README.md").read_text()
    NepaImageProcessorPil().save_pretrained(tmp_path)
    loaded = type(AutoImageProcessor.from_pretrained(tmp_path)).__name__
    assert loaded == ("NepaImageProcessor" if is_torchvision_available() else "NepaImageProcessorPil")
    assert ("`AutoImageProcessor` returns `NepaImageProcessor` (torchvision backend) where torchvision is installed "
            "and\n`NepaImageProcessorPil` (PIL backend, same settings) where it is not") in text  # fmt: skip
    assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")).__name__ == "NepaImageProcessorPil"


def test_converted_unknown_checkpoint_claims_no_dataset():
    """Only the authors' four releases are known to be ImageNet-1k; other vit_nepa sources state no data set."""
    config = NepaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=7)
    config.architectures = ["NepaForImageClassification"]
    card = card_for_conversion("someone/their-nepa", config, repo_id="their-nepa")
    assert card.data.datasets is None and "ImageNet" not in card.text
    assert "| Training data | not recorded |" in card.text and "Predicts the 7 classes" in card.text
    known = card_for_conversion("SixAILab/nepa-base-patch14-224", config, repo_id="nepa-vit-b")
    assert known.data.datasets == ["ILSVRC/imagenet-1k"]


USAGE_RUNNER = textwrap.dedent(
    """
    import re, sys
    sys.modules["nepa_hf"] = None  # the card promises that transformers alone is enough
    # The cards load Hub repos; these are local folders, which AutoBackbone.from_pretrained would send to timm after
    # asking the Hub whether they exist (README, "Segment"). Answer as the Hub would for the repo.
    import huggingface_hub
    huggingface_hub.HfApi.repo_exists = lambda self, repo_id, **kwargs: True
    for card in sys.argv[1:]:
        text = open(card).read()
        for snippet in re.findall(r"```python\\n(.*?)```", text, flags=re.S):
            exec(compile(snippet, card, "exec"), {})
        print("ran", card)
    """
)


@pytest.mark.slow
def test_card_usage_code_runs_with_transformers_only(tmp_path):
    """The usage snippets of the cards of every head run, offline, against small local models."""
    photo = str(bundled_photo_paths()[0])
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
                 image_size=32)  # fmt: skip
    cards = []
    heads = (
        (NepaForPreTraining, {}),
        (NepaForImageClassification, {"num_labels": 5, "is_causal": False}),
        (NepaForSemanticSegmentation, {"num_labels": 3, "num_hidden_layers": 4, "decode_hidden_size": 16,
                                       "auxiliary_hidden_size": 16}),  # four stages for the neck
        (NepaBackbone, {}),
    )
    for cls, kwargs in heads:
        config = NepaConfig(**{**small, **kwargs})
        config.architectures = [cls.__name__]
        folder = tmp_path / cls.__name__
        cls(config).save_pretrained(folder)
        write_remote_code(folder)  # as published: every head's Auto class
        NepaImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
        card = make_model_card(spec_from_config(folder.name, config), repo_id=str(folder), example_image=photo)
        card.save(folder / "README.md")
        cards.append(str(folder / "README.md"))
    script = tmp_path / "run_cards.py"
    script.write_text(USAGE_RUNNER)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, str(script), *cards], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ran ") == 4
    assert re.search(r"LABEL_\d: 0\.\d{3}", result.stdout)  # the classifier printed its top-5
    assert "torch.Size([1, 17, 32])" in result.stdout  # the pretraining card printed the prediction shape
    height, width = Image.open(photo).size[::-1]
    assert f"torch.Size([{height}, {width}])" in result.stdout  # the segmentation card: one class per pixel
    maps = "['stage2'] [(1, 32, 4, 4)]"
    assert maps in result.stdout  # the backbone card printed its feature map (the default stage: the last block)
