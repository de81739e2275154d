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
from nepa_hf.data.images import BUILTIN_DATASETS, load_image_dataset, patch_aligned_size
from nepa_hf.data.pretraining import dataset_identity, pretraining_dataloader, pretraining_images, select_readable
from nepa_hf.data.transforms import INTERPOLATIONS, per_channel, pretraining_transform
from nepa_hf.data.workers import default_num_workers
from nepa_hf.hub.loading import load_pretrained
from nepa_hf.training.checkpointing import (CHECKPOINTS_DIR, checkpoint_to_resume, explained_write_errors,
                                            read_checkpoint_meta, resume_training, save_checkpoint)
from nepa_hf.training.config_overrides import parse_config_overrides, preset_config
from nepa_hf.training.ema import create_ema, save_ema
from nepa_hf.training.long_runs import (DEFAULT_MAX_NONFINITE_STEPS, PreemptionSignal, agreed_flags, exit_preempted,
                                        nonfinite_step, parse_signal_names)
from nepa_hf.training.monitoring import CollapseMonitor, JsonlTracker, cpu_oversubscription_note
from nepa_hf.training.objective import NepaPretrainingObjective, readable_loss_weight
from nepa_hf.training.optimization import create_pretraining_optimizer, scaled_learning_rate, warmup_steps_for
from nepa_hf.training.precision import resolve_mixed_precision
from nepa_hf.training.pretraining_metrics import PretrainingMetrics

# `--demo`: a micro NEPA on the bundled Fashion-MNIST subset; 200 steps of 32 images took 2m49s on two shared CPU
# cores (one thread) with the loss going from -0.60 to -0.79. The short run uses a higher peak lr than the
# linear-scaling rule gives at batch 32 (3.75e-5), which would barely move in 200 steps.
DEMO_DEFAULTS = dict(model="nepa-vit-micro", dataset="bundled", output_dir="outputs/pretrain-demo", max_steps=200,
                     per_device_batch_size=32, learning_rate=1e-3, warmup_ratio=0.05, logging_steps=25,
                     checkpointing_steps=100, mixed_precision="no", dataloader_num_workers=0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--demo", action="store_true", help=f"Preset: {DEMO_DEFAULTS} (flags still win).")
    # Model
    add("--model", help=f"A preset ({', '.join(sorted(NEPA_PRESETS))}), a config JSON file or a NEPA checkpoint.")
    add("--config_overrides", help="Config fields of a new model, e.g. 'hidden_size=64,num_hidden_layers=4'.")
    add("--image_size", type=int, help="Training resolution (crop size); default: the config's.")
    add("--num_channels", type=int, choices=(1, 3), help="3 (default): grayscale becomes RGB; 1: a grayscale model.")
    add("--attn_implementation", help="sdpa (default), eager, flex_attention, ...")
    add("--gradient_checkpointing", action="store_true")
    # Data
    add("--dataset", help=f"Built-in ({', '.join(BUILTIN_DATASETS)}), a local image folder or a Hub dataset id.")
    add("--dataset_config_name")
    add("--train_split", default="train")
    add("--streaming", action="store_true", help="Stream a Hub dataset instead of downloading it.")
    add("--shuffle_buffer_size", type=int, default=10_000)
    add("--image_column", help="default: detected")
    add("--max_train_samples", type=int)
    add("--dataloader_num_workers", type=int, help="Per process (default: 0 on CPU, min(12, cores) on GPU).")
    add("--crop_min_scale", type=float, default=0.08, help="RandomResizedCrop minimum area scale.")
    add("--random_crop_padding", type=int, default=0,
        help="N > 0: pad N px and random-crop (a shift, for small images) instead of RandomResizedCrop "
             "(--crop_min_scale then unused).")
    add("--hflip_prob", type=float, default=0.5)
    add("--image_mean", type=float, nargs="+", help="Normalisation mean (default: the model's image processor's).")
    add("--image_std", type=float, nargs="+", help="Normalisation std (default: the model's image processor's).")
    add("--interpolation", default="bilinear", choices=INTERPOLATIONS)
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
        help="auto: bf16 where the hardware runs it natively, fp16 on older GPUs, else fp32 (training.precision).")
    add("--ema_decay", type=float, help="Keep an EMA of the weights (authors: 0.9999).")
    add("--seed", type=int, default=0)
    # Ablations (the paper's; the pixel loss is timm's NEPA task's)
    add("--no-shift", dest="no_shift", action="store_true", help="Each output predicts its own input embedding.")
    add("--bidirectional", action="store_true", help="No causal mask (is_causal=False).")
    add("--no-stop-grad", dest="no_stop_grad", action="store_true", help="Gradients flow into the targets (collapses).")
    add("--mask-ratio", dest="mask_ratio", type=float, default=0.0, help="Input patches given the mask token.")
    add("--pixel-loss-weight", dest="pixel_loss_weight", type=float, default=0.0, help="Next-patch pixel loss.")
    add("--pixel-loss", dest="pixel_loss", default="mse", choices=("mse", "l1"))
    add("--pixel_decoder_hidden_size", type=int)
    # Logging and checkpoints
    add("--logging_steps", type=int, default=10)
    add("--report_to", default="none", help="Trackers besides metrics.jsonl: tensorboard, trackio, wandb, or none.")
    add("--checkpointing_steps", type=int, help="Save a resumable state every N steps.")
    add("--checkpoints_total_limit", type=int, default=3, help="Keep only the newest N checkpoints.")
    add("--resume_from_checkpoint", help="'latest' or a checkpoints/checkpoint_<i> folder.")
    add("--collapse_min_spread", type=float, default=0.05, help="Warn when the embedding spread falls below this.")
    add("--preemption_signals", default="SIGTERM,SIGUSR1", help="On one: checkpoint, exit 75 (resumable). Or none.")
    add("--max_nonfinite_steps", type=int, default=DEFAULT_MAX_NONFINITE_STEPS, help="Skipped steps in a row: stop.")
    add("--resume_on_changed_dataset", action="store_true", help="Resume onto other data in a fresh epoch.")
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
    if args.random_crop_padding < 0:
        parser.error(f"--random_crop_padding must be >= 0 pixels, got {args.random_crop_padding}.")
    if args.image_std is not None and min(args.image_std) <= 0:
        parser.error(f"--image_std must be positive, got {args.image_std}.")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max_steps {args.max_steps}: give a positive number of optimizer updates, or leave --max_steps "
                     "out to train for --num_train_epochs.")
    if args.streaming and args.max_steps is None:
        parser.error("--streaming needs --max_steps (a streamed dataset has no length to count epochs with).")
    return args


def load_model(args):
    """NepaForPreTraining (fp32 master weights) and its image processor, from a preset, a config JSON or a checkpoint
    (without weights: its config), with the ablation switches applied."""
    overrides = parse_config_overrides(args.config_overrides)
    # Causal unless --bidirectional, left unset so that heads built from the checkpoint fine-tune bidirectionally
    # (NepaConfig.is_causal), also when continuing from a fine-tuned folder that saved is_causal=False.
    overrides["is_causal"] = False if args.bidirectional else overrides.get("is_causal")
    switched_off = {"pretraining_shift": args.no_shift, "pretraining_stop_gradient": args.no_stop_grad}
    overrides.update({field: False for field, off in switched_off.items() if off})
    if args.mask_ratio > 0:
        overrides["use_mask_token"] = True
    if args.num_channels is not None:
        overrides["num_channels"] = args.num_channels
    path, has_weights = Path(args.model), False
    if args.model in NEPA_PRESETS:
        config = preset_config(args.model, overrides, args.image_size)
    elif path.suffix == ".json" and path.is_file():
        # The saved backbone stages follow the saved layer count: let the constructor derive them again.
        saved = {k: v for k, v in NepaConfig.from_json_file(path).to_dict().items()
                 if k not in ("out_indices", "out_features", "stage_names")}
        config = NepaConfig(**{**saved, **overrides})
    elif path.is_dir() or "/" in args.model:
        config = NepaConfig.from_pretrained(args.model, **overrides)
        has_weights = not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    else:
        raise ValueError(f"--model {args.model!r} is neither a preset ({', '.join(sorted(NEPA_PRESETS))}), a config "
                         ".json file, nor a checkpoint folder.")
    if args.image_size is not None:
        config.image_size = patch_aligned_size(args.image_size, config.patch_size)
    attn = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    if has_weights:  # fp32 master weights whatever the checkpoint dtype (Accelerate handles mixed precision)
        model = load_pretrained(NepaForPreTraining, args.model, config=config, dtype=torch.float32, **attn)
    else:
        model = AutoModelForPreTraining.from_config(config, **attn)
    has_processor = (path / "preprocessor_config.json").is_file()
    return model, AutoImageProcessor.from_pretrained(args.model) if has_processor else NepaImageProcessor()


def build_train_dataloader(args, config, mean, std, accelerator):
    """Per-sample decode/crop/flip/normalise (+ mask) in DataLoader workers -> float batches with a `valid` flag."""
    load_kwargs = {"name": args.dataset_config_name} if args.dataset_config_name else {}
    with accelerator.main_process_first():  # one process prepares/caches the dataset, the others reuse it
        dataset = load_image_dataset(args.dataset, split=args.train_split, streaming=args.streaming,
                                     max_samples=args.max_train_samples, seed=args.seed, **load_kwargs)
    num_workers = (default_num_workers(accelerator.device, accelerator.num_processes)  # 0 on CPUs: decode in-process
                   if args.dataloader_num_workers is None else args.dataloader_num_workers)
    dataset, image_column = pretraining_images(dataset, args.image_column, streaming=args.streaming, seed=args.seed,
                                               shuffle_buffer_size=args.shuffle_buffer_size, num_shards=num_workers)
    transform = pretraining_transform(config.image_size, mean, std, scale=(args.crop_min_scale, 1.0),
                                      interpolation=args.interpolation, hflip_prob=args.hflip_prob,
                                      crop_padding=args.random_crop_padding)
    return pretraining_dataloader(
        dataset, image_column, transform, batch_size=args.per_device_batch_size, image_size=config.image_size,
        num_channels=config.num_channels, seed=args.seed, mask_ratio=args.mask_ratio, patch_size=config.patch_size,
        num_workers=num_workers, pin_memory=accelerator.device.type == "cuda", num_processes=accelerator.num_processes,
    ), dataset_identity(dataset, image_column, seed=args.seed)


def main(argv=None):
    args = parse_args(argv)
    with PreemptionSignal(parse_signal_names(args.preemption_signals)) as preemption:  # restored however it ends
        pretrain(args, preemption)


def pretrain(args, preemption):
    output_dir = Path(args.output_dir)
    # Where to start, known before the trackers start (the metrics file drops the records past a resumed step). Every
    # file of the checkpoint must load: `latest` falls back past damaged ones, a named damaged one is an error.
    resume_dir = checkpoint_to_resume(output_dir / CHECKPOINTS_DIR, args.resume_from_checkpoint,
                                      args.overwrite_output_dir)
    resume = read_checkpoint_meta(resume_dir) if resume_dir is not None else None
    report_to = [name for name in map(str.strip, args.report_to.split(",")) if name not in ("", "none")]
    if missing := sorted(set(report_to) - set(get_available_trackers())):
        raise ValueError(f"--report_to {','.join(missing)}: not installed (pip install {' '.join(missing)}).")
    trackers = [JsonlTracker(output_dir / "metrics.jsonl", resume_step=resume["step"] if resume else None), *report_to]

    # Model (the same seed, hence the same initial weights, on every process) and Accelerator
    set_seed(args.seed)
    model, processor = load_model(args)
    config = model.config
    unused_mask_token = config.use_mask_token and args.mask_ratio == 0
    mixed_precision = resolve_mixed_precision(args.mixed_precision, config.hidden_size)
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
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    channels = config.num_channels  # the flags, else the model's image processor (three values for RGB)
    mean = (per_channel(args.image_mean, channels, "--image_mean") if args.image_mean
            else list(processor.image_mean)[:channels])
    std = (per_channel(args.image_std, channels, "--image_std") if args.image_std
           else list(processor.image_std)[:channels])
    objective = NepaPretrainingObjective(model, args.pixel_loss_weight, args.pixel_loss, args.pixel_decoder_hidden_size)

    # Data, optimizer and schedule (in optimizer updates: stepped by hand once per update, since a prepared scheduler
    # steps once per process, and checkpointed beside the prepared objects)
    train_dataloader, data_identity = build_train_dataloader(args, config, mean, std, accelerator)
    global_batch = args.per_device_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate or scaled_learning_rate(args.base_learning_rate, global_batch)
    optimizer = create_pretraining_optimizer(objective, learning_rate, args.weight_decay,
                                             (args.adam_beta1, args.adam_beta2))
    objective, optimizer, train_dataloader = accelerator.prepare(objective, optimizer, train_dataloader)
    # --num_train_epochs counts updates in the prepared loader (a streamed dataset needs --max_steps: parse_args)
    max_steps = args.max_steps or max(1, math.ceil(
        args.num_train_epochs * math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)))
    warmup_steps = warmup_steps_for(max_steps, args.warmup_ratio)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, max_steps)  # 0 -> peak, cosine to 0
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(objective)
    ema = create_ema(unwrapped.model, decay=args.ema_decay) if args.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # Training position and metrics. Resuming restores the weights, optimizer, schedule, EMA and RNG states
    # (Accelerate's state) and, from meta.json, the data position and the metrics bookkeeping.
    global_step = epoch = batch_in_epoch = 0
    run_metrics = PretrainingMetrics(accelerator, unwrapped.pixel_decoder is not None, args.max_nonfinite_steps)
    if resume is not None:  # refused on other data, unless --resume_on_changed_dataset: then a fresh epoch
        global_step, epoch, batch_in_epoch = resume_training(accelerator, resume_dir, resume, data_identity,
                                                             args.resume_on_changed_dataset, max_steps)
        run_metrics.load_state_dict(resume)
    run_config = {**vars(args), "mixed_precision": mixed_precision, "learning_rate": learning_rate,
                  "global_batch_size": global_batch, "max_steps": max_steps, "warmup_steps": warmup_steps,
                  "num_processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
                  "image_size": config.image_size, **data_identity,
                  # ZeRO-3 leaves empty placeholders in the module and keeps the size in ds_numel
                  "num_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in unwrapped.model.parameters())}
    accelerator.init_trackers("nepa-pretraining", config=run_config)
    accelerator.print(
        f"NEPA pretraining: {run_config['num_parameters']:,} parameters, {run_config['num_images'] or 'streamed'} "
        f"images at {config.image_size}px, {accelerator.num_processes} process(es) x {args.per_device_batch_size} x "
        f"{args.gradient_accumulation_steps} accumulation = global batch {global_batch}, {max_steps} steps "
        f"({warmup_steps} warmup), peak lr {learning_rate:.3g}, {mixed_precision} precision, {accelerator.device}.")

    # Training loop
    monitor, last_checkpoint = CollapseMonitor(min_spread=args.collapse_min_spread), resume_dir
    progress = tqdm(total=max_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="pretraining")
    objective.train()
    while global_step < max_steps:
        train_dataloader.set_epoch(epoch)  # reseeds the shuffle and the per-sample augmentation
        batches = (accelerator.skip_first_batches(train_dataloader, batch_in_epoch) if batch_in_epoch
                   else train_dataloader)
        for batch in run_metrics.timed(batches):
            batch_in_epoch += 1
            inputs, num_skipped = select_readable(batch)
            with accelerator.accumulate(objective):
                outputs = objective(pixel_values=inputs["pixel_values"], bool_masked_pos=inputs.get("bool_masked_pos"))
                # The gradient is the mean over the readable images of every process, however they are split across
                # processes (2 processes == 1); a process with only unreadable images still runs, with weight 0.
                accelerator.backward(outputs.loss * readable_loss_weight(batch["valid"], accelerator))
                if accelerator.sync_gradients:  # one host sync per update: all processes decide together
                    grad_norm = accelerator.clip_grad_norm_(objective.parameters(), args.max_grad_norm or math.inf)
                    skip_update, preempted = agreed_flags(
                        accelerator, nonfinite_step(accelerator, outputs.loss, grad_norm), preemption.requested)
                    if not skip_update:  # a non-finite step updates nothing: its gradients are dropped
                        optimizer.step()
                    elif accelerator.scaler is not None:  # fp16: close the scaler's step (its unscale_ ran in clip)
                        accelerator.scaler.update()
                    optimizer.zero_grad(set_to_none=True)
            run_metrics.add_batch(outputs, batch, num_skipped)  # logged: means over the window's readable images
            if accelerator.sync_gradients:
                scheduler.step()  # a skipped step counts too (schedule, data position): a resume replays it
                global_step += 1
                run_metrics.add_update(grad_norm, applied=not skip_update)
                run_metrics.nonfinite.update(not skip_update, global_step, last_checkpoint)  # stops after N in a row
                progress.update(1)
                if ema is not None and not skip_update:
                    ema.update(unwrapped.model)
                if global_step % args.logging_steps == 0 or global_step == max_steps:
                    metrics = {**run_metrics.window_metrics(), "lr": scheduler.get_last_lr()[0], "epoch": epoch,
                               **monitor(outputs.last_hidden_state)}  # embedding_spread, mean_cosine
                    accelerator.log(metrics, step=global_step)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                         img_s=f"{metrics['images_per_s']:.0f}")
                    if monitor.collapsed:
                        accelerator.print(f"step {global_step}: warning: predicted embeddings are collapsing "
                                          f"(spread {metrics['embedding_spread']:.4f}).")
                if preempted or args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    # The data position, the data and the metrics so far: a resumed run continues exactly.
                    last_checkpoint = save_checkpoint(accelerator, global_step, {
                        "epoch": epoch, "batches_in_epoch": batch_in_epoch, "max_steps": max_steps, **data_identity,
                        **run_metrics.state_dict()})
                if preempted:
                    exit_preempted(accelerator, preemption, global_step, last_checkpoint)
                if global_step == max_steps:
                    break
        if global_step < max_steps:  # the epoch ran out
            if batch_in_epoch == 0:
                raise RuntimeError("The training data loader produced no batch: is the dataset empty?")
            epoch, batch_in_epoch = epoch + 1, 0
    progress.close()
    images_skipped = run_metrics.skipped.count(accelerator)

    # Save the model with its image processor (inference preprocessing at the training resolution and mean/std), the
    # EMA weights and the training-only pixel decoder beside it. Full weights on the main process: FSDP2 gathers them,
    # DeepSpeed ZeRO-3 needs zero3_save_16bit_model in its config (docs/distributed.md).
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(objective)
    if accelerator.is_main_process:
        with explained_write_errors(output_dir, last_checkpoint):  # names the path, the free space, the checkpoint
            unwrapped.save_pretrained(output_dir, state_dict=state_dict)
            NepaImageProcessor(size={"height": config.image_size, "width": config.image_size},
                               resample=processor.resample, image_mean=mean, image_std=std,
                               do_convert_rgb=config.num_channels == 3).save_pretrained(output_dir)
            if ema is not None:
                save_ema(ema, output_dir / "ema.safetensors")
    accelerator.print(f"Saved the pretrained model to {output_dir} after {global_step} steps; skipped "
                      f"{images_skipped} unreadable image(s) (distinct files; the warnings name them).")
    accelerator.end_training()


if __name__ == "__main__":
    main()
