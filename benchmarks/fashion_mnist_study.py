# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""A Fashion-MNIST study on a 2-core CPU: NEPA vs scratch vs MAE vs raw pixels, at 1%, 10% and 100% labels.

Backbone: the nepa-vit-micro preset (NEPA's architecture at D 128, 6 blocks, 4 heads, MLP 512: 1.2M parameters)
with patch 7 on the native 28x28 images (16 patches; grey replicated to RGB). Why this size: one torch thread trains
it at ~350 images/s in a bare loop and ~200-250 through the scripts (per-image PIL transforms, evaluation through the
image processor), so the whole study fits in about eight two-core machine-hours, spread over sessions by its
resumable units. Why patch 7 and long fine-tunes: trained from scratch on all labels, the model is limited by optimisation
steps, not by the patch size: patch 4 (49 patches, 2.4-3.3x the CPU time per step) reached 84.2% after 6 epochs
(`benchmarks/results/fashion_mnist_study_patch4/`), patch 7 84.4% after 4.8 epochs of an 8-epoch run and 86.0%
at its end (`benchmarks/results/fashion_mnist_study_patch7_pilot/`), and 87.9% after 16 epochs (this study's first
100% budget: `benchmarks/results/fashion_mnist_study_16_epochs/`). So the same CPU time buys more epochs at patch 7,
and the 100% budget runs 24 epochs to clear the 88% a from-scratch baseline must reach for the comparison to
measure NEPA rather than a weak recipe.

Arms (each fine-tuned with the same recipe, only the layer-wise lr decay differs: 0.75 for a pretrained backbone,
1.0 from scratch, where it would only slow the lower blocks):
  * NEPA: pretrained on the 60k training images without labels; also two shorter pretraining runs (1/3 and 1/9 of
    the length, each a complete schedule) for accuracy against pretraining length;
  * MAE: transformers' `ViTMAEForPreTraining`, encoder at equal dims, 75% masking, given the CPU time the NEPA
    pretraining took (its step cost measured in its own process), fine-tuned as a `ViTModel` with NEPA's head;
  * scratch: the NEPA architecture from a random init;
  * raw pixels: k-NN (k=20, cosine) and logistic regression on the 784 normalised pixels.
Label budgets: class-balanced 1% (600), 10% (6,000) and 100% subsets, drawn per seed; seeds 0-4 at 1%, 0-2 at 10%,
seed 0 at 100%. Each fine-tune evaluates the full 10k test set at 25/50/75% of its steps and five times in its last
20% (80/85/90/95/100%): converged means the last 20% of the steps change test accuracy by less than 0.5 point
(final score against the score at 80%); the spread of the five plateau scores (highest minus lowest) is reported
beside it. Frozen features are probed per block (k-NN and a linear probe on mean-pooled tokens, all 60k training
images).

The units train through the product: NEPA pretraining is `examples/pretrain_nepa.py`, every NEPA and scratch
fine-tune `examples/finetune_classification.py` (subprocesses, with the flags `pretraining_flags` and
`finetuning_flags` build; each result.json records its command); MAE, which the scripts do not take, trains with
transformers' `Trainer` and `NepaTrainer` on the fine-tuning script's argument classes and data code. This file
plans, resumes, reads the scripts' output files, does the statistics and writes the report; it has no optimizer
step of its own. (Until issue 28 it had its own training loops; those units are kept in
`benchmarks/results/fashion_mnist_study_private_loops/`, and the report sets the two side by side.)

Every run ("unit") is one process with one torch thread, so CPU seconds are a load-independent budget; units run
`--jobs` at a time, write `OUTPUT_DIR/<unit>/result.json`, and are skipped when that file exists (the study resumes
where it stopped: `benchmarks/results/fashion_mnist_study/` keeps the finished units' result files). The report
(`docs/results.md`, `docs/study_summary.json`, plots) is written from those files only:

    python benchmarks/fashion_mnist_study.py --jobs 2                 # all units, then the report (~8 h wall)
    python benchmarks/fashion_mnist_study.py --units 'finetune-*-1pct-*'   # some units (their dependencies exist)
    python benchmarks/fashion_mnist_study.py --report_only            # the report from the finished units
    python benchmarks/fashion_mnist_study.py --quick --output_dir /tmp/study --report_dir /tmp/study/docs  # smoke

Data: Debian's `dataset-fashion-mnist` (60k train / 10k test; `apt-get install -y dataset-fashion-mnist`).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import set_seed

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT / "src"))

from nepa_hf import NepaConfig, NepaForPreTraining  # noqa: E402
from nepa_hf.data.classification import stratified_indices  # noqa: E402
from nepa_hf.data.images import load_fashion_mnist  # noqa: E402
from nepa_hf.evaluation.features import knn_accuracy, linear_probe_accuracy  # noqa: E402
from nepa_hf.training.config_overrides import parse_config_overrides  # noqa: E402

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
IMAGE_SIZE, PATCH_SIZE = 28, 7
FRACTIONS = (0.01, 0.1, 1.0)
# NEPA pretraining runs: the main one and two shorter complete runs (fraction of the main run's steps).
NEPA_LENGTHS = {"nepa": 1.0, "nepa-third": 1 / 3, "nepa-ninth": 1 / 9}
PRETRAINED = ("nepa", "nepa-third", "nepa-ninth", "mae")
PRETRAIN_SEED = 0  # one pretraining run per method (the CPU-bound part); fine-tuning seeds vary the rest
# Fractions of the fine-tuning steps where the test set is scored: the curve, and five points on the plateau.
EVAL_POINTS = (0.25, 0.5, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
# How the units train: through the example scripts (since issue 28; the earlier private training loops' units are
# kept in benchmarks/results/fashion_mnist_study_private_loops/ and are refused here).
PIPELINE = "examples/pretrain_nepa.py + examples/finetune_classification.py"
CONVERGED_POINTS = 0.5  # test accuracy may move by less than this (points) over the last 20% of the steps


def plateau_scores(evaluations: list[dict], steps: int) -> list[float]:
    """Test accuracies (points) scored at or after 80% of the steps, in step order."""
    return [100 * e["test_top1"] for e in evaluations if e["step"] >= round(0.8 * steps)]


def convergence(evaluations: list[dict], steps: int) -> dict:
    """How much the last 20% of the steps moved test accuracy: `change` (final minus the score at 80% of the steps,
    the convergence criterion) and `spread` (highest minus lowest plateau score: evaluation noise and wobble)."""
    tail = plateau_scores(evaluations, steps)
    # Rounded to 1e-4 point, far below a test image's weight: the scores are float32 fractions, and 78.57 - 78.07
    # would otherwise come out as 0.4999995 and pass a bar of 0.5 that a change of 50 images in 10,000 meets.
    change, spread = round(tail[-1] - tail[0], 4), round(max(tail) - min(tail), 4)
    return {"change_over_last_20pct_points": change, "plateau_spread_points": spread,
            "converged": abs(change) < CONVERGED_POINTS}


def study_settings(budget: "Budget") -> dict:
    """What a result was produced with: recorded in every result.json, checked before resuming and reporting."""
    return {"pipeline": PIPELINE, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
            "pretrain_steps": budget.pretrain_steps,
            "pretrain_batch": budget.pretrain_batch, "pretrain_lr": budget.pretrain_lr,
            "finetune": {str(f): [p.steps, p.batch_size] for f, p in budget.finetune.items()},
            "finetune_lr": budget.finetune_lr, "pretrained_layer_decay": budget.pretrained_layer_decay,
            "label_smoothing": budget.label_smoothing, "eval_points": list(EVAL_POINTS),
            "probe_epochs": budget.probe_epochs, "seeds": {str(f): s for f, s in budget.seeds.items()}}


PRETRAINING_SETTINGS = ("pipeline", "image_size", "patch_size", "pretrain_steps", "pretrain_batch", "pretrain_lr")


def settings_that_matter(result: dict, settings: dict) -> dict:
    """The part of `settings` a unit's result depends on: a pretraining run does not change when the fine-tuning
    budgets do, a scratch fine-tune not when the pretraining does, the raw-pixel baseline only with its own."""
    kind, method = result["kind"], result.get("init", result.get("method"))
    keys = ["pipeline", "image_size", "patch_size"]
    if kind == "baseline":
        keys = ["pipeline", "image_size", "probe_epochs", "seeds"]
    elif kind == "pretrain" or (kind in ("finetune", "probe") and method in PRETRAINED):
        keys = list(PRETRAINING_SETTINGS)
    if kind == "probe":
        keys.append("probe_epochs")
    if kind == "finetune":
        keys += ["finetune_lr", "label_smoothing", "eval_points"]
        if method in PRETRAINED:  # scratch runs use layer decay 1.0 whatever the pretrained arms use
            keys.append("pretrained_layer_decay")
    picked = {key: settings.get(key) for key in keys}
    if kind == "finetune":
        picked["finetune"] = settings.get("finetune", {}).get(str(result["fraction"]))
    return picked


@dataclass
class Finetune:
    steps: int
    batch_size: int


@dataclass
class Budget:
    pretrain_steps: int = 3750  # 8 epochs of the 60k images at batch 128
    pretrain_batch: int = 128
    pretrain_lr: float = 1.5e-3
    # 192, 51.2 and 24 epochs. Shorter 1% and 10% fine-tunes (64 and 25.6 epochs) still gained 0.7-0.9 point
    # within their last 20% of steps (benchmarks/results/fashion_mnist_study_short_finetunes/), and at 96 epochs
    # four of the fifteen 1% runs still did (benchmarks/results/fashion_mnist_study_96_epoch_1pct/).
    finetune: dict = field(default_factory=lambda: {0.01: Finetune(1800, 64), 0.1: Finetune(2400, 128),
                                                    1.0: Finetune(11250, 128)})
    finetune_lr: float = 2e-3
    pretrained_layer_decay: float = 0.75
    label_smoothing: float = 0.1
    train_images: int | None = None  # None: all 60k
    test_images: int = 10000
    probe_epochs: int = 30
    log_every: int = 10
    # Five seeds at 1%, where the seed-to-seed spread of the paired gain is largest (three gave +2.0, +2.5, +0.2).
    seeds: dict = field(default_factory=lambda: {0.01: [0, 1, 2, 3, 4], 0.1: [0, 1, 2], 1.0: [0]})


# A smoke test of every unit in minutes: 3000 training images for pretraining and the raw-pixel baselines (the
# fine-tunes take their label fraction of all 60k, as the script does), 300 test images.
QUICK = Budget(pretrain_steps=18, pretrain_batch=32, finetune={0.01: Finetune(10, 16), 0.1: Finetune(10, 32),
               1.0: Finetune(10, 32)}, train_images=3000, test_images=300, probe_epochs=2, log_every=2,
               seeds={0.01: [0, 1], 0.1: [0, 1], 1.0: [0]})


# --------------------------------------------------------------------------------------------------------------
# Data (the raw-pixel baseline, the probes and the visualisations read the arrays; the training units read the
# same images through the scripts' data code)
# --------------------------------------------------------------------------------------------------------------

DATASET = "fashion_mnist_debian"  # nepa_hf.data.images: Debian's dataset-fashion-mnist, 60k train / 10k test
SCRIPTS = REPO_ROOT / "examples"


def load_split(split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fashion_mnist(split, source="debian")
    images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def fashion_processor(size: int = IMAGE_SIZE):
    """The preprocessing of the pretrained NEPA model (pretrain_nepa.py saves the same), for the visualisations."""
    from nepa_hf import NepaImageProcessorPil

    return NepaImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False,
                                 image_mean=[FASHION_MEAN] * 3, image_std=[FASHION_STD] * 3)


def label_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of the class-balanced `fraction` of the training set that `finetune_classification.py --train_fraction
    fraction --seed seed` trains on (the same function), so the raw-pixel baselines see the fine-tunes' labels."""
    if fraction >= 1.0:
        return torch.arange(len(labels))
    return torch.as_tensor(np.sort(stratified_indices(labels.numpy(), fraction=fraction, seed=seed)))


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 28, 28) -> normalised float (B, 3, 28, 28), as the saved image processor does."""
    pixels = (images.float() / 255.0 - FASHION_MEAN) / FASHION_STD
    return pixels.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


MODEL_OVERRIDES = f"patch_size={PATCH_SIZE},image_size={IMAGE_SIZE},drop_path_rate=0.0"


def study_config(**overrides) -> NepaConfig:
    return NepaConfig.from_preset("nepa-vit-micro", **parse_config_overrides(MODEL_OVERRIDES), **overrides)


def vit_dims() -> dict:
    base = study_config()
    return dict(hidden_size=base.hidden_size, num_hidden_layers=base.num_hidden_layers,
                num_attention_heads=base.num_attention_heads, intermediate_size=base.intermediate_size,
                image_size=base.image_size, patch_size=base.patch_size, num_channels=3, qkv_bias=True)


def mae_model():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(**vit_dims(), decoder_hidden_size=64, decoder_num_hidden_layers=2,
                          decoder_num_attention_heads=4, decoder_intermediate_size=256, mask_ratio=0.75,
                          norm_pix_loss=True)
    return ViTMAEForPreTraining(config)


class ViTMeanPoolClassifier(nn.Module):
    """A transformers `ViTModel` with NEPA's classification head (mean of the patch tokens, LayerNorm, zero-initialised
    Linear), so MAE-pretrained and NEPA-pretrained encoders are fine-tuned and probed the same way."""

    def __init__(self, num_labels: int = 10):
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(**vit_dims(), attn_implementation="sdpa")
        super().__init__()
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.config = config  # what Trainer reads of a model (problem_type, ...)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def features(self, pixel_values: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Mean-pooled patch tokens of the final output, or of block `layer` (0: the embeddings) passed through the
        encoder's final LayerNorm, as NEPA's per-block probes are."""
        if layer is None or layer == self.vit.config.num_hidden_layers:
            return self.vit(pixel_values).last_hidden_state[:, 1:].mean(1)
        hidden = self.vit(pixel_values, output_hidden_states=True).hidden_states[layer]
        return self.vit.layernorm(hidden)[:, 1:].mean(1)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        """Logits (and, with integer `labels`, the cross-entropy) as an `ImageClassifierOutput`, so `Trainer` and
        `NepaTrainer` treat it as they treat `NepaForImageClassification`."""
        from transformers.modeling_outputs import ImageClassifierOutput

        logits = self.classifier(self.fc_norm(self.features(pixel_values)))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)

    def load_mae_encoder(self, mae_dir: Path) -> None:
        """Copy the MAE encoder (`vit.*` of ViTMAEForPreTraining: same key names as ViTModel) into `self.vit`."""
        from transformers import ViTMAEForPreTraining

        encoder = ViTMAEForPreTraining.from_pretrained(mae_dir).vit.state_dict()
        missing, unexpected = self.vit.load_state_dict(encoder, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"MAE encoder does not fit ViTModel: missing {missing}, unexpected {unexpected}")


def pretrained_dir(output_root: Path, method: str) -> Path:
    return output_root / unit_name("pretrain", method, PRETRAIN_SEED) / "model"


# --------------------------------------------------------------------------------------------------------------
# Units. NEPA pretraining and every NEPA / scratch fine-tune run the example scripts as a user would (a subprocess
# with the flags below); MAE, whose model the scripts do not take, runs transformers' Trainer for pretraining (as
# transformers' run_mae.py does) and NepaTrainer with the fine-tuning script's data code and flags. This file has
# no optimizer step of its own.
# --------------------------------------------------------------------------------------------------------------

NORMALISATION = ["--image_mean", str(FASHION_MEAN), "--image_std", str(FASHION_STD)]
TRANSLATION = ["--random_crop_padding", "2", "--hflip_prob", "0.5"]  # a random shift by up to 2 px, and a flip


def run_script(script: str, flags: list[str], ledger: Path) -> float:
    """Run `examples/<script>` with `flags` (stdout/stderr to this unit's log) on this unit's torch threads; add its
    CPU seconds to `ledger` and return the ledger's total, so a resumed pretraining counts its earlier invocations
    (an invocation that was killed is not counted: its work after the last checkpoint is redone, and counted then)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, str(SCRIPTS / script), *flags]
    print("$ " + shlex.join(["python", f"examples/{script}", *flags]), flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with ledger.open("a") as handle:
        handle.write(f"{(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}\n")
    return sum(float(line) for line in ledger.read_text().split())


def pretraining_flags(steps: int, budget: Budget, output: Path) -> list[str]:
    """`examples/pretrain_nepa.py` flags of the study's NEPA pretraining: the micro preset at patch 7 on 28 px,
    batch 128, AdamW (0.9, 0.95) lr 1.5e-3 wd 0.05, 5% warmup + cosine, grad clip 3, fp32, a 2-px translation + flip,
    the Fashion-MNIST mean/std; resumable through its checkpoints."""
    subset = ["--max_train_samples", str(budget.train_images)] if budget.train_images else []
    return ["--model", "nepa-vit-micro", "--config_overrides", MODEL_OVERRIDES, "--dataset", DATASET, *subset,
            "--output_dir", str(output), "--max_steps", str(steps), "--per_device_batch_size", str(budget.pretrain_batch),
            "--learning_rate", str(budget.pretrain_lr), "--weight_decay", "0.05", "--adam_beta2", "0.95",
            "--warmup_ratio", "0.05", "--max_grad_norm", "3", "--mixed_precision", "no",
            "--dataloader_num_workers", "0", *TRANSLATION, *NORMALISATION, "--seed", str(PRETRAIN_SEED),
            "--logging_steps", str(budget.log_every), "--checkpointing_steps", str(max(1, steps // 10)),
            "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest"]


def pretrain_nepa(method: str, budget: Budget, output: Path) -> dict:
    """The NEPA pretraining unit: `examples/pretrain_nepa.py`, then its metrics.jsonl as the curve."""
    steps = max(1, int(round(budget.pretrain_steps * NEPA_LENGTHS[method])))
    model_dir = output / "model"
    cpu_seconds = run_script("pretrain_nepa.py", pretraining_flags(steps, budget, model_dir), output / "cpu_seconds")
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r and "step" in r]
    run_config = json.loads((model_dir / "run_config.json").read_text())
    shutil.rmtree(model_dir / "checkpoints", ignore_errors=True)  # resumable state, not needed once finished
    # The curve's time axis: the run's CPU seconds spread over its steps (the script logs wall time, not CPU time).
    curve = [{"step": r["step"], "loss": r["loss"], "embedding_spread": r.get("embedding_spread"),
              "mean_cosine": r.get("mean_cosine"), "cpu_s": cpu_seconds * r["step"] / steps} for r in records]
    return {"kind": "pretrain", "method": method, "seed": PRETRAIN_SEED, "steps": steps,
            "epochs": steps * budget.pretrain_batch / run_config["num_images"], "batch_size": budget.pretrain_batch,
            "cpu_seconds": cpu_seconds, "final_loss": curve[-1]["loss"],
            "final_embedding_spread": curve[-1]["embedding_spread"], "final_mean_cosine": curve[-1]["mean_cosine"],
            "script": "examples/pretrain_nepa.py", "command": pretraining_flags(steps, budget, model_dir),
            "curve": curve}


def layer_decay_for(init: str, budget: Budget) -> float:
    """The only difference between the arms' fine-tuning: layer decay 1.0 from scratch, where it would just slow the
    lower blocks down."""
    return 1.0 if init == "scratch" else budget.pretrained_layer_decay


def finetuning_flags(init: str, fraction: float, seed: int, budget: Budget, output_root: Path, output: Path) -> list[str]:
    """`examples/finetune_classification.py` flags of the study's fine-tuning recipe (the same for every backbone;
    only the layer decay differs: `budget.pretrained_layer_decay` for a pretrained backbone, 1.0 from scratch):
    AdamW lr 2e-3 wd 0.05, per-group warmup over 10% of the steps + cosine, label smoothing 0.1, grad clip 3, no EMA, no frozen
    patch embedding, no drop path, no RandAugment / erasing / Mixup / CutMix, a 2-px translation + flip, the full
    10k test set scored at EVAL_POINTS of the steps, nothing saved but the model."""
    plan = budget.finetune[fraction]
    model = (["--preset", "nepa-vit-micro", "--config_overrides", MODEL_OVERRIDES] if init == "scratch"
             else ["--model_name_or_path", str(pretrained_dir(output_root, init))])
    subset = ["--train_fraction", str(fraction)] if fraction < 1.0 else []
    test = ["--max_eval_samples", str(budget.test_images)] if budget.test_images < 10_000 else []
    # The study's schedule is the authors' per-group one (get_layerwise_cosine_schedule over 10% of the steps), in
    # which a group with lr factor 1 warms up in one step: every group of a scratch run (layer decay 1.0). NepaTrainer
    # runs that schedule below layer decay 1.0 only, so a scratch run asks the Trainer's cosine for the same 1 step.
    warmup = "1" if init == "scratch" else "0.1"
    return [*model, "--drop_path_rate", "0", "--freeze_patch_embeddings", "false", "--dataset_name", DATASET,
            *subset, "--eval_split", "test", *test, "--output_dir", str(output), "--do_train",
            "--max_steps", str(plan.steps), "--per_device_train_batch_size", str(plan.batch_size),
            # drop_last drops evaluation batches too: the evaluation batch must divide the test set
            "--dataloader_drop_last", "--per_device_eval_batch_size", str(math.gcd(1000, budget.test_images)),
            "--learning_rate", str(budget.finetune_lr), "--weight_decay", "0.05", "--warmup_steps", warmup,
            "--layer_decay", str(layer_decay_for(init, budget)),
            "--max_grad_norm", "3", "--label_smoothing_factor", str(budget.label_smoothing), "--ema_decay", "0",
            *TRANSLATION, "--rand_augment", "none", "--color_jitter", "0", "--random_erasing_prob", "0",
            "--mixup_alpha", "0", "--cutmix_alpha", "0", "--eval_crop_pct", "1.0", *NORMALISATION,
            "--eval_at_fractions", *map(str, EVAL_POINTS), "--save_strategy", "no", "--logging_steps",
            str(budget.log_every), "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
            "--seed", str(seed)]


def finetune_result(init: str, fraction: float, seed: int, plan: Finetune, cpu_seconds: float, run_dir: Path,
                    train_images: int, test_images: int, layer_decay: float) -> dict:
    """A fine-tuning unit's result from the Trainer's `trainer_state.json` (its training and evaluation logs)."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    evaluations = [{"step": e["step"], "test_top1": e["eval_accuracy"]} for e in history if "eval_accuracy" in e]
    curve = [{"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e]
    return {"kind": "finetune", "init": init, "fraction": fraction, "seed": seed, "train_images": train_images,
            "steps": plan.steps, "batch_size": plan.batch_size, "epochs": plan.steps * plan.batch_size / train_images,
            "layer_decay": layer_decay, "cpu_seconds": cpu_seconds, "test_top1": evaluations[-1]["test_top1"],
            "test_images": test_images,
            **convergence(evaluations, plan.steps), "final_train_loss": curve[-1]["loss"],
            "evaluations": evaluations, "curve": curve}


def finetune(init: str, fraction: float, seed: int, budget: Budget, output_root: Path, output: Path) -> dict:
    """A fine-tuning unit: `examples/finetune_classification.py` (MAE: `finetune_mae`, the same code and flags)."""
    run_dir = output / "run"
    flags = finetuning_flags(init, fraction, seed, budget, output_root, run_dir)
    layer_decay = layer_decay_for(init, budget)
    (output / "cpu_seconds").unlink(missing_ok=True)  # a fine-tune reruns from the start
    cpu_seconds = (finetune_mae(flags, output_root) if init == "mae"
                   else run_script("finetune_classification.py", flags, output / "cpu_seconds"))
    train_images = json.loads((run_dir / "train_results.json").read_text())["train_samples"]
    result = finetune_result(init, fraction, seed, budget.finetune[fraction], cpu_seconds, run_dir, train_images,
                             budget.test_images, layer_decay)
    # MAE's flags are the script's, but run by finetune_mae: the script itself refuses a MAE checkpoint
    result.update(script="examples/finetune_classification.py" if init != "mae" else
                  "finetune_mae: NepaTrainer with the script's arguments and data functions", command=flags)
    shutil.rmtree(run_dir)  # the model and Trainer files (the unit keeps its result.json)
    return result


def finetuning_script():
    """examples/finetune_classification.py as a module: its argument classes and data functions, for the MAE arm."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_classification", SCRIPTS / "finetune_classification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finetune_mae(flags: list[str], output_root: Path) -> float:
    """The MAE arm of a fine-tuning unit: the MAE encoder in `ViTMeanPoolClassifier` (the fine-tuning script takes
    NEPA checkpoints only), trained by `NepaTrainer` with the script's own argument classes parsed from the same
    `flags` and its data functions, in this process; returns its CPU seconds (start-up and imports not included)."""
    from transformers import HfArgumentParser

    from nepa_hf.data.augmentation import AugmentationArguments
    from nepa_hf.data.classification import encode_labels, stratified_subset, with_image_transform
    from nepa_hf.data.transforms import ImageProcessorTransform, per_channel
    from nepa_hf.evaluation.features import classification_metrics
    from nepa_hf.training.finetuning import NepaTrainer, NepaTrainingArguments

    start = time.process_time()
    script = finetuning_script()
    model_args, data_args, aug_args, training_args = HfArgumentParser(
        (script.ModelArguments, script.DataArguments, AugmentationArguments, NepaTrainingArguments)
    ).parse_args_into_dataclasses(flags)
    set_seed(training_args.seed)
    train, classes = encode_labels(script.load_split(data_args, model_args, data_args.train_split), "label")
    test, _ = encode_labels(script.load_split(data_args, model_args, data_args.eval_split), "label", classes)
    test = script.subsample(test, data_args.max_eval_samples, training_args.seed)
    if data_args.train_fraction is not None:
        train = stratified_subset(train, "label", fraction=data_args.train_fraction, seed=training_args.seed)
    model = ViTMeanPoolClassifier(len(classes))
    model.load_mae_encoder(pretrained_dir(output_root, "mae"))
    mean = per_channel(data_args.image_mean, 3, "--image_mean")
    std = per_channel(data_args.image_std, 3, "--image_std")
    processor = aug_args.eval_image_processor(IMAGE_SIZE, mean, std)
    trainer = NepaTrainer(
        model=model, args=training_args,
        train_dataset=with_image_transform(train, aug_args.train_transform(IMAGE_SIZE, mean, std), "image", "label",
                                           mixable=True),
        eval_dataset=with_image_transform(test, ImageProcessorTransform(processor), "image", "label"),
        data_collator=aug_args.collator(len(classes), label_smoothing=training_args.label_smoothing_factor),
        compute_metrics=classification_metrics(len(classes)),
    )
    result = trainer.train()
    result.metrics["train_samples"] = len(train)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    return time.process_time() - start


def pretrain_mae(budget: Budget, output: Path, output_root: Path) -> dict:
    """MAE (transformers' `ViTMAEForPreTraining`) trained by transformers' `Trainer`, as its run_mae.py example does,
    on the same images and augmentation as NEPA, with the CPU time the NEPA pretraining took: a short run measures
    the CPU cost of a MAE step, and the real run gets `nepa_cpu_seconds / that cost` steps (complete schedules,
    equal budgets)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from nepa_hf.data.images import load_image_dataset
    from nepa_hf.data.transforms import pretraining_transform, to_rgb

    nepa = json.loads((output_root / unit_name("pretrain", "nepa", PRETRAIN_SEED) / "result.json").read_text())
    images = load_image_dataset(DATASET, split="train", max_samples=budget.train_images, seed=PRETRAIN_SEED)
    transform = pretraining_transform(IMAGE_SIZE, [FASHION_MEAN] * 3, [FASHION_STD] * 3, crop_padding=2)
    images = images.with_transform(lambda batch: {"pixel_values": [transform(to_rgb(i)) for i in batch["image"]]})

    class StepTimes(TrainerCallback):  # process CPU seconds at the end of every optimizer step
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.process_time())

    def train(steps: int, folder: str, learning_rate: float) -> tuple[Trainer, StepTimes]:
        set_seed(PRETRAIN_SEED)
        arguments = TrainingArguments(
            output_dir=str(output / folder), max_steps=steps, per_device_train_batch_size=budget.pretrain_batch,
            learning_rate=learning_rate, weight_decay=0.05, adam_beta2=0.95, warmup_steps=0.05,
            lr_scheduler_type="cosine", max_grad_norm=3.0, logging_steps=max(1, budget.log_every * steps //
                                                                                  budget.pretrain_steps),
            save_strategy="no", report_to="none", disable_tqdm=True, dataloader_drop_last=True,
            remove_unused_columns=False, seed=PRETRAIN_SEED, dataloader_num_workers=0)
        times = StepTimes()
        trainer = Trainer(model=mae_model(), args=arguments, train_dataset=images, callbacks=[times],
                          data_collator=lambda batch: {"pixel_values": torch.stack([b["pixel_values"] for b in batch])})
        trainer.train()
        return trainer, times

    _, timing = train(12, "timing", 0.0)  # lr 0: the timing run changes nothing; its model is dropped
    mae_cost = (timing.ends[-1] - timing.ends[2]) / (len(timing.ends) - 3)  # steps 4-12: past the first steps' costs
    steps = max(1, int(round(nepa["cpu_seconds"] / mae_cost)))
    start = time.process_time()
    trainer, times = train(steps, "run", budget.pretrain_lr)
    cpu_seconds = time.process_time() - start
    trainer.save_model(str(output / "model"))
    for folder in ("run", "timing"):  # Trainer files; the model is saved above
        shutil.rmtree(output / folder)
    curve = [{"step": e["step"], "loss": e["loss"], "cpu_s": times.ends[e["step"] - 1] - start}
             for e in trainer.state.log_history if "loss" in e]
    return {"kind": "pretrain", "method": "mae", "seed": PRETRAIN_SEED, "steps": steps,
            "epochs": steps * budget.pretrain_batch / len(images), "batch_size": budget.pretrain_batch,
            "cpu_seconds": cpu_seconds, "nepa_cpu_seconds": nepa["cpu_seconds"], "mae_step_cpu_s": mae_cost,
            "nepa_step_cpu_s": nepa["cpu_seconds"] / nepa["steps"], "final_loss": curve[-1]["loss"],
            "script": "transformers Trainer (pretrain_mae)", "curve": curve}


@torch.no_grad()
def block_features(backbone: str, output_root: Path, images: torch.Tensor) -> list[torch.Tensor]:
    """Mean-pooled patch-token features after every block (index 0: the embeddings), each passed through the
    backbone's final LayerNorm (as `extract_features(layer=k)` does), from one forward pass per batch."""
    if backbone == "mae":
        model = ViTMeanPoolClassifier()
        model.load_mae_encoder(pretrained_dir(output_root, "mae"))
        encoder, final_norm = model.vit, model.vit.layernorm
    else:
        if backbone == "random-init":
            torch.manual_seed(PRETRAIN_SEED)
            model = NepaForPreTraining(study_config())
        else:
            model = NepaForPreTraining.from_pretrained(pretrained_dir(output_root, backbone))
        # Probed as pretrained: causal attention (the random init too, for a like-for-like reference).
        encoder, final_norm = model.base_model, model.base_model.norm
    encoder.eval()
    per_layer = []
    for chunk in to_pixels(images).split(1000):
        outputs = encoder(chunk, output_hidden_states=True)
        hidden = [final_norm(h) for h in outputs.hidden_states[:-1]] + [outputs.last_hidden_state]
        per_layer.append([h[:, 1:].mean(1) for h in hidden])
    return [torch.cat(layer) for layer in zip(*per_layer)]


def probe(backbone: str, budget: Budget, data: dict, output_root: Path) -> dict:
    """k-NN and linear probes of the frozen backbone after every block, trained on all training images."""
    (train_images, train_labels), (test_images, test_labels) = data["train"], data["test"]
    train_features = block_features(backbone, output_root, train_images)
    test_features = block_features(backbone, output_root, test_images)
    layers = []
    for layer, (train, test) in enumerate(zip(train_features, test_features)):
        knn = knn_accuracy(train, train_labels, test, test_labels, k=20)
        linear = linear_probe_accuracy(train, train_labels, test, test_labels, epochs=budget.probe_epochs,
                                       batch_size=512, seed=PRETRAIN_SEED)
        layers.append({"layer": layer, "knn_top1": knn["accuracy"], "linear_probe_top1": linear["accuracy"]})
    return {"kind": "probe", "method": backbone, "seed": PRETRAIN_SEED, "layers": layers,
            "probe_train_images": len(train_labels), "probe_test_images": len(test_labels)}


def raw_pixel_baselines(budget: Budget, data: dict) -> dict:
    """k-NN and logistic regression on the raw (normalised) pixels, per label budget and seed."""
    (train_images, train_labels), (test_images, test_labels) = data["train"], data["test"]
    train_pixels = train_images.flatten(1).float() / 255.0
    test_pixels = test_images.flatten(1).float() / 255.0
    runs = []
    for fraction in FRACTIONS:
        for seed in budget.seeds[fraction]:
            subset = label_subset(train_labels, fraction, seed)
            knn = knn_accuracy(train_pixels[subset], train_labels[subset], test_pixels, test_labels, k=20)
            logistic = linear_probe_accuracy(train_pixels[subset], train_labels[subset], test_pixels, test_labels,
                                             epochs=budget.probe_epochs, batch_size=min(512, len(subset)), seed=seed)
            runs.append({"fraction": fraction, "seed": seed, "knn_top1": knn["accuracy"],
                         "logistic_regression_top1": logistic["accuracy"]})
    return {"kind": "baseline", "method": "raw-pixels", "seed": PRETRAIN_SEED, "runs": runs}


# --------------------------------------------------------------------------------------------------------------
# The plan: units with dependencies, in priority order.
# --------------------------------------------------------------------------------------------------------------


def unit_name(kind: str, method: str, seed: int, fraction: float | None = None) -> str:
    name = f"{kind}-{method}"
    if fraction is not None:
        name += f"-{fraction * 100:g}pct"
    return f"{name}-s{seed}"


def plan(budget: Budget) -> list[tuple[str, list[str], list[str]]]:
    """[(unit, argv for `--unit`, dependencies)] in priority order: NEPA pretraining, then the paired NEPA and scratch
    fine-tunes at 1% and at 10%, seed by seed (the scratch ones can run beside the pretraining), the
    scratch anchor on all labels, the raw-pixel baselines, MAE, the other runs on all labels, probes, and the
    pretraining-length runs (fine-tuned on 1% of the labels, where pretraining matters most and a run is cheap)."""
    pretrained = {m: unit_name("pretrain", m, PRETRAIN_SEED) for m in PRETRAINED}

    def finetune_unit(init, fraction, seed):
        deps = [pretrained[init]] if init in pretrained else []
        return unit_name("finetune", init, seed, fraction), ["finetune", init, str(seed), str(fraction)], deps

    def probe_unit(backbone):
        deps = [pretrained[backbone]] if backbone in pretrained else []
        return unit_name("probe", backbone, PRETRAIN_SEED), ["probe", backbone, str(PRETRAIN_SEED)], deps

    units = [(pretrained["nepa"], ["pretrain", "nepa", str(PRETRAIN_SEED)], [])]
    units += [finetune_unit(init, fraction, seed)  # by seed, so that a study stopped early has whole pairs
              for fraction in (0.01, 0.1) for seed in budget.seeds[fraction] for init in ("scratch", "nepa")]
    units += [finetune_unit("scratch", 1.0, seed) for seed in budget.seeds[1.0]]
    units.append((unit_name("baseline", "raw-pixels", PRETRAIN_SEED), ["baseline", "raw-pixels", str(PRETRAIN_SEED)], []))
    units.append((pretrained["mae"], ["pretrain", "mae", str(PRETRAIN_SEED)], [pretrained["nepa"]]))
    units += [finetune_unit("mae", 0.01, seed) for seed in budget.seeds[0.01]]
    # The two remaining 100% fine-tunes are the longest units (~1 CPU-hour each): started before the short ones,
    # so that `--jobs 2` workers finish together instead of one running a long unit alone at the end.
    units += [finetune_unit(init, 1.0, seed) for seed in budget.seeds[1.0] for init in ("nepa", "mae")]
    units += [finetune_unit("mae", 0.1, seed) for seed in budget.seeds[0.1]]
    units += [probe_unit(backbone) for backbone in ("nepa", "mae", "random-init")]
    for method in ("nepa-third", "nepa-ninth"):
        units.append((pretrained[method], ["pretrain", method, str(PRETRAIN_SEED)], []))
        units += [finetune_unit(method, 0.01, seed) for seed in budget.seeds[0.01]]
    return units


def pid_alive(pid_file: Path) -> bool:
    """Whether the unit process recorded in `pid_file` still runs (a reused pid of another program does not count)."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or Path(__file__).name in cmdline.read_text(errors="replace")


def repo_relative(path: Path) -> Path:
    """`path` relative to the repository root, absolute when outside it: what the study records and reports then
    carries no machine's paths."""
    path = path.resolve()
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


def run_unit(argv: list[str], budget: Budget, output_root: Path) -> None:
    """Run one unit from the repository root, with the output folder given relative to it (`repo_relative`), so
    that the commands each result.json records carry no machine's paths."""
    output_root = repo_relative(output_root)  # before the chdir: a relative folder is the caller's
    with contextlib.chdir(REPO_ROOT):
        unit(argv, budget, output_root)


def unit(argv: list[str], budget: Budget, output_root: Path) -> None:
    torch.set_num_threads(1)
    kind, method, seed = argv[0], argv[1], int(argv[2])
    fraction = float(argv[3]) if kind == "finetune" else None
    name = unit_name(kind, method, seed, fraction)
    output = output_root / name
    output.mkdir(parents=True, exist_ok=True)
    if kind == "pretrain":
        result = (pretrain_mae(budget, output, output_root) if method == "mae"
                  else pretrain_nepa(method, budget, output))
    elif kind == "finetune":
        result = finetune(method, fraction, seed, budget, output_root, output)
    else:
        data = {"train": load_split("train", budget.train_images), "test": load_split("test", budget.test_images)}
        result = probe(method, budget, data, output_root) if kind == "probe" else raw_pixel_baselines(budget, data)
    result["unit"] = name
    result["settings"] = study_settings(budget)
    result["torch_threads"] = torch.get_num_threads()
    (output / "result.json.tmp").write_text(json.dumps(result, indent=1))
    os.replace(output / "result.json.tmp", output / "result.json")  # a unit counts as done only when complete


def run_all(args, budget: Budget) -> None:
    output_root = Path(args.output_dir)
    output_root.mkdir(parents=True, exist_ok=True)
    check_settings(load_results(output_root), budget, output_root)
    selected = [u for u in plan(budget) if not args.units or any(fnmatch.fnmatch(u[0], p) for p in args.units)]
    if args.units and (unmatched := [p for p in args.units if not any(fnmatch.fnmatch(u[0], p) for u in selected)]):
        raise SystemExit(f"--units {' '.join(unmatched)}: no planned unit matches (units are named like "
                         f"{plan(budget)[1][0]}; see plan()).")
    finished = {u[0] for u in plan(budget) if (output_root / u[0] / "result.json").exists()}
    chosen = {u[0] for u in selected}
    if unmet := [f"{name} needs {dep}" for name, _, deps in selected for dep in deps if dep not in finished | chosen]:
        raise SystemExit(f"--units: {'; '.join(unmet)}, which is neither finished nor selected: add it to --units.")
    pending = [u for u in selected if u[0] not in finished]
    # Units still running from an earlier invocation of this script (its pid file is live) are waited for.
    elsewhere = {u[0] for u in pending if pid_alive(output_root / f"{u[0]}.pid")}
    pending = [u for u in pending if u[0] not in elsewhere]
    running: dict[str, subprocess.Popen] = {}
    failed: set[str] = set()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    while pending or running or elsewhere:
        elsewhere = {name for name in elsewhere if pid_alive(output_root / f"{name}.pid")}
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                ok = process.returncode == 0 and (output_root / name / "result.json").exists()
                print(f"[{time.strftime('%H:%M:%S')}] {'done' if ok else 'FAILED'}: {name}", flush=True)
                if not ok:
                    failed.add(name)
        finished_elsewhere = [u for u in pending if (output_root / u[0] / "result.json").exists()]
        if finished_elsewhere:  # by another invocation: checked like the results found at the start
            check_settings([json.loads((output_root / u[0] / "result.json").read_text()) for u in finished_elsewhere],
                           budget, output_root)
        for unit in finished_elsewhere:
            print(f"already finished (by another invocation): {unit[0]}", flush=True)
            pending.remove(unit)
        blocked = [u for u in pending if any(d in failed for d in u[2])]
        for unit in blocked:
            print(f"skipped (a dependency failed): {unit[0]}", flush=True)
            pending.remove(unit)
            failed.add(unit[0])
        # Units another invocation started after this one began are left to it.
        elsewhere |= {u[0] for u in pending if pid_alive(output_root / f"{u[0]}.pid")}
        pending = [u for u in pending if u[0] not in elsewhere]
        ready = [u for u in pending if all((output_root / d / "result.json").exists() for d in u[2])]
        while ready and len(running) + len(elsewhere) < args.jobs:
            name, argv, _ = ready.pop(0)
            pending.remove((name, argv, _))
            log = open(output_root / f"{name}.log", "w")
            command = [sys.executable, __file__, "--output_dir", str(output_root), "--unit", *argv]
            if args.quick:
                command.append("--quick")
            running[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            (output_root / f"{name}.pid").write_text(str(running[name].pid))
            print(f"[{time.strftime('%H:%M:%S')}] started: {name}", flush=True)
        if not running and not elsewhere and pending and not ready:
            raise RuntimeError(f"units cannot start (missing dependencies): {[u[0] for u in pending]}")
        time.sleep(1.0)
    if failed:
        raise SystemExit(f"failed units (see their .log files in {output_root}): {sorted(failed)}")


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


ARMS = {"nepa": "NEPA-pretrained", "scratch": "scratch (same architecture)", "mae": "MAE-pretrained (ViT encoder)"}
BUDGET_NAMES = {0.01: "1%", 0.1: "10%", 1.0: "100%"}


def load_results(output_root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(output_root.glob("*/result.json"))]


def check_settings(results: list[dict], budget: Budget, output_root: Path) -> None:
    """Refuse to resume or report a study whose finished units were made with other settings (patch, budgets)
    than the ones they depend on now: they would be mixed in silently."""
    current = study_settings(budget)
    stale = [r["unit"] for r in results
             if "settings" not in r or settings_that_matter(r, r["settings"]) != settings_that_matter(r, current)]
    if stale:
        raise SystemExit(f"{len(stale)} finished units in {output_root} were made with other settings than this "
                         f"script's ({', '.join(stale)}): move them away (or pass another --output_dir) first.")


def finetunes(results: list[dict], init: str, fraction: float) -> list[dict]:
    return sorted((r for r in results if r["kind"] == "finetune" and r["init"] == init and r["fraction"] == fraction),
                  key=lambda r: r["seed"])


def mean_std(values: list[float]) -> str:
    if not values:
        return "not run"
    mean = 100 * float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.1f} (1 seed)"
    return f"{mean:.1f} ± {100 * float(np.std(values, ddof=1)):.1f} (n={len(values)})"


def paired_gains(results: list[dict], fraction: float, arm: str = "nepa", reference: str = "scratch") -> dict | None:
    """Per-seed gains (points) of `arm` over `reference` on the same label subset and seed, with a paired t-test."""
    ours = {r["seed"]: r["test_top1"] for r in finetunes(results, arm, fraction)}
    theirs = {r["seed"]: r["test_top1"] for r in finetunes(results, reference, fraction)}
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return None
    gains = [100 * (ours[s] - theirs[s]) for s in seeds]
    summary = {"seeds": seeds, "gains_points": gains, "mean_points": float(np.mean(gains))}
    if len(gains) > 1:
        from scipy.stats import ttest_1samp

        test = ttest_1samp(gains, 0.0)
        summary.update(std_points=float(np.std(gains, ddof=1)), t=float(test.statistic), p_two_sided=float(test.pvalue))
    return summary


def significance_sentence(name: str, summary: dict) -> str:
    gains = ", ".join(f"{g:+.1f}" for g in summary["gains_points"])
    text = f"{name}: per-seed gains {gains} points, mean {summary['mean_points']:+.1f}"
    if "p_two_sided" in summary:
        positive = sum(g > 0 for g in summary["gains_points"])
        text += (f" ± {summary['std_points']:.1f}; paired t-test over {len(summary['seeds'])} seeds: t = {summary['t']:.2f}, "
                 f"two-sided p = {summary['p_two_sided']:.3f}; {positive} of {len(summary['seeds'])} seeds positive")
    return text + "."


def summary_json(results: list[dict]) -> dict:
    """docs/study_summary.json: accuracies as fractions, per seed in seed order."""
    budgets = {BUDGET_NAMES[f]: {arm: [r["test_top1"] for r in finetunes(results, arm, f)] for arm in ARMS}
               for f in FRACTIONS}
    summary = {"scratch_100": (budgets["100%"]["scratch"] or [None])[0], "budgets": budgets}
    # until the baseline unit finishes
    summary["raw_pixel_knn"] = summary["raw_pixel_logistic_regression"] = summary["raw_pixels"] = None
    baseline = next((r for r in results if r["kind"] == "baseline"), None)
    if baseline:
        full = [run for run in baseline["runs"] if run["fraction"] == 1.0]
        summary["raw_pixel_knn"] = full[0]["knn_top1"] if full else None
        summary["raw_pixel_logistic_regression"] = full[0]["logistic_regression_top1"] if full else None
        summary["raw_pixels"] = {BUDGET_NAMES[f]: {
            "knn": [run["knn_top1"] for run in baseline["runs"] if run["fraction"] == f],
            "logistic_regression": [run["logistic_regression_top1"] for run in baseline["runs"] if run["fraction"] == f],
        } for f in FRACTIONS}
    summary["paired_gain_nepa_minus_scratch"] = {
        BUDGET_NAMES[f]: gains for f in FRACTIONS if (gains := paired_gains(results, f))}
    verdicts = {r["unit"]: convergence(r["evaluations"], r["steps"]) for r in results if r["kind"] == "finetune"}
    summary["not_converged"] = sorted(unit for unit, verdict in verdicts.items() if not verdict["converged"])
    summary["converged"] = not summary["not_converged"] if verdicts else None
    summary["pretraining_length"] = [
        {"method": r["method"], "epochs": r["epochs"], "cpu_seconds": r["cpu_seconds"],
         "finetuned_1%": [f["test_top1"] for f in finetunes(results, r["method"], 0.01)],
         "finetuned_10%": [f["test_top1"] for f in finetunes(results, r["method"], 0.1)]}
        for r in sorted((r for r in results if r["kind"] == "pretrain" and r["method"] in NEPA_LENGTHS),
                        key=lambda r: r["epochs"])]
    return summary


def make_plots(results: list[dict], summary: dict, report_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"nepa": "tab:purple", "scratch": "tab:gray", "mae": "tab:orange", "nepa-third": "tab:blue",
              "nepa-ninth": "tab:cyan", "random-init": "tab:gray"}
    figures = {}

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), dpi=80)
    for ax, fraction in zip(axes, FRACTIONS):
        for arm in ARMS:
            for r in finetunes(results, arm, fraction):
                xs = [e["step"] / r["steps"] for e in r["evaluations"]]
                ax.plot(xs, [100 * e["test_top1"] for e in r["evaluations"]], marker="o", ms=3, lw=1,
                        color=colors[arm], alpha=0.85, label=ARMS[arm] if r["seed"] == min(
                            x["seed"] for x in finetunes(results, arm, fraction)) else None)
        ax.axvspan(0.8, 1.0, color="0.9", zorder=0)
        ax.set(title=f"fine-tuning on {BUDGET_NAMES[fraction]} of the labels", xlabel="fraction of the steps",
               ylabel="test top-1 (%)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Test accuracy during fine-tuning (every seed; shaded: the last 20% of the steps)", fontsize=10)
    fig.tight_layout()
    figures["finetuning"] = "study_finetuning_curves.png"
    fig.savefig(report_dir / figures["finetuning"])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    for r in sorted((r for r in results if r["kind"] == "pretrain"), key=lambda r: r["method"]):
        ax = axes[1] if r["method"] == "mae" else axes[0]
        ax.plot([c["cpu_s"] / 60 for c in r["curve"]], [c["loss"] for c in r["curve"]], lw=1,
                color=colors[r["method"]], label=f"{r['method']} ({r['epochs']:.2g} epochs)")
    axes[0].set(title="NEPA pretraining loss (negative cosine)", xlabel="CPU minutes", ylabel="loss")
    axes[1].set(title="MAE pretraining loss (norm-pix MSE)", xlabel="CPU minutes", ylabel="loss")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    figures["pretraining"] = "study_pretraining_curves.png"
    fig.savefig(report_dir / figures["pretraining"])
    plt.close(fig)

    probes = sorted((r for r in results if r["kind"] == "probe"), key=lambda r: r["method"])
    if probes:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
        for r in probes:
            layers = [x["layer"] for x in r["layers"]]
            axes[0].plot(layers, [100 * x["knn_top1"] for x in r["layers"]], marker="o", color=colors[r["method"]],
                         label=r["method"])
            axes[1].plot(layers, [100 * x["linear_probe_top1"] for x in r["layers"]], marker="o",
                         color=colors[r["method"]], label=r["method"], ls="--" if r["method"] == "random-init" else "-")
        for ax, title in zip(axes, ("k-NN (k=20) on frozen features", "linear probe on frozen features")):
            ax.set(title=title, xlabel="block (0 = patch embeddings)", ylabel="test top-1 (%)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        figures["probes"] = "study_probes_per_block.png"
        fig.savefig(report_dir / figures["probes"])
        plt.close(fig)

    lengths = summary["pretraining_length"]
    if lengths:
        fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=80)
        for key, fraction, marker in (("finetuned_1%", 0.01, "o"), ("finetuned_10%", 0.1, "s")):
            scratch = [r["test_top1"] for r in finetunes(results, "scratch", fraction)]
            points = [(0.0, scratch)] + [(entry["epochs"], entry[key]) for entry in lengths]
            points = [(x, ys) for x, ys in points if ys]
            ax.errorbar([x for x, _ in points], [100 * np.mean(ys) for _, ys in points],
                        yerr=[100 * np.std(ys, ddof=1) if len(ys) > 1 else 0.0 for _, ys in points], marker=marker,
                        capsize=3,
                        label=f"{BUDGET_NAMES[fraction]} labels (mean over seeds)")
        ax.set(title="Fine-tuned accuracy vs NEPA pretraining length", xlabel="pretraining epochs (0 = scratch)",
               ylabel="test top-1 (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figures["lengths"] = "study_pretraining_length.png"
        fig.savefig(report_dir / figures["lengths"])
        plt.close(fig)
    return figures


def make_visualizations(output_root: Path, report_dir: Path) -> list[str]:
    """Attention / next-embedding similarity / PCA maps of the NEPA backbone on a bundled photo (greyscale, 56x56:
    RoPE runs at any resolution) and on a Fashion-MNIST test image."""
    from PIL import Image

    from nepa_hf.data.images import bundled_photo_paths
    from nepa_hf.evaluation.visualization import save_visualizations

    checkpoint = pretrained_dir(output_root, "nepa")
    if not checkpoint.exists():
        return []
    model = NepaForPreTraining.from_pretrained(checkpoint, attn_implementation="eager")
    written = []
    photo = bundled_photo_paths()[0]
    for name, image, size, image_name in (
        ("photo", Image.open(photo).convert("L").convert("RGB"), 2 * IMAGE_SIZE, f"{photo.name} (greyscale)"),
        ("fashion", Image.fromarray(load_split("test", 1)[0][0].numpy()).convert("RGB"), IMAGE_SIZE,
         "Fashion-MNIST test item 0"),
    ):
        paths = save_visualizations(model, fashion_processor(size), image, report_dir, prefix=f"study_{name}_",
                                    model_name="NEPA backbone of the Fashion-MNIST study", image_name=image_name)
        written.extend(Path(path).name for path in paths.values())
    return written


# The units of this study as it ran before issue 28, each with its own training loop in this file (a record).
PRIVATE_LOOPS = REPO_ROOT / "benchmarks" / "results" / "fashion_mnist_study_private_loops"


def comparison_with_private_loops(results: list[dict], records: Path) -> list[str]:
    """The script-run numbers next to the private loops' (same budgets, recipe and seeds; other data order,
    augmentation draws and initialisations, since the scripts draw them their own way)."""
    if not records.is_dir():
        return []
    previous = load_results(records)
    lines = ["", "### Through the scripts against the study's earlier private training loops", "",
             f"The same plan ran before with training loops of its own in this file (`{repo_relative(records)}`"
             "): the same budgets, seeds, label fractions and recipe (learning rates at every step, weight decay, "
             "clipping, augmentation, normalisation, evaluation). What differs: every random draw (label subsets, "
             "data order, augmentation, initialisation), so per-seed numbers differ by seed noise at least; the "
             "pretraining warmup (188 steps, rounded up, against 187); the logged losses (means over 10 steps, "
             "against one step's); and the CPU seconds, which now include the script's start-up, decoding every "
             "image with PIL, the checkpoints and the evaluation through the image processor.", "",
             "| runs | private loops | scripts | difference of the means (points) |", "|---|---|---|---|"]
    for fraction in FRACTIONS:
        for arm in ARMS:
            before = [r["test_top1"] for r in finetunes(previous, arm, fraction)]
            after = [r["test_top1"] for r in finetunes(results, arm, fraction)]
            if before and after:
                lines.append(f"| {arm}, {BUDGET_NAMES[fraction]} labels | {mean_std(before)} | {mean_std(after)} | "
                             f"{100 * (np.mean(after) - np.mean(before)):+.1f} |")
        # Only the arms both pipelines ran, so that both means average the same kinds of run.
        common = [arm for arm in ARMS if finetunes(previous, arm, fraction) and finetunes(results, arm, fraction)]
        before, after = ([r["cpu_seconds"] / 60 for arm in common for r in finetunes(runs, arm, fraction)
                          if "cpu_seconds" in r] for runs in (previous, results))
        if before and after:
            lines.append(f"| CPU minutes of a fine-tune, {BUDGET_NAMES[fraction]} labels (mean over "
                         f"{', '.join(common)}) | {np.mean(before):.1f} | {np.mean(after):.1f} | |")
        before, after = paired_gains(previous, fraction), paired_gains(results, fraction)
        if before and after:
            lines.append(f"| NEPA over scratch, {BUDGET_NAMES[fraction]} labels (paired) | "
                         f"{before['mean_points']:+.1f} ± {before.get('std_points', 0):.1f} (n={len(before['seeds'])}) "
                         f"| {after['mean_points']:+.1f} ± {after.get('std_points', 0):.1f} (n={len(after['seeds'])}) "
                         f"| {after['mean_points'] - before['mean_points']:+.1f} |")
    old_nepa = next((r for r in previous if r["unit"] == unit_name("pretrain", "nepa", PRETRAIN_SEED)), None)
    new_nepa = next((r for r in results if r["unit"] == unit_name("pretrain", "nepa", PRETRAIN_SEED)), None)
    if old_nepa and new_nepa:
        lines.append(f"| NEPA pretraining: final loss, CPU minutes | {old_nepa['final_loss']:.3f}, "
                     f"{old_nepa['cpu_seconds'] / 60:.1f} | {new_nepa['final_loss']:.3f}, "
                     f"{new_nepa['cpu_seconds'] / 60:.1f} | |")
    return lines


def write_report(args, budget: Budget) -> Path:
    output_root, report_dir = Path(args.output_dir), Path(args.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(output_root)
    if not results:
        raise SystemExit(f"no finished units in {output_root}: run the study first")
    check_settings(results, budget, output_root)
    by = {r["unit"]: r for r in results}
    summary = summary_json(results)
    (report_dir / "study_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (report_dir / "study_results.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in results], indent=1) + "\n")
    figures = make_plots(results, summary, report_dir)
    maps = make_visualizations(output_root, report_dir)
    missing = [name for name, _, _ in plan(budget) if name not in by]
    nepa = by.get(unit_name("pretrain", "nepa", PRETRAIN_SEED))
    mae = by.get(unit_name("pretrain", "mae", PRETRAIN_SEED))

    lines = [
        "## Fashion-MNIST study: tables",
        "",
        f"Generated by `python benchmarks/fashion_mnist_study.py{' --quick' if args.quick else ''}` from the "
        f"{len(results)} finished units' `result.json` files (`{repo_relative(output_root)}`; "
        "without curves in `docs/study_results.json`; summary in `docs/study_summary.json`)."
        + (f" **Not finished yet: {len(missing)} units** ({', '.join(missing)})." if missing else " Every planned unit finished."),
        "",
        "**How the units ran.** Through the scripts users run, as subprocesses with the flags in each unit's "
        "`result.json` (`command`): NEPA pretraining by `examples/pretrain_nepa.py` (Accelerate), every NEPA and "
        "scratch fine-tune by `examples/finetune_classification.py` (Trainer with `NepaTrainer`, scored through the "
        "saved image processor); MAE, whose model the scripts do not take, by transformers' `Trainer` "
        "(pretraining, as its run_mae.py example) and `NepaTrainer` with the fine-tuning script's argument classes "
        "and data code. CPU seconds are the script process's (its start-up included).",
        "",
        f"**Setup.** NEPA architecture at D 128, 6 blocks, 4 heads, MLP 512, patch {PATCH_SIZE}, on the native "
        f"{IMAGE_SIZE}x{IMAGE_SIZE} images (grey replicated to RGB; augmentation: random translation by up to 2 px + "
        f"horizontal flip, `--random_crop_padding 2`). One process with one torch thread per run. Pretraining: {budget.pretrain_steps} steps x "
        f"batch {budget.pretrain_batch} on the 60k training images without labels, AdamW (0.9, 0.95) lr "
        f"{budget.pretrain_lr:g} wd 0.05, 5% warmup + cosine, grad-clip 3"
        + (f" ({nepa['epochs']:.1f} epochs, {nepa['cpu_seconds'] / 60:.1f} CPU-minutes)" if nepa else "") + ". MAE: "
        "`ViTMAEForPreTraining` with the same encoder dims, 75% masking, norm-pix loss, a 2-block D-64 decoder, same "
        "optimiser, as many steps as fit in NEPA's pretraining CPU time"
        + (f" ({mae['steps']} steps = {mae['epochs']:.1f} epochs, {mae['cpu_seconds'] / 60:.1f} CPU-minutes against "
           f"NEPA's {mae['nepa_cpu_seconds'] / 60:.1f}; a MAE step costs {mae['mae_step_cpu_s'] / mae['nepa_step_cpu_s']:.2f}x "
           "a NEPA step: its encoder sees a quarter of the patches)" if mae else "") + ". "
        "Fine-tuning, identical for every backbone: AdamW lr "
        f"{budget.finetune_lr:g} wd 0.05, per-group warmup (10%) + cosine, label smoothing {budget.label_smoothing}, "
        "grad-clip 3, bidirectional attention, mean pooling + LayerNorm + Linear head (zero init), layer-wise lr decay "
        f"{budget.pretrained_layer_decay} for pretrained backbones and 1.0 from scratch; "
        + "; ".join(f"{BUDGET_NAMES[f]} labels: {p.steps} steps x batch {p.batch_size}" for f, p in budget.finetune.items())
        + ". Label subsets are class-balanced and drawn per seed; the seed also sets the data order and augmentation "
        "and the scratch initialisation (heads start at zero). Test: all 10,000 test images.",
        "",
        "### Fine-tuned test top-1 (%), mean ± std over seeds",
        "",
        "| backbone | 1% labels (600) | 10% labels (6,000) | 100% labels (60,000) |",
        "|---|---|---|---|",
    ]
    for arm, label in ARMS.items():
        lines.append(f"| {label} | " + " | ".join(mean_std([r["test_top1"] for r in finetunes(results, arm, f)])
                                                  for f in FRACTIONS) + " |")
    baseline = next((r for r in results if r["kind"] == "baseline"), None)
    if baseline:
        for key, label in (("knn_top1", "raw pixels, k-NN (k=20)"), ("logistic_regression_top1",
                                                                       "raw pixels, logistic regression")):
            lines.append(f"| {label} | " + " | ".join(
                mean_std([run[key] for run in baseline["runs"] if run["fraction"] == f]) for f in FRACTIONS) + " |")
    anchor = summary["scratch_100"]
    if anchor is not None:
        lines += ["", f"Sanity anchor: scratch at 100% of the labels reaches {100 * anchor:.1f}% "
                      f"({'meets' if anchor >= 0.88 else 'BELOW'} the 88% bar)."]
    lines += ["", "### NEPA over scratch, paired by seed (same label subset, data order and augmentation)", ""]
    for fraction in FRACTIONS:
        gains = paired_gains(results, fraction)
        if gains:
            lines.append(f"- {significance_sentence(f'{BUDGET_NAMES[fraction]} labels', gains)}")
    for fraction in FRACTIONS:
        gains = paired_gains(results, fraction, "mae")
        if gains:
            lines.append(f"- MAE (a plain ViT) over scratch (NEPA's architecture: RoPE, QK-norm, LayerScale), so "
                         f"pretraining and architecture together, "
                         f"{significance_sentence(f'{BUDGET_NAMES[fraction]} labels', gains)}")

    lines += [] if args.quick else comparison_with_private_loops(results, PRIVATE_LOOPS)

    lines += ["", "### Convergence: test top-1 over the last 20% of the fine-tuning steps", "",
              f"Scored at {', '.join(f'{100 * point:g}' for point in EVAL_POINTS if point >= 0.8)}% of the steps. "
              "Change = final score minus the score at 80% (the criterion: |change| < 0.5 point); spread = highest "
              "minus lowest of these scores (how much a run wobbles on its plateau, test-set noise included). With the "
              "cosine schedule (after a 10% warmup) the last 20% of the steps run at under 12% of the peak learning "
              "rate, so a small change there says the schedule has annealed as well as that the run has plateaued.", "",
              "| run | epochs | at 80% | final | change (points) | spread (points) | converged (abs(change) < 0.5) |",
              "|---|---|---|---|---|---|---|"]
    for fraction in FRACTIONS:
        for init in list(ARMS) + ["nepa-third", "nepa-ninth"]:
            for r in finetunes(results, init, fraction):
                tail, verdict = plateau_scores(r["evaluations"], r["steps"]), convergence(r["evaluations"], r["steps"])
                lines.append(f"| {init}, {BUDGET_NAMES[fraction]}, seed {r['seed']} | {r['epochs']:.1f} | "
                             f"{tail[0]:.2f} | {tail[-1]:.2f} | {verdict['change_over_last_20pct_points']:+.2f} | "
                             f"{verdict['plateau_spread_points']:.2f} | {'yes' if verdict['converged'] else 'NO'} |")

    probes = sorted((r for r in results if r["kind"] == "probe"), key=lambda r: list(ARMS).index(r["method"])
                    if r["method"] in ARMS else 9)
    if probes:
        layers = range(len(probes[0]["layers"]))
        lines += ["", "### Frozen features per block: k-NN / linear-probe test top-1 (%)", "",
                  "| backbone | " + " | ".join("embeddings" if k == 0 else f"block {k}" for k in layers) + " |",
                  "|---|" + "---|" * len(layers)]
        for r in probes:
            lines.append(f"| {r['method']} | " + " | ".join(
                f"{100 * x['knn_top1']:.1f} / {100 * x['linear_probe_top1']:.1f}" for x in r["layers"]) + " |")
        lines += ["", "Mean-pooled patch tokens after each block, through the backbone's final LayerNorm; NEPA and "
                      "the random init with causal attention (as pretrained), MAE's ViT encoder as it was pretrained. "
                      f"Trained on all {probes[0]['probe_train_images']:,} training images: k-NN weighted by "
                      "exp(cos/0.07); linear probe = "
                      f"standardised features, AdamW, {budget.probe_epochs} epochs. The random init's blocks start "
                      f"close to the identity (LayerScale initialised at {study_config().layerscale_value:g}, as in "
                      "NEPA's recipe), so its features barely change from block to block."]

    lengths = summary["pretraining_length"]
    if lengths:
        scratch_1 = [r["test_top1"] for r in finetunes(results, "scratch", 0.01)]
        scratch_10 = [r["test_top1"] for r in finetunes(results, "scratch", 0.1)]
        lines += ["", "### Fine-tuned accuracy against NEPA pretraining length", "",
                  "| pretraining | epochs | CPU minutes | final loss | 1% labels | 10% labels |",
                  "|---|---|---|---|---|---|",
                  f"| none (scratch) | 0 | 0 | — | {mean_std(scratch_1)} | {mean_std(scratch_10)} |"]
        for entry in lengths:
            pretrain = by[unit_name("pretrain", entry["method"], PRETRAIN_SEED)]
            lines.append(f"| {entry['method']} | {entry['epochs']:.2f} | {entry['cpu_seconds'] / 60:.1f} | "
                         f"{pretrain['final_loss']:.3f} | {mean_std(entry['finetuned_1%'])} | "
                         f"{mean_std(entry['finetuned_10%']) if entry['method'] == 'nepa' else '—'} |")
        lines += ["", "Each length is a complete run (warmup + cosine to 0 over its own steps), not an intermediate "
                      "checkpoint of the longest one; the shorter ones are fine-tuned at 1% of the labels only."]
    lines += ["", f"![fine-tuning curves]({figures['finetuning']})", "",
              f"![pretraining curves]({figures['pretraining']})"]
    for key in ("probes", "lengths"):
        if key in figures:
            lines += ["", f"![{key}]({figures[key]})"]
    if maps:
        lines += [
            "", "### What the NEPA backbone looks at", "",
            "Query patch marked; left to right: attention of the query (all layers and heads), similarity of its "
            "next-embedding prediction to every patch's input embedding, PCA of the patch features. A bundled photo "
            f"(grey, {2 * IMAGE_SIZE}x{2 * IMAGE_SIZE}: a resolution the model never saw) and a Fashion-MNIST test "
            "image. `python examples/visualize.py --model CHECKPOINT --image PATH` writes the same maps.",
            "", " ".join(f"![{m}]({m})" for m in maps if m.startswith("study_photo_")),
            "", " ".join(f"![{m}]({m})" for m in maps if m.startswith("study_fashion_")),
        ]
    # The written reading of the numbers lives in its own file (kept when the tables are regenerated).
    findings = report_dir / "results_findings.md"
    header = ["# Results", ""]
    if findings.exists():
        header += [findings.read_text().strip(), ""]
    section = report_dir / "results.md"
    section.write_text("\n".join(header + lines) + "\n")
    print("\n".join(lines))
    return section


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "benchmarks" / "results" / "fashion_mnist_study"),
                        help="one folder per unit (result.json, logs, checkpoints); finished units are skipped")
    parser.add_argument("--report_dir", default=str(REPO_ROOT / "docs"))
    parser.add_argument("--jobs", type=int, default=2, help="units run at once (each uses one thread)")
    parser.add_argument("--units", nargs="+", metavar="PATTERN",
                        help="run only the planned units matching these patterns (and what they need must exist), "
                             "e.g. 'pretrain-nepa-s0' 'finetune-*-1pct-*'; default: every unit")
    parser.add_argument("--quick", action="store_true", help="a tiny budget, to check the whole pipeline")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--unit", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args()


def main():
    args = parse_args()
    budget = QUICK if args.quick else Budget()
    if args.unit:
        run_unit(args.unit, budget, Path(args.output_dir))
        return
    if not args.report_only:
        run_all(args, budget)
    write_report(args, budget)


if __name__ == "__main__":
    main()
