"""The Fashion-MNIST study's own pieces: the MAE baseline's encoder transfer, label subsets, the run plan, its units
running through the example scripts."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nepa_hf.data.classification import stratified_indices

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
    assert classifier(pixels).logits.shape == (2, 10)
    assert classifier(pixels, labels=torch.tensor([1, 2])).loss.item() == pytest.approx(np.log(10))  # zero head


def test_label_subset_is_the_fine_tuning_scripts_subset(study):
    """The raw-pixel baselines score the label subsets the fine-tunes train on: the script's stratified subset of
    `--train_fraction` with `--seed`."""
    labels = torch.arange(10).repeat_interleave(50)
    subset = study.label_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[subset], minlength=10).tolist() == [5] * 10
    assert subset.tolist() == sorted(stratified_indices(labels.numpy(), fraction=0.1, seed=0).tolist())
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
    # NEPA pretraining first, then the paired comparison seed by seed (a study stopped early has whole pairs)
    paired = [f"finetune-{init}-{label}-s{seed}" for label, seeds in (("1pct", range(5)), ("10pct", range(3)))
              for seed in seeds for init in ("scratch", "nepa")]
    assert names[:len(paired) + 1] == ["pretrain-nepa-s0", *paired]


def test_the_study_has_no_optimizer_step_of_its_own(study):
    """Its units train through examples/pretrain_nepa.py, examples/finetune_classification.py, transformers' Trainer
    and NepaTrainer: no optimizer, backward pass or schedule is made in the study's file."""
    import ast

    tree = ast.parse(STUDY_PATH.read_text())
    called = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
              for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not called & {"backward", "step", "zero_grad", "AdamW", "create_pretraining_optimizer",
                         "get_cosine_schedule_with_warmup", "get_layerwise_cosine_schedule", "clip_grad_norm_"}


def test_finetuning_flags_are_the_study_recipe_in_the_scripts_own_arguments(study, tmp_path):
    """What a fine-tuning unit passes to examples/finetune_classification.py, read back by the script's own argument
    classes: the study's recipe."""
    from transformers import HfArgumentParser

    from nepa_hf.data.augmentation import AugmentationArguments
    from nepa_hf.training.finetuning import NepaTrainingArguments

    budget = study.Budget()
    for init, layer_decay in (("nepa", 0.75), ("scratch", 1.0)):
        flags = study.finetuning_flags(init, 0.01, 3, budget, tmp_path, tmp_path / "run")
        augmentation, training, rest = HfArgumentParser((AugmentationArguments, NepaTrainingArguments)) \
            .parse_args_into_dataclasses(flags, return_remaining_strings=True)
        assert (training.max_steps, training.per_device_train_batch_size, training.seed) == (1800, 64, 3)
        assert (training.learning_rate, training.weight_decay) == (2e-3, 0.05)
        assert (training.layer_decay, training.max_grad_norm, training.label_smoothing_factor) == (layer_decay, 3, 0.1)
        assert training.ema_decay == 0 and training.freeze_patch_embeddings is False
        assert training.eval_at_fractions == list(study.EVAL_POINTS) and training.dataloader_drop_last
        assert 10_000 % training.per_device_eval_batch_size == 0  # drop_last must drop no test image
        assert augmentation.random_crop_padding == 2 and augmentation.rand_augment is None
        assert not augmentation.mixes and augmentation.random_erasing_prob == 0
        assert rest[rest.index("--train_fraction") + 1] == "0.01" and "--eval_split" in rest
    assert "--train_fraction" not in study.finetuning_flags("scratch", 1.0, 0, budget, tmp_path, tmp_path)


@pytest.mark.parametrize("init", ["nepa", "scratch"])
def test_finetuning_flags_give_the_studys_learning_rate_schedule(study, init, tmp_path):
    """Every parameter group's lr at every step, as NepaTrainer builds it from a unit's flags, is the study's schedule:
    the authors' per-group warmup over 10% of the steps + cosine (`get_layerwise_cosine_schedule`), with layer decay
    0.75 (NEPA) or 1.0 (scratch: every group warms up in one step)."""
    from transformers import HfArgumentParser

    from nepa_hf import NepaForImageClassification
    from nepa_hf.data.augmentation import AugmentationArguments
    from nepa_hf.training.finetuning import NepaTrainer, NepaTrainingArguments, layer_decay_parameter_groups
    from nepa_hf.training.optimization import get_layerwise_cosine_schedule

    budget = study.Budget(finetune={0.01: study.Finetune(60, 64)})
    flags = study.finetuning_flags(init, 0.01, 0, budget, tmp_path, tmp_path / "run")
    _, training, _ = HfArgumentParser((AugmentationArguments, NepaTrainingArguments)).parse_args_into_dataclasses(
        flags, return_remaining_strings=True)
    model = NepaForImageClassification(study.study_config(num_labels=10))
    trainer = NepaTrainer(model=model, args=training)
    trainer.create_optimizer_and_scheduler(num_training_steps=60)
    layer_decay = 1.0 if init == "scratch" else budget.pretrained_layer_decay
    groups = layer_decay_parameter_groups(model, budget.finetune_lr, 0.05, layer_decay, num_layers=6)
    reference = get_layerwise_cosine_schedule(torch.optim.AdamW(groups, lr=budget.finetune_lr), 6, 60)
    for _ in range(60):
        assert trainer.lr_scheduler.get_last_lr() == pytest.approx(reference.get_last_lr(), abs=1e-12)
        trainer.optimizer.step(), reference.optimizer.step()
        trainer.lr_scheduler.step(), reference.step()


def run_quick_1pct_finetune(study, init: str, seed: int, output_root: Path) -> dict:
    """A fine-tuning unit on 1% of the labels at the --quick budget: its result, scored at the study's points."""
    study.run_unit(["finetune", init, str(seed), "0.01"], study.QUICK, output_root)
    result = json.loads((output_root / f"finetune-{init}-1pct-s{seed}" / "result.json").read_text())
    steps = study.QUICK.finetune[0.01].steps
    assert [e["step"] for e in result["evaluations"]] == sorted(
        {max(1, round(point * steps)) for point in study.EVAL_POINTS})
    assert result["train_images"] == 600  # 1% of each class of the 60k training images
    return result


@pytest.mark.slow
def test_units_run_through_the_scripts_and_read_their_outputs(study, tmp_path):
    """A NEPA pretraining unit and a NEPA fine-tuning unit at the --quick budget, end to end: the scripts run in
    subprocesses, and the units' results come from their output files."""
    study.run_unit(["pretrain", "nepa", "0"], study.QUICK, tmp_path)
    pretrain = json.loads((tmp_path / "pretrain-nepa-s0" / "result.json").read_text())
    assert pretrain["script"] == "examples/pretrain_nepa.py" and pretrain["steps"] == study.QUICK.pretrain_steps
    assert len(pretrain["curve"]) > 1 and pretrain["cpu_seconds"] > 0
    model_dir = tmp_path / "pretrain-nepa-s0" / "model"
    assert (model_dir / "model.safetensors").exists() and not (model_dir / "checkpoints").exists()
    finetune = run_quick_1pct_finetune(study, "nepa", 1, tmp_path)
    assert finetune["test_images"] == study.QUICK.test_images
    assert finetune["test_top1"] == finetune["evaluations"][-1]["test_top1"]
    assert not (tmp_path / "finetune-nepa-1pct-s1" / "run").exists()  # the unit keeps its result, not the model


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


def test_comparison_with_the_private_loops_sets_like_against_like(study, tmp_path):
    """Accuracy rows per arm run by both pipelines, their difference, and a CPU row averaged over those arms only (a
    budget where the scripts ran scratch alone must not compare it with the private loops' mean over three arms)."""
    def run(init, fraction, seed, accuracy, cpu_seconds):
        return {"kind": "finetune", "init": init, "fraction": fraction, "seed": seed, "test_top1": accuracy,
                "cpu_seconds": cpu_seconds, "unit": f"finetune-{init}-{fraction}-s{seed}"}

    records = tmp_path / "records"
    for result in [run("nepa", 1.0, 0, 0.90, 3000), run("scratch", 1.0, 0, 0.89, 3200), run("mae", 1.0, 0, 0.88, 60)]:
        (records / result["unit"]).mkdir(parents=True)
        (records / result["unit"] / "result.json").write_text(json.dumps(result))
    lines = study.comparison_with_private_loops([run("scratch", 1.0, 0, 0.885, 4800)], records)
    assert "| scratch, 100% labels | 89.0 (1 seed) | 88.5 (1 seed) | -0.5 |" in lines
    assert not any(line.startswith(("| nepa,", "| mae,")) for line in lines)
    assert "| CPU minutes of a fine-tune, 100% labels (mean over scratch) | 53.3 | 80.0 | |" in lines


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


@pytest.mark.slow
def test_mae_units_train_with_transformers_trainer_and_the_scripts_arguments(study, tmp_path):
    """The MAE baseline at the --quick budget: pretraining by transformers' Trainer with the CPU time of the NEPA
    pretraining (a stand-in result here), fine-tuning by NepaTrainer with the fine-tuning script's arguments."""
    (tmp_path / "pretrain-nepa-s0").mkdir()
    (tmp_path / "pretrain-nepa-s0" / "result.json").write_text(json.dumps({"cpu_seconds": 3.0, "steps": 10}))
    study.run_unit(["pretrain", "mae", "0"], study.QUICK, tmp_path)
    pretrain = json.loads((tmp_path / "pretrain-mae-s0" / "result.json").read_text())
    assert pretrain["steps"] == round(3.0 / pretrain["mae_step_cpu_s"]) and pretrain["curve"]
    assert (tmp_path / "pretrain-mae-s0" / "model" / "model.safetensors").exists()
    finetune = run_quick_1pct_finetune(study, "mae", 0, tmp_path)
    assert finetune["layer_decay"] == study.QUICK.pretrained_layer_decay
    assert finetune["script"].startswith("finetune_mae")


def test_units_run_from_the_repository_root_with_relative_paths(study, monkeypatch, tmp_path):
    """The commands a unit records carry no machine's paths: inside the repository the output folder is relative to
    it and the unit runs from its root (and the caller's working directory is restored); outside, it stays absolute."""
    import os

    seen = []
    monkeypatch.setattr(study, "unit", lambda argv, budget, root: seen.append((root, Path.cwd())))
    before = Path.cwd()
    study.run_unit(["finetune", "nepa", "0", "0.01"], study.QUICK, study.REPO_ROOT / "benchmarks" / "results" / "x")
    study.run_unit(["finetune", "nepa", "0", "0.01"], study.QUICK, tmp_path)
    assert seen == [(Path("benchmarks/results/x"), study.REPO_ROOT), (tmp_path.resolve(), study.REPO_ROOT)]
    assert Path.cwd() == before and os.getcwd() == str(before)
    monkeypatch.chdir(tmp_path)  # a relative folder is the caller's, not the repository root's
    study.run_unit(["finetune", "nepa", "0", "0.01"], study.QUICK, Path("out"))
    assert seen[-1] == ((tmp_path / "out").resolve(), study.REPO_ROOT)
