#!/usr/bin/env python
# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Pretrain NEPA (next-embedding predictive autoregression) on your own images with Accelerate.

No labels are used: a causal ViT learns to predict the embedding of the next patch (reference recipe: AdamW
(0.9, 0.95), weight decay 0.05, lr = 3e-4 x global batch / 256, 2.5% warmup then cosine, grad clip 1.0, bf16,
RandomResizedCrop + flip). The same script runs on one CPU, one GPU, or many through `accelerate launch`
(DDP, FSDP, DeepSpeed) without code changes. The data pipeline is the authors': torchvision RandomResizedCrop(size)
with its defaults (scale 0.08-1, ratio 3/4-4/3, bilinear), horizontal flip, the image processor's normalisation.

    python examples/pretrain_nepa.py --model nepa-vit-tiny --dataset fashion_mnist --output_dir out \
        --max_steps 1000 --per_device_batch_size 64 --checkpointing_steps 200 --seed 0
    accelerate launch --multi_gpu --num_processes 8 examples/pretrain_nepa.py ...        # GPUs
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 examples/pretrain_nepa.py ...   # 2 CPU processes
    python examples/pretrain_nepa.py --demo                    # tiny NEPA on the bundled images, a few minutes

Outputs in --output_dir: the model (`AutoModelForPreTraining.from_pretrained(output_dir)`) and its image processor,
`ema.safetensors` (with --ema_decay), `metrics.jsonl` (one JSON object per logged step), `run_config.json`, and
`checkpoints/checkpoint-<step>/` (resume with --resume_from_checkpoint latest: the newest checkpoint whose files all
load). Unreadable images are skipped with a warning and counted once per file (`images_skipped`); the loss is the
mean over the readable images of the global batch, so any number of processes trains the same model.
"""

import argparse
import math
import os
import shutil
import time
from pathlib import Path

import datasets
import torch
import transformers
from transformers import AutoImageProcessor, AutoModelForPreTraining
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.tracking import get_available_trackers
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from nepa_hf import NEPA_PRESETS, NepaConfig, NepaForPreTraining, NepaImageProcessor
from nepa_hf.data.images import BUILTIN_DATASETS, load_image_dataset, resolve_column
from nepa_hf.training.ema import create_ema, save_ema
from nepa_hf.training.pretraining import (
    CollapseMonitor,
    EpochShuffleSampler,
    JsonlTracker,
    NepaPretrainingObjective,
    PretrainingCollator,
    PretrainingImageDataset,
    PretrainingIterableDataset,
    UNKNOWN_FILE,
    create_pretraining_optimizer,
    list_checkpoints,
    read_checkpoint_meta,
    readable_loss_weight,
    resume_checkpoint,
    save_checkpoint,
    scaled_learning_rate,
    select_readable,
    skipped_file_keys,
    warmup_cosine_schedule,
    warmup_steps_for,
)
from nepa_hf.data.transforms import INTERPOLATIONS, pretraining_transform


# `--demo`: a micro NEPA on the bundled Fashion-MNIST subset; 200 steps of 32 images took 2m49s on two shared CPU
# cores (one thread) with the loss going from -0.60 to -0.79. The short run uses a higher peak lr than the
# linear-scaling rule gives at batch 32 (3.75e-5), which would barely move in 200 steps.
DEMO_DEFAULTS = dict(
    model="nepa-vit-micro", dataset="bundled", output_dir="outputs/pretrain-demo", max_steps=200,
    per_device_batch_size=32, learning_rate=1e-3, warmup_ratio=0.05, logging_steps=25, checkpointing_steps=100,
    mixed_precision="no", dataloader_num_workers=0,
)
IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "images", "jpg", "png", "webp")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true",
                        help=f"Preset: {', '.join(f'{k}={v}' for k, v in DEMO_DEFAULTS.items())} (flags still win).")
    # Model
    parser.add_argument("--model", default=None,
                        help=f"A preset ({', '.join(sorted(NEPA_PRESETS))}), a config JSON file, or a NEPA "
                             "checkpoint folder / Hub id to continue from.")
    parser.add_argument("--config_overrides", default=None,
                        help="Comma-separated config fields for a new model, e.g. 'hidden_size=64,num_hidden_layers=4'.")
    parser.add_argument("--image_size", type=int, default=None,
                        help="Training resolution (crop size); default: the config's image_size.")
    parser.add_argument("--num_channels", type=int, choices=(1, 3), default=None,
                        help="3: grayscale sources become RGB (default); 1: train a grayscale model.")
    parser.add_argument("--attn_implementation", default=None, help="sdpa (default), eager, flex_attention, ...")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    # Data
    parser.add_argument("--dataset", default=None,
                        help=f"Built-in ({', '.join(BUILTIN_DATASETS)}), a local image folder, or a Hub dataset id.")
    parser.add_argument("--dataset_config_name", default=None, help="Hub dataset configuration name.")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--streaming", action="store_true", help="Stream a Hub dataset instead of downloading it.")
    parser.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="Shuffle buffer when streaming.")
    parser.add_argument("--image_column", default=None, help="Column with the images (default: detected).")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use only this many images.")
    parser.add_argument("--dataloader_num_workers", type=int, default=None,
                        help="Decoding workers per process (default: 0 on CPU, min(8, cores per process) on GPU).")
    parser.add_argument("--crop_min_scale", type=float, default=0.08, help="RandomResizedCrop minimum area scale.")
    parser.add_argument("--hflip_prob", type=float, default=0.5)
    parser.add_argument("--interpolation", default="bilinear", choices=INTERPOLATIONS,
                        help="RandomResizedCrop resampling (the authors: torchvision's default, bilinear).")
    # Recipe (reference §8)
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Start afresh even if --output_dir holds checkpoints of an earlier run (deletes them).")
    parser.add_argument("--per_device_batch_size", type=int, default=64)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=None, help="Optimizer updates (overrides --num_train_epochs).")
    parser.add_argument("--num_train_epochs", type=float, default=1.0)
    parser.add_argument("--base_learning_rate", type=float, default=3e-4, help="lr = base x global batch / 256.")
    parser.add_argument("--learning_rate", type=float, default=None, help="Absolute peak lr (skips the scaling rule).")
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.95)
    parser.add_argument("--warmup_ratio", type=float, default=0.025)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping (the norm is still logged).")
    parser.add_argument("--mixed_precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
                        help="auto: bf16 on GPUs and CPUs that run it natively (AMX), fp16 on older GPUs, else fp32.")
    parser.add_argument("--ema_decay", type=float, default=None,
                        help="Keep an EMA of the weights (reference 0.9999), saved as ema.safetensors.")
    parser.add_argument("--seed", type=int, default=0)
    # Ablations (reference §4; timm's NEPA task)
    parser.add_argument("--no-shift", dest="no_shift", action="store_true",
                        help="Same-position targets: each output predicts its own input embedding.")
    parser.add_argument("--bidirectional", action="store_true", help="No causal mask.")
    parser.add_argument("--no-stop-grad", dest="no_stop_grad", action="store_true",
                        help="Let gradients flow into the targets (collapses).")
    parser.add_argument("--mask-ratio", dest="mask_ratio", type=float, default=0.0,
                        help="Replace this fraction of input patches with a learned mask token; targets stay clean.")
    parser.add_argument("--pixel-loss-weight", dest="pixel_loss_weight", type=float, default=0.0,
                        help="Add this weight x a next-patch pixel loss through a small MLP pixel decoder.")
    parser.add_argument("--pixel-loss", dest="pixel_loss", default="mse", choices=("mse", "l1"))
    parser.add_argument("--pixel_decoder_hidden_size", type=int, default=None)
    # Logging and checkpoints
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--report_to", default="none",
                        help="Extra trackers besides metrics.jsonl: comma-separated tensorboard, trackio, wandb, "
                             "or none.")
    parser.add_argument("--checkpointing_steps", type=int, default=None, help="Save a resumable state every N steps.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=3, help="Keep only the newest N checkpoints.")
    parser.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder.")
    parser.add_argument("--collapse_min_spread", type=float, default=0.05,
                        help="Warn when the predicted-embedding spread falls below this.")

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
        # 0 used to fall through to one epoch: say what the flag takes instead of guessing.
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
        config_dict = {**NepaConfig.from_json_file(args.model).to_dict(), **overrides}
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
    patch = config.patch_size
    num_patches = (image_size // patch) ** 2
    transform = pretraining_transform(image_size, mean, std, scale=(args.crop_min_scale, 1.0),
                                      interpolation=args.interpolation, hflip_prob=args.hflip_prob)
    wrapper_kwargs = dict(image_column=image_column, transform=transform, seed=args.seed,
                          num_channels=config.num_channels, mask_ratio=args.mask_ratio,
                          num_patches=num_patches if args.mask_ratio > 0 else None)
    num_workers = args.dataloader_num_workers
    if num_workers is None:
        cores = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
        num_workers = min(8, cores) if accelerator.device.type == "cuda" else 0
    if args.streaming:
        if isinstance(dataset, datasets.Dataset):  # built-in or local data: stream it too, e.g. to try the path
            dataset = dataset.to_iterable_dataset(num_shards=max(1, num_workers))
        dataset = dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        train_dataset, sampler = PretrainingIterableDataset(dataset, **wrapper_kwargs), None
    else:
        train_dataset = PretrainingImageDataset(dataset, **wrapper_kwargs)
        sampler = EpochShuffleSampler(len(train_dataset), seed=args.seed)
        global_batch = args.per_device_batch_size * accelerator.num_processes
        if len(train_dataset) < global_batch:
            raise ValueError(f"The dataset has {len(train_dataset)} images, fewer than one global batch "
                             f"({global_batch}): lower --per_device_batch_size.")
    collator = PretrainingCollator(config.num_channels, image_size, num_patches if args.mask_ratio > 0 else None)
    return DataLoader(
        train_dataset, batch_size=args.per_device_batch_size, sampler=sampler, collate_fn=collator,
        num_workers=num_workers, drop_last=True, pin_memory=accelerator.device.type == "cuda",
        # An explicit generator keeps DataLoader iterator creation off the global RNG, which the model's RoPE
        # augmentation draws from: resuming then replays the same draws.
        generator=torch.Generator().manual_seed(args.seed),
    ), len(dataset) if not args.streaming else None


def gather_skipped(accelerator, new_keys: list, keys: set) -> int:
    """Move every process's newly seen unreadable-file keys into `keys` (the union, on the main process; a
    collective, so call it on every process at the same point) and empty `new_keys`. Returns the number of
    skips that name no file (`UNKNOWN_FILE`), which cannot be told apart and count once each."""
    gathered = gather_object([list(new_keys)]) if accelerator.num_processes > 1 else [list(new_keys)]
    new_keys.clear()
    found = [key for part in gathered for key in part]
    keys.update(key for key in found if key != UNKNOWN_FILE)
    return sum(key == UNKNOWN_FILE for key in found)


def resolve_mixed_precision(choice):
    """auto: bf16 where the hardware runs it natively (the reference trains in bf16), else fp16 on older GPUs and
    fp32 on CPUs without AMX. Measured on a shared 2-core AMX Xeon: ViT-B/14 at 224 trains 2.9x faster in bf16 with
    one thread (1.5x with two), ViT-Ti/14 on par."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        amx = torch.cpu._is_amx_tile_supported()  # no public API yet
    except AttributeError:  # pragma: no cover - older torch
        amx = False
    return "bf16" if amx else "no"


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    checkpoints_dir = output_dir / "checkpoints"

    # Resume position first: the metrics log drops records past it.
    resume_dir = None
    if args.resume_from_checkpoint:
        # Every file must load: `latest` falls back past damaged checkpoints (with a warning naming the file), a named
        # checkpoint with a damaged file is an error naming it.
        resume_dir = resume_checkpoint(checkpoints_dir, args.resume_from_checkpoint)
        if resume_dir is None:
            print(f"No checkpoint under {checkpoints_dir}: starting from scratch.")
    resume_meta = read_checkpoint_meta(resume_dir) if resume_dir is not None else None
    if resume_dir is None and list_checkpoints(checkpoints_dir):
        # A fresh run must not mix its checkpoints with an earlier run's: `latest` could then pick a stale one.
        if not args.overwrite_output_dir:
            raise ValueError(f"{checkpoints_dir} holds checkpoints of an earlier run. Continue it with "
                             "--resume_from_checkpoint latest, or pass --overwrite_output_dir to start afresh.")
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(checkpoints_dir)

    trackers = [JsonlTracker(output_dir / "metrics.jsonl", resume_step=resume_meta["step"] if resume_meta else None)]
    for name in filter(lambda n: n and n != "none", (n.strip() for n in args.report_to.split(","))):
        if name not in get_available_trackers():
            raise ValueError(f"--report_to {name}: the {name} package is not installed (pip install {name}).")
        trackers.append(name)
    # Model and image processor (same seed, hence same init, on every process)
    set_seed(args.seed)
    model, processor = load_model(args)
    config = model.config
    unused_mask_token = config.use_mask_token and args.mask_ratio == 0

    mixed_precision = resolve_mixed_precision(args.mixed_precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        # DDP errors out on parameters without gradient: a checkpoint's mask token trained without masking.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused_mask_token else [],
    )
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    if unused_mask_token:
        accelerator.print("Note: the model has a mask token but --mask-ratio is 0; it stays unused.")
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    if accelerator.device.type == "cpu" and threads > 1 and hasattr(os, "getloadavg") and os.getloadavg()[0] > cores:
        accelerator.print(f"Note: the CPU is busy (load {os.getloadavg()[0]:.1f} on {cores} cores) and each process "
                          f"runs {threads} threads; oversubscribed threads can slow training several-fold. Consider "
                          "OMP_NUM_THREADS=1.")
    image_size = args.image_size or config.image_size
    if image_size % config.patch_size:
        raise ValueError(f"--image_size {image_size} is not a multiple of the patch size {config.patch_size}.")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    mean, std = list(processor.image_mean), list(processor.image_std)
    if config.num_channels == 1:
        mean, std = mean[:1], std[:1]
    objective = NepaPretrainingObjective(model, args.pixel_loss_weight, args.pixel_loss,
                                         args.pixel_decoder_hidden_size)

    # Data
    train_dataloader, num_images = build_train_dataloader(args, config, image_size, mean, std, accelerator)

    # Optimizer and schedule (in optimizer updates; stepped by hand once per update, whatever the process count)
    global_batch = args.per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate or scaled_learning_rate(args.base_learning_rate, global_batch)
    optimizer = create_pretraining_optimizer(objective, learning_rate, args.weight_decay,
                                             (args.adam_beta1, args.adam_beta2))
    objective, optimizer, train_dataloader = accelerator.prepare(objective, optimizer, train_dataloader)
    if num_images is not None:
        updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        max_steps = args.max_steps or max(1, math.ceil(args.num_train_epochs * updates_per_epoch))
    else:
        updates_per_epoch, max_steps = None, args.max_steps
    warmup_steps = warmup_steps_for(max_steps, args.warmup_ratio)
    scheduler = warmup_cosine_schedule(optimizer, max_steps, warmup_steps)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(objective)
    ema = create_ema(unwrapped.model, decay=args.ema_decay) if args.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # Logging window, summed over micro-batches (and processes when logged): loss, embedding loss and pixel loss
    # summed over readable images, micro-batches, readable images, reads of unreadable images, seconds waiting for
    # data, grad norm, optimizer steps.
    window = torch.zeros(9, device=accelerator.device)
    global_step = epoch = batches_done = images_seen = 0
    # Unreadable files, counted once each however often they are read: keys seen by this process since the last
    # gather, and (main process) all keys so far plus skips that name no file.
    new_skipped_keys, skipped_keys, unknown_skips = [], set(), 0

    # Resume: weights, optimizer, schedule, EMA, RNG states; the data position and counters come from meta.json.
    if resume_dir is not None:
        accelerator.print(f"Resuming from {resume_dir}")
        accelerator.load_state(str(resume_dir))
        global_step, epoch = resume_meta["step"], resume_meta["epoch"]
        batches_done = resume_meta["batches_in_epoch"]
        images_seen = resume_meta["images_seen"]
        skipped_keys = set(resume_meta.get("skipped_keys", []))
        unknown_skips = resume_meta.get("unknown_skips", resume_meta["images_skipped"] - len(skipped_keys))
        if accelerator.is_main_process:  # the partly filled window of the interrupted run (already summed)
            window += torch.tensor(resume_meta["log_window"], device=accelerator.device)
        if resume_meta.get("max_steps") not in (None, max_steps):
            accelerator.print(f"Warning: the checkpoint was made for --max_steps {resume_meta['max_steps']}, this run "
                              f"has {max_steps}: the lr schedule will not match the original run.")

    run_config = {**vars(args), "mixed_precision": mixed_precision, "learning_rate": learning_rate,
                  "global_batch_size": global_batch, "max_steps": max_steps, "warmup_steps": warmup_steps,
                  "num_processes": accelerator.num_processes, "image_size": image_size, "num_images": num_images,
                  "num_parameters": sum(p.numel() for p in unwrapped.model.parameters())}
    accelerator.init_trackers("nepa-pretraining", config=run_config)
    accelerator.print(
        f"NEPA pretraining: {run_config['num_parameters']:,} parameters, {num_images or 'streamed'} images at "
        f"{image_size}px, {accelerator.num_processes} process(es) x {args.per_device_batch_size} x "
        f"{args.gradient_accumulation_steps} accumulation = global batch {global_batch}, {max_steps} steps "
        f"({warmup_steps} warmup), peak lr {learning_rate:.3g}, {mixed_precision} precision, device "
        f"{accelerator.device}."
    )

    monitor = CollapseMonitor(min_spread=args.collapse_min_spread)
    progress = tqdm(total=max_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="pretraining")
    window_start = time.perf_counter()
    objective.train()
    while global_step < max_steps:
        train_dataloader.set_epoch(epoch)  # reseeds the shuffle and the per-sample augmentation
        active_dataloader = (accelerator.skip_first_batches(train_dataloader, batches_done) if batches_done
                             else train_dataloader)
        batch_index, produced = batches_done, False
        wait_start = time.perf_counter()
        for batch in active_dataloader:
            window[6] += time.perf_counter() - wait_start
            batch_index, produced = batch_index + 1, True
            inputs, num_skipped, all_skipped = select_readable(batch)
            if num_skipped:  # rare: only then read the keys off the device
                new_skipped_keys.extend(skipped_file_keys(batch))
            readable = batch["valid"].sum()
            with accelerator.accumulate(objective):
                outputs = objective(pixel_values=inputs["pixel_values"],
                                    bool_masked_pos=inputs.get("bool_masked_pos"))
                # The gradient is the mean over the readable images of every process, whatever their split across
                # processes (2 processes == 1); a process with only unreadable images still runs (DDP needs every
                # process) with weight 0.
                loss = outputs.loss * readable_loss_weight(batch["valid"], accelerator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(objective.parameters(), args.max_grad_norm or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not all_skipped:  # the logged losses are means over the readable images of the window
                window[0] += outputs.loss.detach().float() * readable
                window[1] += outputs.embedding_loss.detach().float() * readable
                if outputs.pixel_loss is not None:
                    window[2] += outputs.pixel_loss.detach().float() * readable
                window[4] += readable
            window[3] += 1
            window[5] += num_skipped

            if accelerator.sync_gradients:
                scheduler.step()
                global_step += 1
                window[7] += torch.as_tensor(grad_norm, dtype=torch.float32, device=window.device)
                window[8] += 1
                progress.update(1)
                if ema is not None:
                    ema.update(unwrapped.model)
                if global_step % args.logging_steps == 0 or global_step == max_steps:
                    totals = accelerator.reduce(window.clone(), reduction="sum").cpu()
                    elapsed = time.perf_counter() - window_start
                    images_seen += int(totals[4])
                    unknown_skips += gather_skipped(accelerator, new_skipped_keys, skipped_keys)
                    readable_images = max(totals[4].item(), 1.0)
                    values = {
                        "loss": totals[0].item() / readable_images,
                        "embedding_loss": totals[1].item() / readable_images,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": totals[7].item() / max(totals[8].item(), 1.0),
                        "images_per_s": totals[4].item() / elapsed,
                        "data_wait_fraction": totals[6].item() / accelerator.num_processes / elapsed,
                        "epoch": epoch,
                        "images_seen": images_seen,
                        "images_skipped": len(skipped_keys) + unknown_skips,  # distinct files
                        **monitor(outputs.last_hidden_state),
                    }
                    if unwrapped.pixel_decoder is not None:
                        values["pixel_loss"] = totals[2].item() / readable_images
                    accelerator.log(values, step=global_step)
                    progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}",
                                         img_s=f"{values['images_per_s']:.0f}")
                    if monitor.collapsed:
                        accelerator.print(f"step {global_step}: warning: predicted embeddings are collapsing "
                                          f"(spread {values['embedding_spread']:.4f}).")
                    window.zero_()
                    window_start = time.perf_counter()
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    # The data position, the counters and the partly filled logging window: a resumed run
                    # continues the data stream and the metrics exactly.
                    pending = accelerator.reduce(window.clone(), reduction="sum").cpu()
                    pending[6] = 0.0  # wall time does not carry over
                    unknown_skips += gather_skipped(accelerator, new_skipped_keys, skipped_keys)
                    meta = {"epoch": epoch, "batches_in_epoch": batch_index, "max_steps": max_steps,
                            "images_seen": images_seen, "images_skipped": len(skipped_keys) + unknown_skips,
                            "skipped_keys": sorted(skipped_keys), "unknown_skips": unknown_skips,
                            "log_window": pending.tolist()}
                    save_checkpoint(accelerator, checkpoints_dir, global_step, meta, args.checkpoints_total_limit)
                if global_step >= max_steps:
                    break
            wait_start = time.perf_counter()
        else:  # the epoch ran out before max_steps
            if not produced and batches_done == 0:
                raise RuntimeError("The training data loader produced no batch: is the dataset empty?")
            epoch, batches_done = epoch + 1, 0
            continue
        break
    progress.close()
    unknown_skips += gather_skipped(accelerator, new_skipped_keys, skipped_keys)
    images_skipped = len(skipped_keys) + unknown_skips

    # Save: the model and its image processor (AutoModelForPreTraining.from_pretrained(output_dir) works), the EMA
    # weights beside it, and the training-only pixel decoder.
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(objective)  # full weights on the main process, also under FSDP/DeepSpeed
    if accelerator.is_main_process:
        model_state = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        unwrapped.model.save_pretrained(output_dir, state_dict=model_state)
        # Inference preprocessing at the training resolution with the training mean/std.
        processor_kwargs = dict(size={"height": image_size, "width": image_size}, resample=processor.resample,
                                image_mean=mean, image_std=std)
        if config.num_channels == 1:
            processor_kwargs["do_convert_rgb"] = False
        NepaImageProcessor(**processor_kwargs).save_pretrained(output_dir)
        if ema is not None:
            save_ema(ema, output_dir / "ema.safetensors")
        if unwrapped.pixel_decoder is not None:
            decoder_state = {k[len("pixel_decoder."):]: v.contiguous().cpu() for k, v in state_dict.items()
                             if k.startswith("pixel_decoder.")}
            save_file(decoder_state, str(output_dir / "pixel_decoder.safetensors"))
    accelerator.print(f"Saved the pretrained model to {output_dir} after {global_step} steps; skipped "
                      f"{images_skipped} unreadable image(s) (distinct files; the warnings name them).")
    accelerator.end_training()


if __name__ == "__main__":
    main()
