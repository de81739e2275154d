"""Our optimizer groups and schedules against the authors' own, parameter by parameter (recipe-facts.json, produced by running their code).

`recipe-facts.json` (beside the reference, in the shared folder next to the repository) was made by running the
authors' training code on their ViT-B/14 layout: per fine-tuning parameter its weight decay, lr group, layer-decay
exponent and factor and its lr at 11 steps of their per-group warmup + cosine schedule; per pretraining parameter
their weight-decay flag. Here our `NepaForImageClassification` / `NepaForPreTraining` with the same presets, names
mapped with the converter's key mapping, must give the same numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nepa_hf import NepaConfig, NepaForImageClassification, NepaForPreTraining
from nepa_hf.models.nepa.convert_nepa import HEAD_KEYS, NEPA_PREFIX, REFERENCE_PREFIX, nepa_key_to_reference
from nepa_hf.training.finetuning import freeze_patch_embeddings, layer_decay_parameter_groups
from nepa_hf.training.optimization import (
    get_layerwise_cosine_schedule,
    pretraining_param_groups,
    reference_warmup_steps,
    weight_decay_flags,
)

FACTS_PATH = Path(__file__).resolve().parents[1].parent / "shared/reference/recipe-facts.json"
REL_TOL = 1e-9


@pytest.fixture(scope="module")
def facts() -> dict:
    if not FACTS_PATH.is_file():
        pytest.skip(f"{FACTS_PATH} is missing: the authors' recipe facts live in the shared folder beside the repo")
    return json.loads(FACTS_PATH.read_text())


def reference_name(name: str) -> str:
    """Our full parameter name -> the authors' (`nepa.X` -> `vit_nepa.` + mapped X; the head keys are shared)."""
    if name in HEAD_KEYS:
        return name
    assert name.startswith(NEPA_PREFIX), name
    mapped = nepa_key_to_reference(name[len(NEPA_PREFIX):])
    assert mapped is not None, f"the converter has no reference name for {name}"
    return REFERENCE_PREFIX + mapped


@pytest.fixture(scope="module")
def finetuning_model(facts) -> NepaForImageClassification:
    args = facts["args"]
    config = NepaConfig.from_preset("nepa-vit-b-in1k", num_labels=10)
    assert config.num_hidden_layers == args["layers"]
    with torch.device("meta"):  # names and shapes are all the groups need
        model = NepaForImageClassification(config)
    freeze_patch_embeddings(model)  # their `--freeze_embed`
    return model


def test_name_mapping_covers_exactly_the_reference_parameters(facts, finetuning_model):
    trainable = [name for name, p in finetuning_model.named_parameters() if p.requires_grad]
    mapped = [reference_name(name) for name in trainable]
    assert len(set(mapped)) == len(mapped)
    assert set(mapped) == set(facts["finetune"])
    for step_lrs in facts["finetune_lr"].values():
        assert set(step_lrs) == set(facts["finetune"])
    pretraining = NepaConfig.from_preset("nepa-vit-b")
    with torch.device("meta"):
        names = [name for name, _ in NepaForPreTraining(pretraining).named_parameters()]
    assert {reference_name(name) for name in names} == set(facts["pretrain_decay"])


def test_finetuning_groups_and_schedule_match_the_authors(facts, finetuning_model):
    args = facts["args"]
    num_layers, total = args["layers"], args["steps"]
    groups = layer_decay_parameter_groups(
        finetuning_model, learning_rate=args["base_lr"], weight_decay=0.05, layer_decay=args["llrd"],
        head_learning_rate=args["head_lr"],
    )
    group_of = {reference_name(name): index for index, group in enumerate(groups) for name in group["param_names"]}
    assert set(group_of) == set(facts["finetune"])

    # Per parameter: weight decay, lr group (head lr or backbone lr), layer-decay exponent and factor.
    for name, theirs in facts["finetune"].items():
        group = groups[group_of[name]]
        assert group["weight_decay"] == theirs["weight_decay"], name
        assert math.isclose(group["lr_scale"], theirs["factor"], rel_tol=REL_TOL), name
        layer_id = group["layer_id"]
        exponent = num_layers if layer_id == 0 else (num_layers - layer_id if layer_id <= num_layers else 0)
        assert exponent == theirs["layer_scale_exponent"], name
        is_head = group["name"].startswith("head.")
        assert is_head == (theirs["lr"] == args["head_lr"]), name
        peak = theirs["lr"] * (1.0 if is_head else theirs["factor"])
        assert math.isclose(group["lr"], peak, rel_tol=REL_TOL), name
    # The deviations this file was written for: fc_norm at the backbone lr, the final norm at the head lr, a
    # decayed CLS token.
    assert groups[group_of["fc_norm.weight"]]["lr"] == args["base_lr"]
    assert groups[group_of["vit_nepa.layernorm.weight"]]["lr"] == args["head_lr"]
    assert groups[group_of["vit_nepa.embeddings.cls_token"]]["weight_decay"] == 0.05

    # Per parameter and step: the lr of our per-group schedule with the reference's W = int(0.2 x 100) = 20.
    warmup = reference_warmup_steps(args["warmup_ratio"], total)
    assert warmup == args["num_warmup_steps"] == 20
    for group in groups:
        group.pop("param_names")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    schedule = get_layerwise_cosine_schedule(optimizer, warmup, total)
    wanted = {int(step): lrs for step, lrs in facts["finetune_lr"].items()}
    assert max(wanted) < total
    worst, compared = 0.0, 0
    for step in range(max(wanted) + 1):
        if step in wanted:
            for name, lr in wanted[step].items():
                ours = optimizer.param_groups[group_of[name]]["lr"]
                if lr == 0.0:
                    assert ours == 0.0, (name, step, ours)
                else:
                    error = abs(ours - lr) / lr
                    assert error <= REL_TOL, (name, step, ours, lr)
                    worst = max(worst, error)
                compared += 1
        optimizer.step()  # no gradients (meta parameters): a no-op that keeps the scheduler's step order
        schedule.step()
    assert compared == len(wanted) * len(facts["finetune"])
    print(f"max relative lr error over {compared} (parameter, step) pairs: {worst:.3g}")


def test_pretraining_weight_decay_matches_the_authors(facts):
    config = NepaConfig.from_preset("nepa-vit-b")
    with torch.device("meta"):
        model = NepaForPreTraining(config)
    flags = {reference_name(name): flag for name, flag in weight_decay_flags(model).items()}
    assert flags == facts["pretrain_decay"]
    decay, no_decay = pretraining_param_groups(model, weight_decay=0.05)
    names = {id(p): reference_name(n) for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {n for n, f in facts["pretrain_decay"].items() if f}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, f in facts["pretrain_decay"].items() if not f}
    assert facts["pretrain_decay"]["vit_nepa.embeddings.cls_token"] is True  # the CLS token is decayed
