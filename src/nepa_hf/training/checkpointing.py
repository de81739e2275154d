# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Kill-safe, verified checkpoints on top of Accelerate's automatic checkpoint naming.

Build the Accelerator with `ProjectConfiguration(project_dir=output_dir, automatic_checkpoint_naming=True,
total_limit=N)`: `accelerator.save_state()` then names each state `<project_dir>/checkpoints/checkpoint_<iteration>`
(the iteration counts saves). On its own it writes straight into that folder and deletes the oldest checkpoint
before writing the new one, so a kill during a save leaves a partial folder that looks like a checkpoint (and, with
`total_limit=1`, no usable one). `save_checkpoint` keeps Accelerate's naming and counting but lets `save_state` write
into a staging project folder beside `checkpoints/`, adds `meta.json` (the training position, written last), renames
the finished folder into `checkpoints/` and only then deletes the checkpoints beyond `total_limit`. A kill at any
point leaves the previous checkpoints untouched, and `checkpoints/` only ever holds complete ones; a write error
(full disk, read-only folder) removes the staging folder and raises `CheckpointSaveError` naming the path and the
free space.

`resume_checkpoint` picks the checkpoint to resume from and checks that every file of it loads (`verify_checkpoint`):
`latest` falls back past damaged checkpoints (e.g. a file truncated by a full disk). Accelerate does not store the
save iteration in a checkpoint; `meta.json` does (`"iteration"`), so a resumed run continues the numbering.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .long_runs import agreed_flags

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # Accelerate's folder under the project folder
CHECKPOINT_META = "meta.json"
STAGING_DIR = ".checkpoint-staging"  # under the project folder, beside `checkpoints/` (same filesystem: atomic renames)
_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)")  # Accelerate's `checkpoint_<iteration>`


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints `checkpoint_<iteration>` (with their `meta.json`) under `checkpoints_dir`, oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(child.name)
        if match and child.is_dir() and (child / CHECKPOINT_META).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `checkpoints_dir`, or None."""
    checkpoints = list_checkpoints(checkpoints_dir)
    return checkpoints[-1][1] if checkpoints else None


def read_checkpoint_meta(checkpoint_dir: str | os.PathLike) -> dict:
    """The `meta.json` of a checkpoint written by `save_checkpoint`: the training position, the step under `"step"`
    and the save iteration under `"iteration"`."""
    path = Path(checkpoint_dir) / CHECKPOINT_META
    if not path.is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a complete checkpoint: it has no {CHECKPOINT_META}. Pass a "
            f"'{CHECKPOINTS_DIR}/checkpoint_<i>' folder written by this script, or 'latest'."
        )
    meta = json.loads(path.read_text())
    if "iteration" not in meta:  # `checkpoint-<step>` folders of the script before Accelerate's naming
        raise ValueError(f"{checkpoint_dir} was written by an earlier version of examples/pretrain_nepa.py, whose "
                         "training position this one cannot restore: start afresh with --overwrite_output_dir.")
    return meta


class CheckpointLoadError(ValueError):
    """A file of a checkpoint does not load (truncated or corrupt); the message names the file."""


# The kinds of file a checkpoint holds (`accelerator.save_state` plus meta.json) and how `verify_checkpoint` loads them.
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def verify_checkpoint(checkpoint_dir: str | os.PathLike) -> None:
    """Load every file of a checkpoint folder once (safetensors, torch/pickle files, JSON) and raise a
    `CheckpointLoadError` naming the first one that does not load, e.g. a file truncated by a full disk or a copy cut
    short. Files of other kinds (e.g. sharded FSDP states) are not checked. The files are the run's own, loaded as
    `accelerator.load_state` loads them."""
    from safetensors.torch import load_file

    root = Path(checkpoint_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                load_file(path)
            elif path.suffix in _TORCH_SUFFIXES:
                torch.load(path, map_location="cpu", weights_only=False)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as error:
            raise CheckpointLoadError(
                f"{path} does not load ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
                "the checkpoint is damaged (truncated or corrupt file)."
            ) from error


def resume_checkpoint(checkpoints_dir: str | os.PathLike, requested: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from, verified (`verify_checkpoint`).

    `requested == "latest"`: the newest complete checkpoint under `checkpoints_dir` whose files all load; a damaged
    one is skipped with a warning naming the bad file, and the previous one is tried. None when there is no
    checkpoint; a `CheckpointLoadError` when there are only damaged ones. A named checkpoint folder must load
    entirely: a damaged file is a `CheckpointLoadError` naming it (`read_checkpoint_meta`'s error when it is not a
    checkpoint at all).
    """
    if str(requested) != "latest":
        read_checkpoint_meta(requested)
        try:
            verify_checkpoint(requested)
        except CheckpointLoadError as error:
            raise CheckpointLoadError(
                f"Cannot resume from {requested}: {error} Resume from an earlier checkpoint, or pass "
                "--resume_from_checkpoint latest to use the newest one that loads."
            ) from error
        return Path(requested)
    damaged = []
    for _, checkpoint in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(checkpoint)
        except CheckpointLoadError as error:
            logger.warning("Skipping damaged checkpoint %s: %s Trying the previous one.", checkpoint, error)
            damaged.append(str(error))
            continue
        return checkpoint
    if damaged:
        raise CheckpointLoadError(
            f"No checkpoint under {checkpoints_dir} loads: {' '.join(damaged)} Start afresh with "
            "--overwrite_output_dir (deletes them)."
        )
    return None


def checkpoint_to_resume(checkpoints_dir: str | os.PathLike, resume_from_checkpoint: str | os.PathLike | None,
                         overwrite: bool = False) -> Path | None:
    """Where a run starts: the verified checkpoint to resume from (`resume_checkpoint`; None: start from scratch).

    A fresh run into a folder that holds an earlier run's checkpoints is refused, since `latest` could later pick one
    of the stale ones, unless `overwrite`, which deletes them (the process of rank 0 does; call it on every process
    before the Accelerator exists).
    """
    checkpoint = resume_checkpoint(checkpoints_dir, resume_from_checkpoint) if resume_from_checkpoint else None
    if resume_from_checkpoint and checkpoint is None:
        logger.warning("No checkpoint under %s: starting from scratch.", checkpoints_dir)
    if checkpoint is None and list_checkpoints(checkpoints_dir):
        if not overwrite:
            raise ValueError(f"{checkpoints_dir} holds checkpoints of an earlier run. Continue it with "
                             "--resume_from_checkpoint latest, or pass --overwrite_output_dir to start afresh.")
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(checkpoints_dir)
    return checkpoint


def _remove(path: Path, staging: Path) -> None:
    """Delete a folder by first moving it out of `checkpoints/` (into the staging folder), so a kill mid-delete
    never leaves a half-deleted folder that looks like a checkpoint."""
    staging.mkdir(parents=True, exist_ok=True)
    trash = staging / f"deleting-{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


class CheckpointSaveError(RuntimeError):
    """A checkpoint or the final model could not be written (full disk, read-only or vanished folder); the message
    names the path, the free space and what was kept."""


def write_failure_message(path: str | os.PathLike, error: Exception, kept: str) -> str:
    """An explanation of a failed write into `path`: the error, the free space on that filesystem, what was `kept`
    and the fix."""
    where = Path(path)
    while not where.exists() and where != where.parent:  # the free space of the filesystem the path is on
        where = where.parent
    try:
        free = f"{shutil.disk_usage(where).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    return (f"Could not write {path} ({type(error).__name__}: {error}); {free} there. {kept} Free up space or make the "
            "folder writable (or pick another --output_dir on a disk with room), then resume with "
            "--resume_from_checkpoint latest.")


@contextmanager
def explained_write_errors(path: str | os.PathLike, last_checkpoint: str | os.PathLike | None):
    """Turn a failure while writing into `path` (the final `save_pretrained` of a run) into a `CheckpointSaveError`
    naming the path, the free space and the newest checkpoint to resume from (`write_failure_message`)."""
    try:
        yield
    except Exception as error:
        kept = (f"The newest checkpoint, {last_checkpoint}, is intact (a resume redoes the steps after it)."
                if last_checkpoint else "There is no checkpoint to resume from (--checkpointing_steps saves some).")
        raise CheckpointSaveError(write_failure_message(path, error, kept)) from error


def _kept_note(checkpoints_dir: Path, staging: Path) -> str:
    newest = latest_checkpoint(checkpoints_dir)
    leftover = ("nothing half-written was left" if not staging.exists() else
                f"the partial save in {staging} could not be removed (delete it; resuming ignores it)")
    return (f"The previous checkpoints are intact (newest: {newest}) and {leftover}." if newest else
            f"There was no checkpoint yet, and {leftover}.")


def save_checkpoint(accelerator, step: int, meta: dict | None = None) -> Path:
    """`accelerator.save_state()` into `<project_dir>/checkpoints/checkpoint_<iteration>`, kill-safe (see the module
    docstring); returns the checkpoint folder. Call on every process.

    The Accelerator needs `ProjectConfiguration(project_dir=..., automatic_checkpoint_naming=True)`; its `total_limit`
    (None: keep all) applies after the new checkpoint is in place. `meta.json` records `step`, the save iteration and
    `meta`. Assumes the main process can see every process's files (a shared filesystem on multi-node runs, as
    `save_state` itself does).

    A write error on any process (full disk, read-only folder; torch and safetensors report some as other exceptions
    than OSError, so any Exception counts) removes the staging folder, keeps the previous checkpoints and raises
    `CheckpointSaveError` on every process (they agree on it, so none waits forever for the others), naming the path
    and the free space. (A process failing inside a collective of a sharded save, FSDP or DeepSpeed, cannot be
    caught this way.)
    """
    config = accelerator.project_configuration
    if not config.automatic_checkpoint_naming or config.project_dir is None:
        raise ValueError("save_checkpoint needs an Accelerator built with ProjectConfiguration(project_dir=..., "
                         "automatic_checkpoint_naming=True).")
    project_dir = Path(config.project_dir)
    checkpoints_dir, staging = project_dir / CHECKPOINTS_DIR, project_dir / STAGING_DIR
    iteration = config.iteration
    final = checkpoints_dir / f"checkpoint_{iteration}"  # Accelerate's name for this save

    def failed(error: Exception | None) -> None:
        """Every process learns whether any failed; then the staging folder goes and all of them raise."""
        if not agreed_flags(accelerator, error is not None)[0]:
            return
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        if error is None:
            raise CheckpointSaveError(f"Another process could not write checkpoint {final} (its error names the "
                                      f"path). {_kept_note(checkpoints_dir, staging)}")
        raise CheckpointSaveError(write_failure_message(final, error, _kept_note(checkpoints_dir, staging))) from error

    error = None
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted save or deletion
        try:
            checkpoints_dir.mkdir(parents=True, exist_ok=True)
        except Exception as caught:
            error = caught
    failed(error)
    config.project_dir = str(staging)  # Accelerate names and writes <project_dir>/checkpoints/checkpoint_<iteration>
    try:
        written = Path(accelerator.save_state())
    except Exception as caught:
        error = caught
    finally:
        config.project_dir = str(project_dir)
    failed(error)
    if accelerator.is_main_process:
        try:
            with open(written / CHECKPOINT_META, "w") as handle:
                json.dump({"step": step, "iteration": iteration, **(meta or {})}, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(written)
            if final.exists():  # a run resumed from an earlier checkpoint re-makes the later ones
                _remove(final, staging)
            os.replace(written, final)
            _fsync_dir(checkpoints_dir)
        except Exception as caught:
            error = caught
    failed(error)
    if accelerator.is_main_process:
        if config.total_limit:
            for _, old in list_checkpoints(checkpoints_dir)[:-config.total_limit]:
                _remove(old, staging)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_training(accelerator, checkpoint_dir: str | os.PathLike, meta: dict, data_identity: dict,
                    allow_changed_data: bool, max_steps: int) -> tuple[int, int, int]:
    """Restore a run saved by `save_checkpoint` with a meta of `step`, `epoch`, `batches_in_epoch`, `max_steps` and
    the data's identity (`data.pretraining.dataset_identity`): Accelerate's state (weights, optimizer, schedule, RNG
    and registered objects) is loaded and the training position returned as (step, epoch, batches in the epoch).
    Other data than the checkpoint's are refused unless `allow_changed_data`, which starts a fresh epoch instead
    (`check_resume_dataset`); a different `max_steps` is warned about. Call on every process."""
    new_data_note = check_resume_dataset(meta, data_identity, checkpoint_dir, allow_changed_data)
    accelerator.print(f"Resuming from {checkpoint_dir}")
    accelerator.load_state(str(checkpoint_dir))
    if meta["max_steps"] != max_steps:
        accelerator.print(f"Warning: the checkpoint was made for --max_steps {meta['max_steps']}, this run has "
                          f"{max_steps}: the lr schedule will not match the original run.")
    if new_data_note:
        accelerator.print(new_data_note)
        return meta["step"], meta["epoch"] + 1, 0
    return meta["step"], meta["epoch"], meta["batches_in_epoch"]


def check_resume_dataset(meta: dict, identity: dict, checkpoint_dir: str | os.PathLike,
                         allow_changed: bool = False) -> str | None:
    """Whether a run may resume from `checkpoint_dir` (whose `meta.json` is `meta`) on data whose `identity` is
    `data.pretraining.dataset_identity`'s: None when it is the data the checkpoint was made on; when not, a
    ValueError naming both sizes and fingerprints, or, with `allow_changed`, the note to print for starting a fresh
    epoch on the new data (the caller moves to epoch + 1, batch 0). A checkpoint from before these records passes,
    with a warning that the data could not be checked."""
    keys = ("num_images", "dataset_fingerprint")
    if not all(key in meta for key in keys):
        logger.warning("%s does not record its dataset (written by an earlier version): cannot check that this run "
                       "resumes on the same data.", checkpoint_dir)
        return None
    if all(meta[key] == identity[key] for key in keys):
        return None
    change = (f"{checkpoint_dir} was made on a dataset of {meta['num_images']} images (fingerprint "
              f"{meta['dataset_fingerprint']}); this run's has {identity['num_images']} (fingerprint "
              f"{identity['dataset_fingerprint']})")
    if not allow_changed:
        raise ValueError(f"{change}: its data position (epoch {meta['epoch']}, batch {meta['batches_in_epoch']}) "
                         "would point at other images. Resume on the same data (same --dataset, --max_train_samples "
                         "and --seed), or pass --resume_on_changed_dataset to keep the weights, optimizer and schedule "
                         "and start a fresh epoch on the new data.")
    return (f"Note: {change}. --resume_on_changed_dataset: starting a fresh epoch ({meta['epoch'] + 1}) at its first "
            "batch on this run's data.")


__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKPOINT_META",
    "CheckpointLoadError",
    "CheckpointSaveError",
    "check_resume_dataset",
    "checkpoint_to_resume",
    "explained_write_errors",
    "latest_checkpoint",
    "list_checkpoints",
    "read_checkpoint_meta",
    "resume_checkpoint",
    "resume_training",
    "save_checkpoint",
    "verify_checkpoint",
    "write_failure_message",
]
