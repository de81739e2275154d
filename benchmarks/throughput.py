# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Throughput of NEPA against transformers' ViTModel and against the machine's own limit.

Everything that is compared is measured side by side in one run: repetitions of the compared models are
interleaved (the order rotates every round) and medians are reported, because shared machines are noisy.

    python benchmarks/throughput.py --quick      # a few minutes
    python benchmarks/throughput.py              # full suite, under half an hour on 2 CPU cores

Sections (select with --sections):
  peak        fp32 matmul FLOP/s of this machine at the chosen thread count (square and model-shaped GEMMs).
  inference   images/s of NepaModel vs ViTModel at equal dims and token count, several batch sizes, and the
              achieved model FLOP/s as a fraction of the matmul peak (re-measured inside the same rounds).
  train       forward + backward + AdamW step images/s for every size, and peak memory measured in a fresh
              subprocess per model.
  resolution  cost per image vs token count (112 -> 448 pixels): the attention term.
  profile     torch.profiler breakdown of one forward per model: which op groups take the time.
  compile     ViTModel and NepaModel at full depth, eager and under torch.compile: inference and a training step.
  backends    NEPA with eager / sdpa / flex attention, torch.compile off and on, causal and bidirectional.
  data        images/s one input-pipeline worker sustains (decode + augment) vs the model's consumption rate.

Results: a JSON file (top-level ratios + detailed rows) and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT / "src"))

import transformers  # noqa: E402
from transformers import ViTConfig, ViTModel  # noqa: E402

from nepa_hf import NepaConfig, NepaForPreTraining, NepaModel  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# Model sizes: the same dims for both families. ViT gets 1 + (image/patch)^2 tokens (CLS + patches), exactly as
# NEPA, so the two do the same matmul work; they differ only in NEPA's QK-norm, RoPE and LayerScale (and ViT's
# absolute position embedding).
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSize:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_size: int
    patch_size: int
    image_size: int

    def tokens(self, image_size: int | None = None) -> int:
        return 1 + ((image_size or self.image_size) // self.patch_size) ** 2


SIZES = {
    "vit-b16": ModelSize("ViT-B/16", 768, 12, 12, 3072, 16, 224),
    "vit-b14": ModelSize("ViT-B/14 (reference NEPA-B)", 768, 12, 12, 3072, 14, 224),
    "vit-s16": ModelSize("ViT-S/16", 384, 12, 6, 1536, 16, 224),
    "vit-ti16": ModelSize("ViT-Ti/16", 192, 12, 3, 768, 16, 224),
    "vit-l14": ModelSize("ViT-L/14 (reference NEPA-L)", 1024, 24, 16, 4096, 14, 224),
    # For smoke tests only.
    "tiny": ModelSize("tiny (smoke test)", 64, 2, 4, 128, 8, 32),
    "tiny-p4": ModelSize("tiny at patch 4 (smoke test)", 64, 2, 4, 128, 4, 32),
}


def build_vit(size: ModelSize, attn_implementation: str = "sdpa", image_size: int | None = None) -> ViTModel:
    config = ViTConfig(
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        intermediate_size=size.mlp_size,
        patch_size=size.patch_size,
        image_size=image_size or size.image_size,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        qkv_bias=True,
    )
    # No pooler: the comparison is backbone vs backbone (NEPA's mean pooling has no weights).
    model = ViTModel(config, add_pooling_layer=False)
    model.set_attn_implementation(attn_implementation)
    return model


def nepa_config(size: ModelSize, image_size: int | None = None, is_causal: bool = False, **overrides) -> NepaConfig:
    # Defaults of the reference NEPA-B pretraining config (QK-norm without affine, LayerScale 1e-5, RoPE rescale
    # 2.0 in training), bidirectional unless asked: the same attention pattern as ViT.
    return NepaConfig(
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        intermediate_size=size.mlp_size,
        patch_size=size.patch_size,
        image_size=image_size or size.image_size,
        is_causal=is_causal,
        drop_path_rate=0.0,
        **overrides,
    )


def build_nepa(
    size: ModelSize, attn_implementation: str = "sdpa", image_size: int | None = None, is_causal: bool = False
) -> NepaModel:
    model = NepaModel(nepa_config(size, image_size, is_causal))
    model.set_attn_implementation(attn_implementation)
    return model


def build_nepa_pretraining(size: ModelSize, attn_implementation: str = "sdpa") -> NepaForPreTraining:
    model = NepaForPreTraining(nepa_config(size, is_causal=True))
    model.set_attn_implementation(attn_implementation)
    return model


_BASELINE_MODULES: dict[str, object] = {}


def load_baseline_package(source_dir: str):
    """Import another copy of `nepa_hf` (e.g. `git archive <rev> src | tar -x -C /tmp/base` -> /tmp/base/src) as
    `nepa_hf_baseline`, to time a previous revision side by side with this one in the same run."""
    import importlib.util

    if source_dir not in _BASELINE_MODULES:
        package_dir = Path(source_dir) / "nepa_hf"
        if not (package_dir / "__init__.py").exists():
            raise FileNotFoundError(f"--baseline-src {source_dir}: no nepa_hf/__init__.py there.")
        spec = importlib.util.spec_from_file_location(
            "nepa_hf_baseline", package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["nepa_hf_baseline"] = module
        spec.loader.exec_module(module)
        _BASELINE_MODULES[source_dir] = module
    return _BASELINE_MODULES[source_dir]


def build_nepa_baseline(size: ModelSize, source_dir: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """NepaModel of the baseline revision with the same config (and, seeded alike, the same init)."""
    baseline = load_baseline_package(source_dir)
    config = baseline.NepaConfig(**nepa_config(size).to_diff_dict())
    model = baseline.NepaModel(config)
    model.set_attn_implementation(attn_implementation)
    return model


# --------------------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------------------


def interleaved_timings(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, cpu_timings: dict | None = None
) -> dict[str, list[float]]:
    """Wall-clock seconds of each case, `repeats` times, interleaved; the order rotates every round so that no case
    is always first (cold) or last. Warm-up calls are not recorded. `cpu_timings`, if given, receives the process
    CPU seconds of the same calls (with one thread, a measure of the work that other load on the machine barely
    disturbs)."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    timings: dict[str, list[float]] = {name: [] for name in names}
    if cpu_timings is not None:
        cpu_timings.update({name: [] for name in names})
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            cpu_start, start = time.process_time(), time.perf_counter()
            cases[name]()
            timings[name].append(time.perf_counter() - start)
            if cpu_timings is not None:
                cpu_timings[name].append(time.process_time() - cpu_start)
    return timings


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative spread (max - min) / median: how noisy a measurement was."""
    return (max(values) - min(values)) / statistics.median(values) if values else float("nan")


def paired_ratio_range(timings: dict[str, list[float]], name: str, reference: str = "vit") -> list[float]:
    """[min, max] over rounds of reference seconds / `name` seconds: the speed ratio within each interleaved round,
    so that a slow moment of the machine hits both sides of the ratio."""
    ratios = [ref / own for ref, own in zip(timings[reference], timings[name])]
    return [min(ratios), max(ratios)]


def matmul_case(n: int, m: int | None = None, k: int | None = None) -> tuple[Callable[[], object], float]:
    """A fp32 GEMM (n x k) @ (k x m) and its FLOP count."""
    m = m or n
    k = k or n
    a = torch.randn(n, k)
    b = torch.randn(k, m)
    out = torch.empty(n, m)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n * m * k


# --------------------------------------------------------------------------------------------------------------
# FLOP counting: torch.utils.flop_counter, with the CPU flash-attention ops (not in torch's registry) counted by
# torch's own sdpa formulas. Attention FLOPs are counted in full even when causal (torch's convention).
# --------------------------------------------------------------------------------------------------------------


def flop_counter():
    """FlopCounterMode, plus the CPU flash-attention ops (not in torch's registry) counted by torch's sdpa formulas.
    Shared with benchmarks/gpu_check.py."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa_flop
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = cpu_sdpa_backward_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], object]) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def analytic_forward_flops(size: ModelSize, image_size: int | None = None) -> dict[str, float]:
    """Per-image forward FLOPs (2 per multiply-add): linear layers, attention matmuls, patch embedding."""
    n = size.tokens(image_size)
    d, layers = size.hidden_size, size.num_layers
    linear = layers * n * (8 * d * d + 4 * d * size.mlp_size)
    attention = layers * 4 * n * n * d
    patches = (n - 1) * 2 * d * 3 * size.patch_size**2
    return {"linear": float(linear), "attention": float(attention), "patch_embed": float(patches)}


# --------------------------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------------------------


def repo_relative(path: Path) -> str:
    """The path relative to the repository when it lies inside it, so results files carry no machine paths."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def cpu_model_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_description(threads: int) -> dict:
    cpu_flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                cpu_flags = line
                break
    isa = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {flag}" in cpu_flags]
    return {
        "cpu": cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "isa": isa,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


def run_peak(args) -> dict:
    """fp32 matmul FLOP/s: square GEMMs and the model's own largest GEMM shape; the peak is the best median."""
    size = SIZES[args.sizes[0]]
    rows_model = max(args.batch_sizes) * size.tokens()
    shapes = {f"square {n}": (n, n, n) for n in args.peak_square_sizes}
    shapes[f"model MLP GEMM ({rows_model}x{size.hidden_size} @ {size.hidden_size}x{size.mlp_size})"] = (
        rows_model,
        size.mlp_size,
        size.hidden_size,
    )
    cases, flops = {}, {}
    for name, (n, m, k) in shapes.items():
        cases[name], flops[name] = matmul_case(n, m, k)
    timings = interleaved_timings(cases, repeats=args.repeats + 2, warmup=1)
    rows = []
    for name, values in timings.items():
        rows.append(
            {
                "section": "peak",
                "shape": name,
                "gflops_median": flops[name] / median(values) / 1e9,
                "gflops_best": flops[name] / min(values) / 1e9,
                "spread": spread(values),
            }
        )
    best = max(rows, key=lambda r: r["gflops_median"])
    n, m, k = shapes[best["shape"]]
    return {"rows": rows, "peak_gflops": best["gflops_median"], "peak_shape": best["shape"], "probe": (n, m, k)}


def run_inference(args, peak: dict) -> dict:
    """NepaModel vs ViTModel images/s (fp32, sdpa, inference_mode), plus a matmul-peak probe in the same rounds."""
    rows = []
    probe_fn, probe_flops = matmul_case(*peak["probe"])
    for size_key in args.sizes:
        size = SIZES[size_key]
        torch.manual_seed(0)
        models = {
            "vit": build_vit(size).eval(),
            "nepa": build_nepa(size).eval(),
        }
        first_size = size_key == args.sizes[0]  # extra rows and all batch sizes for the first size only
        if args.causal_rows and first_size:
            models["nepa-causal"] = build_nepa(size, is_causal=True).eval()
        if args.baseline_src and first_size:
            models["nepa-baseline"] = build_nepa_baseline(size, args.baseline_src).eval()
        batch_sizes = args.batch_sizes if first_size else [max(args.batch_sizes)]
        for batch in batch_sizes:
            pixels = torch.randn(batch, 3, size.image_size, size.image_size)
            flops = {}
            with torch.inference_mode():
                for name, model in models.items():
                    flops[name] = count_flops(lambda m=model: m(pixels[:1])) * batch

                cases = {name: (lambda m=model: m(pixels)) for name, model in models.items()}
                cases["matmul-peak"] = probe_fn
                cpu_timings: dict[str, list[float]] = {}
                timings = interleaved_timings(cases, repeats=args.repeats, warmup=1, cpu_timings=cpu_timings)
            peak_gflops = probe_flops / median(timings["matmul-peak"]) / 1e9
            for name in models:
                seconds = median(timings[name])
                achieved = flops[name] / seconds / 1e9
                rows.append(
                    {
                        "section": "inference",
                        "size": size_key,
                        "model": name,
                        "tokens": size.tokens(),
                        "batch": batch,
                        "attention": "sdpa",
                        "images_per_s": batch / seconds,
                        "seconds_median": seconds,
                        "spread": spread(timings[name]),
                        "ratio_vs_vit_range": paired_ratio_range(timings, name),
                        "images_per_cpu_s": batch / median(cpu_timings[name]),
                        "gflop_per_image": flops[name] / batch / 1e9,
                        "achieved_gflops": achieved,
                        "peak_gflops_same_rounds": peak_gflops,
                        "peak_fraction": achieved / peak_gflops,
                    }
                )
            vit_row, nepa_row = rows[-len(models)], rows[-len(models) + 1]
            log(
                f"inference {size_key} batch {batch}: ViT {vit_row['images_per_s']:.2f} img/s, NEPA "
                f"{nepa_row['images_per_s']:.2f} img/s (ratio {nepa_row['images_per_s'] / vit_row['images_per_s']:.3f}), "
                f"NEPA {nepa_row['peak_fraction']:.1%} of matmul peak {peak_gflops:.0f} GFLOP/s"
            )
        del models
        gc.collect()
    return {"rows": rows}


def _train_step_fn(model, pixels, optimizer, family: str) -> Callable[[], None]:
    """One optimizer step. Backbones get the same cheap loss; NepaForPreTraining uses its own objective."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        outputs = model(pixels)
        if family == "nepa-pretraining":
            loss = outputs.loss
        else:
            loss = outputs.last_hidden_state.float().square().mean()
        loss.backward()
        optimizer.step()

    return step


def build_for_training(family: str, size: ModelSize, baseline_src: str | None = None):
    if family == "vit":
        return build_vit(size)
    if family == "nepa":
        return build_nepa(size)
    if family == "nepa-baseline":
        return build_nepa_baseline(size, baseline_src)
    if family == "nepa-pretraining":
        return build_nepa_pretraining(size)
    raise ValueError(f"unknown model family {family!r}")


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # Same optimizer for both (torch's default implementation on this device).
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)


def run_train(args) -> dict:
    rows = []
    for size_key in args.sizes:
        rows += _run_train_size(args, size_key, first_size=size_key == args.sizes[0])
    return {"rows": rows}


def _run_train_size(args, size_key: str, first_size: bool) -> list[dict]:
    """Training rows of one size: ViT and NEPA; the pretraining model and the baseline revision for the first size."""
    rows = []
    size = SIZES[size_key]
    families = ["vit", "nepa"]
    if first_size:
        families += (["nepa-pretraining"] if args.causal_rows else []) + (["nepa-baseline"] if args.baseline_src else [])
    for batch in args.train_batch_sizes:
        torch.manual_seed(0)
        models = {family: build_for_training(family, size, args.baseline_src).train() for family in families}
        pixels = torch.randn(batch, 3, size.image_size, size.image_size)
        optimizers = {family: make_optimizer(model) for family, model in models.items()}
        cases = {family: _train_step_fn(models[family], pixels, optimizers[family], family) for family in families}
        flops = {}
        for family, model in models.items():
            # FLOPs of one step on one image (forward + backward; the optimizer's elementwise work is not counted).
            one = pixels[:1]

            def fwd_bwd(model=model, family=family):
                outputs = model(one)
                loss = outputs.loss if family == "nepa-pretraining" else outputs.last_hidden_state.float().square().mean()
                loss.backward()

            flops[family] = count_flops(fwd_bwd) * batch
            model.zero_grad(set_to_none=True)
        cpu_timings: dict[str, list[float]] = {}
        timings = interleaved_timings(cases, repeats=args.train_repeats, warmup=1, cpu_timings=cpu_timings)
        del cases, optimizers, models
        gc.collect()
        memory = {family: measure_training_memory(args, family, size_key, batch) for family in families}
        for family in families:
            seconds = median(timings[family])
            rows.append(
                {
                    "section": "train",
                    "size": size_key,
                    "model": family,
                    "tokens": size.tokens(),
                    "batch": batch,
                    "images_per_s": batch / seconds,
                    "seconds_median": seconds,
                    "spread": spread(timings[family]),
                    "ratio_vs_vit_range": paired_ratio_range(timings, family),
                    "images_per_cpu_s": batch / median(cpu_timings[family]),
                    "gflop_per_image": flops[family] / batch / 1e9,
                    "achieved_gflops": flops[family] / seconds / 1e9,
                    **memory[family],
                }
            )
        vit_row, nepa_row = rows[-len(families)], rows[-len(families) + 1]
        log(
            f"train {size_key} batch {batch}: ViT {vit_row['images_per_s']:.2f} img/s, NEPA "
            f"{nepa_row['images_per_s']:.2f} img/s (ratio {nepa_row['images_per_s'] / vit_row['images_per_s']:.3f}); "
            f"peak tensor memory ViT {vit_row['tensor_peak_mib']:.0f} MiB, NEPA {nepa_row['tensor_peak_mib']:.0f} MiB"
        )
    return rows


# -- torch.compile: both families compiled, full depth -------------------------------------------------------------


def run_compile(args) -> dict:
    """ViTModel and NepaModel at full depth, eager and under torch.compile (default inductor backend), timed in the
    same interleaved rounds: inference, then a training step (forward + backward + AdamW)."""
    rows = []
    size_key = args.sizes[0]
    size = SIZES[size_key]

    def timed_cases(build_case):
        cases, first_call, errors = {}, {}, {}
        for family in ("vit", "nepa"):
            for compiled in (False, True):
                name = family + (" +compile" if compiled else "")
                torch.manual_seed(0)
                call = build_case(family, compiled)
                start = time.perf_counter()
                try:
                    call()  # eager: warm-up; compiled: the compilation
                except Exception as error:  # a torch/compiler that cannot compile here: record why, keep going
                    errors[name] = f"{type(error).__name__}: {error}"[:300]
                    log(f"compile {name}: failed ({type(error).__name__})")
                    continue
                first_call[name] = time.perf_counter() - start
                cases[name] = call
        return cases, first_call, errors

    def inference_case(family, compiled):
        model = (build_vit(size) if family == "vit" else build_nepa(size)).eval()
        runner = torch.compile(model) if compiled else model
        pixels = torch.randn(args.compile_batch, 3, size.image_size, size.image_size)

        def call():
            with torch.inference_mode():
                return runner(pixels)

        return call

    def train_case(family, compiled):
        model = build_for_training(family, size).train()
        runner = torch.compile(model) if compiled else model
        pixels = torch.randn(args.compile_train_batch, 3, size.image_size, size.image_size)
        return _train_step_fn(runner, pixels, make_optimizer(model), family)

    for mode, build_case, batch, repeats in (
        ("inference", inference_case, args.compile_batch, args.repeats),
        ("train", train_case, args.compile_train_batch, args.train_repeats),
    ):
        cases, first_call, errors = timed_cases(build_case)
        timings = interleaved_timings(cases, repeats=repeats, warmup=1)
        del cases
        gc.collect()
        memory = {}
        if mode == "train":  # peak tensor memory of one step, each variant in a fresh process
            for name in timings:
                memory[name] = measure_training_memory(args, name.split()[0], size_key, batch, compiled=name.endswith("+compile"))
        for name in ("vit", "vit +compile", "nepa", "nepa +compile"):
            if name in errors:
                rows.append({"section": "compile", "mode": mode, "variant": name, "error": errors[name]})
                continue
            family = name.split()[0]
            same_mode_vit = "vit +compile" if name.endswith("+compile") else "vit"
            seconds = median(timings[name])
            rows.append(
                {
                    "section": "compile",
                    "size": size_key,
                    "mode": mode,
                    "variant": name,
                    "batch": batch,
                    "images_per_s": batch / seconds,
                    "spread": spread(timings[name]),
                    "first_call_s": first_call[name],
                    "ratio_vs_vit_same_mode": median(timings[same_mode_vit]) / seconds if same_mode_vit in timings else None,
                    "ratio_vs_vit_same_mode_range": (
                        paired_ratio_range(timings, name, same_mode_vit) if same_mode_vit in timings else None
                    ),
                    "speedup_vs_eager": median(timings[family]) / seconds if family in timings else None,
                }
            )
            if name in memory:
                reference = memory.get(same_mode_vit)
                rows[-1]["tensor_peak_mib"] = memory[name]["tensor_peak_mib"]
                rows[-1]["memory_ratio_vs_vit_same_mode"] = (
                    memory[name]["tensor_peak_mib"] / reference["tensor_peak_mib"] if reference else None
                )
            log(f"compile {mode} {name}: {batch / seconds:.2f} img/s (first call {first_call[name]:.0f} s)")
    return {"rows": rows}


# -- memory: a fresh process per model so that high-water marks do not mix ------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def saved_activation_bytes(model: torch.nn.Module, step_input: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct tensor storages autograd saves for backward in one forward, parameters excluded."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages and tensor.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = step_input()
    del outputs
    return sum(seen.values())


def profiled_step_peak_bytes(model, optimizer, step: Callable[[], None]) -> int:
    """Peak bytes of tensors allocated during one training step (forward, backward, optimizer), from the CPU
    allocator's running total that torch.profiler records with `profile_memory=True`. Gradients are released
    first, so the peak covers activations, gradients and temporaries; allocator fragmentation is not included."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


def memory_worker(spec: dict) -> dict:
    """Runs in its own process: build, train `steps` steps, report the RSS high-water mark. With `compiled`, the
    model runs under torch.compile (whose partitioner may recompute cheap ops instead of saving their inputs)."""
    torch.set_num_threads(spec["threads"])
    size = SIZES[spec["size"]]
    family = spec["family"]
    compiled = spec.get("compiled", False)
    rss_before_model = _status_kib("VmRSS")
    torch.manual_seed(0)
    model = build_for_training(family, size, spec.get("baseline_src")).train()
    optimizer = make_optimizer(model)
    pixels = torch.randn(spec["batch"], 3, size.image_size, size.image_size)
    step = _train_step_fn(torch.compile(model) if compiled else model, pixels, optimizer, family)
    for _ in range(spec["steps"] - 1):
        step()
    # The last step runs with the AdamW state allocated, so its backward is the process's high-water mark.
    step_peak = profiled_step_peak_bytes(model, optimizer, step)
    peak_kib = _status_kib("VmHWM")
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )

    def forward():
        outputs = model(pixels)
        return outputs.loss if family == "nepa-pretraining" else outputs.last_hidden_state

    # Saved tensors are counted on the eager graph only: a compiled graph saves what its partitioner decides.
    saved = None if compiled else saved_activation_bytes(model, forward)
    return {
        "peak_rss_mib": peak_kib / 1024,
        "rss_before_model_mib": rss_before_model / 1024,
        "train_memory_mib": (peak_kib - rss_before_model) / 1024,
        "saved_activations_mib": None if saved is None else saved / 2**20,
        "tensor_peak_mib": (state_bytes + step_peak) / 2**20,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def measure_training_memory(args, family: str, size_key: str, batch: int, compiled: bool = False) -> dict:
    spec = {"family": family, "size": size_key, "batch": batch, "threads": args.threads, "steps": 2,
            "compiled": compiled}
    spec["baseline_src"] = args.baseline_src
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory worker for {spec} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_resolution(args) -> dict:
    """Per-image cost vs token count for NEPA and ViT (ViT built for each resolution, same tokens)."""
    rows = []
    size = SIZES[args.sizes[0]]
    batch = args.resolution_batch
    for resolution in args.resolutions:
        if resolution % size.patch_size:
            raise ValueError(f"resolution {resolution} is not a multiple of the patch size {size.patch_size}")
        torch.manual_seed(0)
        models = {"vit": build_vit(size, image_size=resolution).eval(), "nepa": build_nepa(size).eval()}
        pixels = torch.randn(batch, 3, resolution, resolution)
        with torch.inference_mode():
            timings = interleaved_timings(
                {name: (lambda m=model: m(pixels)) for name, model in models.items()}, repeats=args.repeats, warmup=1
            )
        analytic = analytic_forward_flops(size, resolution)
        total = sum(analytic.values())
        for name in models:
            seconds = median(timings[name])
            rows.append(
                {
                    "section": "resolution",
                    "size": args.sizes[0],
                    "model": name,
                    "resolution": resolution,
                    "tokens": size.tokens(resolution),
                    "batch": batch,
                    "ms_per_image": seconds / batch * 1e3,
                    "us_per_token": seconds / batch / size.tokens(resolution) * 1e6,
                    "attention_flop_share": analytic["attention"] / total,
                    "gflop_per_image_analytic": total / 1e9,
                    "spread": spread(timings[name]),
                }
            )
        log(
            f"resolution {resolution} ({size.tokens(resolution)} tokens): ViT {rows[-2]['ms_per_image']:.0f} ms/img, "
            f"NEPA {rows[-1]['ms_per_image']:.0f} ms/img, attention {analytic['attention'] / total:.1%} of FLOPs"
        )
        del models
        gc.collect()
    return {"rows": rows}


def op_category(name: str) -> str:
    """Group ATen ops into what a ViT block spends time on."""
    name = name.replace("aten::", "")
    groups = {
        "matmul (linear layers)": ("addmm", "mm", "bmm", "linear", "matmul"),
        "attention kernel": ("_scaled_dot_product", "scaled_dot_product", "_efficient_attention", "_flash_attention"),
        "bias broadcast / copies": ("copy_", "clone", "contiguous", "_to_copy", "cat", "index_select"),
        "layer norm": ("native_layer_norm", "layer_norm"),
        "gelu": ("gelu",),
        "elementwise (add/mul/addcmul/neg)": ("add", "mul", "addcmul", "neg", "sub", "div"),
        "softmax (eager attention)": ("softmax", "_softmax"),
        "patch embedding": ("convolution", "mkldnn_convolution", "conv2d"),
    }
    for group, prefixes in groups.items():
        if name.startswith(prefixes):
            return group
    return "other"


def run_profile(args) -> dict:
    """Where the time goes: torch.profiler self CPU time per op group for one inference forward of each model."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    size_key = args.sizes[0]
    size = SIZES[size_key]
    batch = args.profile_batch
    torch.manual_seed(0)
    models = {"vit": build_vit(size).eval(), "nepa": build_nepa(size).eval()}
    if args.baseline_src:
        models["nepa-baseline"] = build_nepa_baseline(size, args.baseline_src).eval()
    pixels = torch.randn(batch, 3, size.image_size, size.image_size)
    # Interleaved like the timings; per op group the smallest of the repetitions (least disturbed by other load).
    best: dict[str, dict[str, float]] = {name: {} for name in models}
    calls: dict[str, dict[str, int]] = {name: {} for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(pixels)
        for _ in range(args.profile_repeats):
            for name, model in models.items():
                with profile(activities=[ProfilerActivity.CPU]) as profiler:
                    model(pixels)
                totals: dict[str, float] = {}
                counts: dict[str, int] = {}
                for event in profiler.key_averages():
                    if event.self_cpu_time_total <= 0 or not event.key.startswith("aten::"):
                        continue
                    group = op_category(event.key)
                    totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total / 1e3
                    counts[group] = counts.get(group, 0) + event.count
                for group, value in totals.items():
                    best[name][group] = min(best[name].get(group, float("inf")), value)
                    calls[name][group] = counts[group]
    for name in models:
        total = sum(best[name].values())
        for group, milliseconds in sorted(best[name].items(), key=lambda item: -item[1]):
            rows.append(
                {
                    "section": "profile",
                    "size": size_key,
                    "model": name,
                    "batch": batch,
                    "op_group": group,
                    "ms": milliseconds,
                    "share": milliseconds / total,
                    "calls": calls[name][group],
                }
            )
        log(f"profile {name}: {total:.0f} ms of ATen self time per forward (batch {batch})")
    return {"rows": rows}


def run_backends(args) -> dict:
    """NEPA inference with each attention backend, torch.compile off/on, causal and bidirectional."""
    rows = []
    base = SIZES[args.sizes[0]]
    size = dataclasses.replace(base, num_layers=args.backend_layers or base.num_layers)
    batch = args.backend_batch
    pixels = torch.randn(batch, 3, size.image_size, size.image_size)
    cases, compile_seconds = {}, {}
    for attn in args.backends:
        for is_causal in (False, True):
            # torch.compile for sdpa only: flex attention is compiled either way, eager is the slow reference.
            for compiled in [False, True] if (args.compile and attn == "sdpa") else [False]:
                name = f"{attn}{' causal' if is_causal else ''}{' +compile' if compiled else ''}"
                torch.manual_seed(0)
                model = build_nepa(size, attn_implementation=attn, is_causal=is_causal).eval()
                runner = torch.compile(model, fullgraph=True) if compiled else model

                def call(runner=runner):
                    with torch.inference_mode():
                        return runner(pixels)

                start = time.perf_counter()
                try:
                    call()  # first call: compiles (torch.compile, flex attention's kernel)
                except Exception as error:  # a backend this torch/CPU cannot run: record why, keep going
                    rows.append({"section": "backends", "variant": name, "error": f"{type(error).__name__}: {error}"[:300]})
                    log(f"backend {name}: failed ({type(error).__name__})")
                    continue
                compile_seconds[name] = time.perf_counter() - start
                cases[name] = call
    timings = interleaved_timings(cases, repeats=args.repeats, warmup=1)
    reference = median(timings["sdpa"]) if "sdpa" in timings else None
    for name, values in timings.items():
        seconds = median(values)
        rows.append(
            {
                "section": "backends",
                "size": args.sizes[0],
                "layers": size.num_layers,
                "variant": name,
                "batch": batch,
                "images_per_s": batch / seconds,
                "speed_vs_sdpa": (reference / seconds) if reference else None,
                "first_call_s": compile_seconds[name],
                "spread": spread(values),
            }
        )
        log(f"backend {name}: {batch / seconds:.2f} img/s (first call {compile_seconds[name]:.1f} s)")
    return {"rows": rows}


# -- data pipeline ------------------------------------------------------------------------------------------------


def input_pipelines(image_size: int) -> dict[str, dict]:
    """The library's per-sample transforms (what one DataLoader worker runs per image) for each recipe: everything,
    normalisation included, happens per sample; Mixup in the fine-tuning collator is a cheap batch blend."""
    from nepa_hf.data.augmentation import AugmentationArguments
    from nepa_hf.data.transforms import ImageProcessorTransform, pretraining_transform, to_rgb

    mean = std = (0.5, 0.5, 0.5)
    pretrain = pretraining_transform(image_size, mean, std)
    recipe = AugmentationArguments()
    return {
        "pretraining": {
            "sample": lambda image: pretrain(to_rgb(image)),
            "description": "torchvision v2: RGB + RandomResizedCrop(0.08-1, bilinear) + flip + normalise",
            "consumer": "train",
        },
        "fine-tuning": {
            "sample": recipe.train_transform(image_size, mean, std),
            "description": "timm create_transform: RandomResizedCrop (bicubic) + flip + RandAugment m9 + normalise + "
                           "random erasing 0.25",
            "consumer": "train",
        },
        "evaluation": {
            "sample": ImageProcessorTransform(recipe.eval_image_processor(image_size, mean, std)),
            "description": f"NepaImageProcessor: resize short side to {int(image_size / 0.875)} (bicubic) + centre "
                           f"crop {image_size} + normalise",
            "consumer": "inference",
        },
    }


def run_data(args, consumption: dict) -> dict:
    """Images/s one input worker sustains (one process, one torch thread: decode + per-sample augmentation) and
    against the model's consumption rate."""
    from nepa_hf.data.images import bundled_photo_paths

    rows = []
    photos = [Path(path).read_bytes() for path in bundled_photo_paths()]
    image_size = SIZES[args.sizes[0]].image_size
    threads = torch.get_num_threads()
    pipelines = input_pipelines(image_size)
    samples = args.data_samples
    for name, pipeline in pipelines.items():

        def per_sample(data, transform=pipeline["sample"]):
            with Image.open(io.BytesIO(data)) as image:
                return transform(image)

        torch.set_num_threads(1)  # a DataLoader worker runs one torch thread
        try:
            for data in photos:  # warm-up
                per_sample(data)
            per_round = []
            for _ in range(3):
                start = time.perf_counter()
                for index in range(samples):
                    per_sample(photos[index % len(photos)])
                per_round.append(samples / (time.perf_counter() - start))
        finally:
            torch.set_num_threads(threads)
        worker_rate = median(per_round)
        consumer = consumption.get(pipeline["consumer"])
        rows.append(
            {
                "section": "data",
                "pipeline": name,
                "description": pipeline["description"],
                "images_per_s_per_worker": worker_rate,
                "model_images_per_s": consumer,
                "workers_needed": math.ceil(consumer / worker_rate) if consumer else None,
                "target_images_per_s": args.target_images_per_s,
                "workers_for_target": math.ceil(args.target_images_per_s / worker_rate),
            }
        )
        log(
            f"data {name}: {worker_rate:.1f} img/s per worker "
            f"(model consumes {consumer or float('nan'):.1f} img/s)"
        )
    return {"rows": rows}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def summarize(results: dict) -> dict:
    """Top-level ratios: equal dims and tokens, the largest batch of the first size; `by_size` repeats the NEPA/ViT
    ratios for every size; `compile_*` compares both families under torch.compile."""
    summary = {}
    first_size = results["config"]["sizes"][0]
    by_size = {}
    for section, keys in (("inference", ("inference_ratio_vs_vit",)), ("train", ("train_ratio_vs_vit", "train_memory_ratio_vs_vit"))):
        for size_key in results["config"]["sizes"]:
            size_rows = [r for r in results["rows"] if r["section"] == section and r["size"] == size_key]
            if not size_rows:
                continue
            batch = max(r["batch"] for r in size_rows)
            by_model = {r["model"]: r for r in size_rows if r["batch"] == batch}
            entry = by_size.setdefault(size_key, {})
            entry[keys[0]] = by_model["nepa"]["images_per_s"] / by_model["vit"]["images_per_s"]
            entry[keys[0] + "_range"] = by_model["nepa"].get("ratio_vs_vit_range")
            entry[f"{section}_batch"] = batch
            if section == "train":
                entry[keys[1]] = by_model["nepa"]["tensor_peak_mib"] / by_model["vit"]["tensor_peak_mib"]
    if by_size:
        summary["by_size"] = by_size
    inference = [r for r in results["rows"] if r["section"] == "inference" and r["size"] == first_size]
    if inference:
        batch = max(r["batch"] for r in inference)
        by_model = {r["model"]: r for r in inference if r["batch"] == batch}
        summary["inference_ratio_vs_vit"] = by_model["nepa"]["images_per_s"] / by_model["vit"]["images_per_s"]
        summary["inference_ratio_vs_vit_range"] = by_model["nepa"].get("ratio_vs_vit_range")
        summary["inference_cpu_time_ratio_vs_vit"] = by_model["nepa"]["images_per_cpu_s"] / by_model["vit"]["images_per_cpu_s"]
        summary["inference_peak_fraction"] = by_model["nepa"]["peak_fraction"]
        summary["inference_peak_fraction_vit"] = by_model["vit"]["peak_fraction"]
        summary["inference_batch"] = batch
    train = [r for r in results["rows"] if r["section"] == "train" and r["size"] == first_size]
    if train:
        batch = max(r["batch"] for r in train)
        by_model = {r["model"]: r for r in train if r["batch"] == batch}
        summary["train_ratio_vs_vit"] = by_model["nepa"]["images_per_s"] / by_model["vit"]["images_per_s"]
        summary["train_ratio_vs_vit_range"] = by_model["nepa"].get("ratio_vs_vit_range")
        summary["train_cpu_time_ratio_vs_vit"] = by_model["nepa"]["images_per_cpu_s"] / by_model["vit"]["images_per_cpu_s"]
        summary["train_memory_ratio_vs_vit"] = by_model["nepa"]["tensor_peak_mib"] / by_model["vit"]["tensor_peak_mib"]
        summary["train_rss_ratio_vs_vit"] = by_model["nepa"]["train_memory_mib"] / by_model["vit"]["train_memory_mib"]
        summary["train_saved_activations_ratio_vs_vit"] = (
            by_model["nepa"]["saved_activations_mib"] / by_model["vit"]["saved_activations_mib"]
        )
        summary["train_batch"] = batch
        if "nepa-baseline" in by_model:
            baseline = by_model["nepa-baseline"]
            summary["baseline_train_ratio_vs_vit"] = baseline["images_per_s"] / by_model["vit"]["images_per_s"]
            summary["baseline_train_memory_ratio_vs_vit"] = baseline["tensor_peak_mib"] / by_model["vit"]["tensor_peak_mib"]
            summary["baseline_train_rss_ratio_vs_vit"] = baseline["train_memory_mib"] / by_model["vit"]["train_memory_mib"]
    if inference:
        batch = summary["inference_batch"]
        by_model = {r["model"]: r for r in inference if r["batch"] == batch}
        if "nepa-baseline" in by_model:
            summary["baseline_inference_ratio_vs_vit"] = by_model["nepa-baseline"]["images_per_s"] / by_model["vit"]["images_per_s"]
    for r in results["rows"]:
        if r["section"] == "compile" and r["variant"] == "nepa +compile" and "error" not in r:
            summary[f"compile_{r['mode']}_ratio_vs_vit"] = r["ratio_vs_vit_same_mode"]
            summary[f"compile_{r['mode']}_ratio_vs_vit_range"] = r["ratio_vs_vit_same_mode_range"]
            summary[f"compile_{r['mode']}_speedup_vs_eager"] = r["speedup_vs_eager"]
            if r.get("memory_ratio_vs_vit_same_mode") is not None:
                summary["compile_train_memory_ratio_vs_vit"] = r["memory_ratio_vs_vit_same_mode"]
    return summary


def fmt_range(bounds, spec=".3f") -> str:
    return f"{fmt(bounds[0], spec)}–{fmt(bounds[1], spec)}" if bounds else "-"


def fmt(value, spec=".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return format(value, spec)


def markdown_report(results: dict) -> str:
    machine, config, summary = results["machine"], results["config"], results["summary"]
    first_size = config["sizes"][0]
    rows = results["rows"]
    lines = [
        f"# NEPA throughput ({'quick' if config['quick'] else 'full'} run, {results['date']})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['torch_threads']} torch threads, "
        f"ISA {'/'.join(machine['isa']) or '-'}; torch {machine['torch']}, transformers {machine['transformers']}, "
        f"Python {machine['python']}. Load average before/after: {results['loadavg_before']} / {results['loadavg_after']}.",
        "",
        "fp32 throughout. Compared models have identical dims and token counts (CLS + patches); NEPA is bidirectional "
        "unless marked causal. Timings are medians of interleaved repetitions; `spread` = (max - min) / median.",
        "",
    ]
    if summary:
        lines += ["## Headline", "", "| metric | value | goal |", "|---|---|---|"]
        goals = {
            "inference_ratio_vs_vit": ("NEPA / ViT inference images/s", "≥ 0.95", ".3f"),
            "inference_cpu_time_ratio_vs_vit": ("same, by process CPU time (load-robust with 1 thread)", "-", ".3f"),
            "inference_peak_fraction": ("NEPA inference FLOP/s ÷ matmul peak", "reported", ".1%"),
            "inference_peak_fraction_vit": ("ViT inference FLOP/s ÷ matmul peak (for scale)", "-", ".1%"),
            "train_ratio_vs_vit": ("NEPA / ViT training images/s", "≥ 0.95", ".3f"),
            "train_cpu_time_ratio_vs_vit": ("same, by process CPU time (load-robust with 1 thread)", "-", ".3f"),
            "train_memory_ratio_vs_vit": ("NEPA / ViT training peak tensor memory (profiler)", "≤ 1.10", ".3f"),
            "train_rss_ratio_vs_vit": ("NEPA / ViT training memory by RSS (VmHWM − RSS before model)", "-", ".3f"),
            "train_saved_activations_ratio_vs_vit": ("NEPA / ViT bytes saved for backward", "-", ".3f"),
            "baseline_inference_ratio_vs_vit": ("baseline revision: inference images/s vs ViT", "-", ".3f"),
            "baseline_train_ratio_vs_vit": ("baseline revision: training images/s vs ViT", "-", ".3f"),
            "baseline_train_memory_ratio_vs_vit": ("baseline revision: training peak tensor memory vs ViT", "-", ".3f"),
            "baseline_train_rss_ratio_vs_vit": ("baseline revision: training memory by RSS vs ViT", "-", ".3f"),
            "compile_inference_ratio_vs_vit": ("NEPA / ViT inference images/s, both under torch.compile", "≥ 1.0", ".3f"),
            "compile_train_ratio_vs_vit": ("NEPA / ViT training images/s, both under torch.compile", "≥ 1.0", ".3f"),
            "compile_train_memory_ratio_vs_vit": ("NEPA / ViT training peak tensor memory, both under torch.compile", "-", ".3f"),
            "compile_inference_speedup_vs_eager": ("NEPA inference: torch.compile / eager", "-", ".3f"),
            "compile_train_speedup_vs_eager": ("NEPA training: torch.compile / eager", "-", ".3f"),
        }
        for key, (label, goal, spec) in goals.items():
            if key in summary:
                value = fmt(summary[key], spec)
                if isinstance(summary.get(key + "_range"), list):
                    low, high = summary[key + "_range"]
                    value += f" ({fmt(low, '.3f')}–{fmt(high, '.3f')})"
                lines.append(f"| {label} | {value} | {goal} |")
        for size_key, entry in summary.get("by_size", {}).items():
            if size_key == first_size:
                continue
            for key, label, goal in (
                ("inference_ratio_vs_vit", "NEPA / ViT inference images/s", "≥ 0.95"),
                ("train_ratio_vs_vit", "NEPA / ViT training images/s", "≥ 0.95"),
                ("train_memory_ratio_vs_vit", "NEPA / ViT training peak tensor memory", "≤ 1.10"),
            ):
                if key in entry:
                    value = fmt(entry[key], ".3f")
                    if entry.get(key + "_range"):
                        value += f" ({fmt(entry[key + '_range'][0], '.3f')}–{fmt(entry[key + '_range'][1], '.3f')})"
                    lines.append(f"| {size_key}: {label} | {value} | {goal} |")
        batches = [f"{k.split('_')[0]} batch {summary[k]}" for k in ("inference_batch", "train_batch") if k in summary]
        batches += [f"compiled {r['mode']} batch {r['batch']}" for r in rows
                    if r["section"] == "compile" and r.get("variant") == "nepa +compile"]
        lines += [
            "",
            f"Ratios for {first_size} unless a row names another size"
            + (f" ({', '.join(batches)})" if batches else "")
            + "; in brackets the lowest and highest ratio within one interleaved round.",
            "",
        ]

    def section(name):
        return [r for r in rows if r["section"] == name]

    if section("peak"):
        lines += ["## Matmul peak (fp32)", "", "| GEMM | GFLOP/s median | best | spread |", "|---|---|---|---|"]
        for r in section("peak"):
            lines.append(f"| {r['shape']} | {fmt(r['gflops_median'], '.1f')} | {fmt(r['gflops_best'], '.1f')} | {fmt(r['spread'], '.0%')} |")
        lines.append("")
    if section("inference"):
        lines += [
            "## Inference (sdpa, inference_mode)",
            "",
            "| size | tokens | batch | model | images/s | vs ViT | per-round range | vs ViT by CPU time | GFLOP/img | GFLOP/s | of peak | spread |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        vit_row = {(r["size"], r["batch"]): r for r in section("inference") if r["model"] == "vit"}
        for r in section("inference"):
            v = vit_row[(r["size"], r["batch"])]
            ratio = r["images_per_s"] / v["images_per_s"]
            cpu_ratio = r["images_per_cpu_s"] / v["images_per_cpu_s"]
            lines.append(
                f"| {r['size']} | {r['tokens']} | {r['batch']} | {r['model']} | {fmt(r['images_per_s'])} | {fmt(ratio, '.3f')} | "
                f"{fmt_range(r.get('ratio_vs_vit_range'))} | {fmt(cpu_ratio, '.3f')} | "
                f"{fmt(r['gflop_per_image'], '.1f')} | {fmt(r['achieved_gflops'], '.1f')} | {fmt(r['peak_fraction'], '.1%')} | {fmt(r['spread'], '.0%')} |"
            )
        lines += ["", "FLOPs: `torch.utils.flop_counter` (CPU flash-attention ops counted with torch's sdpa formula; causal attention counted in full). Peak: the matmul probe timed in the same rounds.", ""]
    if section("train"):
        lines += [
            "## Training step (forward + backward + AdamW, sdpa)",
            "",
            "| size | batch | model | images/s | vs ViT | per-round range | vs ViT by CPU time | GFLOP/s | peak tensor MiB | vs ViT | RSS memory MiB | vs ViT | saved for backward MiB | spread |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        vit = {(r["size"], r["batch"]): r for r in section("train") if r["model"] == "vit"}
        for r in section("train"):
            v = vit[(r["size"], r["batch"])]
            lines.append(
                f"| {r['size']} | {r['batch']} | {r['model']} | {fmt(r['images_per_s'])} | {fmt(r['images_per_s'] / v['images_per_s'], '.3f')} | "
                f"{fmt_range(r.get('ratio_vs_vit_range'))} | "
                f"{fmt(r['images_per_cpu_s'] / v['images_per_cpu_s'], '.3f')} | "
                f"{fmt(r['achieved_gflops'], '.1f')} | {fmt(r['tensor_peak_mib'], '.0f')} | {fmt(r['tensor_peak_mib'] / v['tensor_peak_mib'], '.3f')} | "
                f"{fmt(r['train_memory_mib'], '.0f')} | {fmt(r['train_memory_mib'] / v['train_memory_mib'], '.3f')} | "
                f"{fmt(r['saved_activations_mib'], '.0f')} | {fmt(r['spread'], '.0%')} |"
            )
        lines += [
            "",
            "Backbones use the same loss (mean square of `last_hidden_state`); `nepa-pretraining` is `NepaForPreTraining` "
            "(causal, its own loss). Memory is measured in a fresh subprocess per model (one step, then a profiled step "
            "whose backward, with the AdamW state allocated, is the high-water mark). Peak tensor memory = weights + AdamW state + the peak of the CPU allocator's running total "
            "during one step (torch.profiler, `profile_memory=True`: activations, gradients, temporaries). RSS memory = "
            "process high-water mark (VmHWM) − RSS before the model is built; it also counts allocator fragmentation. "
            "Saved for backward: distinct storages autograd saves in one forward (parameters excluded).",
            "",
        ]
    if section("resolution"):
        lines += [
            "## Cost vs resolution (inference)",
            "",
            "| resolution | tokens | model | ms/image | µs/token | attention share of FLOPs |",
            "|---|---|---|---|---|---|",
        ]
        for r in section("resolution"):
            lines.append(
                f"| {r['resolution']} | {r['tokens']} | {r['model']} | {fmt(r['ms_per_image'], '.1f')} | {fmt(r['us_per_token'], '.0f')} | {fmt(r['attention_flop_share'], '.1%')} |"
            )
        lines.append("")
    if section("profile"):
        profile_rows = section("profile")
        models = list(dict.fromkeys(r["model"] for r in profile_rows))
        groups = list(dict.fromkeys(r["op_group"] for r in profile_rows))
        table = {(r["model"], r["op_group"]): r for r in profile_rows}
        lines += [
            f"## Where the time goes (torch.profiler, one inference forward, batch {profile_rows[0]['batch']})",
            "",
            "| op group | " + " | ".join(f"{m} ms (calls)" for m in models) + " |",
            "|---|" + "---|" * len(models),
        ]
        for group in groups:
            cells = []
            for m in models:
                r = table.get((m, group))
                cells.append(f"{r['ms']:.0f} ({r['calls']})" if r else "-")
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
        totals = [sum(r["ms"] for r in profile_rows if r["model"] == m) for m in models]
        lines += ["| **total** | " + " | ".join(f"**{t:.0f}**" for t in totals) + " |", ""]
        lines += ["Self CPU time of ATen ops, per group the minimum over interleaved repetitions.", ""]
    if section("backends"):
        lines += ["## Attention backends and torch.compile (NEPA inference)", "", "| variant | layers | batch | images/s | vs sdpa | first call s |", "|---|---|---|---|---|---|"]
        for r in section("backends"):
            if "error" in r:
                lines.append(f"| {r['variant']} | - | - | failed: {r['error'][:80]} | - | - |")
            else:
                lines.append(
                    f"| {r['variant']} | {r['layers']} | {r['batch']} | {fmt(r['images_per_s'])} | {fmt(r['speed_vs_sdpa'], '.3f')} | {fmt(r['first_call_s'], '.1f')} |"
                )
        lines.append("")
    if section("compile"):
        lines += [
            "## torch.compile: ViT and NEPA both compiled (full depth)",
            "",
            "| mode | variant | batch | images/s | vs ViT in the same mode | per-round range | vs its eager | first call s | spread | peak tensor MiB | vs ViT in the same mode |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in section("compile"):
            if "error" in r:
                lines.append(f"| {r['mode']} | {r['variant']} | - | failed: {r['error'][:80]} | - | - | - | - | - | - | - |")
                continue
            lines.append(
                f"| {r['mode']} | {r['variant']} | {r['batch']} | {fmt(r['images_per_s'])} | {fmt(r['ratio_vs_vit_same_mode'], '.3f')} | "
                f"{fmt_range(r['ratio_vs_vit_same_mode_range'])} | {fmt(r['speedup_vs_eager'], '.3f')} | {fmt(r['first_call_s'], '.0f')} | "
                f"{fmt(r['spread'], '.0%')} | {fmt(r.get('tensor_peak_mib'), '.0f')} | {fmt(r.get('memory_ratio_vs_vit_same_mode'), '.3f')} |"
            )
        lines += ["", "torch.compile with the default (inductor) backend, graph breaks allowed, on both models alike; the "
                  "first call includes the compilation (forward and backward for training).", ""]
    if section("data"):
        target = section("data")[0]["target_images_per_s"]
        lines += [
            "## Input pipeline vs model consumption",
            "",
            f"| pipeline | per-sample images/s per worker | model consumes images/s here | workers needed here | workers for {target:,.0f} images/s |",
            "|---|---|---|---|---|",
        ]
        for r in section("data"):
            lines.append(
                f"| {r['pipeline']} | {fmt(r['images_per_s_per_worker'], '.1f')} | "
                f"{fmt(r['model_images_per_s'], '.2f')} | {fmt(r['workers_needed'], 'd')} | {fmt(r['workers_for_target'], 'd')} |"
            )
        lines += ["", "A worker = one process with one torch thread decoding the bundled JPEG photos (≤ 512 px). The model rate is NEPA's training (pre-/fine-tuning) or inference images/s above."]
        lines += [""] + [f"- {r['pipeline']}: {r['description']}" for r in section("data")] + [""]
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small, fast run (a few minutes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--sizes", type=lambda s: s.split(","), default=None, help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--train-batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--resolutions", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--resolution-batch", type=int, default=None)
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["eager", "sdpa", "flex_attention"])
    parser.add_argument("--backend-layers", type=int, default=None, help="depth of the model in the backends section")
    parser.add_argument("--backend-batch", type=int, default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="include torch.compile")
    parser.add_argument("--causal-rows", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--train-repeats", type=int, default=None)
    parser.add_argument("--peak-square-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096])
    parser.add_argument("--data-samples", type=int, default=None)
    parser.add_argument(
        "--sections",
        type=lambda s: s.split(","),
        default=["peak", "inference", "train", "compile", "resolution", "profile", "backends", "data"],
    )
    parser.add_argument("--compile-batch", type=int, default=None, help="inference batch of the compile section")
    parser.add_argument("--compile-train-batch", type=int, default=None, help="training batch of the compile section")
    parser.add_argument(
        "--target-images-per-s", type=float, default=3000.0,
        help="a training rate to feed (default: ViT-B/14 bf16 on one H100, about 3,000 images/s): workers it needs",
    )
    parser.add_argument("--profile-batch", type=int, default=None)
    parser.add_argument("--profile-repeats", type=int, default=None)
    parser.add_argument(
        "--baseline-src",
        default=None,
        help="a directory holding another revision's nepa_hf/ package: adds interleaved 'nepa-baseline' rows "
        "(before/after comparisons), e.g. after `git archive REV src | tar -x -C /tmp/base`: /tmp/base/src",
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON path (markdown written next to it)")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "sizes": ["vit-b16"] if quick else ["vit-b16", "vit-b14"],
        "batch_sizes": [1, 16] if quick else [1, 16, 32],
        "train_batch_sizes": [8] if quick else [16],
        "compile_batch": 4 if quick else 16,
        "compile_train_batch": 4 if quick else 8,
        "resolutions": [112, 224, 448] if quick else [112, 160, 224, 320, 448],
        "resolution_batch": 2 if quick else 4,
        "backend_layers": 2 if quick else 4,
        "backend_batch": 8 if quick else 16,
        "compile": not quick,
        "causal_rows": not quick,
        "repeats": 3 if quick else 5,
        "train_repeats": 3 if quick else 5,
        "data_samples": 21 if quick else 70,
        "profile_batch": 8 if quick else 16,
        "profile_repeats": 2 if quick else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {sorted(SIZES)}")
    if args.output is None:
        args.output = REPO_ROOT / "benchmarks" / "results" / ("throughput-quick.json" if quick else "throughput.json")
    return args


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
        "machine": machine_description(args.threads),
        "config": {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k != "memory_worker"},
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "rows": [],
    }
    start = time.perf_counter()
    peak = None
    if "peak" in args.sections or "inference" in args.sections:
        peak = run_peak(args)
        results["rows"] += peak["rows"]
        results["matmul_peak_gflops"] = peak["peak_gflops"]
        log(f"matmul peak {peak['peak_gflops']:.1f} GFLOP/s ({peak['peak_shape']}) with {args.threads} threads")
    if "inference" in args.sections:
        results["rows"] += run_inference(args, peak)["rows"]
    if "train" in args.sections:
        results["rows"] += run_train(args)["rows"]
    if "compile" in args.sections and args.compile:  # --quick / --no-compile: nothing is compiled
        results["rows"] += run_compile(args)["rows"]
    if "resolution" in args.sections:
        results["rows"] += run_resolution(args)["rows"]
    if "profile" in args.sections:
        results["rows"] += run_profile(args)["rows"]
    if "backends" in args.sections:
        results["rows"] += run_backends(args)["rows"]
    if "data" in args.sections:
        consumption = {}
        first = args.sizes[0]  # the data section's images are of the first size
        train_rows = [r for r in results["rows"] if r["section"] == "train" and r["model"] == "nepa" and r["size"] == first]
        inference_rows = [r for r in results["rows"]
                          if r["section"] == "inference" and r["model"] == "nepa" and r["size"] == first]
        if train_rows:
            consumption["train"] = max(train_rows, key=lambda r: r["batch"])["images_per_s"]
        if inference_rows:
            consumption["inference"] = max(inference_rows, key=lambda r: r["batch"])["images_per_s"]
        results["rows"] += run_data(args, consumption)["rows"]
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_seconds"] = time.perf_counter() - start
    results["summary"] = summarize(results)
    results.update(results["summary"])  # the top-level numeric keys
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return {}
    results = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    markdown = markdown_report(results)
    args.output.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    log(f"wrote {args.output} and {args.output.with_suffix('.md')} in {results['wall_seconds'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
