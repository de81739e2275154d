# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""A small, reproducible NEPA study on Fashion-MNIST (CPU): NEPA vs scratch vs MAE, probes, ablations.

One tiny backbone (nepa-vit-micro: D 128, 6 blocks, 4 heads, MLP 512, patch 4, 32x32 input = the 28x28 images
zero-padded by 2 px, grey replicated to RGB) is

  1. pretrained with NEPA on the 60k training images (labels unused), then fine-tuned on 10% and on 100% of the
     training labels, against the same architecture fine-tuned from a random init with the same budget;
  2. pretrained as MAE (transformers' `ViTMAEForPreTraining`, encoder with the same dims, 75% masking, a 2-block
     D-64 decoder) for the same pretraining CPU time, then fine-tuned the same way (its encoder as a `ViTModel`
     with the same mean-pool + LayerNorm + Linear head as NEPA);
  3. probed frozen (weighted kNN, k=20, and a linear probe on mean-pooled final features);
  4. ablated: no shift, no causal mask, no stop-gradient (collapse, tracked with the library's CollapseMonitor),
     and 40% random input masking, each pretrained with NEPA's budget and fine-tuned on 10% of the labels.

Every run ("unit") is one process with one torch thread, so CPU seconds are a load-independent budget; units run
`--jobs` at a time, write `OUTPUT_DIR/<unit>/result.json`, and are skipped when that file exists (the study resumes
where it stopped). The report (tables, loss-curve plots, visualisations) is written from those files:

    python benchmarks/fashion_mnist_study.py --jobs 2                 # all units, then the report (a few hours)
    python benchmarks/fashion_mnist_study.py --report_only            # the report from the finished units
    python benchmarks/fashion_mnist_study.py --quick --output_dir /tmp/study --report_dir /tmp/study/docs  # smoke

Data: Debian's `dataset-fashion-mnist` (60k train / 10k test; `apt-get install -y dataset-fashion-mnist`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT / "src"))

from nepa_hf import NepaConfig, NepaForImageClassification, NepaForPreTraining  # noqa: E402
from nepa_hf.data.images import load_fashion_mnist  # noqa: E402
from nepa_hf.evaluation.features import extract_features, knn_accuracy, linear_probe_accuracy  # noqa: E402
from nepa_hf.data.pretraining import random_patch_mask  # noqa: E402
from nepa_hf.training.finetuning import layer_decay_parameter_groups  # noqa: E402
from nepa_hf.training.monitoring import CollapseMonitor  # noqa: E402
from nepa_hf.training.optimization import create_pretraining_optimizer, get_layerwise_cosine_schedule  # noqa: E402

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# NEPA pretraining variants: config overrides and the input mask ratio.
NEPA_VARIANTS = {
    "nepa": ({}, 0.0),
    "nepa-short": ({}, 0.0),  # NEPA with the ablations' (shorter) budget: their reference
    "nepa-no-shift": ({"pretraining_shift": False}, 0.0),
    "nepa-bidirectional": ({"is_causal": False}, 0.0),
    "nepa-no-stop-grad": ({"pretraining_stop_gradient": False}, 0.0),
    "nepa-mask40": ({"use_mask_token": True}, 0.4),
}
ABLATIONS = ["nepa-no-shift", "nepa-bidirectional", "nepa-no-stop-grad", "nepa-mask40"]
ABLATION_RUNS = ["nepa-short"] + ABLATIONS


@dataclass
class Budget:
    pretrain_steps: int = 800
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    ablation_pretrain_steps: int = 300  # the ablations and their "nepa-short" reference
    finetune_steps: int = 150
    finetune_batch: int = 128
    finetune_lr: float = 1e-3
    layer_decay: float = 0.75
    label_smoothing: float = 0.1
    probe_train_images: int = 10000
    test_images: int = 10000
    log_every: int = 10
    finetune_seeds: list = field(default_factory=lambda: [0, 1, 2])


QUICK = Budget(pretrain_steps=20, pretrain_batch=32, ablation_pretrain_steps=10, finetune_steps=20, finetune_batch=32, probe_train_images=500,
               test_images=500, log_every=5, finetune_seeds=[0, 1])
# One pretraining run per method (CPU-bound); fine-tuning seeds vary the head/scratch init, data order, label subset.
PRETRAIN_SEED = 0


# --------------------------------------------------------------------------------------------------------------
# Data: uint8 tensors in memory, padded to 32x32; batches are augmented and normalised on the fly.
# --------------------------------------------------------------------------------------------------------------


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fashion_mnist(split, source="debian")
    images = F.pad(torch.from_numpy(images), (2, 2, 2, 2))  # 28x28 -> 32x32, zero border like the background
    return images, torch.from_numpy(labels).long()


def fashion_processor(size: int = 32):
    """The image processor matching this study's inputs, saved next to every pretrained model so that pipelines,
    the segmentation example and the visualisations preprocess photos the way the model was trained."""
    from nepa_hf import NepaImageProcessorPil

    return NepaImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False,
                                 image_mean=[FASHION_MEAN] * 3, image_std=[FASHION_STD] * 3)


def label_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a class-balanced `fraction` of the training set, drawn with `seed`."""
    if fraction >= 1.0:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(1000 + seed)
    picked = []
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        count = int(round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(picked).sort().values


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 32, 32) -> normalised float (B, 3, 32, 32)."""
    pixels = (images.float() / 255.0 - FASHION_MEAN) / FASHION_STD
    return pixels.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random translation (zero-padded crop, up to `pad` px) and horizontal flip, per image."""
    batch, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(batch):
        top, left = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, top:top + height, left:left + width]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


def batches(num_items: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` index batches, epoch-shuffled, dropping each epoch's remainder."""
    done = 0
    while done < steps:
        order = torch.randperm(num_items, generator=generator)
        for start in range(0, num_items - batch_size + 1, batch_size):
            if done == steps:
                return
            yield order[start:start + batch_size]
            done += 1


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def micro_config(**overrides) -> NepaConfig:
    return NepaConfig.from_preset("nepa-vit-micro", drop_path_rate=0.0, **overrides)


def mae_model():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    base = micro_config()
    config = ViTMAEConfig(
        hidden_size=base.hidden_size, num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads, intermediate_size=base.intermediate_size,
        image_size=base.image_size, patch_size=base.patch_size, num_channels=3, qkv_bias=True,
        decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
        decoder_intermediate_size=256, mask_ratio=0.75, norm_pix_loss=True,
    )
    return ViTMAEForPreTraining(config)


class ViTMeanPoolClassifier(nn.Module):
    """A transformers `ViTModel` with NEPA's classification head (mean of the patch tokens, LayerNorm, Linear), so
    MAE-pretrained and NEPA-pretrained encoders are fine-tuned and probed the same way."""

    def __init__(self, num_labels: int = 10):
        from transformers import ViTConfig, ViTModel

        base = micro_config()
        config = ViTConfig(
            hidden_size=base.hidden_size, num_hidden_layers=base.num_hidden_layers,
            num_attention_heads=base.num_attention_heads, intermediate_size=base.intermediate_size,
            image_size=base.image_size, patch_size=base.patch_size, num_channels=3, qkv_bias=True,
            attn_implementation="sdpa",
        )
        super().__init__()
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values).last_hidden_state[:, 1:].mean(1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc_norm(self.features(pixel_values)))

    def load_mae_encoder(self, mae_dir: Path) -> None:
        """Copy the MAE encoder (`vit.*` of ViTMAEForPreTraining: same key names as ViTModel) into `self.vit`."""
        from transformers import ViTMAEForPreTraining

        encoder = ViTMAEForPreTraining.from_pretrained(mae_dir).vit.state_dict()
        missing, unexpected = self.vit.load_state_dict(encoder, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"MAE encoder does not fit ViTModel: missing {missing}, unexpected {unexpected}")


def classifier_logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model(pixels) if isinstance(model, ViTMeanPoolClassifier) else model(pixel_values=pixels).logits


# --------------------------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def frozen_features(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    if isinstance(model, ViTMeanPoolClassifier):
        return torch.cat([model.features(to_pixels(chunk)) for chunk in images.split(batch_size)])
    # NEPA backbones are probed as pretrained (causal when pretrained causally), mean of the patch tokens.
    features, _ = extract_features(model, to_pixels(images), pooling="mean", batch_size=batch_size)
    return features


def probe(model: nn.Module, budget: Budget, data: dict, seed: int) -> dict:
    train_images, train_labels = data["train"]
    test_images, test_labels = data["test"]
    pick = label_subset(train_labels, budget.probe_train_images / len(train_labels), seed)
    train_features = frozen_features(model, train_images[pick])
    test_features = frozen_features(model, test_images[: budget.test_images])
    test_labels = test_labels[: budget.test_images]
    knn = knn_accuracy(train_features, train_labels[pick], test_features, test_labels, k=20)
    linear = linear_probe_accuracy(train_features, train_labels[pick], test_features, test_labels, epochs=50, seed=seed)
    return {"knn_top1": knn["accuracy"], "linear_probe_top1": linear["accuracy"],
            "probe_train_images": len(pick), "probe_test_images": len(test_labels)}


def pretrain_nepa(variant: str, seed: int, budget: Budget, data: dict, output: Path) -> dict:
    overrides, mask_ratio = NEPA_VARIANTS[variant]
    steps = budget.ablation_pretrain_steps if variant in ABLATION_RUNS else budget.pretrain_steps
    torch.manual_seed(seed)
    config = micro_config(**overrides)
    model = NepaForPreTraining(config)
    optimizer = create_pretraining_optimizer(model, budget.pretrain_lr, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    monitor = CollapseMonitor()
    images = data["train"][0]
    generator = torch.Generator().manual_seed(seed)
    num_patches = (config.image_size // config.patch_size) ** 2
    curve = []
    cpu_start = time.process_time()
    model.train()
    for step, index in enumerate(batches(len(images), budget.pretrain_batch, steps, generator), 1):
        pixels = to_pixels(augment(images[index], generator))
        mask = random_patch_mask(len(index), num_patches, mask_ratio, generator) if mask_ratio > 0 else None
        outputs = model(pixel_values=pixels, bool_masked_pos=mask)
        optimizer.zero_grad(set_to_none=True)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        schedule.step()
        if step % budget.log_every == 0 or step == steps:
            stats = monitor(outputs.last_hidden_state.detach())
            curve.append({"step": step, "loss": outputs.loss.item(), **stats, "cpu_s": time.process_time() - cpu_start})
    cpu_seconds = time.process_time() - cpu_start
    model.save_pretrained(output / "model")
    fashion_processor().save_pretrained(output / "model")
    result = {"kind": "pretrain", "method": variant, "seed": seed, "steps": steps,
              "batch_size": budget.pretrain_batch, "cpu_seconds": cpu_seconds, "final_loss": curve[-1]["loss"],
              "final_embedding_spread": curve[-1]["embedding_spread"], "final_mean_cosine": curve[-1]["mean_cosine"],
              "collapsed": monitor.collapsed, "curve": curve}
    result.update(probe(model, budget, data, seed))  # the backbone as pretrained (causal unless ablated)
    return result


def cpu_seconds_per_step(step_fn, steps: int = 8) -> float:
    step_fn()  # warm-up
    start = time.process_time()
    for _ in range(steps):
        step_fn()
    return (time.process_time() - start) / steps


def pretrain_mae(seed: int, budget: Budget, data: dict, output: Path) -> dict:
    """MAE with NEPA's pretraining CPU budget: both step costs are measured here, in one process, and MAE gets
    `nepa_steps * nepa_cost / mae_cost` steps (a load-independent way to match wall-clock at one thread)."""
    images = data["train"][0]
    generator = torch.Generator().manual_seed(seed)
    probe_pixels = to_pixels(images[: budget.pretrain_batch])

    def timed(model):
        optimizer = create_pretraining_optimizer(model, 1e-6)

        def step():
            loss = model(pixel_values=probe_pixels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return cpu_seconds_per_step(step)

    nepa_cost, mae_cost = timed(NepaForPreTraining(micro_config()).train()), timed(mae_model().train())
    steps = max(1, int(round(budget.pretrain_steps * nepa_cost / mae_cost)))

    torch.manual_seed(seed)
    model = mae_model()
    optimizer = create_pretraining_optimizer(model, budget.pretrain_lr, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    curve = []
    cpu_start = time.process_time()
    model.train()
    log_every = max(1, int(round(budget.log_every * steps / budget.pretrain_steps)))
    for step, index in enumerate(batches(len(images), budget.pretrain_batch, steps, generator), 1):
        pixels = to_pixels(augment(images[index], generator))
        loss = model(pixel_values=pixels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            curve.append({"step": step, "loss": loss.item(), "cpu_s": time.process_time() - cpu_start})
    cpu_seconds = time.process_time() - cpu_start
    model.save_pretrained(output / "model")
    result = {"kind": "pretrain", "method": "mae", "seed": seed, "steps": steps, "batch_size": budget.pretrain_batch,
              "cpu_seconds": cpu_seconds, "nepa_step_cpu_s": nepa_cost, "mae_step_cpu_s": mae_cost,
              "final_loss": curve[-1]["loss"], "curve": curve}
    encoder = ViTMeanPoolClassifier()
    encoder.load_mae_encoder(output / "model")
    result.update(probe(encoder, budget, data, seed))
    return result


def probe_random(seed: int, budget: Budget, data: dict, output: Path) -> dict:
    torch.manual_seed(seed)
    return {"kind": "probe", "method": "random-init", "seed": seed,
            # causal features, like the NEPA probes (a classifier's trunk attends per finetuning_is_causal)
            **probe(NepaForImageClassification(micro_config(finetuning_is_causal=True, num_labels=10)), budget, data,
                    seed)}


def build_classifier(init: str, seed: int, output_root: Path) -> nn.Module:
    torch.manual_seed(seed)
    if init == "scratch":
        return NepaForImageClassification(micro_config(is_causal=False, num_labels=10))
    if init == "vit-scratch":
        return ViTMeanPoolClassifier()
    if init == "mae":
        model = ViTMeanPoolClassifier()
        model.load_mae_encoder(output_root / unit_name("pretrain", "mae", PRETRAIN_SEED) / "model")
        return model
    # NEPA checkpoints load into the classifier bidirectional, with a zero-initialised head (the authors' fine-tuning setup).
    return NepaForImageClassification.from_pretrained(
        output_root / unit_name("pretrain", init, PRETRAIN_SEED) / "model", num_labels=10, drop_path_rate=0.0
    )


def finetune(init: str, fraction: float, seed: int, budget: Budget, data: dict, output_root: Path) -> dict:
    model = build_classifier(init, seed, output_root)
    groups = layer_decay_parameter_groups(model, budget.finetune_lr, weight_decay=0.05, layer_decay=budget.layer_decay,
                                          num_layers=micro_config().num_hidden_layers)
    optimizer = torch.optim.AdamW(groups, lr=budget.finetune_lr, betas=(0.9, 0.999))
    schedule = get_layerwise_cosine_schedule(optimizer, max(1, budget.finetune_steps // 10), budget.finetune_steps)
    train_images, train_labels = data["train"]
    subset = label_subset(train_labels, fraction, seed)
    images, labels = train_images[subset], train_labels[subset]
    generator = torch.Generator().manual_seed(seed)
    curve = []
    cpu_start = time.process_time()
    model.train()
    batch_size = min(budget.finetune_batch, len(subset))
    for step, index in enumerate(batches(len(subset), batch_size, budget.finetune_steps, generator), 1):
        logits = classifier_logits(model, to_pixels(augment(images[index], generator)))
        loss = F.cross_entropy(logits, labels[index], label_smoothing=budget.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        schedule.step()
        if step % budget.log_every == 0 or step == budget.finetune_steps:
            curve.append({"step": step, "loss": loss.item()})
    cpu_seconds = time.process_time() - cpu_start
    model.eval()
    test_images, test_labels = data["test"][0][: budget.test_images], data["test"][1][: budget.test_images]
    with torch.no_grad():
        predictions = torch.cat([classifier_logits(model, to_pixels(chunk)).argmax(-1)
                                 for chunk in test_images.split(500)])
    return {"kind": "finetune", "init": init, "fraction": fraction, "seed": seed, "train_images": len(subset),
            "steps": budget.finetune_steps, "batch_size": batch_size, "cpu_seconds": cpu_seconds,
            "test_top1": (predictions == test_labels).float().mean().item(), "test_images": len(test_labels),
            "final_train_loss": curve[-1]["loss"], "curve": curve}


# --------------------------------------------------------------------------------------------------------------
# The plan: units with dependencies, in priority order (headline numbers first).
# --------------------------------------------------------------------------------------------------------------


def unit_name(kind: str, method: str, seed: int, fraction: float | None = None) -> str:
    name = f"{kind}-{method}"
    if fraction is not None:
        name += f"-{int(round(fraction * 100))}pct"
    return f"{name}-s{seed}"


def plan(budget: Budget) -> list[tuple[str, list[str], list[str]]]:
    """[(unit, argv for `--unit`, dependencies)] in priority order: the pretraining runs and the seed-0 headline
    fine-tunes, the other seeds of the 10%-label headline, the ablations, then the 100%-label runs."""
    pretrained = {m: unit_name("pretrain", m, PRETRAIN_SEED) for m in ["nepa", "mae"] + ABLATION_RUNS}

    def finetune_unit(init, seed, fraction):
        deps = [pretrained[init]] if init in pretrained else []
        return unit_name("finetune", init, seed, fraction), ["finetune", init, str(seed), str(fraction)], deps

    units = [(pretrained[m], ["pretrain", m, str(PRETRAIN_SEED)], []) for m in ("nepa", "mae")]
    units += [finetune_unit(init, seed, 0.1) for seed in budget.finetune_seeds for init in ("nepa", "scratch", "mae")]
    units.append((unit_name("probe", "random-init", PRETRAIN_SEED), ["probe", "random-init", str(PRETRAIN_SEED)], []))
    for variant in ABLATION_RUNS:
        units.append((pretrained[variant], ["pretrain", variant, str(PRETRAIN_SEED)], []))
        units.append(finetune_unit(variant, budget.finetune_seeds[0], 0.1))
    units += [finetune_unit(init, budget.finetune_seeds[0], 1.0) for init in ("nepa", "scratch", "mae")]
    units.append(finetune_unit("vit-scratch", budget.finetune_seeds[0], 0.1))
    return units


def pid_alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def run_unit(argv: list[str], budget: Budget, output_root: Path) -> None:
    torch.set_num_threads(1)
    kind, method, seed = argv[0], argv[1], int(argv[2])
    data = {"train": load_split("train"), "test": load_split("test")}
    if kind == "pretrain":
        name = unit_name("pretrain", method, seed)
        output = output_root / name
        result = (pretrain_mae(seed, budget, data, output) if method == "mae"
                  else pretrain_nepa(method, seed, budget, data, output))
    elif kind == "probe":
        name = unit_name("probe", method, seed)
        output = output_root / name
        result = probe_random(seed, budget, data, output)
    else:
        fraction = float(argv[3])
        name = unit_name("finetune", method, seed, fraction)
        output = output_root / name
        result = finetune(method, fraction, seed, budget, data, output_root)
    output.mkdir(parents=True, exist_ok=True)
    result["unit"] = name
    result["torch_threads"] = torch.get_num_threads()
    (output / "result.json.tmp").write_text(json.dumps(result, indent=1))
    os.replace(output / "result.json.tmp", output / "result.json")  # a unit counts as done only when complete


def run_all(args, budget: Budget) -> None:
    output_root = Path(args.output_dir)
    output_root.mkdir(parents=True, exist_ok=True)
    pending = [u for u in plan(budget) if not (output_root / u[0] / "result.json").exists()]
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
        blocked = [u for u in pending if any(d in failed for d in u[2])]
        for unit in blocked:
            print(f"skipped (a dependency failed): {unit[0]}", flush=True)
            pending.remove(unit)
            failed.add(unit[0])
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


def load_results(output_root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(output_root.glob("*/result.json"))]


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = 100 * float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.1f} (1 seed)"
    return f"{mean:.1f} ± {100 * float(np.std(values, ddof=1)):.1f} (n={len(values)})"


def make_plots(results: list[dict], report_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    pretrain = [r for r in results if r["kind"] == "pretrain"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), dpi=80)
    for r in sorted(pretrain, key=lambda r: (r["method"], r["seed"])):
        steps = [c["step"] for c in r["curve"]]
        losses = [c["loss"] for c in r["curve"]]
        label = f"{r['method']} s{r['seed']}"
        if r["method"] == "mae":
            axes[1].plot([c["cpu_s"] for c in r["curve"]], losses, label=label, lw=1)
        else:
            axes[0].plot(steps, losses, label=label, lw=1)
            axes[2].plot(steps, [c["embedding_spread"] for c in r["curve"]], label=label, lw=1)
    axes[0].set(title="NEPA pretraining loss (neg. cosine)", xlabel="step", ylabel="loss")
    axes[1].set(title="MAE pretraining loss (norm-pix MSE)", xlabel="CPU seconds", ylabel="loss")
    axes[2].set(title="spread of predicted embeddings", xlabel="step", ylabel="embedding spread", yscale="log")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    figures["pretraining"] = "study_pretraining_curves.png"
    fig.savefig(report_dir / figures["pretraining"])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=80)
    for r in sorted([r for r in results if r["kind"] == "finetune"], key=lambda r: (r["init"], r["seed"])):
        if r["seed"] != 0:
            continue
        ax = axes[0 if r["fraction"] < 1 else 1]
        ax.plot([c["step"] for c in r["curve"]], [c["loss"] for c in r["curve"]], label=r["init"], lw=1)
    for ax, title in zip(axes, ("fine-tuning on 10% of the labels (seed 0)", "fine-tuning on 100% (seed 0)")):
        ax.set(title=title, xlabel="step", ylabel="train loss (label smoothing 0.1)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    figures["finetuning"] = "study_finetuning_curves.png"
    fig.savefig(report_dir / figures["finetuning"])
    plt.close(fig)
    return figures


def make_visualizations(output_root: Path, report_dir: Path) -> list[str]:
    """Attention / next-embedding similarity / PCA maps of the seed-0 NEPA backbone on a bundled photo (resized to
    64x64: RoPE runs at any resolution) and on a Fashion-MNIST test image."""
    from PIL import Image

    from nepa_hf.data.images import bundled_photo_paths
    from nepa_hf.evaluation.visualization import save_visualizations

    checkpoint = output_root / unit_name("pretrain", "nepa", 0) / "model"
    if not checkpoint.exists():
        return []
    model = NepaForPreTraining.from_pretrained(checkpoint, attn_implementation="eager")
    written = []
    photo = bundled_photo_paths()[0]
    for name, image, size, image_name in (
        ("photo", Image.open(photo).convert("L").convert("RGB"), 64, f"{photo.name} (greyscale)"),
        ("fashion", Image.fromarray(load_split("test")[0][0].numpy()).convert("RGB"), 32, "Fashion-MNIST test item 0"),
    ):
        # Written at their own size: each PNG carries its title, colourbar and notes (nepa_hf.evaluation.visualization).
        paths = save_visualizations(model, fashion_processor(size), image, report_dir, prefix=f"study_{name}_",
                                    model_name="seed-0 NEPA backbone (Fashion-MNIST study)", image_name=image_name)
        written.extend(Path(path).name for path in paths.values())
    return written


def write_report(args, budget: Budget) -> Path:
    output_root, report_dir = Path(args.output_dir), Path(args.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(output_root)
    if not results:
        raise SystemExit(f"no finished units in {output_root}: run the study first")
    for r in results:  # runs from before the processor was saved with the model
        folder = output_root / r["unit"] / "model"
        if r["kind"] == "pretrain" and r["method"] != "mae" and not (folder / "preprocessor_config.json").exists():
            fashion_processor().save_pretrained(folder)
    by = {r["unit"]: r for r in results}
    (report_dir / "study_results.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in results], indent=1))
    figures = make_plots(results, report_dir)
    maps = make_visualizations(output_root, report_dir)

    def finetune_values(init, fraction):
        return [r["test_top1"] for r in results
                if r["kind"] == "finetune" and r["init"] == init and r["fraction"] == fraction]

    def pretrain_values(method, key):
        return [r[key] for r in results if r["kind"] == "pretrain" and r["method"] == method]

    lines = [
        "## Fashion-MNIST study",
        "",
        f"Produced by `benchmarks/fashion_mnist_study.py` ({'quick smoke budget' if args.quick else 'full budget'}); "
        "every number below is read from the run's `result.json` files (copied without curves to "
        "`docs/study_results.json`).",
        "",
        "```bash",
        "python benchmarks/fashion_mnist_study.py --jobs 2      # all runs (resumable), then this report",
        "python benchmarks/fashion_mnist_study.py --report_only  # rewrite the report from finished runs",
        "```",
        "",
        f"**Setup.** Backbone nepa-vit-micro (D 128, 6 blocks, 4 heads, MLP 512, patch 4, 0.8M parameters) on 32x32 "
        f"inputs (the 28x28 images zero-padded; grey replicated to 3 channels; augmentation = random translation by "
        f"up to 4 px + horizontal flip). Each run is one process with one torch thread on the project's 2-core CPU "
        f"machine. Pretraining: {budget.pretrain_steps} steps x batch {budget.pretrain_batch} on the 60k training "
        f"images without labels, AdamW (0.9, 0.95) lr {budget.pretrain_lr:g} wd 0.05, 5% warmup + cosine, grad-clip "
        f"3. MAE: `ViTMAEForPreTraining`, same encoder dims, 75% masking, norm-pix loss, decoder 2 x D 64, same "
        f"optimiser, given as many steps as fit in NEPA's pretraining CPU time (step costs measured side by side in "
        f"its process). Fine-tuning (identical for every backbone): {budget.finetune_steps} steps x batch "
        f"{budget.finetune_batch}, AdamW lr {budget.finetune_lr:g} wd 0.05, layer-wise lr decay {budget.layer_decay} "
        f"with per-group warmup (10%) + cosine, label smoothing {budget.label_smoothing}, bidirectional attention, "
        f"mean pooling + LayerNorm + Linear head (zero init), no EMA/drop-path/Mixup. 10% labels = a class-balanced "
        f"6,000-image subset drawn per seed. Test: the {budget.test_images} test images. One pretraining run per method "
        f"(seed {PRETRAIN_SEED}: pretraining is the CPU-bound part); the fine-tuning seeds vary the head (or scratch) "
        f"initialisation, the data order and the label subset.",
        "",
        "### Fine-tuned top-1 (%), mean ± std over seeds",
        "",
        "| backbone | 10% labels | 100% labels |",
        "|---|---|---|",
    ]
    rows = [("NEPA-pretrained", "nepa"), ("MAE-pretrained (ViT encoder)", "mae"), ("scratch (NEPA architecture)",
            "scratch"), ("scratch (ViT architecture)", "vit-scratch")]
    for label, init in rows:
        lines.append(f"| {label} | {mean_std(finetune_values(init, 0.1))} | {mean_std(finetune_values(init, 1.0))} |")
    nepa10, scratch10, mae10 = (finetune_values(i, 0.1) for i in ("nepa", "scratch", "mae"))
    paired = [(by.get(unit_name("finetune", "nepa", s, 0.1)), by.get(unit_name("finetune", "scratch", s, 0.1)))
              for s in budget.finetune_seeds]
    gains = [100 * (a["test_top1"] - b["test_top1"]) for a, b in paired if a and b]
    if gains:
        lines += ["", f"Paired gain of NEPA over scratch at 10% labels, per seed: "
                      f"{', '.join(f'{g:+.1f}' for g in gains)} points (mean {np.mean(gains):+.1f})."]
    lines += [
        "",
        "### Pretraining and frozen features",
        "",
        "| backbone | pretraining steps | CPU s | final loss | kNN top-1 (k=20) | linear probe top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for label, method in (("NEPA", "nepa"), ("MAE", "mae"), ("random init (no pretraining)", "random-init")):
        rs = [r for r in results if r.get("method") == method]
        if not rs:
            continue
        steps = "—" if method == "random-init" else f"{int(np.mean([r['steps'] for r in rs]))}"
        cpu = "—" if method == "random-init" else f"{np.mean([r['cpu_seconds'] for r in rs]):.0f}"
        loss = "—" if method == "random-init" else f"{np.mean([r['final_loss'] for r in rs]):.3f}"
        lines.append(f"| {label} | {steps} | {cpu} | {loss} | {mean_std([r['knn_top1'] for r in rs])} | "
                     f"{mean_std([r['linear_probe_top1'] for r in rs])} |")
    lines += [
        "",
        "Probe protocol: mean-pooled final features (NEPA with the causal attention it was pretrained with), "
        f"{budget.probe_train_images} class-balanced training images, the test images; kNN weighted by "
        "exp(cos/0.07); linear probe = standardised features, AdamW, 50 epochs.",
        "",
        f"### Ablations (seed {PRETRAIN_SEED}, {budget.ablation_pretrain_steps} pretraining steps each, fine-tuned on 10% "
        "of the labels)",
        "",
        "| pretraining | final loss | embedding spread | mean cosine | collapsed | kNN top-1 | linear probe top-1 | "
        "fine-tuned top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in ABLATION_RUNS:
        p = by.get(unit_name("pretrain", variant, 0))
        f = by.get(unit_name("finetune", variant, 0, 0.1))
        if not p:
            continue
        finetuned = f"{100 * f['test_top1']:.1f}" if f else "n/a"
        lines.append(f"| {variant} | {p['final_loss']:.3f} | {p['final_embedding_spread']:.4f} | "
                     f"{p['final_mean_cosine']:.3f} | {'yes' if p['collapsed'] else 'no'} | {100 * p['knn_top1']:.1f} | "
                     f"{100 * p['linear_probe_top1']:.1f} | {finetuned} |")
    s0 = by.get(unit_name("finetune", "scratch", 0, 0.1))
    random_probe = by.get(unit_name("probe", "random-init", PRETRAIN_SEED))
    if s0 and random_probe:
        lines.append(f"| (no pretraining: random init / scratch) | — | — | — | — | {100 * random_probe['knn_top1']:.1f} | "
                     f"{100 * random_probe['linear_probe_top1']:.1f} | {100 * s0['test_top1']:.1f} |")
    lines += [
        "",
        "Embedding spread and mean cosine come from the library's `CollapseMonitor` on the last pretraining batch's "
        "predictions (spread: mean per-feature std of the L2-normalised predictions; collapse = spread below 0.05 "
        "or below 2% of its peak).",
        "",
        f"![pretraining curves]({figures['pretraining']})",
        "",
        f"![fine-tuning curves]({figures['finetuning']})",
    ]
    if maps:
        lines += [
            "",
            "### What the seed-0 NEPA backbone looks at",
            "",
            "Query patch marked; left to right: attention of the query (all layers and heads), similarity of its "
            "next-embedding prediction to every patch's input embedding, PCA of the patch features. A bundled photo "
            "(grey, 64x64: a resolution the model never saw) and a Fashion-MNIST test image. "
            "`python examples/visualize.py --model CHECKPOINT --image PATH` writes the same maps.",
            "",
            " ".join(f"![{m}]({m})" for m in maps if m.startswith("study_photo_")),
            "",
            " ".join(f"![{m}]({m})" for m in maps if m.startswith("study_fashion_")),
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
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "study"))
    parser.add_argument("--report_dir", default=str(REPO_ROOT / "docs"))
    parser.add_argument("--jobs", type=int, default=2, help="units run at once (each uses one thread)")
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
