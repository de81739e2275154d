"""The reference fine-tuning recipe as Trainer pieces: LLRD groups, per-group schedule, EMA callback, NepaTrainer."""

import math

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

from nepa_hf import NepaConfig, NepaForImageClassification, NepaModel
from nepa_hf.data.augmentation import AugmentationArguments
from nepa_hf.data.classification import collate_image_batch
from nepa_hf.training.ema import create_ema, load_ema, sharded_parameter_name
from nepa_hf.evaluation.features import classification_metrics
from nepa_hf.training.finetuning import (
    EMA_WEIGHTS_NAME,
    NepaTrainer,
    NepaTrainingArguments,
    freeze_patch_embeddings,
    layer_decay_parameter_groups,
)
from nepa_hf.training.optimization import get_layerwise_cosine_schedule, layerwise_warmup_steps, reference_warmup_steps


def tiny_classifier(num_layers: int = 4, num_labels: int = 3) -> NepaForImageClassification:
    torch.manual_seed(0)
    config = NepaConfig(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=64,
                        patch_size=4, image_size=8, is_causal=False, num_labels=num_labels)
    return NepaForImageClassification(config)


def expected_factor(name: str, num_layers: int, decay: float) -> float:
    if ".embeddings." in f".{name}":
        return decay**num_layers
    if ".encoder.layers." in name:
        index = int(name.split(".encoder.layers.")[1].split(".")[0])
        return decay ** (num_layers - 1 - index)
    return 1.0


def owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def test_layer_decay_groups_match_the_reference_formula():
    """The authors' rule: block i decay^(L-1-i), embeddings (CLS token too) decay^L; the head lr goes to the classifier and
    the backbone's final norm only, fc_norm trains at the backbone lr with factor 1; weight decay on every weight
    matrix/kernel and on the CLS token, never on a 1-D parameter."""
    model = tiny_classifier(num_layers=4)
    groups = layer_decay_parameter_groups(model, learning_rate=1e-3, weight_decay=0.05, layer_decay=0.65,
                                          head_learning_rate=5e-3)
    seen = {}
    for group in groups:
        for name, parameter in zip(group["param_names"], group["params"]):
            assert name not in seen
            seen[name] = group
            factor = expected_factor(name, 4, 0.65)
            head = name.startswith(("classifier.", "nepa.norm."))
            assert math.isclose(group["lr"], 5e-3 if head else 1e-3 * factor), name
            assert math.isclose(group["lr_scale"], factor), name
            # decayed: weights of Linear/Conv layers and the learned token; never biases, norms or LayerScale
            decayed = name.endswith("cls_token") or (
                isinstance(owner(model, name), (nn.Linear, nn.Conv2d)) and name.endswith(".weight"))
            assert group["weight_decay"] == (0.05 if decayed else 0.0), name
    assert set(seen) == {name for name, _ in model.named_parameters()}
    # spot checks against hand-computed values
    assert math.isclose(seen["nepa.embeddings.cls_token"]["lr"], 1e-3 * 0.65**4)
    assert seen["nepa.embeddings.cls_token"]["weight_decay"] == 0.05  # the authors decay the CLS token
    assert seen["nepa.embeddings.patch_embeddings.projection.weight"]["weight_decay"] == 0.05
    assert math.isclose(seen["nepa.encoder.layers.0.mlp.up_proj.weight"]["lr"], 1e-3 * 0.65**3)
    assert seen["nepa.encoder.layers.2.layer_scale1.lambda1"]["weight_decay"] == 0.0
    assert seen["nepa.encoder.layers.2.norm2.weight"]["weight_decay"] == 0.0
    assert math.isclose(seen["nepa.encoder.layers.3.attention.q_proj.weight"]["lr"], 1e-3)
    for head_name in ("nepa.norm.weight", "nepa.norm.bias", "classifier.weight", "classifier.bias"):
        assert seen[head_name]["lr"] == 5e-3 and seen[head_name]["lr_scale"] == 1.0
        assert seen[head_name]["name"].startswith("head.")
    for name in ("fc_norm.weight", "fc_norm.bias"):  # not the head: backbone lr, factor 1, no decay
        assert seen[name]["lr"] == 1e-3 and seen[name]["lr_scale"] == 1.0 and seen[name]["weight_decay"] == 0.0
        assert seen[name]["name"] == "other.no_decay"
    assert seen["classifier.weight"]["weight_decay"] == 0.05 and seen["classifier.bias"]["weight_decay"] == 0.0


def test_one_weight_decay_rule_for_pretraining_and_finetuning():
    """The pretraining rule decays every weight and the tokens but no bias, norm or LayerScale; fine-tuning decays
    the same parameters minus the 1-D ones (there are none among the decayed here), through the same function."""
    from nepa_hf.training.optimization import decays_in_pretraining, pretraining_param_groups, weight_decay_flags

    model = NepaForImageClassification(NepaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4,
        image_size=8, num_labels=3, qk_norm=True, qk_norm_affine=True, use_mask_token=True))
    pretraining = weight_decay_flags(model)
    finetuning = weight_decay_flags(model, finetuning=True)
    for name, parameter in model.named_parameters():
        module = owner(model, name)
        weight = isinstance(module, (nn.Linear, nn.Conv2d)) and name.endswith(".weight")
        token = name.endswith(("cls_token", "mask_token"))
        assert pretraining[name] == (weight or token), name
        assert finetuning[name] == (pretraining[name] and parameter.ndim > 1), name
        assert decays_in_pretraining(name) == pretraining[name], name  # our names alone give the rule
    assert pretraining["nepa.encoder.layers.0.attention.q_norm.weight"] is False
    assert finetuning["nepa.embeddings.cls_token"] is True
    # names alone give the rule for our norms and LayerScale, and for the authors' names
    for name in ("nepa.encoder.layers.0.norm1.weight", "nepa.norm.bias", "fc_norm.weight",
                 "encoder.layer.0.attention.attention.k_norm.weight", "vit_nepa.layernorm.weight",
                 "encoder.layers.1.layer_scale2.lambda1", "encoder.layer.1.output.layer_scale.lambda1"):
        assert not decays_in_pretraining(name), name
    for name in ("nepa.embeddings.cls_token", "nepa.encoder.layers.0.mlp.up_proj.weight", "normalizer.weight"):
        assert decays_in_pretraining(name), name
    # a LayerNorm module is never decayed, whatever its name
    wrapper = nn.ModuleDict({"final": nn.LayerNorm(4), "proj": nn.Linear(4, 4)})
    assert weight_decay_flags(wrapper) == {"final.weight": False, "final.bias": False, "proj.weight": True,
                                           "proj.bias": False}
    decay, no_decay = pretraining_param_groups(wrapper)
    assert decay["params"] == [wrapper["proj"].weight] and len(no_decay["params"]) == 3


def test_layer_decay_groups_are_generic_and_skip_frozen_parameters():
    class Segmenter(nn.Module):  # any model holding a NEPA backbone, e.g. a segmentation model
        def __init__(self):
            super().__init__()
            self.backbone = NepaModel(tiny_classifier(num_layers=3).config)
            self.neck = nn.Conv2d(32, 32, 1)
            self.decode_head = nn.Conv2d(32, 5, 1)

    model = Segmenter()
    frozen = freeze_patch_embeddings(model)
    assert frozen == sum(p.numel() for p in model.backbone.embeddings.patch_embeddings.parameters())
    groups = layer_decay_parameter_groups(model, learning_rate=1.0, layer_decay=0.5, head_learning_rate=3.0)
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert "backbone.embeddings.patch_embeddings.projection.weight" not in by_name
    assert by_name["backbone.embeddings.cls_token"]["lr"] == 0.5**3
    assert by_name["backbone.encoder.layers.1.norm1.weight"]["lr"] == 0.5
    # head lr: the task head and the backbone's final norm; the neck trains at the backbone lr with factor 1
    assert by_name["decode_head.weight"]["lr"] == 3.0 and by_name["decode_head.bias"]["weight_decay"] == 0.0
    assert by_name["backbone.norm.weight"]["lr"] == 3.0
    assert by_name["neck.weight"]["lr"] == 1.0 and by_name["neck.weight"]["lr_scale"] == 1.0
    assert by_name["neck.weight"]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="encoder.layers.N"):
        layer_decay_parameter_groups(nn.Linear(2, 2), learning_rate=1.0)
    with pytest.raises(ValueError, match="patch_embeddings"):
        freeze_patch_embeddings(nn.Linear(2, 2))


def test_layer_decay_groups_also_read_transformers_vit_block_names():
    """Baselines such as an MAE-pretrained transformers ViT get the same recipe (benchmarks compare them)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    config = ViTConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4, num_labels=3)
    vit = ViTModel(config, add_pooling_layer=False)
    groups = layer_decay_parameter_groups(vit, learning_rate=1.0, layer_decay=0.5, head_learning_rate=3.0)
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert by_name["embeddings.position_embeddings"]["lr"] == 0.5**3
    # the one rule: a learned [1, N, D] table is decayed like the CLS token
    assert by_name["embeddings.position_embeddings"]["weight_decay"] == 0.05
    block = {name.split(".")[0] for name in by_name if "0." in name and "attention" in name}.pop()
    assert block in ("layers", "encoder")  # ViT's blocks: `layers.N` in newer transformers, `encoder.layer.N` before
    prefix = "layers" if block == "layers" else "encoder.layer"
    first = [name for name in by_name if name.startswith(f"{prefix}.0.")]
    last = [name for name in by_name if name.startswith(f"{prefix}.2.") and name.endswith("weight")]
    assert first and last
    assert all(by_name[name]["lr"] == 0.5**2 for name in first)
    assert all(by_name[name]["lr"] == 1.0 for name in last)
    assert all(by_name[name]["weight_decay"] == 0.0 for name in first if "layernorm" in name or name.endswith("bias"))
    assert by_name["layernorm.weight"]["lr_scale"] == 1.0 and by_name["layernorm.weight"]["lr"] == 3.0  # final norm

    classifier = ViTForImageClassification(config)
    by_name = {name: group for group in layer_decay_parameter_groups(classifier, 1.0, head_learning_rate=3.0)
               for name in group["param_names"]}
    assert by_name["vit.layernorm.bias"]["lr"] == by_name["classifier.weight"]["lr"] == 3.0


def test_per_group_warmup_worked_example():
    """The authors' schedule: L=4, decay 0.65, 100 steps, warmup ratio 0.2 -> W=20; a group with factor f warms up over
    max(1, W - round(W * f)) steps: embeddings 16, blocks 0-3: 15, 12, 7, 1, head and fc_norm 1."""
    args = NepaTrainingArguments(output_dir="unused", warmup_steps=0.2, report_to="none")
    warmup = reference_warmup_steps(args.warmup_steps, 100)
    assert warmup == 20 == args.get_warmup_steps(100)
    # W = int(ratio x total) like the reference, where transformers rounds up
    assert reference_warmup_steps(0.2, 101) == 20 and args.get_warmup_steps(101) == 21
    assert reference_warmup_steps(0.3, 10) == 3 and reference_warmup_steps(25, 100) == 25
    model = tiny_classifier(num_layers=4)
    groups = layer_decay_parameter_groups(model, learning_rate=1e-3, layer_decay=0.65)
    per_layer = {group["layer_id"]: layerwise_warmup_steps(warmup, group["lr_scale"], 100) for group in groups}
    assert per_layer == {0: 16, 1: 15, 2: 12, 3: 7, 4: 1, 5: 1}
    # with no warmup at all every group still starts at lr 0 and reaches its peak after one step
    assert {layerwise_warmup_steps(0, group["lr_scale"], 100) for group in groups} == {1}

    for group in groups:
        group.pop("param_names")
    optimizer = torch.optim.AdamW(groups)
    schedule = get_layerwise_cosine_schedule(optimizer, warmup, 100)
    lrs = {}
    for step in range(100):
        lrs[step] = [group["lr"] for group in optimizer.param_groups]
        optimizer.step()
        schedule.step()
    embeddings = 0  # first group: embeddings
    factor = 0.65**4
    assert all(lr == 0.0 for lr in lrs[0])  # every group starts at 0
    assert math.isclose(lrs[8][embeddings], 1e-3 * factor * 8 / 16)
    assert math.isclose(lrs[16][embeddings], 1e-3 * factor)  # warmup done, cosine starts at the top
    assert math.isclose(lrs[58][embeddings], 1e-3 * factor * 0.5 * (1 + math.cos(math.pi * (58 - 16) / 84)))
    head = len(groups) - 1
    assert optimizer.param_groups[head]["name"].startswith("head.")
    assert lrs[0][head] == 0.0 and math.isclose(lrs[1][head], 1e-3)  # one-step warmup
    assert math.isclose(lrs[50][head], 1e-3 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert lrs[99][head] < 1e-6


def pixel_dataset(count: int, num_labels: int = 3, size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % num_labels
    images = torch.rand((count, 3, size, size), generator=generator) * 2 - 1
    for i, label in enumerate(labels.tolist()):
        images[i, label] = 1.0  # learnable: the class is the saturated channel
    return [{"pixel_values": images[i], "labels": int(labels[i])} for i in range(count)]


def make_trainer(output_dir, max_steps=4, **overrides) -> NepaTrainer:
    options = dict(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        save_steps=2, logging_steps=1, report_to="none", seed=0, ema_decay=0.5, learning_rate=1e-2,
        use_cpu=True, disable_tqdm=True, label_smoothing_factor=0.0,
    )
    options.update(overrides)
    args = NepaTrainingArguments(**options)
    return NepaTrainer(model=tiny_classifier(num_layers=2), args=args, train_dataset=pixel_dataset(8),
                       eval_dataset=pixel_dataset(6, seed=1), data_collator=collate_image_batch,
                       compute_metrics=classification_metrics(3))


def test_ema_refuses_a_sharded_model_with_a_clear_error():
    """Under FSDP or DeepSpeed ZeRO-3 each process holds a shard: an EMA copy would average partial weights (FSDP2's
    DTensors are covered end to end by the sharded pretraining test)."""
    model = tiny_classifier(num_layers=1)
    assert sharded_parameter_name(model) is None
    model.nepa.embeddings.cls_token.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert sharded_parameter_name(model) == "nepa.embeddings.cls_token"
    with pytest.raises(ValueError, match=r"Cannot keep an EMA of a sharded model \(parameter 'nepa.embeddings.cls_token'.*"
                                         r"--ema_decay 0"):
        create_ema(model)


def test_ema_callback_updates_per_step_saves_and_resumes(tmp_path):
    first = make_trainer(tmp_path / "a")
    initial = {k: v.clone() for k, v in first.model.state_dict().items()}
    recorded = []

    class Recorder(TrainerCallback):  # sees the weights after each optimizer step, like the EMA callback
        def on_step_end(self, args, state, control, model=None, **kwargs):
            recorded.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    first.add_callback(Recorder())
    first.train()
    ema = first.ema
    assert len(recorded) == 4
    expected = {k: v.float() for k, v in initial.items() if v.is_floating_point()}
    for weights in recorded:  # ema = 0.5 * ema + 0.5 * w, once per optimizer step
        expected = {k: 0.5 * v + 0.5 * weights[k].float() for k, v in expected.items()}
    for name, value in expected.items():
        torch.testing.assert_close(ema.module.state_dict()[name], value)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / EMA_WEIGHTS_NAME).is_file() and (tmp_path / "a" / "checkpoint-4" / EMA_WEIGHTS_NAME).is_file()

    # Resume from step 2 in a fresh trainer: the EMA comes back from ema.safetensors and ends where run A ended.
    second = make_trainer(tmp_path / "b")
    second.train(resume_from_checkpoint=str(checkpoint))
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(second.ema.module.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    for name, value in first.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    loaded = create_ema(tiny_classifier(num_layers=2))
    load_ema(loaded, checkpoint / EMA_WEIGHTS_NAME)
    assert not torch.equal(loaded.module.classifier.weight, ema.module.classifier.weight)  # step 2, not step 4


def test_ema_is_evaluated_beside_the_online_model_and_can_be_the_best(tmp_path):
    trainer = make_trainer(tmp_path, ema_decay=1.0, eval_strategy="steps", eval_steps=2,
                           load_best_model_at_end=True, metric_for_best_model="ema_loss", greater_is_better=False)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    before = trainer.evaluate()
    assert "eval_ema_loss" not in before  # no EMA before training
    trainer.train()
    evaluations = [log for log in trainer.state.log_history if "eval_ema_loss" in log]
    assert len(evaluations) == 2
    for log in evaluations:
        assert {"eval_loss", "eval_accuracy", "eval_ema_loss", "eval_ema_accuracy"} <= set(log)
        # decay 1.0: the EMA never leaves the initial weights, so it scores like the initial model ...
        assert math.isclose(log["eval_ema_loss"], before["eval_loss"], rel_tol=1e-5)
        # ... while the online weights moved
        assert not math.isclose(log["eval_loss"], before["eval_loss"], rel_tol=1e-3)
    # best checkpoint picked on the EMA metric -> its EMA weights (here: the initial ones) end up in the model
    assert trainer.state.best_model_checkpoint is not None
    for name, value in initial.items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / EMA_WEIGHTS_NAME).is_file()


def test_nepa_trainer_builds_llrd_optimizer_and_layerwise_schedule(tmp_path):
    trainer = make_trainer(tmp_path, layer_decay=0.5, head_learning_rate=3e-3, warmup_steps=0.5,
                           freeze_patch_embeddings=True, ema_decay=0.0)
    trainer.create_optimizer_and_scheduler(num_training_steps=13)
    groups = trainer.optimizer.param_groups
    lrs = {group["name"]: group["initial_lr"] for group in groups}
    assert lrs == {
        "embeddings.decay": pytest.approx(1e-2 * 0.25),  # the CLS token (the patch embedding is frozen)
        "layers.0.no_decay": pytest.approx(1e-2 * 0.5), "layers.0.decay": pytest.approx(1e-2 * 0.5),
        "layers.1.no_decay": pytest.approx(1e-2), "layers.1.decay": pytest.approx(1e-2),
        "other.no_decay": pytest.approx(1e-2),  # fc_norm: backbone lr, factor 1
        "head.no_decay": 3e-3, "head.decay": 3e-3,  # the backbone's final norm and the classifier
    }
    assert not trainer.model.nepa.embeddings.patch_embeddings.projection.weight.requires_grad
    assert trainer.ema_callback is None
    # W = int(0.5 x 13) = 6 (transformers' ceil would give 7 and a 5-step warmup for the embeddings): the embeddings
    # (f 0.25) warm up 6 - round(1.5) = 4 steps, block 0 (f 0.5) 6 - round(3) = 3 steps, block 1, fc_norm and the
    # head 1 step.
    index = {group["name"]: i for i, group in enumerate(groups)}
    lambdas = trainer.lr_scheduler.lr_lambdas
    assert [lambdas[index["embeddings.decay"]](step) for step in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [lambdas[index["layers.0.decay"]](step) for step in range(4)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    for name in ("layers.1.decay", "other.no_decay", "head.decay"):
        assert lambdas[index[name]](0) == 0.0 and lambdas[index[name]](1) == 1.0
    assert lambdas[index["head.decay"]](6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 12)))


def test_label_smoothing_is_never_applied_twice(tmp_path):
    collator = AugmentationArguments().collator(3, label_smoothing=0.1)
    args = NepaTrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.2, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="would stack"):
        NepaTrainer(model=tiny_classifier(), args=args, data_collator=collator)
    args = NepaTrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to="none", use_cpu=True)
    trainer = NepaTrainer(model=tiny_classifier(), args=args, data_collator=collator)
    assert trainer.label_smoother is None  # smoothing lives in the soft targets only
    args = NepaTrainingArguments(output_dir=str(tmp_path), metric_for_best_model="ema_accuracy", ema_decay=0.0,
                                 report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="needs an EMA"):
        NepaTrainer(model=tiny_classifier(), args=args)


def test_eval_at_fractions_needs_an_evaluation_set_and_fractions_in_range(tmp_path):
    """--eval_at_fractions evaluates during training: refused up front without an eval_dataset (it would fail at the
    first fraction, mid-run) and for fractions outside (0, 1]."""
    from nepa_hf.training.trainer_callbacks import EvaluateAtFractionsCallback, steps_at_fractions

    args = NepaTrainingArguments(output_dir=str(tmp_path), eval_at_fractions=[0.5, 1.0], report_to="none",
                                 use_cpu=True)
    train = [{"pixel_values": torch.zeros(3, 8, 8), "labels": 0}] * 4
    with pytest.raises(ValueError, match="eval_at_fractions evaluates during training, but the Trainer has no"):
        NepaTrainer(model=tiny_classifier(), args=args, train_dataset=train, data_collator=collate_image_batch)
    trainer = NepaTrainer(model=tiny_classifier(), args=args, train_dataset=train, eval_dataset=train,
                          data_collator=collate_image_batch)
    assert any(isinstance(cb, EvaluateAtFractionsCallback) for cb in trainer.callback_handler.callbacks)
    assert steps_at_fractions([0.25, 0.5, 0.8, 1.0], 10) == {2, 5, 8, 10}  # round(2.5) = 2: Python's rounding
    assert steps_at_fractions([0.01], 10) == {1}
    with pytest.raises(ValueError, match=r"in \(0, 1\], got \[0.0\]"):
        NepaTrainingArguments(output_dir=str(tmp_path), eval_at_fractions=[0.0])
