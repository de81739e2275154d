"""The Fashion-MNIST study's own pieces: the MAE baseline's encoder transfer, label subsets, the run plan."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
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
    size = study.IMAGE_SIZE
    pixels = torch.randn(2, 3, size, size)
    num_patches = (size // study.PATCH_SIZE) ** 2
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
    budget = study.Budget()
    units = study.plan(budget)
    names = [name for name, _, _ in units]
    assert len(names) == len(set(names))
    for index, (name, _, deps) in enumerate(units):
        assert all(dep in names[:index] for dep in deps), name
    for method in study.PRETRAINED:
        assert f"pretrain-{method}-s0" in names
    for init in ("nepa", "scratch", "mae"):
        for fraction, label in ((0.01, "1pct"), (0.1, "10pct")):
            assert all(f"finetune-{init}-{label}-s{seed}" in names for seed in (0, 1, 2))
        assert f"finetune-{init}-100pct-s0" in names
    for shorter in ("nepa-third", "nepa-ninth"):  # the pretraining-length points
        assert all(f"finetune-{shorter}-1pct-s{seed}" in names for seed in (0, 1, 2))
    assert {"probe-nepa-s0", "probe-mae-s0", "probe-random-init-s0", "baseline-raw-pixels-s0"} <= set(names)
    assert names[:2] == ["pretrain-nepa-s0", "finetune-scratch-100pct-s0"]  # the anchor is known early


def test_report_pairs_seeds_and_writes_the_summary_schema(study):
    """The summary and the paired gains come from result files; seeds pair by seed, in seed order."""
    def run(init, fraction, seed, accuracy):
        return {"kind": "finetune", "init": init, "fraction": fraction, "seed": seed, "test_top1": accuracy,
                "unit": f"finetune-{init}-{fraction}-s{seed}", "steps": 10,
                "evaluations": [{"step": 8, "test_top1": accuracy}, {"step": 10, "test_top1": accuracy}]}

    results = [run("nepa", 0.1, 1, 0.83), run("nepa", 0.1, 0, 0.80), run("scratch", 0.1, 0, 0.78),
               run("scratch", 0.1, 1, 0.80), run("scratch", 1.0, 0, 0.885), run("mae", 0.01, 0, 0.6),
               {"kind": "baseline", "method": "raw-pixels", "runs": [
                   {"fraction": 1.0, "seed": 0, "knn_top1": 0.855, "logistic_regression_top1": 0.84}]}]
    gains = study.paired_gains(results, 0.1)
    assert gains["seeds"] == [0, 1]
    assert gains["gains_points"] == pytest.approx([2.0, 3.0])
    assert 0 < gains["p_two_sided"] < 1
    summary = study.summary_json(results)
    assert summary["scratch_100"] == 0.885
    assert summary["raw_pixel_knn"] == 0.855
    assert summary["budgets"]["10%"]["nepa"] == [0.80, 0.83]
    assert summary["budgets"]["1%"] == {"nepa": [], "scratch": [], "mae": [0.6]}
    assert set(summary["budgets"]) == {"1%", "10%", "100%"}
    assert summary["converged"] is True and summary["not_converged"] == []


def test_augment_keeps_shape_and_content(study):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    out = study.augment(images, generator, pad=0)  # no translation: each image is itself or its mirror
    for original, augmented in zip(images, out):
        assert torch.equal(augmented, original) or torch.equal(augmented, original.flip(-1))


def test_convergence_is_the_change_over_the_last_20_percent_with_the_plateau_spread_beside_it(study):
    wobbling = [{"step": 25, "test_top1": 0.70}, {"step": 80, "test_top1": 0.850},
                {"step": 90, "test_top1": 0.860}, {"step": 100, "test_top1": 0.852}]
    verdict = study.convergence(wobbling, 100)
    assert verdict["change_over_last_20pct_points"] == pytest.approx(0.2)  # the step-25 score is not on the plateau
    assert verdict["plateau_spread_points"] == pytest.approx(1.0)
    assert verdict["converged"] is True
    falling = [{"step": 80, "test_top1": 0.86}, {"step": 100, "test_top1": 0.852}]
    assert study.convergence(falling, 100)["change_over_last_20pct_points"] == pytest.approx(-0.8)
    assert study.convergence(falling, 100)["converged"] is False  # a drop counts like a rise
    # Scores are stored as float32 fractions: a change of exactly 0.5 point (50 of 10,000 images) is not below 0.5.
    at_the_bar = [{"step": 80, "test_top1": float(np.float32(0.7807))},
                  {"step": 100, "test_top1": float(np.float32(0.7857))}]
    assert study.convergence(at_the_bar, 100)["change_over_last_20pct_points"] == 0.5
    assert study.convergence(at_the_bar, 100)["converged"] is False


def test_report_of_a_partly_finished_study(study, tmp_path):
    """Resuming studies report what finished: missing arms say so, the summary keeps its keys."""
    import argparse
    import json

    budget = study.Budget()
    settings = study.study_settings(budget)
    units = {
        "pretrain-nepa-s0": {"kind": "pretrain", "method": "nepa", "seed": 0, "steps": 100, "epochs": 1.0,
                             "cpu_seconds": 60.0, "final_loss": -0.8, "curve": [{"step": 100, "loss": -0.8, "cpu_s": 60}]},
        "finetune-nepa-1pct-s0": {"kind": "finetune", "init": "nepa", "fraction": 0.01, "seed": 0, "steps": 10,
                                  "epochs": 1.0, "test_top1": 0.7, "curve": [{"step": 10, "loss": 1.0}],
                                  "evaluations": [{"step": 8, "test_top1": 0.69}, {"step": 10, "test_top1": 0.7}]},
    }
    for name, result in units.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps({**result, "unit": name, "settings": settings}))
    args = argparse.Namespace(output_dir=str(tmp_path), report_dir=str(tmp_path / "docs"), quick=False)
    report = study.write_report(args, budget).read_text()
    assert "Not finished yet" in report and "not run" in report
    summary = json.loads((tmp_path / "docs" / "study_summary.json").read_text())
    assert summary["budgets"]["1%"]["nepa"] == [0.7] and summary["scratch_100"] is None
    assert summary["raw_pixel_knn"] is None and summary["converged"] is False  # 1 point over the last 20%
    (tmp_path / "finetune-nepa-1pct-s0" / "result.json").write_text(json.dumps(
        {**units["finetune-nepa-1pct-s0"], "unit": "finetune-nepa-1pct-s0", "settings": {**settings, "patch_size": 4}}))
    with pytest.raises(SystemExit, match="other settings"):
        study.write_report(args, budget)


def test_settings_check_follows_what_each_unit_depends_on(study, tmp_path):
    """A new fine-tuning budget keeps the pretraining run; new pretraining settings stale the fine-tunes of its
    checkpoint but not the scratch runs; a result without recorded settings is never taken silently."""
    budget = study.Budget()
    settings = study.study_settings(budget)
    pretrain = {"kind": "pretrain", "method": "nepa", "unit": "pretrain-nepa-s0"}
    nepa_1pct = {"kind": "finetune", "init": "nepa", "fraction": 0.01, "unit": "finetune-nepa-1pct-s0"}
    scratch_1pct = {"kind": "finetune", "init": "scratch", "fraction": 0.01, "unit": "finetune-scratch-1pct-s0"}
    scratch_all = {"kind": "finetune", "init": "scratch", "fraction": 1.0, "unit": "finetune-scratch-100pct-s0"}
    baseline = {"kind": "baseline", "method": "raw-pixels", "unit": "baseline-raw-pixels-s0"}

    def stale(results, new_budget):
        try:
            study.check_settings(results, new_budget, tmp_path)
        except SystemExit as error:
            return {unit for unit in ("pretrain-nepa-s0", "finetune-nepa-1pct-s0", "finetune-scratch-1pct-s0",
                                      "finetune-scratch-100pct-s0", "baseline-raw-pixels-s0") if unit in str(error)}
        return set()

    results = [{**r, "settings": settings} for r in (pretrain, nepa_1pct, scratch_1pct, scratch_all, baseline)]
    assert stale(results, budget) == set()
    longer_finetune = study.Budget(finetune={**budget.finetune, 1.0: study.Finetune(9000, 128)})
    assert stale(results, longer_finetune) == {"finetune-scratch-100pct-s0"}
    longer_pretraining = study.Budget(pretrain_steps=budget.pretrain_steps * 2)
    assert stale(results, longer_pretraining) == {"pretrain-nepa-s0", "finetune-nepa-1pct-s0"}
    assert stale([{**scratch_1pct}], budget) == {"finetune-scratch-1pct-s0"}  # no settings recorded
    # The pretrained arms' layer decay is theirs alone; label smoothing changes every fine-tune, no pretraining run.
    assert stale(results, study.Budget(pretrained_layer_decay=0.65)) == {"finetune-nepa-1pct-s0"}
    assert stale(results, study.Budget(label_smoothing=0.0)) == {
        "finetune-nepa-1pct-s0", "finetune-scratch-1pct-s0", "finetune-scratch-100pct-s0"}
    # The raw-pixel baseline depends on its probe epochs and seeds only; probes on their backbone and probe epochs.
    assert stale(results, study.Budget(probe_epochs=5)) == {"baseline-raw-pixels-s0"}
    probes = [{"kind": "probe", "method": method, "unit": f"probe-{method}-s0", "settings": settings}
              for method in ("nepa", "random-init")]
    with pytest.raises(SystemExit) as error:
        study.check_settings(probes, longer_pretraining, tmp_path)
    assert "probe-nepa-s0" in str(error.value) and "probe-random-init-s0" not in str(error.value)
