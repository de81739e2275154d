# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Long runs that survive preemption and non-finite steps; shared by the pretraining loop and the fine-tuning Trainer.

- `PreemptionSignal`: handlers that only record a preemption signal (SLURM sends SIGTERM, or the signal chosen with
  `#SBATCH --signal`, e.g. SIGUSR1, some time before the kill). The training loop polls `.requested` after each
  optimizer step, saves a checkpoint of that step and exits with `PREEMPTED_EXIT_CODE` (resume with
  `--resume_from_checkpoint latest`). A handler that saved from inside the signal would interrupt a step half done.
- `NonFiniteGuard`: counts the optimizer steps skipped for a non-finite loss or gradient norm and stops the run with
  `NonFiniteTrainingError` after `max_consecutive` of them in a row, naming the last good checkpoint.
- `agreed_flags`: one all-reduce per optimizer step makes every process take the same decision (skip the step, save
  and exit), as torch's GradScaler agrees on inf checks: a process that decided alone would hang the others in their
  next collective, or save a different step. `nonfinite_step` is the per-process flag of a step, read on the device.
- `parse_signal_names` reads a `--preemption_signals` value; `exit_preempted` ends a preempted run with its status.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

import torch

from .monitoring import grad_norm_tensor

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again, i.e. preempted and resumable
DEFAULT_PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")
DEFAULT_MAX_NONFINITE_STEPS = 5


def _signal_number(name: str) -> signal.Signals:
    number = signal.Signals.__members__.get(name)
    if number is None:
        valid = ", ".join(sorted(s.name for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP)))
        raise ValueError(f"Unknown signal name {name!r}: use names such as SIGTERM or SIGUSR1 (this platform has "
                         f"{valid}), or 'none' to disable preemption handling.")
    if number in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{name} cannot be caught: a process cannot act on it. Have the scheduler send SIGTERM or "
                         "SIGUSR1 before the kill (SLURM: #SBATCH --signal=USR1@120).")
    return number


def parse_signal_names(text: str) -> tuple[str, ...]:
    """The signal names of a command-line value: comma-separated names ("SIGTERM,SIGUSR1"; "USR1" also works), or
    "none" (or "") for none. Validated: an unknown name is a ValueError naming it."""
    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(name if name.startswith("SIG") else f"SIG{name}"
                  for name in (part.strip().upper() for part in text.split(",")) if name)
    for name in names:
        _signal_number(name)
    return names


class PreemptionSignal:
    """Records the first of `signal_names` the process receives (`.requested`, `.received`: its name) and does
    nothing else, so training finishes its optimizer step before reacting. `.restore()` (or leaving the `with` block)
    puts the previous handlers back. An empty `signal_names` installs nothing (preemption handling off).

    Handlers can only be installed from the main thread of the main interpreter (Python's rule); the error says so.
    """

    def __init__(self, signal_names: Sequence[str] = DEFAULT_PREEMPTION_SIGNALS):
        if isinstance(signal_names, str):
            raise TypeError(f"signal_names must be a sequence of names, got the string {signal_names!r}: use "
                            "parse_signal_names() for a command-line value.")
        numbers = [_signal_number(name) for name in signal_names]  # validate all before installing any
        self.requested = False
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}
        try:
            for number in numbers:
                self._previous[number] = signal.signal(number, self._record)
        except ValueError as error:  # not the main thread
            self.restore()
            raise RuntimeError(f"Cannot install the preemption signal handlers ({error}): create PreemptionSignal "
                               "in the main thread, or pass no signal names to disable preemption handling.") from error

    def _record(self, signum, frame) -> None:
        if not self.requested:
            self.received = signal.Signals(signum).name
        self.requested = True

    def restore(self) -> None:
        """Put back the handlers that were installed before this object's."""
        while self._previous:
            number, handler = self._previous.popitem()
            signal.signal(number, handler)

    def __enter__(self) -> PreemptionSignal:
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()


def exit_preempted(accelerator, preemption: PreemptionSignal, step: int, checkpoint) -> None:
    """After saving `checkpoint` for step `step`: say so, end the trackers and exit with `PREEMPTED_EXIT_CODE`.
    Call on every process (all of them agreed on the preemption with `agreed_flags`)."""
    accelerator.print(f"Preempted ({preemption.received or 'a signal to another process'}): saved step {step} to "
                      f"{checkpoint}; exiting with status {PREEMPTED_EXIT_CODE}. Resume with --resume_from_checkpoint "
                      "latest.", flush=True)  # before a launcher that saw another process exit stops this one
    accelerator.end_training()
    sys.exit(PREEMPTED_EXIT_CODE)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many optimizer steps in a row with a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """Counts the optimizer steps skipped for a non-finite loss or gradient norm (`skipped`: all of them,
    `consecutive`: the current run of them) and raises `NonFiniteTrainingError` once `max_consecutive` come in a row.
    A finite step resets the run. `state_dict` / `load_state_dict` carry the counts through a checkpoint."""

    def __init__(self, max_consecutive: int = DEFAULT_MAX_NONFINITE_STEPS):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive (--max_nonfinite_steps) must be at least 1, got {max_consecutive}: "
                             "it is how many skipped steps in a row stop the run (1: the first one).")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def update(self, finite: bool, step: int, last_checkpoint: str | None) -> None:
        """Record optimizer step `step`: `finite` or skipped. `last_checkpoint` (None: none yet) is named in the error
        raised at the `max_consecutive`-th skipped step in a row."""
        if finite:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
            raise NonFiniteTrainingError(
                f"Step {step}: {self.consecutive} optimizer steps in a row had a non-finite loss or gradient norm "
                f"and were skipped ({self.skipped} in all); stopping ({where}). Check the data for corrupt or extreme "
                "inputs and resume from that checkpoint (--resume_from_checkpoint; it restores its learning-rate "
                "schedule, so for a lower learning rate start a new run from its weights), or raise "
                "--max_nonfinite_steps to tolerate more in a row.")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state["skipped"])
        self.consecutive = int(state["consecutive"])


def nonfinite_step(accelerator, loss, grad_norm) -> torch.Tensor:
    """Whether this process's optimizer step is non-finite, as a 0-dim bool tensor on the device (no host sync: hand
    it to `agreed_flags`): its `loss` (the last micro-batch's; an earlier one's NaN shows in the gradient norm) or
    `grad_norm` (`accelerator.clip_grad_norm_`'s result, computed with or without clipping) is NaN or infinite.

    The gradient norm does not count under fp16 mixed precision: there inf gradients are the GradScaler's business,
    which skips those steps itself and lowers its scale (counting them would stop a run during its scale search).
    Nor does a None norm (DeepSpeed may report none). Under DeepSpeed the engine steps inside `backward`, so a
    non-finite step is counted and stops the run after `max_consecutive`, but cannot be skipped."""
    flag = ~torch.isfinite(loss.detach().float())
    if grad_norm is not None and getattr(accelerator, "scaler", None) is None:
        flag = flag | ~torch.isfinite(grad_norm_tensor(grad_norm, accelerator.device))
    return flag.to(accelerator.device)


def agreed_flags(accelerator, *flags) -> list[bool]:
    """Every process's `flags` (bools or 0-dim tensors, e.g. `~torch.isfinite(loss)`) combined across processes:
    flag i is True when it is True on any process. One all-reduce (max) of one small tensor on the accelerator's
    device and one host read; with one process, only the host read. Call on every process at the same point."""
    # Python bools are filled on the device (torch.full): a host-to-device copy would be a second sync.
    values = torch.stack([flag.detach().reshape(()).to(accelerator.device, torch.int32) if torch.is_tensor(flag)
                          else torch.full((), int(flag), dtype=torch.int32, device=accelerator.device)
                          for flag in flags])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="max")
    return [bool(value) for value in values.tolist()]


__all__ = [
    "DEFAULT_MAX_NONFINITE_STEPS",
    "DEFAULT_PREEMPTION_SIGNALS",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "PREEMPTED_EXIT_CODE",
    "PreemptionSignal",
    "agreed_flags",
    "exit_preempted",
    "nonfinite_step",
    "parse_signal_names",
]
