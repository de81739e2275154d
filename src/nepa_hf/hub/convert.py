# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Convert the authors' NEPA checkpoints as the model bundle's converter does, and make the folder Hub-ready: a model
card beside it and the remote code of every head (`nepa_hf.hub.publish.write_remote_code`), in the converter's
staged step.

    python -m nepa_hf.hub.convert --input SixAILab/nepa-base-patch14-224 --output nepa-vit-b [--ema]

The same flags as `python -m nepa_hf.models.nepa.convert_nepa`, which ships inside checkpoints and so cannot import
the card template (`nepa_hf.hub.model_card.card_for_conversion`). `--to-reference` writes no card.
"""

import sys
from pathlib import Path

from ..models.nepa.convert_nepa import convert_reference_checkpoint, main as convert_main
from .model_card import card_for_conversion
from .publish import write_remote_code


def convert_with_model_card(source, output_dir, *, ema=False, revision=None, **options) -> Path:
    """`convert_reference_checkpoint` (same arguments), adding the conversion's model card as README.md and every
    head's remote code in the same staged step: a failed conversion leaves nothing at `output_dir`."""
    repo_id = Path(output_dir).expanduser().name

    def finish(folder: Path, config) -> None:
        card_for_conversion(str(source), config, repo_id=repo_id, ema=ema, revision=revision).save(folder / "README.md")
        write_remote_code(folder)

    return convert_reference_checkpoint(source, output_dir, ema=ema, revision=revision, finish=finish, **options)


def main(argv=None) -> int:
    return convert_main(argv, prog="python -m nepa_hf.hub.convert", convert=convert_with_model_card)


if __name__ == "__main__":
    sys.exit(main())
