"""The authors' fine-tuning recipe as pieces for `transformers.Trainer`.

* `layer_decay_parameter_groups`: layer-wise lr decay groups for any model holding a NEPA backbone
  (`embeddings`, `encoder.layers.N`); the head lr goes to the task heads and the backbone's final norm; weight decay
  on the >1-D parameters the pretraining rule decays (`nepa_hf.training.optimization`: the CLS token is decayed).
* The authors' per-group warmup + cosine schedule and their warmup length live in `nepa_hf.training.optimization`
  (`get_layerwise_cosine_schedule`, `reference_warmup_steps`); `NepaTrainer` uses them.
* `EMACallback`: EMA of the weights (timm's `ModelEmaV3`, fp32, see `nepa_hf.training.ema`) updated per optimizer step,
  saved as `ema.safetensors` in every checkpoint and restored on resume; works with any Trainer.
* `AutoWorkersTrainingArguments`: `TrainingArguments` with DataLoader workers by device (see `nepa_hf.data.workers`).
* `NepaTrainingArguments` + `NepaTrainer`: a Trainer that wires the above together, freezes the patch embedding
  on request, and evaluates the EMA weights beside the online ones (metrics `eval_ema_*`, usable as
  `metric_for_best_model="ema_accuracy"`). Augmentation lives in the data: timm transforms per sample and timm
  Mixup in the collator (`nepa_hf.data.augmentation`).
* Long runs (`nepa_hf.training.trainer_callbacks.LongRunCallback`, added by `NepaTrainer`): a preemption signal
  saves a checkpoint of the current step and stops (`NepaTrainer.exit_if_preempted` then exits with status 75); a
  step with a non-finite loss or gradient norm updates nothing, is counted, and `max_nonfinite_steps` in a row stop
  the run.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput, get_last_checkpoint
from transformers.utils import logging

from timm.utils import ModelEmaV3

from ..data.workers import default_num_workers
from .ema import create_ema, ema_weights, load_ema, save_ema
from .long_runs import DEFAULT_MAX_NONFINITE_STEPS, DEFAULT_PREEMPTION_SIGNALS, PREEMPTED_EXIT_CODE, parse_signal_names
from .optimization import get_layerwise_cosine_schedule, reference_warmup_steps, weight_decay_flags
from .trainer_callbacks import EvaluateAtFractionsCallback, LongRunCallback

logger = logging.get_logger(__name__)

EMA_WEIGHTS_NAME = "ema.safetensors"

# Top-level task heads: they (and the backbone's final norm) get `head_learning_rate`.
HEAD_MODULE_NAMES = ("classifier", "decode_head", "auxiliary_head")
# The backbone's final norm: `norm` in NEPA, `layernorm` in transformers' ViT/ViTMAE, beside the blocks' container.
FINAL_NORM_NAMES = ("norm", "layernorm")

_EMBEDDINGS_PATTERN = re.compile(r"(?:^|\.)embeddings\.")
# Blocks are `encoder.layers.N` in NEPA, `layers.N` in transformers 5's ViT/ViTMAE (`encoder.layer.N` before). The
# match starts at a name component, so `name[:match.start()]` is the backbone's prefix (`nepa.`, `vit.`, ``).
_LAYER_PATTERN = re.compile(r"(?:^|(?<=\.))(?:encoder\.layers?|layers)\.(\d+)\.")


# ----------------------------------------------------------------------------------------------------------------
# Layer-wise lr decay
# ----------------------------------------------------------------------------------------------------------------


def layer_id_for_parameter(name: str, num_layers: int) -> int:
    """0 for the patch/CLS embeddings, i + 1 for block i (`encoder.layers.i`, or transformers ViT's `layers.i`),
    num_layers + 1 for everything else.

    Matches by name, so it works for any model containing a NEPA backbone (classifier, segmentation, backbone).
    """
    match = _LAYER_PATTERN.search(name)
    if match is not None:
        return int(match.group(1)) + 1
    if _EMBEDDINGS_PATTERN.search(name):
        return 0
    return num_layers + 1


def layer_lr_scale(layer_id: int, num_layers: int, layer_decay: float) -> float:
    """Reference factors: embeddings decay^L, block i decay^(L-1-i), head 1."""
    if layer_id == 0:
        return layer_decay**num_layers
    if layer_id <= num_layers:
        return layer_decay ** (num_layers - layer_id)
    return 1.0


def count_backbone_layers(model: nn.Module) -> int:
    """Number of NEPA blocks, from the highest `encoder.layers.N` parameter index."""
    indices = [int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER_PATTERN.search(name))]
    if not indices:
        raise ValueError(
            f"{type(model).__name__} has no `encoder.layers.N` parameters: layer-wise lr decay needs a NEPA "
            "backbone (or pass num_layers and use your own layer naming)."
        )
    return max(indices) + 1


def _backbone_prefixes(names: Iterable[str]) -> set[str]:
    """Prefixes of the modules holding the blocks (`nepa.` for `nepa.encoder.layers.N.*`, `` for `layers.N.*`)."""
    return {name[: match.start()] for name in names if (match := _LAYER_PATTERN.search(name))}


def is_head_parameter(name: str, backbone_prefixes: Iterable[str] = ("",),
                      head_module_names: Iterable[str] = HEAD_MODULE_NAMES) -> bool:
    """True for a parameter that takes the head lr: one inside a task head (a module named `classifier`,
    `decode_head` or `auxiliary_head`) or in the backbone's final norm (`{prefix}norm.*` / `{prefix}layernorm.*` for a
    prefix in `backbone_prefixes`, e.g. `nepa.norm.weight`, `vit.layernorm.bias`). `fc_norm`, a segmentation neck or
    any other module outside the blocks is not a head. Block and embedding parameters are never heads."""
    if _LAYER_PATTERN.search(name) or _EMBEDDINGS_PATTERN.search(name):
        return False
    if set(name.split(".")[:-1]) & set(head_module_names):
        return True
    return any(name.startswith(f"{prefix}{norm}.") for prefix in backbone_prefixes for norm in FINAL_NORM_NAMES)


def layer_decay_parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.05,
    layer_decay: float = 0.65,
    head_learning_rate: float | None = None,
    num_layers: int | None = None,
    head_module_names: Iterable[str] = HEAD_MODULE_NAMES,
) -> list[dict]:
    """Optimizer parameter groups with layer-wise lr decay , the authors' rule, for any model with a NEPA backbone (or a
    transformers ViT/ViTMAE, whose `layers.N`/`encoder.layer.N` blocks and `layernorm` are read the same way).

    Learning rates (factor f = the group's `lr_scale`):
      * block i: `learning_rate * layer_decay**(L-1-i)`; the embeddings (CLS token included):
        `learning_rate * layer_decay**L`;
      * head: `head_learning_rate` (default `learning_rate`) with f = 1 for the task heads (modules named
        `classifier`, `decode_head`, `auxiliary_head`; see `head_module_names`) and the backbone's final norm
        (`nepa.norm`, `vit.layernorm`, ...), as the authors do;
      * everything else outside the blocks (`fc_norm`, a segmentation `neck`, ...): `learning_rate` with f = 1.
    Weight decay (`nepa_hf.training.optimization`, one rule with pretraining): `weight_decay` on parameters with more than
    one dimension that the pretraining rule decays (so the CLS token `[1, 1, D]` is decayed; biases, norms and
    LayerScale are not), 0 elsewhere.

    Frozen parameters (`requires_grad=False`) are left out. Each group carries `lr_scale` (its factor, which sets
    its warmup length in `get_layerwise_cosine_schedule`), `layer_id` (0 embeddings, i + 1 block i, L + 1 the rest),
    a readable `name` (`embeddings.decay`, `layers.3.no_decay`, `head.decay`, `other.no_decay`, ...) and
    `param_names` (pop it before handing the groups to an optimizer that rejects unknown keys).
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
    num_layers = count_backbone_layers(model) if num_layers is None else num_layers
    head_learning_rate = learning_rate if head_learning_rate is None else head_learning_rate
    named = list(model.named_parameters())
    decay_flags = weight_decay_flags(model, finetuning=True)
    backbone_prefixes = _backbone_prefixes(name for name, _ in named)
    head_module_names = tuple(head_module_names)
    groups: dict[tuple[int, bool, bool], dict] = {}
    for name, parameter in named:
        if not parameter.requires_grad:
            continue
        layer_id = layer_id_for_parameter(name, num_layers)
        decay = decay_flags[name]
        is_head = layer_id > num_layers and is_head_parameter(name, backbone_prefixes, head_module_names)
        key = (layer_id, is_head, decay)
        if key not in groups:
            scale = layer_lr_scale(layer_id, num_layers, layer_decay)
            if layer_id == 0:
                part = "embeddings"
            elif layer_id <= num_layers:
                part = f"layers.{layer_id - 1}"
            else:
                part = "head" if is_head else "other"
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr": head_learning_rate if is_head else learning_rate * scale,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "layer_id": layer_id,
                "name": f"{part}.{'decay' if decay else 'no_decay'}",
            }
        groups[key]["params"].append(parameter)
        groups[key]["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


# ----------------------------------------------------------------------------------------------------------------
# Freezing
# ----------------------------------------------------------------------------------------------------------------


def freeze_patch_embeddings(model: nn.Module) -> int:
    """Freeze every NEPA patch-embedding projection in `model` (the reference fine-tunes with it frozen).

    Returns the number of parameters frozen; raises if the model has no `patch_embeddings` module.
    """
    frozen = 0
    for name, module in model.named_modules():
        if name == "patch_embeddings" or name.endswith(".patch_embeddings"):
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.requires_grad_(False)
                    frozen += parameter.numel()
    if not any(n == "patch_embeddings" or n.endswith(".patch_embeddings") for n, _ in model.named_modules()):
        raise ValueError(f"{type(model).__name__} has no `patch_embeddings` module to freeze.")
    return frozen


# ----------------------------------------------------------------------------------------------------------------
# EMA as a TrainerCallback
# ----------------------------------------------------------------------------------------------------------------


def is_ema_metric(metric_name: str | None) -> bool:
    return bool(metric_name) and (metric_name.startswith("ema_") or metric_name.startswith("eval_ema_"))


class EMACallback(TrainerCallback):
    """Keeps an EMA of the model weights during `Trainer.train` (the authors': decay 0.9999, fp32, one update per
    optimizer step, i.e. after gradient accumulation).

    * `on_train_begin`: starts the EMA from the current weights; when resuming (`state.global_step > 0`) loads
      `ema.safetensors` from the checkpoint being resumed (`resume_from_checkpoint` when set, which `NepaTrainer`
      does, else `output_dir/checkpoint-{global_step}`).
    * `on_step_end`: one EMA update, unless `skip_update` is set (`NepaTrainer` sets it for a step that made no
      update, see `LongRunCallback`).
    * `on_save`: writes `ema.safetensors` into the new checkpoint folder.
    * `on_train_end`: with `load_best_model_at_end` and an EMA metric as `metric_for_best_model` (e.g.
      "ema_accuracy"), the best checkpoint's EMA weights (the ones that scored) are loaded into the model.

    Evaluating the EMA beside the online weights needs `NepaTrainer` (the Trainer has no "before evaluate" hook).
    """

    def __init__(self, decay: float = 0.9999, device=None, filename: str = EMA_WEIGHTS_NAME):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        self.decay, self.device, self.filename = decay, device, filename
        self.ema: ModelEmaV3 | None = None
        self.resume_from_checkpoint: str | None = None
        self.skip_update = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ema = create_ema(model, decay=self.decay, device=self.device)
        if state.global_step > 0:
            checkpoint = self.resume_from_checkpoint or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(checkpoint, self.filename)
            if os.path.isfile(path):
                load_ema(self.ema, path)
                logger.info(f"Resumed the EMA weights from {path}.")
            else:
                logger.warning(
                    f"Resuming at step {state.global_step} but {path} does not exist: the EMA restarts from the "
                    "resumed weights."
                )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.ema is not None and not self.skip_update:
            self.ema.update(model)

    def on_save(self, args, state, control, **kwargs):
        if self.ema is not None and args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                save_ema(self.ema, os.path.join(folder, self.filename))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if (
            self.ema is not None
            and args.load_best_model_at_end
            and state.best_model_checkpoint is not None
            and is_ema_metric(args.metric_for_best_model)
        ):
            path = os.path.join(state.best_model_checkpoint, self.filename)
            if os.path.isfile(path):
                load_ema(self.ema, path)
                model.load_state_dict(self.ema.module.state_dict())
                logger.info(f"Loaded the EMA weights of the best checkpoint ({path}) into the model.")
            else:
                logger.warning(f"metric_for_best_model is an EMA metric but {path} is missing; keeping online weights.")


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AutoWorkersTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the run settings of every Trainer script here: `dataloader_num_workers` defaults by
    device (`nepa_hf.data.workers.default_num_workers`: min(12, cores per process) on a GPU, 0 on a CPU; a number
    given explicitly, 0 included, is kept), and the long-run guards `NepaTrainer` applies (`preemption_signals`,
    `max_nonfinite_steps`)."""

    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "DataLoader worker processes per training process; default: min(12, CPU cores per process) "
                          "on a GPU, 0 on a CPU."},
    )
    preemption_signals: str = field(
        default=",".join(DEFAULT_PREEMPTION_SIGNALS),
        metadata={"help": "Signals that mean 'preempted' (SLURM: SIGTERM, or the one of #SBATCH --signal): finish the "
                          "step, save checkpoint-<step>, exit with status 75; resume with --resume_from_checkpoint "
                          "latest. Comma-separated names, or 'none'."},
    )
    max_nonfinite_steps: int = field(
        default=DEFAULT_MAX_NONFINITE_STEPS,
        metadata={"help": "Optimizer steps with a non-finite loss or gradient norm are skipped (no update) and "
                          "counted; this many in a row stop the run, naming the last checkpoint."},
    )

    def __post_init__(self):
        parse_signal_names(self.preemption_signals)  # an unknown name fails here, before any data is loaded
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"--max_nonfinite_steps must be at least 1, got {self.max_nonfinite_steps}: it is how "
                             "many skipped steps in a row stop the run (1: the first one).")
        automatic = self.dataloader_num_workers is None
        if automatic:  # an int through TrainingArguments' own checks; the device is known only after them
            self.dataloader_num_workers = 0
        super().__post_init__()
        if automatic:
            self.dataloader_num_workers = default_num_workers(self.device, self.world_size)
            # TrainingArguments picks "fork" on MPS with several workers; its check saw 0 workers above.
            if self.device.type == "mps" and self.dataloader_num_workers > 1:
                self.dataloader_multiprocessing_context = self.dataloader_multiprocessing_context or "fork"


@dataclass
class NepaTrainingArguments(AutoWorkersTrainingArguments):
    """`TrainingArguments` with the authors' fine-tuning recipe as defaults, plus its extra knobs.

    Changed defaults: learning_rate 1e-3, weight_decay 0.05, warmup_steps 0.2 (a ratio of the total steps),
    lr_scheduler_type "cosine", label_smoothing_factor 0.1, remove_unused_columns False (image datasets with
    `set_transform`). The reference scales the backbone lr as 1.5e-3 (B) / 1e-3 (L) x batch / 256.
    """

    learning_rate: float = field(default=1e-3, metadata={"help": "Backbone peak lr (block L-1 gets it in full)."})
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (not on 1-D params: biases, norms, LayerScale)."}
    )
    warmup_steps: float = field(default=0.2, metadata={"help": "Warmup steps, or a ratio of the total if < 1."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Schedule when the per-group one is off (see layerwise_warmup)."}
    )
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing (inside the soft targets with Mixup)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep raw columns for set_transform."})
    layer_decay: float | None = field(
        default=0.65,
        metadata={"help": "Layer-wise lr decay (reference: 0.65 B / 0.75 L); 1.0 gives every block the same lr "
                          "(the groups still keep 1-D params free of weight decay)."},
    )
    head_learning_rate: float | None = field(
        default=None, metadata={"help": "lr of the head (classifier and the backbone's final norm; fc_norm trains "
                                        "at learning_rate); default learning_rate."}
    )
    layerwise_warmup: bool = field(
        default=True,
        metadata={"help": "With layer_decay < 1: the reference's per-group warmup + cosine to 0 (replaces "
                          "lr_scheduler_type). False, or layer_decay 1: lr_scheduler_type with one warmup for all."},
    )
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per optimizer step; 0 disables the EMA."})
    ema_on_cpu: bool = field(default=False, metadata={"help": "Keep the EMA copy on the CPU."})
    freeze_patch_embeddings: bool | None = field(
        default=None, metadata={"help": "Freeze the patch embedding (reference: yes when fine-tuning a pretrained model)."}
    )
    eval_at_fractions: list[float] | None = field(
        default=None,
        metadata={"help": "Also evaluate when these fractions of the training steps are done, e.g. 0.25 0.5 0.8 1.0 "
                          "(a curve and a look at the plateau; needs an evaluation split)."},
    )

    def __post_init__(self):
        if self.eval_at_fractions is not None:
            EvaluateAtFractionsCallback(self.eval_at_fractions)  # refuses a fraction outside (0, 1] before any data
        super().__post_init__()


def class_before_fully_shard(cls: type) -> type:
    """The model's own class under FSDP2's dynamic `FSDP<Name>(FSDPModule, Name)` subclass; `cls` otherwise."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support: nothing was wrapped
        return cls

    return next(base for base in cls.__mro__ if not issubclass(base, FSDPModule))


class NepaTrainer(Trainer):
    """`Trainer` for the reference fine-tuning recipe.

    Reads its extra settings from `NepaTrainingArguments` (plain `TrainingArguments` work too: then only an
    `EMACallback` passed in `callbacks` applies). Takes the Trainer's arguments; with a `MixupCollator` as
    `data_collator` the label smoothing lives in its soft targets and the Trainer's own smoother is switched off.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.args, "freeze_patch_embeddings", False) and self.model is not None:
            count = freeze_patch_embeddings(self.model)
            logger.info(f"Froze the patch embedding ({count} parameters).")
        ema_decay = getattr(self.args, "ema_decay", 0.0) or 0.0
        if ema_decay > 0 and self.ema_callback is None:
            device = "cpu" if getattr(self.args, "ema_on_cpu", False) else None
            self.add_callback(EMACallback(ema_decay, device=device))
        if hasattr(self.args, "max_nonfinite_steps") and self.long_run_callback is None:
            self.add_callback(LongRunCallback(self.args.preemption_signals, self.args.max_nonfinite_steps))
            if self.is_deepspeed_enabled:
                logger.warning("DeepSpeed applies the update inside backward: steps with a non-finite loss or "
                               "gradient norm are counted and stop the run after max_nonfinite_steps in a row, but "
                               "cannot be skipped.")
        if getattr(self.args, "eval_at_fractions", None):
            if self.eval_dataset is None and self.train_dataset is not None:
                raise ValueError("eval_at_fractions evaluates during training, but the Trainer has no eval_dataset: "
                                 "give the script an evaluation split (e.g. --do_eval) or drop --eval_at_fractions.")
            self.add_callback(EvaluateAtFractionsCallback(self.args.eval_at_fractions))
        if is_ema_metric(self.args.metric_for_best_model) and self.ema_callback is None:
            raise ValueError(
                f"metric_for_best_model={self.args.metric_for_best_model!r} needs an EMA: set ema_decay > 0 "
                "(NepaTrainingArguments) or pass an EMACallback."
            )
        mixup = getattr(self.data_collator, "mixup", None)
        if mixup is not None:
            smoothing = self.args.label_smoothing_factor
            if smoothing and not math.isclose(smoothing, mixup.label_smoothing):
                raise ValueError(
                    f"label_smoothing_factor={smoothing} but the collator's Mixup already smooths its soft targets "
                    f"with {mixup.label_smoothing}: the two would stack. Use one value: build the collator with "
                    f"label_smoothing={smoothing} (AugmentationArguments.collator does) or set "
                    "label_smoothing_factor=0."
                )
            # The soft targets already carry the smoothing: never apply the Trainer's LabelSmoother on top.
            self.label_smoother = None

    # -- EMA -------------------------------------------------------------------------------------------------------

    @property
    def ema_callback(self) -> EMACallback | None:
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, EMACallback)), None)

    @property
    def ema(self) -> ModelEmaV3 | None:
        callback = self.ema_callback
        return None if callback is None else callback.ema

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        callback = self.ema_callback
        if callback is not None:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            callback.resume_from_checkpoint = checkpoint if isinstance(checkpoint, str) else None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:  # however training ends, the preemption handlers go (on_train_end is not reached on an error)
            if self.long_run_callback is not None:
                self.long_run_callback.restore_signal_handlers()

    # -- long runs: preemption and non-finite steps ----------------------------------------------------------------

    @property
    def long_run_callback(self) -> LongRunCallback | None:
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, LongRunCallback)), None)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        callback = self.long_run_callback
        if callback is not None:
            callback.record_loss(loss)
            if self.accelerator.sync_gradients:  # the optimizer step's last backward: its gradients are final
                callback.agree(self.accelerator, model)
                if self.ema_callback is not None:  # a skipped step moves neither the weights nor their EMA
                    self.ema_callback.skip_update = callback.skip_step
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        callback = self.long_run_callback
        if callback is not None:
            if "loss" in logs:  # a training log
                logs["nonfinite_steps"] = callback.guard.skipped
            elif "train_loss" in logs:  # the run's summary (train_result.metrics)
                logs["train_nonfinite_steps"] = callback.guard.skipped
        super().log(logs, start_time)

    @property
    def preempted_checkpoint(self) -> str | None:
        """The checkpoint written when a preemption signal stopped the last `train()` (None: it was not preempted)."""
        callback = self.long_run_callback
        if callback is None or callback.preempted_step is None:
            return None
        return os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{callback.preempted_step}")

    def _finalize_training(self, *args, **kwargs):
        # Preempted, the run goes on after a resume: load no best model, and keep every checkpoint (with
        # load_best_model_at_end and save_total_limit=1 the Trainer would delete all but the best, the preemption
        # checkpoint included).
        if self.preempted_checkpoint is None:
            return super()._finalize_training(*args, **kwargs)
        best, self.state.best_model_checkpoint = self.state.best_model_checkpoint, None
        try:
            return super()._finalize_training(*args, **kwargs)
        finally:
            self.state.best_model_checkpoint = best

    def exit_if_preempted(self) -> None:
        """After `train()`: if a preemption signal stopped it, wait until every process has written its part of the
        checkpoint, then exit with `PREEMPTED_EXIT_CODE` (75, "try again"), saying how to resume."""
        checkpoint = self.preempted_checkpoint
        if checkpoint is None:
            return
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            logger.warning(f"Preempted ({self.long_run_callback.preempted_by}): saved {checkpoint} and stopped. "
                           "Continue with the same command and --resume_from_checkpoint latest.")
        raise SystemExit(PREEMPTED_EXIT_CODE)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """The online evaluation, then the same with the EMA weights swapped in (metrics `{prefix}_ema_*`)."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        ema = self.ema
        if ema is None:
            return output
        with ema_weights(ema, self.model):
            ema_output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, f"{metric_key_prefix}_ema"
            )
        metrics = dict(output.metrics)
        metrics.update({k: v for k, v in ema_output.metrics.items() if not k.endswith("_model_preparation_time")})
        return EvalLoopOutput(output.predictions, output.label_ids, metrics, output.num_samples)

    def _save(self, output_dir: str | None = None, state_dict=None):
        # FSDP2's `fully_shard` swaps the model's class for a dynamic `FSDP<Name>` subclass defined in torch, and
        # transformers would copy torch's files as the model's remote code: save as the model's own class.
        wrapped_class = type(self.model)
        self.model.__class__ = class_before_fully_shard(wrapped_class)
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.model.__class__ = wrapped_class

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        # Checkpoints get their EMA file from EMACallback.on_save; final saves get it here.
        if not _internal_call and self.ema is not None and self.args.should_save:
            save_ema(self.ema, os.path.join(output_dir or self.args.output_dir, EMA_WEIGHTS_NAME))

    # -- optimizer and schedule ------------------------------------------------------------------------------------

    def _layer_decay(self) -> float | None:
        """The layer decay in use (None when the arguments have no `layer_decay` field, i.e. plain Trainer rules)."""
        if not hasattr(self.args, "layer_decay"):
            return None
        return 1.0 if self.args.layer_decay is None else float(self.args.layer_decay)

    def create_optimizer(self, model=None):
        """Layer-wise lr decay groups (`layer_decay_parameter_groups`) with the optimizer the arguments select."""
        layer_decay = self._layer_decay()
        if self.optimizer is not None or layer_decay is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        if getattr(self.args, "freeze_patch_embeddings", False):
            freeze_patch_embeddings(opt_model)  # idempotent; covers models built by model_init
        groups = layer_decay_parameter_groups(
            opt_model,
            learning_rate=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            layer_decay=layer_decay,
            head_learning_rate=getattr(self.args, "head_learning_rate", None),
        )
        for group in groups:
            group.pop("param_names")
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The per-group warmup + cosine of the reference when layer-wise decay is on and `layerwise_warmup` is set;
        otherwise the Trainer's `lr_scheduler_type` (one warmup for all groups)."""
        layer_decay = self._layer_decay()
        if self.lr_scheduler is None and getattr(self.args, "layerwise_warmup", False) and layer_decay is not None and layer_decay < 1.0:
            optimizer = self.optimizer if optimizer is None else optimizer
            warmup = reference_warmup_steps(self.args.warmup_steps, num_training_steps)  # int(), not ceil()
            self.lr_scheduler = get_layerwise_cosine_schedule(optimizer, warmup, num_training_steps)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def _get_learning_rate(self) -> float:
        """Log the lr of the last block (factor 1, i.e. `learning_rate` after scheduling), not the embeddings'."""
        groups = getattr(self.optimizer, "param_groups", [])
        blocks = [i for i, g in enumerate(groups) if str(g.get("name", "")).startswith("layers.")]
        if blocks and self.lr_scheduler is not None and hasattr(self.lr_scheduler, "get_last_lr"):
            last = max(blocks, key=lambda i: groups[i]["layer_id"])
            return float(self.lr_scheduler.get_last_lr()[last])
        return super()._get_learning_rate()


__all__ = [
    "AutoWorkersTrainingArguments",
    "EMACallback",
    "EMA_WEIGHTS_NAME",
    "FINAL_NORM_NAMES",
    "HEAD_MODULE_NAMES",
    "NepaTrainer",
    "NepaTrainingArguments",
    "class_before_fully_shard",
    "count_backbone_layers",
    "freeze_patch_embeddings",
    "is_ema_metric",
    "is_head_parameter",
    "layer_decay_parameter_groups",
    "layer_id_for_parameter",
    "layer_lr_scale",
]
