"""Semantic segmentation: NepaBackbone, UperNet with a NEPA backbone, NepaForSemanticSegmentation, the
image-segmentation pipeline, remote code, the scenes task, augmentation, inference helpers, metric, example script."""

import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import numpy as np
import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoBackbone,
    AutoModelForSemanticSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    pipeline,
)
from transformers.utils import is_torchvision_available

from nepa_hf.evaluation.features import local_metric_path
from nepa_hf.training.finetuning import layer_decay_parameter_groups
from nepa_hf import (
    NepaBackbone,
    NepaConfig,
    NepaForImageClassification,
    NepaForPreTraining,
    NepaForSemanticSegmentation,
    NepaImageProcessor,
    NepaImageProcessorPil,
    NepaModel,
    default_backbone_out_indices,
)
from nepa_hf.evaluation.segmentation import (
    sliding_window_inference,
    whole_inference,
)
from nepa_hf.data.segmentation import (
    FASHION_SCENES_LABELS,
    fashion_scenes_dataset,
    make_fashion_scenes,
    random_scale_crop_flip,
    segmentation_folder_dataset,
)

REPO = Path(__file__).resolve().parents[1]
MEAN_IOU = local_metric_path("mean_iou")
LABELS = ["sky", "cat", "road", "tree", "car"]


def tiny_config(**overrides) -> NepaConfig:
    base = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=4,
        image_size=32, layerscale_value=1.0, qk_norm_affine=True, decode_hidden_size=16, auxiliary_hidden_size=8,
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
    )
    base.update(overrides)
    return NepaConfig(**base)


def tiny_upernet_config(**overrides) -> UperNetConfig:
    # UperNet reads four stages: named explicitly, as for every transformers backbone (the default is the last block).
    backbone = tiny_config(id2label=None, label2id=None, out_indices=default_backbone_out_indices(4))
    return UperNetConfig(
        backbone_config=backbone, num_labels=len(LABELS), hidden_size=16, auxiliary_channels=8, **overrides
    )


# ------------------------------------------------------------------------------------------------ config


def test_default_out_indices_are_four_evenly_spaced_blocks():
    assert default_backbone_out_indices(12) == [4, 6, 8, 12]  # blocks 3, 5, 7, 11 zero-based (BEiT/MAE)
    assert default_backbone_out_indices(24) == [8, 12, 16, 24]
    assert default_backbone_out_indices(6) == [2, 3, 4, 6]
    assert default_backbone_out_indices(4) == [1, 2, 3, 4]
    assert default_backbone_out_indices(3) == [0, 1, 2, 3]
    # The backbone default is the last block, as for every transformers backbone; the segmentation model reads four.
    config = NepaConfig()
    assert config.out_features == ["stage12"] and config.out_indices == [12]
    assert NepaConfig(out_features=None, out_indices=None).out_indices == [12]
    stored = NepaConfig.from_dict({**NepaConfig().to_dict(), "out_indices": [3, 12], "out_features": None})
    assert stored.out_indices == [3, 12]
    segmenter_config = tiny_config()
    assert segmenter_config.out_indices == [4]
    segmenter = NepaForSemanticSegmentation(segmenter_config)
    assert segmenter.config.out_indices == [1, 2, 3, 4]  # chosen by the segmenter, written into its own config
    reloaded = NepaConfig.from_dict(json.loads(json.dumps(tiny_config(pool_scales=[1, 3]).to_dict())))
    assert reloaded.pool_scales == [1, 3] and reloaded.semantic_loss_ignore_index == 255
    with pytest.raises(StrictDataclassClassValidationError, match="pool_scales"):
        tiny_config(pool_scales=[])


def test_segmentation_heads_scale_with_the_backbone():
    """Issue 25 item 4: the decode and auxiliary channels follow hidden_size (BEiT's UperNet sizing: hidden_size and
    hidden_size // 3, 768 / 256 for ViT-B), so a micro backbone gets a micro head; explicit values win and are saved."""
    sizes = {name: NepaConfig.from_preset(name) for name in ("nepa-vit-micro", "nepa-vit-tiny", "nepa-vit-b")}
    assert [(c.decode_hidden_size, c.auxiliary_hidden_size) for c in sizes.values()] == [(128, 42), (192, 64), (768, 256)]
    micro = NepaForSemanticSegmentation(NepaConfig.from_preset("nepa-vit-micro", num_labels=10))
    backbone = sum(p.numel() for p in micro.nepa.parameters())
    assert sum(p.numel() for p in micro.parameters()) < 4 * backbone  # was 24x with the fixed 512/256 heads
    explicit = NepaConfig.from_preset("nepa-vit-micro", decode_hidden_size=512)
    assert NepaConfig.from_dict(explicit.to_dict()).decode_hidden_size == 512


# ------------------------------------------------------------------------------------------------ backbone


@pytest.mark.parametrize("height, width", [(20, 28), (36, 12), (4, 4)])
def test_backbone_feature_maps_for_odd_sizes(height, width):
    torch.manual_seed(0)
    backbone = NepaBackbone(tiny_config(out_indices=[1, 2, 3, 4])).eval()
    assert backbone.out_features == ["stage1", "stage2", "stage3", "stage4"] and backbone.channels == [32] * 4
    with torch.no_grad():
        outputs = backbone(torch.randn(2, 3, height, width))
    assert [tuple(f.shape) for f in outputs.feature_maps] == [(2, 32, height // 4, width // 4)] * 4
    assert outputs.hidden_states is None  # only when asked for


def test_backbone_maps_are_the_model_patch_tokens_row_major():
    torch.manual_seed(0)
    config = tiny_config(is_causal=False)
    model = NepaModel(config).eval()
    backbone = NepaBackbone(tiny_config(is_causal=False, out_indices=[0, 2, 4])).eval()
    backbone.load_state_dict(model.state_dict())
    pixels = torch.randn(2, 3, 12, 20)
    with torch.no_grad():
        expected = model(pixels, output_hidden_states=True)
        outputs = backbone(pixels, output_hidden_states=True)
    assert backbone.out_features == ["stem", "stage2", "stage4"]
    # The last stage is the model's normed sequence, CLS dropped, (B, N, D) -> (B, D, h, w) row-major.
    tokens = expected.last_hidden_state[:, 1:]
    torch.testing.assert_close(outputs.feature_maps[-1], tokens.transpose(1, 2).reshape(2, 32, 3, 5))
    torch.testing.assert_close(
        outputs.feature_maps[1], backbone.norm(expected.hidden_states[2][:, 1:]).transpose(1, 2).reshape(2, 32, 3, 5)
    )
    assert len(outputs.hidden_states) == config.num_hidden_layers + 1
    # Without the final norm and reshape: raw (B, N, D) patch tokens.
    backbone.config.apply_layernorm, backbone.config.reshape_hidden_states = False, False
    with torch.no_grad():
        raw = backbone(pixels).feature_maps
    torch.testing.assert_close(raw[0], expected.hidden_states[0][:, 1:])


def test_backbone_is_bidirectional_and_loads_every_nepa_checkpoint(tmp_path):
    torch.manual_seed(0)
    pretrain = NepaForPreTraining(tiny_config(id2label=None, label2id=None))
    sources = {
        "pretrain": pretrain,
        "base": pretrain.nepa,
        "classifier": NepaForImageClassification(tiny_config(is_causal=False)),
        "segmenter": NepaForSemanticSegmentation(tiny_config()),
    }
    pixels = torch.randn(1, 3, 16, 16)
    for name, source in sources.items():
        source.save_pretrained(tmp_path / name)
        backbone, info = NepaBackbone.from_pretrained(tmp_path / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        trunk = source.nepa if hasattr(source, "nepa") else source
        for key, tensor in backbone.state_dict().items():
            assert torch.equal(tensor, trunk.state_dict()[key]), (name, key)
        assert backbone.config.is_causal is False, name
    # Bidirectional by default for a pretraining checkpoint: different from a causal call.
    backbone = NepaBackbone.from_pretrained(tmp_path / "pretrain").eval()
    with torch.no_grad():
        bidirectional = backbone(pixels).feature_maps[-1]
        causal = backbone(pixels, is_causal=True).feature_maps[-1]
    assert not torch.allclose(bidirectional, causal)
    # A deliberate causal backbone keeps its choice through save/load.
    backbone.config.is_causal = True
    backbone.save_pretrained(tmp_path / "causal-backbone")
    assert NepaBackbone.from_pretrained(tmp_path / "causal-backbone").config.is_causal is True
    # out_indices can be chosen at load time; AutoBackbone.from_config resolves NEPA.
    picked = NepaBackbone.from_pretrained(tmp_path / "pretrain", out_indices=[2, 4])
    assert picked.out_features == ["stage2", "stage4"]
    assert type(AutoBackbone.from_config(tiny_config())) is NepaBackbone


# ------------------------------------------------------------------------------------------------ UperNet


def test_upernet_with_nepa_backbone_trains_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(tiny_upernet_config())
    assert type(model.backbone) is NepaBackbone and model.backbone.config.is_causal is False
    pixels, labels = torch.randn(2, 3, 20, 28), torch.randint(0, len(LABELS), (2, 20, 28))
    labels[0, :4] = 255
    outputs = model(pixels, labels=labels)
    assert outputs.logits.shape == (2, len(LABELS), 20, 28) and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert model.backbone.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert model.backbone.encoder.layers[0].attention.q_proj.weight.grad.abs().sum() > 0

    model.eval().save_pretrained(tmp_path)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(reloaded) is UperNetForSemanticSegmentation and type(reloaded.backbone) is NepaBackbone
    with torch.no_grad():
        assert torch.equal(model(pixels).logits, reloaded(pixels).logits)


# ------------------------------------------------------------------------------------------------ NepaForSemanticSegmentation


def test_segmentation_model_from_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(0)
    # A pretraining config names no stages: the backbone default, the last block only.
    pretrain = NepaForPreTraining(tiny_config(id2label=None, label2id=None, out_indices=[4]))
    pretrain.save_pretrained(tmp_path)
    model, info = NepaForSemanticSegmentation.from_pretrained(
        tmp_path, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
        output_loading_info=True,
    )
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.is_causal is False and model.config.out_indices == [1, 2, 3, 4]
    assert torch.equal(model.nepa.embeddings.cls_token, pretrain.nepa.embeddings.cls_token)
    assert torch.equal(model.nepa.encoder.layers[3].mlp.up_proj.weight, pretrain.nepa.encoder.layers[3].mlp.up_proj.weight)
    assert model.loss_type == "ForSemanticSegmentation" and model.accepts_loss_kwargs is False
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, 3, 20, 28)).logits
    assert logits.shape == (1, len(LABELS), 20, 28)  # stride p/4 = 1 for patch size 4


def test_segmentation_loss_ignore_index_and_auxiliary_weight():
    torch.manual_seed(0)
    model = NepaForSemanticSegmentation(tiny_config(patch_size=8)).train()
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 40)
    labels = torch.randint(0, len(LABELS), (2, 32, 40))
    labels[:, :10] = 255
    torch.manual_seed(2)
    outputs = model(pixels, labels=labels)
    assert outputs.logits.shape == (2, len(LABELS), 16, 20)  # stride 8/4 = 2
    # Same forward again (same dropout/RoPE draws) to get the auxiliary logits for the reference loss.
    torch.manual_seed(2)
    pyramid = model.neck(model.nepa(pixels).feature_maps)
    logits, aux = model.decode_head(pyramid), model.auxiliary_head(pyramid)
    upsample = lambda x: F.interpolate(x, size=(32, 40), mode="bilinear", align_corners=False)  # noqa: E731
    kept = labels != 255
    expected = F.cross_entropy(upsample(logits).permute(0, 2, 3, 1)[kept], labels[kept])
    expected = expected + 0.4 * F.cross_entropy(upsample(aux).permute(0, 2, 3, 1)[kept], labels[kept])
    torch.testing.assert_close(outputs.loss, expected)
    # The Trainer's item count (which includes the 255 pixels) must not rescale the loss.
    torch.manual_seed(2)
    with_count = model(pixels, labels=labels, num_items_in_batch=torch.tensor(labels.numel()))
    torch.testing.assert_close(with_count.loss, outputs.loss)
    # Auxiliary head off: decode loss only.
    model.auxiliary_head, model.config.use_auxiliary_head = None, False
    torch.manual_seed(2)
    torch.testing.assert_close(
        model(pixels, labels=labels).loss, F.cross_entropy(upsample(logits).permute(0, 2, 3, 1)[kept], labels[kept])
    )


def test_segmentation_input_errors():
    model = NepaForSemanticSegmentation(tiny_config()).train()
    pixels = torch.randn(2, 3, 16, 16)
    # Label values are checked by the data pipeline (check_label_maps, test_bad_inputs_model.py).
    with pytest.raises(ValueError, match="at least 2 images"):
        model(pixels[:1], labels=torch.zeros(1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(2, 3, 15, 16))
    with pytest.raises(ValueError, match="num_hidden_layers >= 3"):
        NepaForSemanticSegmentation(tiny_config(num_hidden_layers=2))
    two_stages = tiny_config(out_indices=[2, 4])
    with pytest.raises(ValueError, match=r"reads four backbone stages.*out_indices=\[1, 2, 3, 4\]"):
        NepaForSemanticSegmentation(two_stages)
    assert two_stages.out_indices == [2, 4]  # a refused config is left as it was
    config = tiny_config(out_indices=[1, 2, 3, 4])
    saved = config.to_dict()
    segmenter, backbone = NepaForSemanticSegmentation(config), NepaBackbone(config)
    assert config.to_dict() == saved  # the caller's config is left alone (it may be a pretraining model's too)
    assert segmenter.config.out_indices == backbone.config.out_indices == [1, 2, 3, 4]  # four chosen stages are kept
    assert segmenter.config.is_causal is False and segmenter.nepa.config is segmenter.config
    model.eval()(pixels[:1])  # a single image is fine for inference


def test_label_reduction_and_ignore_index_end_to_end():
    """ADE20K-style maps: 0 = unlabelled -> 255 ignored by the loss, k -> k - 1."""
    processor = NepaImageProcessorPil(do_resize=False, do_reduce_labels=True)
    raw = np.zeros((16, 16), dtype=np.uint8)
    raw[:8] = 1
    raw[8:, :4] = 5
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    inputs = processor(image, segmentation_maps=raw, return_tensors="pt")
    labels = inputs["labels"][0]
    assert set(labels.unique().tolist()) == {0, 4, 255}
    assert torch.equal(labels == 255, torch.from_numpy(raw == 0))
    model = NepaForSemanticSegmentation(tiny_config()).eval()
    with torch.no_grad():
        logits = model(inputs["pixel_values"]).logits
        loss = model(inputs["pixel_values"], labels=inputs["labels"]).loss
    kept = labels != 255
    expected = F.cross_entropy(logits[0].permute(1, 2, 0)[kept], labels[kept])
    model.auxiliary_head, model.config.use_auxiliary_head = None, False
    with torch.no_grad():
        decode_only = model(inputs["pixel_values"], labels=inputs["labels"]).loss
    torch.testing.assert_close(decode_only, expected)  # the mean over labelled pixels only
    assert loss > decode_only  # + 0.4 x auxiliary loss


# ------------------------------------------------------------------------------------------------ Auto classes, pipeline, remote code


def save_segmenter(directory) -> NepaForSemanticSegmentation:
    torch.manual_seed(0)
    model = NepaForSemanticSegmentation(tiny_config()).eval()
    with torch.no_grad():  # a strong classifier bias pattern so several classes appear in the predictions
        model.decode_head.classifier.weight.normal_(0, 1.0)
    model.save_pretrained(directory)
    NepaImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return model


def test_auto_model_and_image_segmentation_pipeline(tmp_path, photo_images):
    model = save_segmenter(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForSemanticSegmentation"] == "modeling_nepa_segmentation.NepaForSemanticSegmentation"
    assert (tmp_path / "modeling_nepa_segmentation.py").exists() and (tmp_path / "modeling_nepa.py").exists()
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(reloaded) is NepaForSemanticSegmentation
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(pixels).logits, model(pixels).logits)

    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    # The pipeline runs AutoImageProcessor's choice, the torchvision backend where it is installed, so the expected
    # masks come from that class. (The PIL backend's resize differs by up to 1 uint8 step, 2/255 after normalisation,
    # which flips 25 of 135300 mask pixels (0.018%) on this photo: exact equality holds only for the same backend.)
    processor_class = NepaImageProcessor if is_torchvision_available() else NepaImageProcessorPil
    assert type(segmenter.image_processor) is processor_class
    image = photo_images[1]
    results = segmenter(image)
    processor = processor_class.from_pretrained(tmp_path)
    with torch.no_grad():
        outputs = model(processor(image, return_tensors="pt").pixel_values)
    expected = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    present = sorted(expected.unique().tolist())
    assert len(present) >= 2
    assert sorted(LABELS.index(r["label"]) for r in results) == present  # one mask per class present
    coverage = np.zeros(image.size[::-1], dtype=int)
    for result in results:
        assert result["mask"].mode == "L" and result["mask"].size == image.size
        mask = np.asarray(result["mask"]) > 0
        assert np.array_equal(mask, expected.numpy() == LABELS.index(result["label"]))
        coverage += mask
    assert np.all(coverage == 1)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    torch.set_num_threads(int(os.environ["NEPA_TEST_THREADS"]))
    sys.modules["nepa_hf"] = None  # nepa_hf is not installed
    from transformers import AutoBackbone, AutoConfig, AutoModelForSemanticSegmentation, pipeline
    from PIL import Image
    folder, pixels_path, out_path = sys.argv[1:4]
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "NepaForSemanticSegmentation" and "nepa_hf" not in type(model).__module__
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    backbone = AutoBackbone.from_config(config, trust_remote_code=True)
    assert type(backbone).__name__ == "NepaBackbone", type(backbone)
    with torch.no_grad():
        torch.save(model(torch.load(pixels_path)).logits, out_path)
    segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    print(sorted(r["label"] for r in segmenter(Image.new("RGB", (40, 30), (200, 10, 10)))))
    """
)


@pytest.mark.slow
def test_trust_remote_code_segmentation_without_the_package(tmp_path):
    from nepa_hf.hub.publish import write_remote_code

    model = save_segmenter(tmp_path / "ckpt")
    write_remote_code(tmp_path / "ckpt")  # what a published folder carries: every head's Auto class
    pixels = torch.randn(2, 3, 32, 32)
    torch.save(pixels, tmp_path / "pixels.pt")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="",
               # same thread count as this process, so reductions run in the same order (bit-exact outputs)
               NEPA_TEST_THREADS=str(torch.get_num_threads()))
    result = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(tmp_path / "ckpt"), str(tmp_path / "pixels.pt"),
         str(tmp_path / "out.pt")],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(pixels).logits)
    assert any(label in result.stdout for label in LABELS)


# ------------------------------------------------------------------------------------------------ metric


def test_mean_iou_on_a_hand_made_example():
    metric = evaluate.load(MEAN_IOU)
    prediction = np.array([[0, 0, 1, 1], [0, 2, 2, 1], [2, 2, 2, 1]])
    reference = np.array([[0, 0, 1, 255], [0, 0, 2, 1], [2, 2, 1, 1]])
    # 11 labelled pixels ((0, 3) is ignored), 9 correct. class 0: I=3, U=3+4-3; class 1: I=3, U=3+4-3;
    # class 2: I=3, U=5+3-3 ((1, 1) and (2, 2) wrongly predicted 2).
    results = metric.compute(predictions=[prediction], references=[reference], num_labels=4)
    np.testing.assert_allclose(results["per_category_iou"][:3], [3 / 4, 3 / 4, 3 / 5])
    assert np.isnan(results["per_category_iou"][3])  # class 3 absent from both: skipped by the mean
    assert results["mean_iou"] == pytest.approx((3 / 4 + 3 / 4 + 3 / 5) / 3)
    assert results["overall_accuracy"] == pytest.approx(9 / 11)
    np.testing.assert_allclose(results["per_category_accuracy"][:3], [3 / 4, 3 / 4, 3 / 3])
    # Accumulated over images (not averaged per image), with add_batch.
    metric.add_batch(predictions=[prediction], references=[reference])
    metric.add_batch(predictions=[np.full((2, 2), 3)], references=[np.array([[3, 3], [0, 0]])])
    two = metric.compute(num_labels=4)
    np.testing.assert_allclose(two["per_category_iou"], [3 / 6, 3 / 4, 3 / 5, 2 / 4])
    # reduce_labels: raw 0 is ignored, k -> k - 1.
    reduced = metric.compute(
        predictions=[np.array([[0, 1], [1, 1]])], references=[np.array([[1, 2], [0, 0]])], num_labels=2,
        reduce_labels=True,
    )
    assert reduced["mean_iou"] == pytest.approx(1.0) and reduced["overall_accuracy"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        metric.compute(predictions=[np.array([[5]])], references=[np.array([[0]])], num_labels=2)


# ------------------------------------------------------------------------------------------------ data


def test_fashion_scenes_are_deterministic_and_labelled():
    images, masks = make_fashion_scenes(6, split="train", image_size=48, seed=3)
    again_images, again_masks = make_fashion_scenes(6, split="train", image_size=48, seed=3)
    assert np.array_equal(images, again_images) and np.array_equal(masks, again_masks)
    other_images, _ = make_fashion_scenes(6, split="train", image_size=48, seed=4)
    test_images, _ = make_fashion_scenes(6, split="test", image_size=48, seed=3)
    assert not np.array_equal(images, other_images) and not np.array_equal(images, test_images)
    assert images.shape == (6, 48, 48, 3) and images.dtype == np.uint8
    assert masks.shape == (6, 48, 48) and masks.max() <= 10
    for mask in masks:  # every scene has background and at least one item
        assert 0 in mask and (mask > 0).any()
    assert len(FASHION_SCENES_LABELS) == 11 and FASHION_SCENES_LABELS[0] == "background"
    dataset = fashion_scenes_dataset(2, seed=3, image_size=48)
    assert dataset.column_names == ["image", "annotation"]
    assert np.array_equal(np.asarray(dataset[1]["annotation"]), masks[1])
    assert np.array_equal(np.asarray(dataset[1]["image"]), images[1])


def test_segmentation_folder_dataset(tmp_path):
    for split in ("train", "validation"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        for name in ("b", "a"):
            Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / split / "images" / f"{name}.jpg")
            Image.fromarray(np.full((6, 8), 2, dtype=np.uint8)).save(tmp_path / split / "masks" / f"{name}.png")
    dataset = segmentation_folder_dataset(tmp_path, "train")
    assert len(dataset) == 2 and np.asarray(dataset[0]["annotation"]).tolist() == [[2] * 8] * 6
    (tmp_path / "validation" / "masks" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="No mask"):
        segmentation_folder_dataset(tmp_path, "validation")


def test_random_scale_crop_flip_keeps_image_and_mask_aligned():
    # Label blocks; the image encodes each pixel's label in its red channel.
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[:30, 40:] = 1
    mask[30:, :40] = 2
    mask[30:, 40:] = 3
    image = np.stack([mask * 60, np.zeros_like(mask), np.zeros_like(mask)], axis=-1).astype(np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out_image, out_mask = random_scale_crop_flip(image, mask, (32, 48), rng, scale_range=(0.5, 2.0))
        assert out_image.shape == (32, 48, 3) and out_mask.shape == (32, 48) and out_mask.dtype == np.int64
        assert set(np.unique(out_mask)) <= {0, 1, 2, 3, 255}
        labelled = out_mask != 255
        assert np.all(out_image[~labelled] == 0)  # padding
        agreement = np.mean(np.abs(out_image[..., 0][labelled].astype(int) - out_mask[labelled] * 60) < 30)
        assert agreement > 0.9  # only block edges differ (bilinear image, nearest mask); a shift or lone flip: ~0.5
    with pytest.raises(ValueError, match="differ"):
        random_scale_crop_flip(image, mask[:10], (32, 32), rng)


# ------------------------------------------------------------------------------------------------ inference, optimizer


def test_sliding_window_equals_whole_image_when_the_window_covers_it():
    torch.manual_seed(0)
    model = NepaForSemanticSegmentation(tiny_config()).eval()
    pixels = torch.randn(1, 3, 18, 26)  # not a multiple of the patch size: padded internally
    whole = whole_inference(model, pixels)
    assert whole.shape == (1, len(LABELS), 18, 26)
    assert torch.equal(sliding_window_inference(model, pixels, window_size=(32, 32), stride=16), whole)
    assert torch.equal(sliding_window_inference(model, pixels, window_size=(18, 26)), whole)
    windows = sliding_window_inference(model, pixels, window_size=12, stride=8)
    assert windows.shape == whole.shape and torch.isfinite(windows).all()


class _PerPixelModel(nn.Module):
    """Logits depend on each pixel only, so any tiling must reproduce the whole-image logits."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"patch_size": 1})()
        self.conv = nn.Conv2d(3, 4, kernel_size=1)

    def forward(self, pixel_values):
        return type("Output", (), {"logits": self.conv(pixel_values)})()


def test_sliding_window_stitches_overlapping_windows():
    torch.manual_seed(0)
    model = _PerPixelModel()
    pixels = torch.randn(2, 3, 23, 31)
    torch.testing.assert_close(
        sliding_window_inference(model, pixels, window_size=(8, 10), stride=(5, 7)), whole_inference(model, pixels)
    )


def test_layer_decay_param_groups():
    """Head lr for the task heads (decode_head, auxiliary_head) and the backbone's final norm; the neck trains at the
    backbone lr with factor 1; weight decay on >1-D parameters except norms (the CLS token is decayed)."""
    model = NepaForSemanticSegmentation(tiny_config())
    groups = layer_decay_parameter_groups(model, learning_rate=1.0, weight_decay=0.05, layer_decay=0.5,
                                          head_learning_rate=2.0)
    by_parameter = {id(p): group for group in groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert len(by_parameter) == len(named) == sum(len(g["params"]) for g in groups)
    lr = {name: by_parameter[id(p)]["lr"] for name, p in named.items()}
    scale = {name: by_parameter[id(p)]["lr_scale"] for name, p in named.items()}
    decay = {name: by_parameter[id(p)]["weight_decay"] for name, p in named.items()}
    assert lr["nepa.embeddings.patch_embeddings.projection.weight"] == 0.5**4
    assert lr["nepa.encoder.layers.0.attention.q_proj.weight"] == 0.5**3
    assert lr["nepa.encoder.layers.3.mlp.up_proj.weight"] == 1.0
    head = [name for name in named if name.startswith(("decode_head.", "auxiliary_head.", "nepa.norm."))]
    assert head and all(lr[name] == 2.0 and scale[name] == 1.0 for name in head)
    neck = [name for name in named if name.startswith("neck.")]
    assert neck and all(lr[name] == 1.0 and scale[name] == 1.0 for name in neck)
    for name in ("nepa.encoder.layers.1.attention.q_proj.weight", "nepa.embeddings.cls_token",
                 "neck.upsample_2x.weight", "decode_head.fpn_bottleneck.conv.weight", "auxiliary_head.classifier.weight"):
        assert decay[name] == 0.05, name
    for name in ("nepa.encoder.layers.1.attention.q_proj.bias", "nepa.encoder.layers.1.layer_scale1.lambda1",
                 "nepa.norm.weight", "decode_head.fpn_bottleneck.batch_norm.weight", "neck.upsample_4x.1.weight"):
        assert decay[name] == 0.0, name
    # The same rule for transformers' UperNet on a NEPA backbone.
    upernet_groups = layer_decay_parameter_groups(UperNetForSemanticSegmentation(tiny_upernet_config()), 1.0)
    assert min(group["lr"] for group in upernet_groups) == pytest.approx(0.65**4)


# ------------------------------------------------------------------------------------------------ example script


def run_example(monkeypatch, args):
    monkeypatch.setattr(sys, "argv", ["finetune_segmentation.py", *args])
    runpy.run_path(str(REPO / "examples" / "finetune_segmentation.py"), run_name="__main__")


COMMON_ARGS = [
    "--do_train", "--do_eval", "--max_steps", "2", "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "2", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
    "--learning_rate", "1e-3", "--dataloader_num_workers", "0",
]


def test_example_on_the_scenes_task_from_a_pretrained_checkpoint(tmp_path, monkeypatch):
    pretrained = tmp_path / "pretrained"
    NepaForPreTraining(tiny_config(id2label=None, label2id=None)).save_pretrained(pretrained)
    output = tmp_path / "seg"
    run_example(monkeypatch, [
        "--model_name_or_path", str(pretrained), "--output_dir", str(output), "--num_train_scenes", "8",
        "--num_eval_scenes", "4", "--scene_size", "32", "--final_eval_mode", "slide", *COMMON_ARGS,
        "--per_device_eval_batch_size", "1",  # same batching as the final evaluation, for an exact comparison
    ])
    final = json.loads((output / "final_eval_results.json").read_text())
    trainer_eval = json.loads((output / "eval_results.json").read_text())
    # 32x32 scenes, 32x32 window: the sliding-window protocol equals the Trainer's evaluation.
    assert final["slide_mean_iou"] == pytest.approx(trainer_eval["eval_mean_iou"])
    assert 0.0 <= final["slide_mean_iou"] <= 1.0 and "slide_iou_Sneaker" in final
    segmenter = pipeline("image-segmentation", model=str(output))
    labels = {r["label"] for r in segmenter(Image.new("RGB", (40, 30), (90, 90, 90)))}
    assert labels and labels <= set(FASHION_SCENES_LABELS)
    saved = json.loads((output / "config.json").read_text())
    assert saved["is_causal"] is False and saved["id2label"]["1"] == "T-shirt/top"


def test_example_on_a_hub_layout_dataset_with_reduced_labels(tmp_path, monkeypatch):
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    folder = tmp_path / "ade_like"
    folder.mkdir()
    for split, count in (("train", 4), ("validation", 2)):
        images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(count)]
        maps = [Image.fromarray(rng.integers(0, 4, (40, 56), dtype=np.uint8)) for _ in range(count)]  # 0 = unlabelled
        datasets.Dataset.from_dict({"image": images, "annotation": maps}, features=features).to_parquet(
            str(folder / f"{split}.parquet")
        )
    output = tmp_path / "seg"
    run_example(monkeypatch, [
        "--dataset_name", str(folder), "--do_reduce_labels", "--num_labels", "3", "--crop_size", "24",
        "--config_preset", "nepa-vit-micro", "--config_overrides",
        "hidden_size=32,num_hidden_layers=3,num_attention_heads=2,intermediate_size=64,decode_hidden_size=8,"
        "auxiliary_hidden_size=8,pool_scales=1:2",
        "--output_dir", str(output), "--slide_stride", "16", "--cache_dir", str(tmp_path / "cache"), *COMMON_ARGS,
    ])
    final = json.loads((output / "final_eval_results.json").read_text())
    assert set(final) >= {"slide_mean_iou", "slide_overall_accuracy", "slide_iou_class_2"}
    saved = json.loads((output / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3 and saved["out_indices"] == [0, 1, 2, 3]
    assert json.loads((output / "preprocessor_config.json").read_text())["do_reduce_labels"] is True


def test_default_crop_fits_the_patch_size_and_an_explicit_one_must(tmp_path, monkeypatch):
    """The scenes task's default crop (the scene size) is fitted to a patch-7 model (32 -> 28); a --crop_size that
    is not a multiple of the patch size is an error naming both."""
    pretrained = tmp_path / "pretrained"
    NepaForPreTraining(tiny_config(id2label=None, label2id=None, patch_size=7, image_size=28)).save_pretrained(pretrained)
    output = tmp_path / "seg"
    scenes = ["--num_train_scenes", "4", "--num_eval_scenes", "2", "--scene_size", "32", "--final_eval_mode", "none"]
    run_example(monkeypatch, ["--model_name_or_path", str(pretrained), "--output_dir", str(output), *scenes,
                              *COMMON_ARGS])
    assert json.loads((output / "preprocessor_config.json").read_text())["size"] == {"height": 28, "width": 28}
    with pytest.raises(ValueError, match="--crop_size 32 must be a multiple of the patch size 7"):
        run_example(monkeypatch, ["--model_name_or_path", str(pretrained), "--output_dir", str(tmp_path / "seg2"),
                                  *scenes, "--crop_size", "32", *COMMON_ARGS])
