#!/usr/bin/env python
# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Pretrain NEPA (next-embedding predictive autoregression) on your own images with Accelerate.

No labels are used: a causal ViT learns to predict the embedding of the next patch, with the authors' recipe (AdamW
(0.9, 0.95), weight decay 0.05, lr = 3e-4 x global batch / 256, 2.5% warmup then cosine to 0, grad clip 1.0, bf16,
RandomResizedCrop + flip). One CPU, one GPU or many through `accelerate launch` (DDP, FSDP, DeepSpeed):

    python examples/pretrain_nepa.py --model nepa-vit-tiny --dataset fashion_mnist --output_dir out --max_steps 1000
    accelerate launch --multi_gpu --num_processes 8 examples/pretrain_nepa.py ...
    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml examples/pretrain_nepa.py ...  # or ZeRO-3
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 examples/pretrain_nepa.py ...   # 2 CPU processes
    python examples/pretrain_nepa.py --demo                    # tiny NEPA on the bundled images, a few minutes

Outputs in --output_dir: the model (`AutoModelForPreTraining.from_pretrained(output_dir)`) and its image processor,
`ema.safetensors` (with --ema_decay), `metrics.jsonl`, `run_config.json` and `checkpoints/checkpoint_<i>/` (resume with
--resume_from_checkpoint latest). Unreadable images are skipped and counted once per file; the loss is the mean over
the readable images of the global batch, so any number of processes trains the same model.
"""

import argparse
import logging
import math
import os
import time
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.tracking import get_available_trackers
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForPreTraining, get_cosine_schedule_with_warmup

from nepa_hf import NEPA_PRESETS, NepaConfig, NepaForPreTraining, NepaImageProcessor
from nepa_hf.data.images import BUILTIN_DATASETS, load_image_dataset, resolve_column
from nepa_hf.data.pretraining import UnreadableFileCounter, pretraining_dataloader, select_readable
from nepa_hf.data.transforms import INTERPOLATIONS, pretraining_transform
from nepa_hf.data.workers import default_num_workers
from nepa_hf.training.checkpointing import CHECKPOINTS_DIR, checkpoint_to_resume, read_checkpoint_meta, save_checkpoint
from nepa_hf.training.ema import create_ema, save_ema
from nepa_hf.training.monitoring import CollapseMonitor, JsonlTracker, cpu_oversubscription_note, grad_norm_tensor
from nepa_hf.training.objective import NepaPretrainingObjective, readable_loss_weight
from nepa_hf.training.optimization import create_pretraining_optimizer, scaled_learning_rate, warmup_steps_for

# `--demo`: a micro NEPA on the bundled Fashion-MNIST subset; 200 steps of 32 images took 2m49s on two shared CPU
# cores (one thread) with the loss going from -0.60 to -0.79. The short run uses a higher peak lr than the
# linear-scaling rule gives at batch 32 (3.75e-5), which would barely move in 200 steps.
DEMO_DEFAULTS = dict(
    model="nepa-vit-micro", dataset="bundled", output_dir="outputs/pretrain-demo", max_steps=200,
    per_device_batch_size=32, learning_rate=1e-3, warmup_ratio=0.05, logging_steps=25, checkpointing_steps=100,
    mixed_precision="no", dataloader_num_workers=0,
)
IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "images", "jpg", "png", "webp")
# Running sums of a logging window over micro-batches (and processes, when logged): the losses weighted by the number
# of readable images, the readable images, seconds spent waiting for data, gradient norms, optimizer updates.
RUNNING_SUMS = ("loss", "embedding_loss", "pixel_loss", "images", "data_wait_s", "grad_norm", "updates")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--demo", action="store_true", help=f"Preset: {DEMO_DEFAULTS} (flags still win).")
    # Model
    add("--model", help=f"A preset ({', '.join(sorted(NEPA_PRESETS))}), a config JSON file or a NEPA checkpoint.")
    add("--config_overrides",
        help="Comma-separated config fields for a new model, e.g. 'hidden_size=64,num_hidden_layers=4'.")
    add("--image_size", type=int, help="Training resolution (crop size); default: the config's.")
    add("--num_channels", type=int, choices=(1, 3), help="3 (default): grayscale becomes RGB; 1: a grayscale model.")
    add("--attn_implementation", help="sdpa (default), eager, flex_attention, ...")
    add("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    # Data
    add("--dataset", help=f"Built-in ({', '.join(BUILTIN_DATASETS)}), a local image folder or a Hub dataset id.")
    add("--dataset_config_name", help="Hub dataset configuration name.")
    add("--train_split", default="train")
    add("--streaming", action="store_true", help="Stream a Hub dataset instead of downloading it.")
    add("--shuffle_buffer_size", type=int, default=10_000, help="Shuffle buffer when streaming.")
    add("--image_column", help="Column with the images (default: detected).")
    add("--max_train_samples", type=int, help="Use only this many images.")
    add("--dataloader_num_workers", type=int,
        help="Per process (default: 0 on CPU, min(12, cores per process) on GPU).")
    add("--crop_min_scale", type=float, default=0.08, help="RandomResizedCrop minimum area scale.")
    add("--hflip_prob", type=float, default=0.5)
    add("--interpolation", default="bilinear", choices=INTERPOLATIONS, help="RandomResizedCrop resampling.")
    # Recipe
    add("--output_dir")
    add("--overwrite_output_dir", action="store_true", help="Start afresh, deleting an earlier run's checkpoints.")
    add("--per_device_batch_size", type=int, default=64)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--max_steps", type=int, help="Optimizer updates (overrides --num_train_epochs).")
    add("--num_train_epochs", type=float, default=1.0)
    add("--base_learning_rate", type=float, default=3e-4, help="lr = base x global batch / 256.")
    add("--learning_rate", type=float, help="Absolute peak lr (skips the scaling rule).")
    add("--weight_decay", type=float, default=0.05)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.95)
    add("--warmup_ratio", type=float, default=0.025)
    add("--max_grad_norm", type=float, default=1.0, help="0: no clipping (the norm is still logged).")
    add("--mixed_precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
        help="auto: bf16 on GPUs and on CPUs that run it natively (AMX; from hidden size 384 up), fp16 on older "
             "GPUs, else fp32.")
    add("--ema_decay", type=float, help="Keep an EMA of the weights (authors: 0.9999).")
    add("--seed", type=int, default=0)
    # Ablations (the paper's; the pixel loss is timm's NEPA task's)
    add("--no-shift", dest="no_shift", action="store_true", help="Each output predicts its own input embedding.")
    add("--bidirectional", action="store_true", help="No causal mask.")
    add("--no-stop-grad", dest="no_stop_grad", action="store_true", help="Gradients flow into the targets (collapses).")
    add("--mask-ratio", dest="mask_ratio", type=float, default=0.0,
        help="Replace this fraction of the input patches with a learned mask token (the targets stay clean).")
    add("--pixel-loss-weight", dest="pixel_loss_weight", type=float, default=0.0, help="Weight of a next-patch "
        "pixel loss (through a small MLP pixel decoder).")
    add("--pixel-loss", dest="pixel_loss", default="mse", choices=("mse", "l1"))
    add("--pixel_decoder_hidden_size", type=int)
    # Logging and checkpoints
    add("--logging_steps", type=int, default=10)
    add("--report_to", default="none", help="Trackers besides metrics.jsonl: tensorboard, trackio, wandb, or none.")
    add("--checkpointing_steps", type=int, help="Save a resumable state every N steps.")
    add("--checkpoints_total_limit", type=int, default=3, help="Keep only the newest N checkpoints.")
    add("--resume_from_checkpoint", help="'latest' or a checkpoints/checkpoint_<i> folder.")
    add("--collapse_min_spread", type=float, default=0.05, help="Warn when the embedding spread falls below this.")
    args = parser.parse_args(argv)
    if args.demo:  # demo values for everything left at its default
        for name, value in DEMO_DEFAULTS.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    for name in ("model", "dataset", "output_dir"):
        if getattr(args, name) is None:
            parser.error(f"--{name} is required (or use --demo).")
    if not 0.0 <= args.mask_ratio < 1.0:
        parser.error(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}.")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max_steps {args.max_steps}: give a positive number of optimizer updates, or leave --max_steps "
                     "out to train for --num_train_epochs.")
    if args.streaming and args.max_steps is None:
        parser.error("--streaming needs --max_steps (a streamed dataset has no length to count epochs with).")
    return args


def load_model(args):
    """NepaForPreTraining from a preset, a config JSON or a checkpoint, with the ablation switches applied."""
    overrides = NepaConfig.overrides_from_string(args.config_overrides)
    if args.no_shift:
        overrides["pretraining_shift"] = False
    if args.no_stop_grad:
        overrides["pretraining_stop_gradient"] = False
    if args.bidirectional:
        overrides["is_causal"] = False
    if args.mask_ratio > 0:
        overrides["use_mask_token"] = True
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.num_channels is not None:
        overrides["num_channels"] = args.num_channels
    attn = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    processor = NepaImageProcessor()
    if args.model in NEPA_PRESETS:
        model = AutoModelForPreTraining.from_config(NepaConfig.from_preset(args.model, **overrides), **attn)
    elif args.model.endswith(".json") and os.path.isfile(args.model):
        # The saved backbone stages follow the saved layer count: let the constructor derive them again.
        saved = {k: v for k, v in NepaConfig.from_json_file(args.model).to_dict().items()
                 if k not in ("out_indices", "out_features", "stage_names")}
        config_dict = {**saved, **overrides}
        model = AutoModelForPreTraining.from_config(NepaConfig(**config_dict), **attn)
    elif os.path.isdir(args.model) or "/" in args.model:
        folder = Path(args.model)
        if folder.is_dir() and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            model = AutoModelForPreTraining.from_config(NepaConfig.from_pretrained(args.model, **overrides), **attn)
        else:
            # fp32 master weights whatever the checkpoint dtype (Accelerate handles mixed precision).
            model = NepaForPreTraining.from_pretrained(args.model, dtype=torch.float32, **overrides, **attn)
        if os.path.isfile(os.path.join(args.model, "preprocessor_config.json")):
            processor = AutoImageProcessor.from_pretrained(args.model)
    else:
        raise ValueError(
            f"--model {args.model!r} is neither a preset ({', '.join(sorted(NEPA_PRESETS))}), a config .json file, "
            "nor a checkpoint folder."
        )
    return model, processor


def build_train_dataloader(args, config, image_size, mean, std, accelerator):
    """Per-sample decode/crop/flip/normalise (+ mask) in DataLoader workers -> float batches with a `valid` flag."""
    load_kwargs = {"name": args.dataset_config_name} if args.dataset_config_name else {}
    with accelerator.main_process_first():  # one process prepares/caches the dataset, the others reuse it
        dataset = load_image_dataset(args.dataset, split=args.train_split, streaming=args.streaming,
                                     max_samples=args.max_train_samples, seed=args.seed, **load_kwargs)
    if getattr(dataset, "column_names", None) is None:  # a streamed dataset whose columns are unknown up front
        image_column = args.image_column or "image"
    else:
        image_column = resolve_column(dataset, args.image_column, IMAGE_COLUMN_CANDIDATES, "image")
    num_workers = args.dataloader_num_workers
    if num_workers is None:  # decoding workers on GPU machines, the training process itself on CPUs
        num_workers = default_num_workers(accelerator.device, accelerator.num_processes)
    if args.streaming:
        if isinstance(dataset, datasets.Dataset):  # built-in or local data: stream it too, e.g. to try the path
            dataset = dataset.to_iterable_dataset(num_shards=max(1, num_workers))
        dataset = dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
    elif len(dataset) < args.per_device_batch_size * accelerator.num_processes:
        raise ValueError(f"The dataset has {len(dataset)} images, fewer than one global batch "
                         f"({args.per_device_batch_size * accelerator.num_processes}): lower --per_device_batch_size.")
    transform = pretraining_transform(image_size, mean, std, scale=(args.crop_min_scale, 1.0),
                                      interpolation=args.interpolation, hflip_prob=args.hflip_prob)
    return pretraining_dataloader(
        dataset, image_column, transform, batch_size=args.per_device_batch_size, image_size=image_size,
        num_channels=config.num_channels, seed=args.seed, mask_ratio=args.mask_ratio, patch_size=config.patch_size,
        num_workers=num_workers, pin_memory=accelerator.device.type == "cuda",
    ), None if args.streaming else len(dataset)


# On CPUs, bf16 autocast pays off only when the matmuls are big enough for AMX to beat the casts around them.
CPU_BF16_MIN_HIDDEN_SIZE = 384


def resolve_mixed_precision(choice, hidden_size: int):
    """auto: bf16 where the hardware runs it natively (the authors train in bf16), else fp16 on older GPUs and fp32
    on CPUs without AMX. On AMX CPUs only from ViT-S width up. Measured on a shared 2-core AMX Xeon with one thread:
    ViT-B/14 at 224 trains 2.9x faster in bf16 (1.5x with two threads), ViT-Ti/14 on par, and the D-128 micro model
    (patch 7 at 28x28, batch 128) 1.7x slower."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()  # no public API yet
    return "bf16" if amx and hidden_size >= CPU_BF16_MIN_HIDDEN_SIZE else "no"


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    # Where to start, known before the trackers start (the metrics file drops the records past a resumed step). Every
    # file of the checkpoint must load: `latest` falls back past damaged ones, a named damaged one is an error.
    resume_dir = checkpoint_to_resume(output_dir / CHECKPOINTS_DIR, args.resume_from_checkpoint,
                                      args.overwrite_output_dir)
    resume = read_checkpoint_meta(resume_dir) if resume_dir is not None else None
    trackers = [JsonlTracker(output_dir / "metrics.jsonl", resume_step=resume["step"] if resume else None)]
    for name in filter(lambda n: n and n != "none", (n.strip() for n in args.report_to.split(","))):
        if name not in get_available_trackers():
            raise ValueError(f"--report_to {name}: the {name} package is not installed (pip install {name}).")
        trackers.append(name)

    # Model (the same seed, hence the same initial weights, on every process) and Accelerator
    set_seed(args.seed)
    model, processor = load_model(args)
    config = model.config
    unused_mask_token = config.use_mask_token and args.mask_ratio == 0
    mixed_precision = resolve_mixed_precision(args.mixed_precision, model.config.hidden_size)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=mixed_precision,
        log_with=trackers,
        # Accelerate names the checkpoints (checkpoints/checkpoint_<i>) and keeps the newest `total_limit`;
        # `save_checkpoint` makes each save kill-safe. A resumed run continues the numbering.
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "runs"), automatic_checkpoint_naming=True,
            total_limit=args.checkpoints_total_limit, iteration=resume["iteration"] + 1 if resume else 0),
        # DDP errors out on parameters without gradient: a checkpoint's mask token trained without masking.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused_mask_token else [],
    )
    for library in (datasets, transformers):
        library.utils.logging.set_verbosity(logging.WARNING if accelerator.is_local_main_process else logging.ERROR)
    if unused_mask_token:
        accelerator.print("Note: the model has a mask token but --mask-ratio is 0; it stays unused.")
    if note := cpu_oversubscription_note(accelerator.device):
        accelerator.print(note)
    image_size = args.image_size or config.image_size
    if image_size % config.patch_size:
        raise ValueError(f"--image_size {image_size} is not a multiple of the patch size {config.patch_size}.")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    mean, std = list(processor.image_mean)[:config.num_channels], list(processor.image_std)[:config.num_channels]
    objective = NepaPretrainingObjective(model, args.pixel_loss_weight, args.pixel_loss, args.pixel_decoder_hidden_size)

    # Data, optimizer and schedule (in optimizer updates: stepped by hand once per update, since a prepared scheduler
    # steps once per process, and checkpointed beside the prepared objects)
    train_dataloader, num_images = build_train_dataloader(args, config, image_size, mean, std, accelerator)
    global_batch = args.per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate or scaled_learning_rate(args.base_learning_rate, global_batch)
    optimizer = create_pretraining_optimizer(objective, learning_rate, args.weight_decay,
                                             (args.adam_beta1, args.adam_beta2))
    objective, optimizer, train_dataloader = accelerator.prepare(objective, optimizer, train_dataloader)
    if args.max_steps is None:  # epochs; a streamed dataset has no length (parse_args requires --max_steps there)
        updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_steps or max(1, math.ceil(args.num_train_epochs * updates_per_epoch))
    warmup_steps = warmup_steps_for(max_steps, args.warmup_ratio)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, max_steps)  # 0 -> peak, cosine to 0
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(objective)
    ema = create_ema(unwrapped.model, decay=args.ema_decay) if args.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # Training position and counters. Resuming restores the weights, optimizer, schedule, EMA and RNG states
    # (Accelerate's state) and, from meta.json, the data position, the counters and the partly filled logging window.
    global_step = epoch = batch_in_epoch = images_seen = 0
    skipped = UnreadableFileCounter()
    sums = {name: torch.zeros((), device=accelerator.device) for name in RUNNING_SUMS}
    if resume is not None:
        accelerator.print(f"Resuming from {resume_dir}")
        accelerator.load_state(str(resume_dir))
        global_step, epoch, batch_in_epoch, images_seen = (resume[key] for key in (
            "step", "epoch", "batches_in_epoch", "images_seen"))
        skipped.load_state_dict(resume)
        if accelerator.is_main_process:  # summed over processes already
            for name, value in resume["running_sums"].items():
                sums[name] += value
        if resume["max_steps"] != max_steps:
            accelerator.print(f"Warning: the checkpoint was made for --max_steps {resume['max_steps']}, this run has "
                              f"{max_steps}: the lr schedule will not match the original run.")
    run_config = {**vars(args), "mixed_precision": mixed_precision, "learning_rate": learning_rate,
                  "global_batch_size": global_batch, "max_steps": max_steps, "warmup_steps": warmup_steps,
                  "num_processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
                  "image_size": image_size, "num_images": num_images,
                  # ZeRO-3 leaves empty placeholders in the module and keeps the size in ds_numel
                  "num_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in unwrapped.model.parameters())}
    accelerator.init_trackers("nepa-pretraining", config=run_config)
    accelerator.print(
        f"NEPA pretraining: {run_config['num_parameters']:,} parameters, {num_images or 'streamed'} images at "
        f"{image_size}px, {accelerator.num_processes} process(es) x {args.per_device_batch_size} x "
        f"{args.gradient_accumulation_steps} accumulation = global batch {global_batch}, {max_steps} steps "
        f"({warmup_steps} warmup), peak lr {learning_rate:.3g}, {mixed_precision} precision, {accelerator.device}.")

    # Training loop
    monitor = CollapseMonitor(min_spread=args.collapse_min_spread)
    progress = tqdm(total=max_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="pretraining")
    window_start = time.perf_counter()
    objective.train()
    while global_step < max_steps:
        train_dataloader.set_epoch(epoch)  # reseeds the shuffle and the per-sample augmentation
        batches = (accelerator.skip_first_batches(train_dataloader, batch_in_epoch) if batch_in_epoch
                   else train_dataloader)
        wait_start = time.perf_counter()
        for batch in batches:
            sums["data_wait_s"] += time.perf_counter() - wait_start
            batch_in_epoch += 1
            inputs, num_skipped, all_skipped = select_readable(batch)
            if num_skipped:  # rare: only then read the keys off the device
                skipped.add(batch)
            readable = batch["valid"].sum()
            with accelerator.accumulate(objective):
                outputs = objective(pixel_values=inputs["pixel_values"], bool_masked_pos=inputs.get("bool_masked_pos"))
                # The gradient is the mean over the readable images of every process, however they are split across
                # processes (2 processes == 1); a process with only unreadable images still runs, with weight 0.
                accelerator.backward(outputs.loss * readable_loss_weight(batch["valid"], accelerator))
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(objective.parameters(), args.max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not all_skipped:  # the logged losses are means over the readable images of the window
                sums["images"] += readable
                for name in ("loss", "embedding_loss", "pixel_loss"):
                    if getattr(outputs, name) is not None:
                        sums[name] += getattr(outputs, name).detach().float() * readable
            if accelerator.sync_gradients:
                scheduler.step()
                global_step += 1
                sums["grad_norm"] += grad_norm_tensor(grad_norm, accelerator.device)
                sums["updates"] += 1
                progress.update(1)
                if ema is not None:
                    ema.update(unwrapped.model)
                if global_step % args.logging_steps == 0 or global_step == max_steps:
                    totals = {name: value.item() for name, value in accelerator.reduce(sums, reduction="sum").items()}
                    elapsed, images = time.perf_counter() - window_start, max(totals["images"], 1.0)
                    images_seen += int(totals["images"])
                    metrics = {
                        "loss": totals["loss"] / images,
                        "embedding_loss": totals["embedding_loss"] / images,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": totals["grad_norm"] / totals["updates"],
                        "images_per_s": totals["images"] / elapsed,
                        "data_wait_fraction": totals["data_wait_s"] / accelerator.num_processes / elapsed,
                        "epoch": epoch,
                        "images_seen": images_seen,
                        "images_skipped": skipped.gather(accelerator),  # distinct files
                        **monitor(outputs.last_hidden_state),  # embedding_spread, mean_cosine
                    }
                    if unwrapped.pixel_decoder is not None:
                        metrics["pixel_loss"] = totals["pixel_loss"] / images
                    accelerator.log(metrics, step=global_step)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                         img_s=f"{metrics['images_per_s']:.0f}")
                    if monitor.collapsed:
                        accelerator.print(f"step {global_step}: warning: predicted embeddings are collapsing "
                                          f"(spread {metrics['embedding_spread']:.4f}).")
                    for value in sums.values():
                        value.zero_()
                    window_start = time.perf_counter()
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    # The data position, the counters and the partly filled logging window (less its wall time): a
                    # resumed run continues the data stream and the metrics exactly.
                    pending = {name: value.item() for name, value in accelerator.reduce(sums, reduction="sum").items()}
                    skipped.gather(accelerator)
                    save_checkpoint(accelerator, global_step, {
                        "epoch": epoch, "batches_in_epoch": batch_in_epoch, "max_steps": max_steps,
                        "images_seen": images_seen, "running_sums": {**pending, "data_wait_s": 0.0},
                        **skipped.state_dict()})
                if global_step == max_steps:
                    break
            wait_start = time.perf_counter()
        if global_step < max_steps:  # the epoch ran out
            if batch_in_epoch == 0:
                raise RuntimeError("The training data loader produced no batch: is the dataset empty?")
            epoch, batch_in_epoch = epoch + 1, 0
    progress.close()
    images_skipped = skipped.gather(accelerator)

    # Save the model with its image processor (inference preprocessing at the training resolution and mean/std), the
    # EMA weights and the training-only pixel decoder beside it. Full weights on the main process: FSDP2 gathers them,
    # DeepSpeed ZeRO-3 needs zero3_save_16bit_model in its config (docs/distributed.md).
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(objective)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        NepaImageProcessor(size={"height": image_size, "width": image_size}, resample=processor.resample,
                           image_mean=mean, image_std=std, do_convert_rgb=config.num_channels == 3,
                           ).save_pretrained(output_dir)
        if ema is not None:
            save_ema(ema, output_dir / "ema.safetensors")
    accelerator.print(f"Saved the pretrained model to {output_dir} after {global_step} steps; skipped "
                      f"{images_skipped} unreadable image(s) (distinct files; the warnings name them).")
    accelerator.end_training()


if __name__ == "__main__":
    main()
