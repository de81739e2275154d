# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Watching a pretraining run: the collapse monitor and a JSON-lines metrics tracker.

- `CollapseMonitor`: the spread of NEPA's predicted embeddings (`embedding_spread`, `mean_pairwise_cosine`), with a
  warning when it heads to zero. Without stop-gradient NEPA collapses to one vector while the loss looks great (-1).
- `cpu_oversubscription_note`: says when a CPU run's threads oversubscribe a busy machine.
- `grad_norm_tensor`: `accelerator.clip_grad_norm_`'s result as a plain tensor, whatever the distributed backend.
- `JsonlTracker`: an Accelerate tracker (`Accelerator(log_with=[JsonlTracker(path)])`) writing one JSON object per
  logged step to a local file, available offline and beside any other tracker; `read_jsonl` reads it back.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

try:
    from accelerate.tracking import GeneralTracker
except ImportError:  # accelerate comes with the `train` extra; without it JsonlTracker still writes its file
    GeneralTracker = object

logger = logging.getLogger(__name__)


@torch.no_grad()
def embedding_spread(embeddings: torch.Tensor) -> float:
    """sqrt(D) x the mean per-dimension std of the L2-normalised embeddings, pooled over images and tokens.

    About 1 for directions spread evenly over the sphere, 0 when every embedding points the same way (collapse).
    """
    flat = F.normalize(embeddings.detach().float().reshape(-1, embeddings.shape[-1]), dim=-1)
    if flat.shape[0] < 2:
        return float("nan")
    return (flat.std(dim=0, unbiased=False).mean() * math.sqrt(flat.shape[-1])).item()


@torch.no_grad()
def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct embeddings (images x tokens); 1 when collapsed."""
    flat = F.normalize(embeddings.detach().float().reshape(-1, embeddings.shape[-1]), dim=-1)
    count = flat.shape[0]
    if count < 2:
        return float("nan")
    total = flat.sum(dim=0)
    return ((total @ total - count) / (count * (count - 1))).item()


class CollapseMonitor:
    """Tracks the spread of NEPA's predicted embeddings and warns when it heads to zero.

    Without stop-gradient NEPA collapses: every patch maps to one vector and the loss reaches -1, which looks like a
    great loss. Call it on `last_hidden_state`; it returns `embedding_spread` and `mean_cosine` for logging and
    logs a warning when the spread falls below `min_spread` (or below `relative_drop` x the highest seen).
    """

    def __init__(self, min_spread: float = 0.05, relative_drop: float = 0.02):
        self.min_spread = min_spread
        self.relative_drop = relative_drop
        self.peak = 0.0
        self.collapsed = False

    def __call__(self, predictions: torch.Tensor) -> dict[str, float]:
        spread = embedding_spread(predictions)
        cosine = mean_pairwise_cosine(predictions)
        if math.isfinite(spread):
            self.peak = max(self.peak, spread)
            collapsed = spread < self.min_spread or spread < self.relative_drop * self.peak
            if collapsed and not self.collapsed:
                logger.warning(
                    "Representation collapse: the spread of the predicted embeddings fell to %.4f (peak %.4f; mean "
                    "pairwise cosine %.4f). The NEPA loss is then near -1 without the model learning anything; is "
                    "stop-gradient off (--no-stop-grad) or the learning rate too high?", spread, self.peak, cosine,
                )
            self.collapsed = collapsed
        return {"embedding_spread": spread, "mean_cosine": cosine}


def cpu_oversubscription_note(device) -> str | None:
    """A note when training on a CPU that is already busy with more threads than cores (oversubscribed threads can
    slow training several-fold), else None."""
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads <= 1 or not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    if load <= cores:
        return None
    return (f"Note: the CPU is busy (load {load:.1f} on {cores} cores) and each process runs {threads} threads; "
            "oversubscribed threads can slow training several-fold. Consider OMP_NUM_THREADS=1.")


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


class JsonlTracker(GeneralTracker):
    """Accelerate tracker writing one JSON object per `accelerator.log` call to a local file (e.g. `metrics.jsonl`),
    with the step under `"step"`; the run configuration goes to `run_config.json` beside it.

    Args:
        path: the `.jsonl` file.
        resume_step: when resuming, records after this step (written by the interrupted run past its last checkpoint)
            are dropped so the file reads as one uninterrupted run; None starts a fresh file.
    """

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.resume_step = resume_step
        self._file = None

    @property
    def tracker(self):
        return self._file

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", -1) <= self.resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
            self._file = open(self.path, "a")
        else:
            self._file = open(self.path, "w")

    def store_init_configuration(self, values: dict):
        config_path = self.path.with_name("run_config.json")
        config_path.write_text(json.dumps({k: _jsonable(v) for k, v in values.items()}, indent=2, default=str) + "\n")

    def log(self, values: dict, step: int | None = None, **kwargs):
        if self._file is None:
            self.start()
        record = {"step": step} if step is not None else {}
        record.update({key: _jsonable(value) for key, value in values.items()})
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def finish(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def grad_norm_tensor(grad_norm, device) -> torch.Tensor:
    """`accelerator.clip_grad_norm_`'s result as a plain float32 scalar tensor on `device`, to sum over a logging
    window: a tensor (one process, DDP), a replicated DTensor (FSDP2: it cannot be added to plain tensors) or a float
    or None (DeepSpeed, whose engine clips inside its step and may not report a norm: NaN then)."""
    if grad_norm is None:
        return torch.tensor(math.nan, device=device)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor; every process holds the same (replicated) value
        grad_norm = grad_norm.full_tensor()
    return torch.as_tensor(grad_norm, dtype=torch.float32, device=device).detach()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (e.g. a run's `metrics.jsonl`)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


__all__ = [
    "CollapseMonitor",
    "JsonlTracker",
    "cpu_oversubscription_note",
    "embedding_spread",
    "grad_norm_tensor",
    "mean_pairwise_cosine",
    "read_jsonl",
]
