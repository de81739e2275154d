# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Publish a NEPA checkpoint to the Hugging Face Hub.

    python -m nepa_hf.hub.publish --model nepa-vit-b --repo-id my-org/nepa-vit-b --dry-run
    python -m nepa_hf.hub.publish --model nepa-vit-b --repo-id my-org/nepa-vit-b [--private] [--revision BR] [--create-pr]

Steps: (1) assemble a complete Hub-ready folder from a nepa-hf checkpoint folder: safetensors weights, config,
image-processor config, model card (from `nepa_hf.hub.model_card`) and the model code files with an `auto_map`, so
`trust_remote_code=True` users need nothing but transformers. Every head the package registers publishes:
`NepaModel`, `NepaForPreTraining`, `NepaForImageClassification`, `NepaForSemanticSegmentation`, `NepaBackbone`;
(2) validate it: required files, card metadata, and a
load-back in a fresh process where `nepa_hf` cannot be imported, whose outputs must match this process; (3) upload
it with huggingface_hub (`create_repo`, then `upload_folder`), or with `--dry-run` only list what would be
uploaded (works offline). The token comes from `--token`, `HF_TOKEN` or `hf auth login`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token

from ..models.nepa import modeling_nepa
from ..models.nepa.configuration_nepa import NepaConfig
from ..models.nepa.image_processing_nepa import NepaImageProcessorPil
from .model_card import (
    AUTO_CLASS_OF_HEAD,
    HUB_NAMESPACE,
    PUBLISHED_CHECKPOINTS,
    CheckpointSpec,
    head_classes,
    make_model_card,
    spec_from_config,
)

# The code files of every published folder; `REMOTE_CODE_AUTO_MAP` points every Auto class at them.
CODE_FILES = ("configuration_nepa.py", "modeling_nepa.py", "modeling_nepa_segmentation.py", "image_processing_nepa.py")
AUTO_CLASS_OF = AUTO_CLASS_OF_HEAD
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_nepa.NepaConfig",
    "AutoModel": "modeling_nepa.NepaModel",
    "AutoModelForPreTraining": "modeling_nepa.NepaForPreTraining",
    "AutoModelForImageClassification": "modeling_nepa.NepaForImageClassification",
    "AutoModelForSemanticSegmentation": "modeling_nepa_segmentation.NepaForSemanticSegmentation",
    "AutoBackbone": "modeling_nepa_segmentation.NepaBackbone",
}


class PublishError(RuntimeError):
    """Publishing cannot go on; the message says why and what to do (printed as one line by the CLI)."""


# --------------------------------------------------------------------------------------------------------------
# Assemble
# --------------------------------------------------------------------------------------------------------------


def _load_config(model_dir: Path) -> NepaConfig:
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise PublishError(f"{model_dir} has no config.json: pass a folder saved with save_pretrained.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type == "vit_nepa":
        raise PublishError(
            f"{model_dir} is in the authors' vit_nepa layout; convert it first: "
            f"python -m nepa_hf.models.nepa.convert_nepa --input {model_dir} --output <folder>"
        )
    if model_type != NepaConfig.model_type:
        raise PublishError(f"{model_dir} holds model_type {model_type!r}, not a NEPA (model_type 'nepa') checkpoint.")
    return NepaConfig.from_pretrained(model_dir)


def _architecture(config: NepaConfig) -> str:
    for name in config.architectures or []:
        if name in AUTO_CLASS_OF:
            return name
    raise PublishError(
        f"config.architectures={config.architectures} names none of {sorted(AUTO_CLASS_OF)}; save the model with "
        "save_pretrained so the architecture is recorded."
    )


# The sentence transformers' Trainer writes into its README.md from `create_model_card(dataset=...)`.
_TRAINER_CARD_DATASET = re.compile(
    r"^This model (?:was trained from scratch|is a fine-tuned version of .*?) on the (.+) dataset\.$", re.MULTILINE
)


def recorded_dataset(model_dir: str | Path) -> str | None:
    """The training data a run of this project recorded beside the model, else None.

    `examples/pretrain_nepa.py` writes `run_config.json` with its `--dataset`; the Trainer scripts
    (`finetune_classification.py`, `finetune_segmentation.py`) pass `dataset=` to `Trainer.create_model_card`, which
    writes it into `README.md` ("... on the <dataset> dataset.").
    """
    model_dir = Path(model_dir)
    run_config = model_dir / "run_config.json"
    if run_config.exists():
        try:
            value = json.loads(run_config.read_text()).get("dataset")
        except (json.JSONDecodeError, AttributeError):
            value = None
        if value:
            return str(value)
    card = model_dir / "README.md"
    if card.exists():
        match = _TRAINER_CARD_DATASET.search(card.read_text(errors="replace"))
        if match:
            return match.group(1)
    return None


def spec_for(
    name: str,
    config: NepaConfig,
    training: str = "",
    dataset: str | None = None,
    preprocessing: dict | None = None,
) -> CheckpointSpec:
    """The published card spec when `name` is one of ours (checked against the weights' config), else a generic one
    whose card describes the training with `training`, the training data `dataset` (as the run recorded it; None
    states none) and the saved processor's `preprocessing` settings."""
    architecture = _architecture(config)
    if name not in PUBLISHED_CHECKPOINTS:
        return spec_from_config(name, config, training=training, dataset=dataset, preprocessing=preprocessing)
    spec = PUBLISHED_CHECKPOINTS[name]
    actual = spec_from_config(name, config)
    if (actual.architecture, actual.num_parameters, actual.size) != (spec.architecture, spec.num_parameters, spec.size):
        raise PublishError(
            f"The folder holds a {actual.size} {architecture} with {actual.num_parameters:,} parameters, not {name} "
            f"({spec.size} {spec.architecture}, {spec.num_parameters:,}). Pick another --name."
        )
    return spec


def write_remote_code(folder: str | Path) -> None:
    """Give a saved NEPA folder the bundle's code files and an `auto_map` naming every head, so that each Auto class
    loads it with `trust_remote_code=True` and no nepa-hf (transformers' own save names the saving class only)."""
    folder = Path(folder)
    for code_file in CODE_FILES:
        shutil.copy(Path(modeling_nepa.__file__).with_name(code_file), folder / code_file)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = REMOTE_CODE_AUTO_MAP
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def assemble(
    model_dir: str | Path,
    staging_dir: str | Path,
    repo_id: str,
    name: str | None = None,
    card_path=None,
    training_description: str = "",
    dataset: str | None = None,
) -> Path:
    """Write the Hub-ready folder for `model_dir` into `staging_dir` and return it.

    `dataset`: the training data to name on a generated card; default: what the run recorded (`recorded_dataset`).
    """
    model_dir, staging = Path(model_dir), Path(staging_dir)
    if not model_dir.is_dir():
        raise PublishError(f"--model {model_dir} is not a folder.")
    config = _load_config(model_dir)
    architecture = _architecture(config)
    # Loading and saving again writes the current code files; weights keep dtype and values.
    model = head_classes()[architecture].from_pretrained(model_dir)
    model.save_pretrained(staging)
    write_remote_code(staging)
    if (model_dir / "preprocessor_config.json").exists():
        processor = NepaImageProcessorPil.from_pretrained(model_dir)
    else:
        processor = NepaImageProcessorPil(size={"height": config.image_size, "width": config.image_size})
    processor.save_pretrained(staging)
    if card_path is not None:
        (staging / "README.md").write_text(Path(card_path).read_text())
    else:
        spec = spec_for(
            name or repo_id.split("/")[-1], model.config, training=training_description,
            dataset=dataset or recorded_dataset(model_dir), preprocessing=processor.to_dict(),
        )  # fmt: skip
        make_model_card(spec, repo_id=repo_id).save(staging / "README.md")
    return staging


# --------------------------------------------------------------------------------------------------------------
# Validate
# --------------------------------------------------------------------------------------------------------------

def main_outputs(outputs) -> list:
    """The tensors the load-back compares: logits (classifier, segmenter), feature maps (backbone), else the last
    hidden state (NepaModel, NepaForPreTraining). `_LOAD_BACK` repeats this (it cannot import nepa_hf)."""
    for name in ("logits", "feature_maps", "last_hidden_state"):
        value = getattr(outputs, name, None)
        if value is not None:
            return list(value) if isinstance(value, (tuple, list)) else [value]
    raise PublishError(f"{type(outputs).__name__} has none of logits, feature_maps, last_hidden_state to compare.")


_LOAD_BACK = textwrap.dedent(
    """
    import sys
    sys.modules["nepa_hf"] = None  # what a user without nepa-hf installed has
    import numpy as np, torch
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    import transformers
    folder, auto_class, pixels_path, out_path = sys.argv[1:5]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    size = processor.size.get("height") or processor.size.get("shortest_edge")
    image = np.random.default_rng(0).integers(0, 256, (size + 5, size + 3, 3), dtype=np.uint8)
    assert processor(image, return_tensors="pt").pixel_values.shape[-3] == config.num_channels
    if auto_class == "AutoBackbone":
        # AutoBackbone.from_pretrained(local folder) can ask the Hub whether the path is a repo and fail offline
        # (README, "Segment"); take the class from auto_map, as AutoBackbone does for a Hub repo.
        model_class = get_class_from_dynamic_module(config.auto_map[auto_class], folder)
    else:
        model_class = getattr(transformers, auto_class)
    model = model_class.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        out = model(torch.load(pixels_path))
    for name in ("logits", "feature_maps", "last_hidden_state"):  # = nepa_hf.hub.publish.main_outputs
        value = getattr(out, name, None)
        if value is not None:
            torch.save(list(value) if isinstance(value, (tuple, list)) else [value], out_path)
            break
    """
)


def validate(folder: str | Path, check_load: bool = True) -> list[str]:
    """Check a Hub-ready folder; raise `PublishError` on the first problem. Returns the checks that passed."""
    folder = Path(folder)
    passed = []
    weights = [f for f in ("model.safetensors", "model.safetensors.index.json") if (folder / f).exists()]
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    required = ("config.json", "preprocessor_config.json", "README.md", *CODE_FILES)
    missing = [f for f in required if not (folder / f).exists()]
    if not weights:
        missing.append("model.safetensors")
    if missing:
        raise PublishError(f"{folder} is missing {', '.join(missing)}.")
    architecture = next((a for a in config.get("architectures") or [] if a in AUTO_CLASS_OF), None)
    if architecture is None:
        raise PublishError(f"config.json architectures {config.get('architectures')} is not a NEPA model class.")
    auto_class = AUTO_CLASS_OF[architecture]
    if config.get("auto_map") != REMOTE_CODE_AUTO_MAP:
        raise PublishError(
            f"config.json's auto_map is {config.get('auto_map')}, not every head's {REMOTE_CODE_AUTO_MAP}: "
            "trust_remote_code users could not load it with each Auto class (write_remote_code writes it)."
        )
    processor_map = json.loads((folder / "preprocessor_config.json").read_text()).get("auto_map") or {}
    if "AutoImageProcessor" not in processor_map:
        raise PublishError("preprocessor_config.json has no auto_map entry for AutoImageProcessor.")
    passed.append("files and auto_map")

    try:
        card = ModelCard.load(folder / "README.md")
        ModelCardData(**card.data.to_dict())
    except Exception as error:  # huggingface_hub raises ValueError/YAML errors for bad metadata
        raise PublishError(f"README.md model card metadata is invalid: {error}") from None
    required = ("license", "library_name", "pipeline_tag")
    absent = [key for key in required if not getattr(card.data, key, None)]
    if absent:
        raise PublishError(f"README.md metadata lacks {', '.join(absent)}.")
    passed.append("model card metadata")

    if check_load:
        _check_load_back(folder, architecture, auto_class)
        passed.append("load-back with trust_remote_code and without nepa_hf")
    return passed


def _check_load_back(folder: Path, architecture: str, auto_class: str) -> None:
    model = head_classes()[architecture].from_pretrained(folder).eval()
    config = model.config
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, config.num_channels, config.image_size, config.image_size, generator=generator)
    with torch.no_grad():
        expected = main_outputs(model(pixels))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        torch.save(pixels, scratch / "pixels.pt")
        (scratch / "load_back.py").write_text(_LOAD_BACK)
        env = dict(os.environ, HF_HOME=str(scratch / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH="")
        result = subprocess.run(
            [sys.executable, str(scratch / "load_back.py"), str(folder.resolve()), auto_class,
             str(scratch / "pixels.pt"), str(scratch / "out.pt")],
            env=env, capture_output=True, text=True, cwd=scratch, timeout=1800,
        )  # fmt: skip
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise PublishError(f"Loading the folder back with trust_remote_code (without nepa_hf) failed: {last}")
        reloaded = torch.load(scratch / "out.pt")
    tolerance = dict(rtol=1e-4, atol=1e-4) if expected[0].dtype == torch.float32 else {}
    try:
        torch.testing.assert_close(reloaded, expected, **tolerance)
    except AssertionError as error:
        raise PublishError(f"The remote-code model computes different outputs than nepa_hf: {error}") from None


# --------------------------------------------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------------------------------------------


def list_files(folder: str | Path) -> list[tuple[str, int]]:
    """(path relative to the folder, size in bytes) of every file `upload_folder` would send."""
    folder = Path(folder)
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def upload(
    folder: str | Path,
    repo_id: str,
    token: str,
    *,
    revision: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> str:
    """Create the repo if needed and upload `folder`; returns the commit or pull-request URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message or "Upload NEPA checkpoint with nepa_hf.hub.publish",
    )
    return getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)


def _hub_error_message(error: Exception, repo_id: str) -> str | None:
    """One line for the errors a user can fix (token, permissions, network); None for anything else (a bug)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "the Hub is unreachable because HF_HUB_OFFLINE is set; unset it to upload (or use --dry-run)."
    if isinstance(error, HFValidationError):
        return f"invalid --repo-id {repo_id!r}: {error}"
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            return "the Hub rejected the token (401); create a write token and run `hf auth login` or set HF_TOKEN."
        if status == 403:
            return f"the token may not write to {repo_id} (403); check the organisation and the token's permissions."
        return f"the Hub refused the upload: {str(error).splitlines()[0]}"
    # Transport errors of whichever HTTP client this huggingface_hub uses (httpx, httpx2, requests), and sockets.
    client = type(error).__module__.split(".")[0]
    if isinstance(error, OSError) or client in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
        return f"cannot reach the Hugging Face Hub ({type(error).__name__}: {error}); check the network."
    return None


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nepa_hf.hub.publish", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="nepa-hf checkpoint folder (e.g. made by nepa_hf.models.nepa.convert_nepa).")
    parser.add_argument("--repo-id", default=None, help=f"Hub repo (default: {HUB_NAMESPACE}/<folder name>).")
    parser.add_argument("--name", default=None, help="Name on the card (default: the repo name); "
                        f"{', '.join(PUBLISHED_CHECKPOINTS)} get their published card.")  # fmt: skip
    parser.add_argument("--card", default=None, help="Use this README.md instead of generating the card.")
    parser.add_argument(
        "--training-description",
        default="",
        help="For checkpoints trained here: data and recipe, written into the generated card.",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="Training data to name on the generated card (a Hub dataset id goes into its metadata). Default: what "
        "the training run recorded (run_config.json or the Trainer's README.md), else none.",
    )
    parser.add_argument("--revision", default=None, help="Branch to upload to (created if missing).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing directly.")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument(
        "--token", default=None, help="Hub token (default: HF_TOKEN or the one stored by `hf auth login`)."
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="Assemble and validate, list what would be uploaded, upload nothing."
    )
    parser.add_argument("--staging-dir", default=None, help="Assemble here and keep it (default: a temporary folder).")
    parser.add_argument(
        "--skip-load-check", action="store_true", help="Skip loading the folder back in a fresh process."
    )
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    args = parse_args(argv)
    repo_id = args.repo_id or f"{HUB_NAMESPACE}/{Path(args.model).resolve().name}"
    token = None
    if not args.dry_run:  # fail before the (slow) assembly when the upload cannot happen
        token = args.token or get_token()
        if not token:
            return _fail(
                "no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run to upload nothing)."
            )

    staging_parent = None
    if args.staging_dir:
        staging = Path(args.staging_dir)
        if staging.exists() and any(staging.iterdir()):
            return _fail(f"--staging-dir {staging} is not empty.")
    else:
        staging_parent = tempfile.TemporaryDirectory(prefix="nepa-publish-")
        staging = Path(staging_parent.name) / repo_id.split("/")[-1]
    try:
        dataset = args.dataset or recorded_dataset(args.model)
        if args.card is None and (args.name or repo_id.split("/")[-1]) not in PUBLISHED_CHECKPOINTS:
            print(f"card: training data {dataset!r}" if dataset else
                  "card: no training data recorded beside the model; pass --dataset to name it")  # fmt: skip
        assemble(
            args.model, staging, repo_id, name=args.name, card_path=args.card,
            training_description=args.training_description, dataset=dataset,
        )  # fmt: skip
        for check in validate(staging, check_load=not args.skip_load_check):
            print(f"ok: {check}")
        files = list_files(staging)
        target = f"{repo_id}" + (f"@{args.revision}" if args.revision else "")
        mode = " (private)" if args.private else ""
        action = "would upload" if args.dry_run else "uploading"
        print(f"{action} to {target}{mode}{' as a pull request' if args.create_pr else ''}:")
        for path, size in files:
            print(f"  {path:<40} {size:>14,d} bytes  ({_human(size)})")
        print(f"  {len(files)} files, {sum(s for _, s in files):,d} bytes in total")
        if args.dry_run:
            if args.staging_dir:
                print(f"The assembled folder is in {staging}.")
            return 0
        url = upload(
            staging, repo_id, token, revision=args.revision, private=args.private, create_pr=args.create_pr,
            commit_message=args.commit_message,
        )  # fmt: skip
        print(f"Uploaded: {url}")
        return 0
    except PublishError as error:
        return _fail(str(error))
    except Exception as error:
        message = _hub_error_message(error, repo_id)
        if message is None:
            raise
        return _fail(message)
    finally:
        if staging_parent is not None:
            staging_parent.cleanup()


if __name__ == "__main__":
    sys.exit(main())
