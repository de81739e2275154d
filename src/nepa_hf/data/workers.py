# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""How many DataLoader worker processes the scripts use when the user gives no number: one rule for pretraining,
fine-tuning (classification and segmentation) and evaluation."""

from __future__ import annotations

import os

import torch

# Enough to feed ViT-B/14 bf16 training on one H100 (~3,000 images/s) through the fine-tuning transforms, the
# heaviest: one worker sustains ~270 images/s there (benchmarks/README.md, "Input pipeline").
MAX_DEFAULT_WORKERS = 12


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, e.g. under `taskset` or a
    container's cpuset; else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_num_workers(device: str | torch.device, num_processes: int = 1,
                        max_workers: int = MAX_DEFAULT_WORKERS) -> int:
    """DataLoader workers per training process when none are asked for.

    On an accelerator (GPU, MPS, ...): the cores per process, at most `max_workers` (12). JPEG decoding and
    augmentation in the training process itself would leave the GPU waiting: one worker decodes and augments about
    430 images/s for pretraining and 270 for fine-tuning (RandAugment, random erasing; benchmarks/README.md, "Input
    pipeline"), while a ViT-B/14 on one H100 trains on about 3,000 images/s in bf16: 8 and 12 workers.
    On a CPU: 0, the training process loads its own data. The model's matmuls already use every core, worker
    processes would compete for the same cores, and each worker start costs seconds of imports that short CPU runs
    (the demo, the tests) would pay on every epoch.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    if torch.device(device).type == "cpu":
        return 0
    return max(1, min(max_workers, available_cores() // num_processes))


__all__ = ["MAX_DEFAULT_WORKERS", "available_cores", "default_num_workers"]
