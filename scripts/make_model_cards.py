"""Regenerate the committed model cards under model_cards/<name>/README.md from nepa_hf.hub.model_card.

    python scripts/make_model_cards.py [--output model_cards] [--namespace nepa-hf]

The cards come from one template in the library (`nepa_hf.hub.model_card.make_model_card`); edit it there and rerun.
tests/test_model_cards.py fails when the committed cards drift from the template.
"""

import argparse
from pathlib import Path

from nepa_hf.hub.model_card import HUB_NAMESPACE, write_model_cards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "model_cards"))
    parser.add_argument("--namespace", default=HUB_NAMESPACE, help="Hub organisation the usage examples load from.")
    args = parser.parse_args()
    for path in write_model_cards(args.output, namespace=args.namespace):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
