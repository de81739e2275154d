"""The Fashion-MNIST study's own pieces: the MAE baseline's encoder transfer, label subsets, the run plan."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

STUDY_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "fashion_mnist_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("fashion_mnist_study", STUDY_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_mae_encoder_transfers_exactly_into_the_vit_classifier(study, tmp_path):
    """The MAE baseline is fine-tuned as a ViTModel: its encoder must compute exactly what ViTMAE's encoder does."""
    torch.manual_seed(0)
    mae = study.mae_model().eval()
    mae.save_pretrained(tmp_path / "mae")
    classifier = study.ViTMeanPoolClassifier().eval()
    classifier.load_mae_encoder(tmp_path / "mae")
    pixels = torch.randn(2, 3, 32, 32)
    num_patches = (32 // 4) ** 2
    mae.config.mask_ratio = 0.0
    with torch.no_grad():
        # Increasing noise keeps the patch order, so with no masking the MAE encoder sees every patch in place.
        reference = mae.vit(pixels, noise=torch.arange(num_patches).float().expand(2, -1)).last_hidden_state
        ours = classifier.vit(pixels).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert classifier(pixels).shape == (2, 10)


def test_label_subset_is_class_balanced_and_seeded(study):
    labels = torch.arange(10).repeat_interleave(50)
    subset = study.label_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[subset], minlength=10).tolist() == [5] * 10
    assert torch.equal(subset, study.label_subset(labels, 0.1, seed=0))
    assert not torch.equal(subset, study.label_subset(labels, 0.1, seed=1))
    assert len(study.label_subset(labels, 1.0, seed=0)) == 500


def test_plan_orders_every_dependency_first_and_covers_the_study(study):
    units = study.plan(study.Budget())
    names = [name for name, _, _ in units]
    assert len(names) == len(set(names))
    for index, (name, _, deps) in enumerate(units):
        assert all(dep in names[:index] for dep in deps), name
    for variant in ["nepa", "mae", "nepa-short", *study.ABLATIONS]:
        assert f"pretrain-{variant}-s0" in names
    for init in ("nepa", "scratch", "mae"):
        assert all(f"finetune-{init}-10pct-s{seed}" in names for seed in (0, 1, 2))
        assert f"finetune-{init}-100pct-s0" in names


def test_augment_keeps_shape_and_content(study):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 32, 32), dtype=torch.uint8)
    out = study.augment(images, generator, pad=0)  # no translation: each image is itself or its mirror
    for original, augmented in zip(images, out):
        assert torch.equal(augmented, original) or torch.equal(augmented, original.flip(-1))
