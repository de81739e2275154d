"""Long fine-tuning runs with `transformers.Trainer`: preemption and non-finite steps, on the pieces the pretraining
loop shares (`nepa_hf.training.long_runs`).

`LongRunCallback` (which `NepaTrainer` adds from `NepaTrainingArguments.preemption_signals` and
`.max_nonfinite_steps`, and feeds from its `training_step`):

* Preemption: a `PreemptionSignal` records SIGTERM / SIGUSR1 from train begin. The optimizer step during which it
  arrives finishes, the Trainer writes its own checkpoint of that step (`checkpoint-<step>`: weights, optimizer,
  schedule, RNG states, data position; `ema.safetensors` through `EMACallback`) and stops, and
  `NepaTrainer.exit_if_preempted` exits with `PREEMPTED_EXIT_CODE` (75). `--resume_from_checkpoint latest` continues.
* Non-finite guard: a step whose loss (any micro-batch) or gradient norm is not finite has its gradients dropped
  before `optimizer.step()`, which then updates nothing (optimizers skip parameters without a gradient); the batch is
  consumed and the step counts in `global_step` and the lr schedule. Skipped steps are counted (`nonfinite_steps` in
  the logs, the counts in `trainer_state.json`, kept through a resume) and `max_nonfinite_steps` in a row raise
  `NonFiniteTrainingError` naming the step and the newest checkpoint.
* Both decisions come from one all-reduce per optimizer step (`agreed_flags` of [non-finite, preemption requested],
  after the accumulation's last backward), so every process skips the same steps and saves the same step.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .long_runs import (
    DEFAULT_MAX_NONFINITE_STEPS,
    DEFAULT_PREEMPTION_SIGNALS,
    NonFiniteGuard,
    NonFiniteTrainingError,
    PreemptionSignal,
    agreed_flags,
    nonfinite_step,
    parse_signal_names,
)

logger = logging.get_logger(__name__)


def newest_trainer_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-<step>` folder the Trainer wrote in `output_dir` (None: none yet)."""
    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def trainer_checkpoint_to_resume(output_dir: str, requested: str | bool | None) -> str | None:
    """What `Trainer.train(resume_from_checkpoint=...)` gets for a `--resume_from_checkpoint` value.

    "latest" (or True / "true"): the newest `checkpoint-<step>` in `output_dir`, or None with a warning when there is
    none yet (so one job script serves the first run and every resumed one). None (flag not given): the newest one
    too when `output_dir` has any, as the script always did. A path: that checkpoint, which must be a folder.
    """
    if requested is None or requested is True or str(requested).lower() in ("latest", "true"):
        checkpoint = newest_trainer_checkpoint(output_dir)
        if checkpoint is None and requested is not None:
            logger.warning(f"--resume_from_checkpoint {requested}: no checkpoint-<step> folder in {output_dir} yet, "
                           "starting from scratch.")
        elif checkpoint is not None:
            logger.warning(f"Resuming from {checkpoint} (use another --output_dir to start over).")
        return checkpoint
    if requested is False or str(requested).lower() == "false":
        return None
    if not os.path.isdir(requested):
        raise ValueError(f"--resume_from_checkpoint {requested}: no such checkpoint folder. Pass a checkpoint-<step> "
                         f"folder the Trainer wrote, or 'latest' for the newest one in --output_dir.")
    return str(requested)


def _local(gradient: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards are DTensors: check this process's shard (the all-reduce of the flags covers the others) instead of
    # a norm that would gather.
    return gradient.to_local() if isinstance(gradient, DTensor) else gradient


class LongRunCallback(TrainerCallback, ExportableState):
    """Preemption and the non-finite guard for a Trainer (module docstring). Needs a trainer that calls
    `record_loss` for every micro-batch and `agree` after the last backward of each optimizer step, as
    `NepaTrainer.training_step` does.

    Args:
        preemption_signals: signal names ("SIGTERM,SIGUSR1" or a sequence; "none" or empty: preemption handling off).
        max_nonfinite_steps: skipped steps in a row that stop the run (at least 1).
    """

    def __init__(self, preemption_signals=DEFAULT_PREEMPTION_SIGNALS,
                 max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS):
        if isinstance(preemption_signals, str):
            preemption_signals = parse_signal_names(preemption_signals)
        self.signal_names = tuple(preemption_signals)
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.preemption: PreemptionSignal | None = None
        self.preempted_step: int | None = None  # the step saved when a preemption signal stopped the run
        self.preempted_by: str | None = None
        self.skip_step = False  # agreed for the current optimizer step
        self._agreed = False
        self._stop_for_preemption = False
        self._loss_sum: torch.Tensor | None = None  # over the step's micro-batches, on the device (no sync)

    # -- fed by the trainer --------------------------------------------------------------------------------------

    def record_loss(self, loss: torch.Tensor) -> None:
        """Add a micro-batch's loss to the step's sum, on the device (no host sync): the sum is finite only if every
        loss is."""
        loss = loss.detach().float().sum()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def agree(self, accelerator, model: torch.nn.Module) -> None:
        """After the optimizer step's last backward: every process's [loss or gradient norm not finite, preemption
        signal received], combined by one all-reduce (the one host sync this adds per optimizer step)."""
        # The pretraining loop's rule (`nonfinite_step`, with its fp16 exemption), on this process's gradients: the
        # Trainer clips only after this point.
        gradients = [_local(p.grad) for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(gradients) if gradients else None
        loss = self._loss_sum if self._loss_sum is not None else torch.zeros(())
        nonfinite = nonfinite_step(accelerator, loss, grad_norm)
        requested = self.preemption is not None and self.preemption.requested
        self.skip_step, self._stop_for_preemption = agreed_flags(accelerator, nonfinite, requested)
        self._loss_sum = None
        self._agreed = True

    # -- Trainer events --------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        # Resuming: the counts saved in the checkpoint's trainer_state.json (which the Trainer loaded into `state`).
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, dict):
            self.nonfinite_counts = saved.get("attributes", {}).get("nonfinite_counts", self.nonfinite_counts)
        self.preempted_step = self.preempted_by = None
        self.restore_signal_handlers()
        self.preemption = PreemptionSignal(self.signal_names)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self._agreed:
            self.restore_signal_handlers()
            raise RuntimeError("LongRunCallback got no step flags: it needs a trainer whose training_step calls its "
                               "record_loss and agree methods, as NepaTrainer does. Use NepaTrainer, or leave the "
                               "callback out.")
        self._agreed = False
        step = state.global_step + 1
        if self.skip_step:
            model.zero_grad(set_to_none=True)  # optimizer.step() skips parameters without a gradient: no update
            if state.is_world_process_zero:
                logger.warning(f"Step {step}: non-finite loss or gradient norm (on at least one process); the step "
                               f"is skipped, no update ({self.guard.consecutive + 1} in a row).")
        try:
            # The checkpoint is named only in the error, so the folder is listed only on a skipped step.
            last = newest_trainer_checkpoint(args.output_dir) if self.skip_step else None
            self.guard.update(not self.skip_step, step, last)
        except NonFiniteTrainingError:
            self.restore_signal_handlers()
            raise

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop_for_preemption and self.preempted_step is None:
            self.preempted_step = state.global_step
            self.preempted_by = (self.preemption.received if self.preemption is not None else None) or "a signal"
            # Save this step now and stop; no evaluation (it would spend the grace period before the kill, and
            # with save_strategy="best" could cancel the save).
            if control.should_evaluate and state.is_world_process_zero:
                logger.warning(f"Step {state.global_step}: the evaluation due now is skipped for the preemption.")
            control.should_save = True
            control.should_evaluate = False
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.preempted_step is not None:  # the step is saved already: no second save or evaluation at epoch end
            control.should_save = False
            control.should_evaluate = False
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_signal_handlers()

    def restore_signal_handlers(self) -> None:
        if self.preemption is not None:
            self.preemption.restore()
            self.preemption = None

    # -- trainer_state.json ----------------------------------------------------------------------------------------

    @property
    def nonfinite_counts(self) -> dict:
        return self.guard.state_dict()

    @nonfinite_counts.setter
    def nonfinite_counts(self, counts: dict) -> None:
        self.guard.load_state_dict(counts)

    def state(self) -> dict:
        return {"args": {"preemption_signals": list(self.signal_names),
                         "max_nonfinite_steps": self.guard.max_consecutive},
                "attributes": {"nonfinite_counts": self.nonfinite_counts}}


def steps_at_fractions(fractions, max_steps: int) -> set[int]:
    """The optimizer steps at which `fractions` (each in (0, 1]) of `max_steps` are done (at least step 1)."""
    return {max(1, round(fraction * max_steps)) for fraction in fractions}


class EvaluateAtFractionsCallback(TrainerCallback):
    """Evaluate when chosen fractions of the run's optimizer steps are done (`NepaTrainingArguments.
    eval_at_fractions`): e.g. a learning curve at 25/50/75% plus a dense look at the plateau (80-100%), which no
    single `eval_steps` interval gives. Adds to `eval_strategy`, whose own evaluations still happen."""

    def __init__(self, fractions):
        if not fractions or not all(0 < fraction <= 1 for fraction in fractions):
            raise ValueError(f"eval_at_fractions takes fractions of the training steps in (0, 1], got {fractions}.")
        self.fractions = sorted(fractions)
        self.steps: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = steps_at_fractions(self.fractions, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_evaluate = True


__all__ = ["EvaluateAtFractionsCallback", "LongRunCallback", "newest_trainer_checkpoint", "steps_at_fractions",
           "trainer_checkpoint_to_resume"]
