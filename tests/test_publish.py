"""The publishing tool: assemble + validate + dry run offline; uploads through a mocked HfApi; clean failures."""

import json
from types import SimpleNamespace
from unittest import mock

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from nepa_hf import NepaConfig, NepaForImageClassification, NepaImageProcessorPil
from nepa_hf.hub import publish
from nepa_hf.hub.publish import PublishError, assemble, main, validate

LABELS = ["cat", "coffee", "rocket"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small fine-tuned classifier saved the usual way (save_pretrained + processor)."""
    folder = tmp_path_factory.mktemp("ckpt") / "nepa-tiny-demo"
    config = NepaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32,
        is_causal=False, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
    )  # fmt: skip
    torch.manual_seed(0)
    model = NepaForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    NepaImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def no_hub(*args, **kwargs):
    raise AssertionError("the Hub must not be contacted")


@pytest.mark.slow
def test_dry_run_assembles_validates_and_lists_every_file(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(publish, "HfApi", no_hub)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # a dry run needs no token
    staging = tmp_path / "staging"
    code = main(["--model", str(checkpoint), "--repo-id", "someone/nepa-tiny-demo", "--dry-run",
                 "--staging-dir", str(staging),
                 "--training-description", "Fine-tuned on three photo classes."])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ok: load-back with trust_remote_code and without nepa_hf" in out
    assert "would upload to someone/nepa-tiny-demo:" in out
    files = {p.name: p.stat().st_size for p in staging.iterdir()}
    assert set(files) == {"README.md", "config.json", "model.safetensors", "preprocessor_config.json",
                          "configuration_nepa.py", "modeling_nepa.py", "modeling_nepa_segmentation.py",
                          "image_processing_nepa.py"}  # fmt: skip
    for name, size in files.items():  # exactly what would be uploaded, with sizes
        assert f"{size:,d} bytes" in next(line for line in out.splitlines() if line.strip().startswith(name))
    assert f"8 files, {sum(files.values()):,d} bytes in total" in out
    # Weights unchanged; remote code advertised for every head; processor and card present.
    original, staged = load_file(checkpoint / "model.safetensors"), load_file(staging / "model.safetensors")
    assert sorted(original) == sorted(staged) and all(torch.equal(original[k], staged[k]) for k in original)
    auto_map = json.loads((staging / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForImageClassification",
                             "AutoModelForSemanticSegmentation", "AutoBackbone"}
    card = ModelCard.load(staging / "README.md")
    assert card.data.pipeline_tag == "image-classification" and card.data.license == "apache-2.0"
    assert card.data.base_model is None and card.data.eval_results is None  # nothing reported for our own model
    assert "Fine-tuned on three photo classes." in card.text and "ImageNet" not in card.text
    assert "Predicts the 3 classes of its training labels only" in card.text
    assert 'from_pretrained("someone/nepa-tiny-demo", trust_remote_code=True)' in card.text


def test_upload_uses_hfapi_with_all_options(checkpoint, monkeypatch, capsys):
    api = mock.MagicMock()
    uploaded = {}

    def upload_folder(**kwargs):
        from pathlib import Path

        uploaded.update(kwargs, files=sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()))
        return SimpleNamespace(pr_url="https://huggingface.co/someone/x/discussions/1", commit_url=None)

    api.upload_folder.side_effect = upload_folder
    factory = mock.MagicMock(return_value=api)
    monkeypatch.setattr(publish, "HfApi", factory)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    code = main(["--model", str(checkpoint), "--repo-id", "someone/x", "--private", "--revision", "v1",
                 "--create-pr", "--skip-load-check"])  # fmt: skip
    assert code == 0
    factory.assert_called_once_with(token="hf_test_token")
    api.create_repo.assert_called_once_with("someone/x", private=True, exist_ok=True, repo_type="model")
    api.create_branch.assert_called_once_with("someone/x", branch="v1", exist_ok=True, repo_type="model")
    assert uploaded["repo_id"] == "someone/x" and uploaded["revision"] == "v1" and uploaded["create_pr"] is True
    assert uploaded["files"] == sorted(
        ["README.md", "config.json", "model.safetensors", "preprocessor_config.json", "configuration_nepa.py",
         "modeling_nepa.py", "modeling_nepa_segmentation.py", "image_processing_nepa.py"]
    )  # fmt: skip
    assert "Uploaded: https://huggingface.co/someone/x/discussions/1" in capsys.readouterr().out


def test_missing_token_is_one_line_and_uploads_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(publish, "HfApi", no_hub)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert main(["--model", str(checkpoint), "--repo-id", "someone/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no Hugging Face token") and "Traceback" not in err


@pytest.mark.parametrize("failure", ["offline", "unreachable"])
def test_no_network_is_one_line(checkpoint, monkeypatch, capsys, failure):
    # The real client, with the Hub made unreachable: offline mode, or an endpoint where nothing listens.
    if failure == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:  # online mode (conftest turns offline mode on where the Hub is unreachable), dead endpoint
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    code = main(["--model", str(checkpoint), "--repo-id", "someone/x", "--token", "hf_x", "--skip-load-check"])
    err = capsys.readouterr().err  # (besides transformers' loading progress bar)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert ("HF_HUB_OFFLINE" in err) if failure == "offline" else ("cannot reach the Hugging Face Hub" in err)


def test_wrong_inputs_are_refused_clearly(checkpoint, tmp_path, capsys):
    reference = tmp_path / "theirs"
    reference.mkdir()
    (reference / "config.json").write_text(json.dumps({"model_type": "vit_nepa"}))
    assert main(["--model", str(reference), "--repo-id", "a/b", "--dry-run"]) == 1
    assert "python -m nepa_hf.models.nepa.convert_nepa --input" in capsys.readouterr().err
    # A published name on the wrong weights would produce a false card.
    assert main(["--model", str(checkpoint), "--repo-id", "a/nepa-vit-b", "--dry-run", "--skip-load-check"]) == 1
    assert "not nepa-vit-b" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nowhere"), "--repo-id", "a/b", "--dry-run"]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_validate_catches_incomplete_folders(checkpoint, tmp_path):
    staging = assemble(checkpoint, tmp_path / "good", "someone/x")
    assert validate(staging, check_load=False) == ["files and auto_map", "model card metadata"]
    (staging / "modeling_nepa.py").unlink()
    with pytest.raises(PublishError, match="missing modeling_nepa.py"):
        validate(staging, check_load=False)
    staging = assemble(checkpoint, tmp_path / "saving-class-only", "someone/x")
    config = json.loads((staging / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_nepa.NepaConfig",
                          "AutoModelForImageClassification": "modeling_nepa.NepaForImageClassification"}
    (staging / "config.json").write_text(json.dumps(config))  # what a plain save_pretrained writes
    with pytest.raises(PublishError, match="not every head's"):
        validate(staging, check_load=False)
    staging = assemble(checkpoint, tmp_path / "bad-card", "someone/x")
    (staging / "README.md").write_text("# no metadata\n")
    with pytest.raises(PublishError, match="lacks license, library_name, pipeline_tag"):
        validate(staging, check_load=False)


# ------------------------------------------------------------------------------------------- every registered head


def save_head(folder, head: str, processor=None):
    """A small model of class `head`, saved the usual way, with its image processor."""
    from nepa_hf import NepaBackbone, NepaForPreTraining, NepaForSemanticSegmentation, NepaModel

    classes = {cls.__name__: cls for cls in (NepaModel, NepaForPreTraining, NepaForImageClassification,
                                             NepaForSemanticSegmentation, NepaBackbone)}  # fmt: skip
    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
    config = NepaConfig(
        hidden_size=32, num_hidden_layers=4 if head == "NepaForSemanticSegmentation" else 2,  # 4: the neck's stages
        num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32,
        decode_hidden_size=16, auxiliary_hidden_size=16,
        **(labels if head in ("NepaForImageClassification", "NepaForSemanticSegmentation") else {}),
    )  # fmt: skip
    torch.manual_seed(0)
    classes[head](config).save_pretrained(folder)
    (processor or NepaImageProcessorPil(size={"height": 32, "width": 32})).save_pretrained(folder)
    return folder


HEADS = {  # head -> (pipeline tag, Auto class in the card's usage code)
    "NepaModel": ("image-feature-extraction", "AutoModel"),
    "NepaForPreTraining": ("image-feature-extraction", "AutoModelForPreTraining"),
    "NepaForImageClassification": ("image-classification", "AutoModelForImageClassification"),
    "NepaForSemanticSegmentation": ("image-segmentation", "AutoModelForSemanticSegmentation"),
    "NepaBackbone": ("image-feature-extraction", "AutoBackbone"),
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_registered_head_assembles_with_its_pipeline_tag(head, tmp_path):
    """Issue 14 item 13: every head the package registers publishes; the card's tag and usage code follow it."""
    staging = assemble(save_head(tmp_path / "model", head), tmp_path / "staging", "someone/x")
    assert validate(staging, check_load=False) == ["files and auto_map", "model card metadata"]
    card = ModelCard.load(staging / "README.md")
    tag, auto_class = HEADS[head]
    assert card.data.pipeline_tag == tag and tag in card.data.tags
    assert f'model = {auto_class}.from_pretrained("someone/x", trust_remote_code=True)' in card.text
    assert f"(`{head}`" in card.text
    if head in ("NepaForSemanticSegmentation", "NepaBackbone"):
        assert (staging / "modeling_nepa_segmentation.py").exists()
        (staging / "modeling_nepa_segmentation.py").unlink()
        with pytest.raises(PublishError, match="missing modeling_nepa_segmentation.py"):
            validate(staging, check_load=False)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["NepaForSemanticSegmentation", "NepaBackbone"])
def test_dense_heads_load_back_without_nepa_hf(head, tmp_path, capsys, monkeypatch):
    """The dry run's load-back in a fresh process without nepa_hf compares segmentation logits / feature maps."""
    monkeypatch.setattr(publish, "HfApi", no_hub)
    model = save_head(tmp_path / "model", head)
    code = main(["--model", str(model), "--repo-id", "someone/x", "--dry-run", "--staging-dir", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ok: load-back with trust_remote_code and without nepa_hf" in out and "modeling_nepa_segmentation.py" in out


@pytest.mark.slow
def test_load_back_compares_the_dense_outputs(tmp_path, monkeypatch):
    """A remote-code backbone that computes something else is caught (the comparison is not vacuous)."""
    staging = assemble(save_head(tmp_path / "model", "NepaBackbone"), tmp_path / "staging", "someone/x")
    code = (staging / "modeling_nepa_segmentation.py").read_text()
    marker = "        return BackboneOutput(\n            feature_maps=tuple(feature_maps)"
    assert marker in code
    (staging / "modeling_nepa_segmentation.py").write_text(
        code.replace(marker, marker.replace("tuple(feature_maps)", "tuple(2 * f for f in feature_maps)"))
    )
    with pytest.raises(PublishError, match="computes different outputs"):
        validate(staging)


# ------------------------------------------------------------------------------------------- training data on the card


def test_card_names_only_the_dataset_the_run_recorded(tmp_path):
    """Issue 14 item 14: no ImageNet-1k claim for models trained here; the recorded dataset, or nothing."""
    model = save_head(tmp_path / "nothing", "NepaForPreTraining")
    card = ModelCard.load(assemble(model, tmp_path / "s0", "someone/x") / "README.md")
    assert card.data.datasets is None and "ImageNet" not in card.text
    assert "| Training data | not recorded |" in card.text

    # examples/pretrain_nepa.py writes run_config.json with its --dataset
    model = save_head(tmp_path / "pretrained", "NepaForPreTraining")
    (model / "run_config.json").write_text(json.dumps({"dataset": "my-org/street-photos", "max_steps": 10}))
    card = ModelCard.load(assemble(model, tmp_path / "s1", "someone/x") / "README.md")
    assert card.data.datasets == ["my-org/street-photos"] and "ImageNet" not in card.text
    link = "[my-org/street-photos](https://huggingface.co/datasets/my-org/street-photos)"
    assert f"| Training data | {link} |" in card.text

    # the Trainer scripts pass dataset= to Trainer.create_model_card, which writes it into README.md
    model = save_head(tmp_path / "finetuned", "NepaForImageClassification")
    (model / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags:\n- generated_from_trainer\n---\n\n# finetuned\n\nThis model is a "
        "fine-tuned version of [outputs/demo/pretrained](https://huggingface.co/outputs/demo/pretrained) on the "
        "fashion_mnist dataset.\nIt achieves the following results on the evaluation set:\n- Accuracy: 0.8\n"
    )
    assert publish.recorded_dataset(model) == "fashion_mnist"
    card = ModelCard.load(assemble(model, tmp_path / "s2", "someone/x") / "README.md")
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"] and "Fashion-MNIST" in card.text
    assert "Trained on Fashion-MNIST only" in card.text and "ImageNet" not in card.text

    # a local folder is named in the text but is no Hub dataset id for the metadata
    (model / "README.md").write_text((model / "README.md").read_text().replace("fashion_mnist", "/data/my_images"))
    card = ModelCard.load(assemble(model, tmp_path / "s3", "someone/x") / "README.md")
    assert card.data.datasets is None and "| Training data | `/data/my_images` |" in card.text
    # --dataset states it explicitly
    card = ModelCard.load(assemble(model, tmp_path / "s4", "someone/x", dataset="my-org/cats") / "README.md")
    assert card.data.datasets == ["my-org/cats"]


def test_card_describes_the_saved_preprocessing(tmp_path):
    processor = NepaImageProcessorPil(size={"shortest_edge": 36}, resample=3, do_center_crop=True,
                                      crop_size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                                      image_std=[0.229, 0.224, 0.225])  # fmt: skip
    model = save_head(tmp_path / "model", "NepaForImageClassification", processor=processor)
    text = (assemble(model, tmp_path / "staging", "someone/x") / "README.md").read_text()
    assert ("resize the shorter side to 36 (bicubic), centre-crop 32x32, rescale by 1/255, normalise with "
            "mean = (0.485, 0.456, 0.406) and std = (0.229, 0.224, 0.225)") in text  # fmt: skip
    assert "`AutoImageProcessor` returns `NepaImageProcessor`" in text and "`NepaImageProcessorPil`" in text
