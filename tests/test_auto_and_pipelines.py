"""Auto classes, save/load round trips, trust_remote_code without the package, and pipelines on real photos."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    pipeline,
)
from transformers.utils import is_torchvision_available

from nepa_hf import (
    NepaConfig,
    NepaForImageClassification,
    NepaForPreTraining,
    NepaImageProcessor,
    NepaImageProcessorPil,
    NepaModel,
)

LABELS = ["cat", "coffee", "rocket"]
# What AutoImageProcessor returns for a NEPA folder: the torchvision backend's class where torchvision is installed.
EXPECTED_PROCESSOR = "NepaImageProcessor" if is_torchvision_available() else "NepaImageProcessorPil"
BOTH_BACKENDS = {
    "pil": "image_processing_nepa.NepaImageProcessorPil",
    "torchvision": "image_processing_nepa.NepaImageProcessor",
}


def small_config(**overrides) -> NepaConfig:
    base = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, patch_size=8,
        image_size=32, layerscale_value=1.0, qk_norm_affine=True,
    )
    base.update(overrides)
    return NepaConfig(**base)


def save_classifier(directory) -> NepaForImageClassification:
    torch.manual_seed(0)
    config = small_config(
        is_causal=False, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    )
    model = NepaForImageClassification(config).eval()
    with torch.no_grad():  # a non-zero head so that predictions differ between classes
        model.classifier.weight.normal_(0, 0.5)
    model.save_pretrained(directory)
    NepaImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return model


def test_auto_classes_resolve_nepa(tmp_path):
    assert isinstance(AutoConfig.for_model("nepa"), NepaConfig)
    config = small_config()
    assert type(AutoModel.from_config(config)) is NepaModel
    assert type(AutoModelForPreTraining.from_config(config)) is NepaForPreTraining
    assert type(AutoModelForImageClassification.from_config(config)) is NepaForImageClassification
    model = NepaModel(config)
    model.save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is NepaModel
    processor_classes = [NepaImageProcessorPil] + ([NepaImageProcessor] if is_torchvision_available() else [])
    for saving_class in processor_classes:
        saving_class().save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
        assert saved["image_processor_type"] == "NepaImageProcessor"
        assert saved["auto_map"] == {"AutoImageProcessor": BOTH_BACKENDS}
        auto = AutoImageProcessor.from_pretrained(tmp_path)
        assert type(auto) is (NepaImageProcessor if is_torchvision_available() else NepaImageProcessorPil)
        assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")) is NepaImageProcessorPil


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = save_classifier(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    # Non-persistent RoPE buffer is rebuilt, not left as garbage from the meta-device load.
    assert torch.equal(reloaded.nepa.rope_embeddings.inv_freq, model.nepa.rope_embeddings.inv_freq)
    with torch.no_grad():
        assert torch.equal(model(pixels).logits, reloaded(pixels).logits)
    assert reloaded.config.id2label == dict(enumerate(LABELS))
    saved = json.loads((tmp_path / "config.json").read_text())
    # transformers' auto_map: the config and the saving class (a Hub folder from nepa_hf.hub.publish names every head)
    assert saved["model_type"] == "nepa" and saved["auto_map"] == {
        "AutoConfig": "configuration_nepa.NepaConfig",
        "AutoModelForImageClassification": "modeling_nepa.NepaForImageClassification",
    }
    for code_file in ("configuration_nepa.py", "modeling_nepa.py", "image_processing_nepa.py"):
        assert (tmp_path / code_file).exists(), code_file


def test_classifier_from_pretraining_checkpoint_is_bidirectional_with_zero_head(tmp_path, caplog):
    pretrain = NepaForPreTraining(small_config(qk_norm_affine=False))
    pretrain.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        model = NepaForImageClassification.from_pretrained(
            tmp_path, num_labels=4, qk_norm_affine=True, output_loading_info=False
        )
    assert model.config.is_causal is False  # a head decides bidirectional attention for an unset config
    assert torch.all(model.classifier.weight == 0) and torch.all(model.classifier.bias == 0)
    # Affine QK-norm weights start at 1.0 where the source had none (functionally identical; reported as new).
    assert torch.all(model.nepa.encoder.layers[0].attention.q_norm.weight == 1.0)
    # Backbone weights are the pretrained ones.
    assert torch.equal(
        model.nepa.embeddings.cls_token, pretrain.nepa.embeddings.cls_token
    )
    _, info = NepaForImageClassification.from_pretrained(
        tmp_path, num_labels=4, qk_norm_affine=True, output_loading_info=True
    )
    assert info["unexpected_keys"] == set() or not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    # The new head is reported, as for ViT: transformers' LOAD REPORT lists its weights as MISSING, and the affine
    # QK-norm weights the non-affine source lacks (started at 1.0, the same function).
    qk_norm = {f"nepa.encoder.layers.{i}.attention.{n}_norm.weight" for i in range(2) for n in "qk"}
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias", "fc_norm.weight", "fc_norm.bias"} | qk_norm
    report = caplog.text[caplog.text.index("LOAD REPORT") :]
    assert "classifier.weight" in report and "MISSING" in report and "q_norm" in report


def test_pipeline_on_a_pretraining_folder_says_its_head_is_untrained(tmp_path, caplog):
    """Issue 25 item 5: the README's untrained-head case. The pipeline works on a pretraining folder, and transformers'
    LOAD REPORT, printed while the pipeline loads it, names the new head's weights as MISSING."""
    NepaForPreTraining(small_config()).save_pretrained(tmp_path)
    NepaImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        classify = pipeline("image-classification", model=str(tmp_path))
    report = caplog.text[caplog.text.index("NepaForImageClassification LOAD REPORT") :]
    assert all(f"{key} | MISSING" in " ".join(report.split()) for key in ("classifier.weight", "fc_norm.weight"))
    assert "newly initialized" in report
    scores = classify(Image.new("RGB", (40, 30), (200, 10, 10)), top_k=2)
    assert [round(score["score"], 6) for score in scores] == [0.5, 0.5]  # the zero head, as the README says


def test_pretraining_checkpoint_loads_into_every_head(tmp_path):
    pretrain = NepaForPreTraining(small_config())
    pretrain.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert torch.equal(base.norm.weight, pretrain.nepa.norm.weight)
    again = AutoModelForPreTraining.from_pretrained(tmp_path)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(pixels).loss, pretrain.eval()(pixels).loss)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    torch.set_num_threads(int(os.environ["NEPA_TEST_THREADS"]))
    sys.modules["nepa_hf"] = None  # simulate an environment where nepa_hf is not installed
    from transformers import AutoModel, AutoModelForImageClassification, AutoImageProcessor, pipeline
    folder, pixels_path, out_path = sys.argv[1:4]
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert "nepa_hf" not in type(model).__module__, type(model).__module__
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(base).__name__ == "NepaModel"
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == os.environ["NEPA_EXPECTED_PROCESSOR"], type(processor)
    assert "nepa_hf" not in type(processor).__module__, type(processor).__module__
    pil = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, backend="pil")
    assert type(pil).__name__ == "NepaImageProcessorPil", type(pil)
    with torch.no_grad():
        logits = model(torch.load(pixels_path)).logits
    torch.save(logits, out_path)
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
    from PIL import Image
    print(classifier(Image.new("RGB", (40, 30), (200, 10, 10)), top_k=2))
    """
)


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package(tmp_path):
    from nepa_hf.hub.publish import write_remote_code

    model = save_classifier(tmp_path / "ckpt")
    write_remote_code(tmp_path / "ckpt")  # what a published folder carries: every head's Auto class
    pixels = torch.randn(2, 3, 32, 32)
    torch.save(pixels, tmp_path / "pixels.pt")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="",
               # same thread count as this process, so reductions run in the same order (bit-exact outputs)
               NEPA_TEST_THREADS=str(torch.get_num_threads()), NEPA_EXPECTED_PROCESSOR=EXPECTED_PROCESSOR)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(pixels).logits)
    assert "'label'" in result.stdout


NO_TORCHVISION_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["nepa_hf"] = None  # nepa_hf is not installed ...
    sys.modules["torchvision"] = None  # ... and neither is torchvision
    from transformers import AutoImageProcessor, pipeline
    from transformers.utils import is_torchvision_available
    assert not is_torchvision_available()
    folder = sys.argv[1]
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "NepaImageProcessorPil", type(processor)
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
    assert type(classifier.image_processor).__name__ == "NepaImageProcessorPil", type(classifier.image_processor)
    from PIL import Image
    print(classifier(Image.new("RGB", (40, 30), (200, 10, 10)), top_k=2))
    """
)


@pytest.mark.slow
def test_trust_remote_code_falls_back_to_pil_without_torchvision(tmp_path):
    # The saved auto_map names the torchvision class too; without torchvision the PIL one must load.
    save_classifier(tmp_path / "ckpt")
    script = tmp_path / "no_torchvision.py"
    script.write_text(NO_TORCHVISION_SCRIPT)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'label'" in result.stdout


def test_image_classification_pipeline_on_real_photos(tmp_path, photo_images):
    save_classifier(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))
    assert type(classifier.image_processor).__name__ == EXPECTED_PROCESSOR
    results = classifier(photo_images, top_k=3)
    assert len(results) == len(photo_images)
    for result in results:
        assert [r["label"] for r in result] != [] and {r["label"] for r in result} <= set(LABELS)
        scores = [r["score"] for r in result]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-4)


def test_pipelines_never_prompt_for_remote_code(tmp_path, monkeypatch):
    save_classifier(tmp_path)
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    for task in ("image-classification", "image-feature-extraction"):
        pipeline(task, model=str(tmp_path))
    assert prompts == []


def test_image_feature_extraction_pipeline_on_real_photos(tmp_path, photo_images):
    save_classifier(tmp_path)
    extractor = pipeline("image-feature-extraction", model=str(tmp_path))
    assert type(extractor.image_processor).__name__ == EXPECTED_PROCESSOR
    features = extractor(photo_images[0], return_tensors=True)
    assert features.shape == (1, 1 + 16, 64)
    pooled = extractor(photo_images[:2], pool=True, return_tensors=True)
    assert len(pooled) == 2 and pooled[0].shape == (1, 64)
    base = AutoModel.from_pretrained(tmp_path).eval()
    pixels = AutoImageProcessor.from_pretrained(tmp_path)(photo_images[0], return_tensors="pt").pixel_values
    with torch.no_grad():
        torch.testing.assert_close(pooled[0], base(pixels).pooler_output)


def test_a_model_sharded_by_fsdp2_saves_its_own_remote_code(tmp_path):
    """FSDP2's `fully_shard` turns the model's class into a dynamic `FSDP<Name>(FSDPModule, Name)` defined in torch
    (as below, minus the sharding). transformers' save would copy torch's FSDP files as the model's remote code and
    point auto_map at `_fsdp_init.FSDPNepaForImageClassification` (seen with the Trainer under FSDP2); `NepaTrainer`
    saves it as its own class, and keeps the wrapper class afterwards."""
    from torch.distributed.fsdp import FSDPModule

    from nepa_hf.training.finetuning import NepaTrainer, NepaTrainingArguments

    torch.manual_seed(0)
    model = NepaForImageClassification(small_config(id2label=dict(enumerate(LABELS))))
    fsdp_class = type(f"FSDP{type(model).__name__}", (FSDPModule, type(model)),
                      {"__module__": "torch.distributed.fsdp._fully_shard._fsdp_init"})
    arguments = NepaTrainingArguments(output_dir=str(tmp_path / "run"), ema_decay=0, report_to="none", use_cpu=True)
    trainer = NepaTrainer(model=model, args=arguments)
    model.__class__ = fsdp_class
    trainer._save(str(tmp_path))  # what Trainer.save_model calls once it has gathered the full state dict
    assert type(model) is fsdp_class
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_nepa.NepaForImageClassification"
    assert config["architectures"] == ["NepaForImageClassification"]
    assert (tmp_path / "modeling_nepa.py").is_file() and not list(tmp_path.glob("_fsdp*.py"))
