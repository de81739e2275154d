# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""The pretraining script's metrics bookkeeping: what it logs and what of it a checkpoint carries."""

from __future__ import annotations

import math
import time

import torch

from ..data.images import UnreadableImages
from ..data.pretraining import skipped_file_keys
from .long_runs import DEFAULT_MAX_NONFINITE_STEPS, NonFiniteGuard
from .monitoring import grad_norm_tensor

LOSSES = ("loss", "embedding_loss", "pixel_loss")


class PretrainingMetrics:
    """The images seen (readable, all processes), the distinct unreadable images (`skipped`, fed with the keys the
    batches carry), the optimizer steps skipped as non-finite (`nonfinite`: a `long_runs.NonFiniteGuard` that the loop
    updates, stopping the run after `max_nonfinite_steps` in a row) and the running sums of the current logging
    window: the losses weighted by the number of readable images, the readable images, the seconds spent waiting for
    data, the gradient norms and the optimizer updates. A skipped step adds its images but neither its losses nor its
    gradient norm (NaN or inf, they would make the window's means so); `nonfinite_steps` counts it.

    The sums stay on the device (no host sync per step). `window_metrics` and `state_dict` are collectives (call them
    on every process at the same step): the first reduces the window into the logged means and rates and starts the
    next one; the second is the checkpoint's share (the partly filled window less its wall time), so that a resumed
    run logs exactly what the uninterrupted one did.
    """

    def __init__(self, accelerator, with_pixel_loss: bool = False,
                 max_nonfinite_steps: int = DEFAULT_MAX_NONFINITE_STEPS):
        self.accelerator = accelerator
        self.logged_losses = tuple(name for name in LOSSES if with_pixel_loss or name != "pixel_loss")
        self.images_seen = 0
        self.skipped = UnreadableImages()
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.sums = {name: torch.zeros((), device=accelerator.device)
                     for name in (*LOSSES, "images", "loss_images", "data_wait_s", "grad_norm", "updates")}
        # The losses of the optimizer step under way: added to the window by `add_update` unless it was skipped.
        self.step_sums = {name: torch.zeros((), device=accelerator.device) for name in (*LOSSES, "loss_images")}
        self.window_start = time.perf_counter()

    def timed(self, batches):
        """`batches`, adding the time spent waiting for each one to the window's data wait."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.sums["data_wait_s"] += time.perf_counter() - start
            yield batch

    def add_batch(self, outputs, batch: dict[str, torch.Tensor], num_skipped: int) -> None:
        """A micro-batch (from `data.pretraining.select_readable`): the keys of its `num_skipped` unreadable images
        and its losses, means over its readable ones (a batch without any adds no loss)."""
        if num_skipped:  # rare: only then read the keys off the device
            self.skipped.add(skipped_file_keys(batch))
        if num_skipped == batch["valid"].numel():
            return
        readable = batch["valid"].sum()
        self.sums["images"] += readable
        self.step_sums["loss_images"] += readable
        for name in LOSSES:
            if getattr(outputs, name) is not None:
                self.step_sums[name] += getattr(outputs, name).detach().float() * readable

    def add_update(self, grad_norm, applied: bool = True) -> None:
        """The end of an optimizer step: its losses and gradient norm join the window if it was `applied` (not
        skipped as non-finite)."""
        if applied:
            for name, value in self.step_sums.items():
                self.sums[name] += value
            self.sums["grad_norm"] += grad_norm_tensor(grad_norm, self.accelerator.device)
            self.sums["updates"] += 1
        for value in self.step_sums.values():
            value.zero_()

    def _totals(self) -> dict[str, float]:
        return {name: value.item() for name, value in self.accelerator.reduce(self.sums, reduction="sum").items()}

    def window_metrics(self) -> dict[str, float]:
        """The logged losses (means over the readable images of the window's applied updates) and grad_norm (mean
        over those updates), both NaN for a window without any, images_per_s, data_wait_fraction, images_seen,
        images_skipped and nonfinite_steps (since the start); then the next window starts."""
        totals, elapsed = self._totals(), time.perf_counter() - self.window_start
        self.images_seen += int(totals["images"])
        metrics = {name: totals[name] / totals["loss_images"] if totals["loss_images"] else math.nan
                   for name in self.logged_losses}
        metrics.update(
            grad_norm=totals["grad_norm"] / totals["updates"] if totals["updates"] else math.nan,
            images_per_s=totals["images"] / elapsed,
            data_wait_fraction=totals["data_wait_s"] / self.accelerator.num_processes / elapsed,
            images_seen=self.images_seen,
            images_skipped=self.skipped.count(self.accelerator),  # distinct files
            nonfinite_steps=self.nonfinite.skipped,
        )
        for value in self.sums.values():
            value.zero_()
        self.window_start = time.perf_counter()
        return metrics

    def state_dict(self) -> dict:
        running_sums = {**self._totals(), "data_wait_s": 0.0}
        self.skipped.count(self.accelerator)
        return {"images_seen": self.images_seen, "running_sums": running_sums, **self.skipped.state_dict(),
                "nonfinite": self.nonfinite.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.images_seen = state["images_seen"]
        self.skipped.load_state_dict(state)
        if "nonfinite" in state:  # not in checkpoints from before the non-finite guard
            self.nonfinite.load_state_dict(state["nonfinite"])
        if self.accelerator.is_main_process:  # summed over the processes already
            # (checkpoints from before the non-finite guard have no separate count of the images with a loss)
            for name, value in {"loss_images": state["running_sums"]["images"], **state["running_sums"]}.items():
                self.sums[name] += value
        self.window_start = time.perf_counter()  # the window's wall time before the checkpoint is not known


__all__ = ["LOSSES", "PretrainingMetrics"]
