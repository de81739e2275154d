"""The reference fine-tuning recipe as Trainer pieces: LLRD groups, per-group schedule, EMA callback, NepaTrainer."""

import math

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

from nepa_hf import NepaConfig, NepaForImageClassification, NepaModel
from nepa_hf.augmentation import AugmentationArguments
from nepa_hf.classification_data import collate_image_batch
from nepa_hf.ema import create_ema, load_ema
from nepa_hf.evaluation import classification_metrics
from nepa_hf.finetuning import (
    EMA_WEIGHTS_NAME,
    EMACallback,
    NepaTrainer,
    NepaTrainingArguments,
    freeze_patch_embeddings,
    get_layerwise_cosine_schedule,
    layer_decay_parameter_groups,
    layerwise_warmup_steps,
)


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


def test_layer_decay_groups_match_the_reference_formula():
    model = tiny_classifier(num_layers=4)
    groups = layer_decay_parameter_groups(model, learning_rate=1e-3, weight_decay=0.05, layer_decay=0.65,
                                          head_learning_rate=5e-3)
    seen = {}
    for group in groups:
        for name, parameter in zip(group["param_names"], group["params"]):
            assert name not in seen
            seen[name] = group
            factor = expected_factor(name, 4, 0.65)
            head = not (name.startswith("nepa.embeddings.") or name.startswith("nepa.encoder.layers."))
            assert math.isclose(group["lr"], 5e-3 if head else 1e-3 * factor), name
            assert math.isclose(group["lr_scale"], factor), name
            no_decay = parameter.ndim <= 1 or name.endswith("cls_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert set(seen) == {name for name, _ in model.named_parameters()}
    # spot checks against hand-computed values
    assert math.isclose(seen["nepa.embeddings.cls_token"]["lr"], 1e-3 * 0.65**4)
    assert seen["nepa.embeddings.cls_token"]["weight_decay"] == 0.0
    assert math.isclose(seen["nepa.encoder.layers.0.mlp.up_proj.weight"]["lr"], 1e-3 * 0.65**3)
    assert seen["nepa.encoder.layers.2.layer_scale1.lambda1"]["weight_decay"] == 0.0
    assert math.isclose(seen["nepa.encoder.layers.3.attention.q_proj.weight"]["lr"], 1e-3)
    for head_name in ("nepa.norm.weight", "fc_norm.bias", "classifier.weight"):
        assert seen[head_name]["lr"] == 5e-3 and seen[head_name]["lr_scale"] == 1.0
    assert seen["classifier.weight"]["weight_decay"] == 0.05


def test_layer_decay_groups_are_generic_and_skip_frozen_parameters():
    class Segmenter(nn.Module):  # any model holding a NEPA backbone, e.g. a segmentation model
        def __init__(self):
            super().__init__()
            self.backbone = NepaModel(tiny_classifier(num_layers=3).config)
            self.decode_head = nn.Conv2d(32, 5, 1)

    model = Segmenter()
    frozen = freeze_patch_embeddings(model)
    assert frozen == sum(p.numel() for p in model.backbone.embeddings.patch_embeddings.parameters())
    groups = layer_decay_parameter_groups(model, learning_rate=1.0, layer_decay=0.5)
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert "backbone.embeddings.patch_embeddings.projection.weight" not in by_name
    assert by_name["backbone.embeddings.cls_token"]["lr"] == 0.5**3
    assert by_name["backbone.encoder.layers.1.norm1.weight"]["lr"] == 0.5
    assert by_name["decode_head.weight"]["lr"] == 1.0 and by_name["decode_head.bias"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="encoder.layers.N"):
        layer_decay_parameter_groups(nn.Linear(2, 2), learning_rate=1.0)
    with pytest.raises(ValueError, match="patch_embeddings"):
        freeze_patch_embeddings(nn.Linear(2, 2))


def test_layer_decay_groups_also_read_transformers_vit_block_names():
    """Baselines such as an MAE-pretrained transformers ViT get the same recipe (benchmarks compare them)."""
    from transformers import ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                             image_size=8, patch_size=4), add_pooling_layer=False)
    groups = layer_decay_parameter_groups(vit, learning_rate=1.0, layer_decay=0.5)
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert by_name["embeddings.position_embeddings"]["lr"] == 0.5**3
    assert by_name["embeddings.position_embeddings"]["weight_decay"] == 0.0
    block = {name.split(".")[0] for name in by_name if "0." in name and "attention" in name}.pop()
    assert block in ("layers", "encoder")  # transformers 5.23 `layers.N`; earlier releases `encoder.layer.N`
    prefix = "layers" if block == "layers" else "encoder.layer"
    first = [name for name in by_name if name.startswith(f"{prefix}.0.")]
    last = [name for name in by_name if name.startswith(f"{prefix}.2.") and name.endswith("weight")]
    assert first and last
    assert all(by_name[name]["lr"] == 0.5**2 for name in first)
    assert all(by_name[name]["lr"] == 1.0 for name in last)
    assert by_name["layernorm.weight"]["lr_scale"] == 1.0


def test_per_group_warmup_worked_example():
    """Reference §8: L=4, decay 0.65, 100 steps, warmup ratio 0.2 -> W=20; a group with factor f warms up over
    W - round(W * f) steps (>= 1): embeddings 16, blocks 0-3: 15, 12, 7, 1, head 1."""
    args = NepaTrainingArguments(output_dir="unused", warmup_steps=0.2, report_to="none")
    warmup = args.get_warmup_steps(100)
    assert warmup == 20
    model = tiny_classifier(num_layers=4)
    groups = layer_decay_parameter_groups(model, learning_rate=1e-3, layer_decay=0.65)
    per_layer = {group["layer_id"]: layerwise_warmup_steps(warmup, group["lr_scale"], 100) for group in groups}
    assert per_layer == {0: 16, 1: 15, 2: 12, 3: 7, 4: 1, 5: 1}

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
    assert lrs[0][embeddings] == 0.0
    assert math.isclose(lrs[8][embeddings], 1e-3 * factor * 8 / 16)
    assert math.isclose(lrs[16][embeddings], 1e-3 * factor)  # warmup done, cosine starts at the top
    assert math.isclose(lrs[58][embeddings], 1e-3 * factor * 0.5 * (1 + math.cos(math.pi * (58 - 16) / 84)))
    head = len(groups) - 1
    assert lrs[0][head] == 0.0 and math.isclose(lrs[1][head], 1e-3)  # one-step warmup
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
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    lrs = {group["layer_id"]: group["initial_lr"] for group in trainer.optimizer.param_groups}
    assert lrs == {0: pytest.approx(1e-2 * 0.25), 1: pytest.approx(1e-2 * 0.5), 2: pytest.approx(1e-2), 3: 3e-3}
    assert not trainer.model.nepa.embeddings.patch_embeddings.projection.weight.requires_grad
    assert trainer.ema_callback is None
    # W = 5: embeddings (f 0.25) warm up 5 - round(1.25) = 4 steps, block 0 (f 0.5) 5 - round(2.5) = 3 steps
    factors = [lambda_(4) for lambda_ in trainer.lr_scheduler.lr_lambdas]
    by_layer = dict(zip((g["layer_id"] for g in trainer.optimizer.param_groups), factors))
    assert by_layer[0] == 1.0 and by_layer[1] < 1.0 and by_layer[3] < 1.0  # block 0 past its 3-step warmup
    assert trainer.lr_scheduler.lr_lambdas[0](2) == pytest.approx(0.5)  # embeddings halfway through 4 steps


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
