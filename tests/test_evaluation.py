"""Offline `evaluate` metrics, frozen-feature extraction, k-NN and linear probe."""

import numpy as np
import pytest
import torch

from nepa_hf import NepaConfig, NepaForImageClassification, NepaModel
from nepa_hf.data.images import load_fashion_mnist
from nepa_hf.evaluation.features import (
    classification_metrics,
    extract_features,
    knn_accuracy,
    knn_classify,
    linear_probe_accuracy,
    load_metric,
    local_metric_path,
)


def test_local_metric_modules_load_offline_and_compute():
    assert local_metric_path("accuracy").endswith("metrics/accuracy")
    accuracy = load_metric("accuracy")
    assert accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    assert accuracy.compute(predictions=[0, 1], references=[0, 0], normalize=False) == {"accuracy": 1.0}
    top_k = load_metric("top_k_accuracy")
    scores = [[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]
    assert top_k.compute(predictions=scores, references=[2, 2, 2], k=2) == {"top2_accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="k must be in"):
        top_k.compute(predictions=scores, references=[0, 0, 0], k=4)

    class Prediction:
        predictions = np.array([[0.0, 1.0] + [0.0] * 6, [1.0] + [0.0] * 7])
        label_ids = np.array([1, 3])

    metrics = classification_metrics(num_labels=8)(Prediction())
    assert metrics["accuracy"] == 0.5 and metrics["top5_accuracy"] == 1.0
    assert "top5_accuracy" not in classification_metrics(num_labels=3)(
        type("P", (), {"predictions": np.eye(3), "label_ids": np.arange(3)})()
    )


def test_knn_votes_are_temperature_weighted_cosine_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.2]])  # scale must not matter: cosine similarity
    scores = knn_classify(bank, labels, query, k=3, temperature=0.5, num_classes=3)
    sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top = sims[0].topk(3)
    expected = torch.zeros(3)
    for sim, index in zip(top.values, top.indices):
        expected[labels[index]] += torch.exp(sim / 0.5)
    torch.testing.assert_close(scores[0], expected)
    assert scores.argmax().item() == 1  # two class-1 neighbours outvote one closer class-0 neighbour


@pytest.fixture(scope="module")
def fashion_pixels():
    """600 train / 300 test bundled Fashion-MNIST images as flattened [-1, 1] pixels."""
    images, labels = load_fashion_mnist("train", source="bundled")
    test_images, test_labels = load_fashion_mnist("test", source="bundled")
    rng = np.random.default_rng(0)
    train = rng.choice(len(images), 600, replace=False)
    test = rng.choice(len(test_images), 300, replace=False)

    def to_pixels(array):
        return (torch.from_numpy(array).float() / 255 - 0.5) / 0.5

    return (to_pixels(images[train]), torch.from_numpy(labels[train]), to_pixels(test_images[test]),
            torch.from_numpy(test_labels[test]))


def test_knn_and_linear_probe_on_real_images(fashion_pixels):
    train_x, train_y, test_x, test_y = fashion_pixels
    knn = knn_accuracy(train_x.flatten(1), train_y, test_x.flatten(1), test_y, k=20)
    probe = linear_probe_accuracy(train_x.flatten(1), train_y, test_x.flatten(1), test_y, epochs=30)
    # chance is 0.10 on Fashion-MNIST; raw pixels already carry most of the signal
    assert knn["accuracy"] > 0.6 and knn["top5_accuracy"] > 0.9
    assert probe["accuracy"] > 0.6 and probe["top5_accuracy"] > 0.9


def test_extract_features_pooling_and_layers():
    torch.manual_seed(0)
    config = NepaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        patch_size=4, image_size=8, layerscale_value=1.0, num_labels=3)
    classifier = NepaForImageClassification(config)
    backbone = classifier.nepa
    pixels, labels = torch.randn(5, 3, 8, 8), torch.arange(5)
    mean, got_labels = extract_features(classifier, (pixels, labels), pooling="mean", batch_size=2)
    assert mean.shape == (5, 32) and torch.equal(got_labels, labels)
    with torch.no_grad():
        reference = backbone(pixels).last_hidden_state
    torch.testing.assert_close(mean, reference[:, 1:].mean(1))
    torch.testing.assert_close(extract_features(backbone, pixels, pooling="pooler")[0], mean)
    torch.testing.assert_close(extract_features(backbone, pixels, pooling="cls")[0], reference[:, 0])
    torch.testing.assert_close(extract_features(backbone, pixels, pooling="last")[0], reference[:, -1])
    torch.testing.assert_close(extract_features(backbone, pixels, layer=2)[0], mean, rtol=1e-5, atol=1e-5)
    first_block = extract_features(backbone, pixels, layer=1)[0]
    assert not torch.allclose(first_block, mean)
    # a classifier's trunk attends as the head does (is_causal=False: bidirectional); causal features differ
    torch.testing.assert_close(extract_features(backbone, pixels, is_causal=False)[0], mean)
    assert not torch.allclose(extract_features(backbone, pixels, is_causal=True)[0], mean)
    uint8 = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not normalised floats"):  # never features of raw 0-255 pixels
        extract_features(backbone, uint8)
    with pytest.raises(ValueError, match="pooling must be one of"):
        extract_features(backbone, pixels, pooling="max")
    with pytest.raises(ValueError, match="layer must be in"):
        extract_features(NepaModel(config), pixels, layer=5)
