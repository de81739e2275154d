"""Visualise a NEPA checkpoint on an image: attention map, next-embedding similarity map, PCA of patch features.

Example:
    python examples/visualize.py --model outputs/demo/pretrained --image data/photos/chelsea_cat.jpg \
        --output_dir outputs/visualize --query_row 4 --query_col 5

Writes attention.png, similarity.png and pca.png: each names the model, the image, the query patch and how layers
and heads are averaged, shows the input beside the map with the query marked, and has a colourbar (see
`nepa_hf.evaluation.visualization`). Needs matplotlib (`pip install 'nepa-hf[viz]'`).

Works with our checkpoints and converted reference checkpoints, at any resolution the processor produces
(`--size 448` overrides it). Attention maps need eager attention: other backends switch for that call.
"""

import argparse
import os

from PIL import Image
from transformers import AutoImageProcessor, AutoModel

import nepa_hf  # noqa: F401  (registers the "nepa" model type)
from nepa_hf.evaluation.visualization import save_visualizations


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="NEPA checkpoint folder or Hub id")
    parser.add_argument("--image", required=True, help="path to an image file")
    parser.add_argument("--output_dir", default="outputs/visualize")
    parser.add_argument("--query_row", type=int, default=None, help="patch row of the query (default: centre)")
    parser.add_argument("--query_col", type=int, default=None, help="patch column of the query (default: centre)")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="layers to average (default: all)")
    parser.add_argument("--heads", type=int, nargs="*", default=None, help="heads to average (default: all)")
    parser.add_argument("--size", type=int, default=None, help="square input size (multiple of the patch size)")
    return parser.parse_args()


def main():
    args = parse_args()
    if (args.query_row is None) != (args.query_col is None):
        raise SystemExit("Pass both --query_row and --query_col, or neither (centre patch).")
    model = AutoModel.from_pretrained(args.model, attn_implementation="eager").eval()
    overrides = {"size": {"height": args.size, "width": args.size}} if args.size else {}
    processor = AutoImageProcessor.from_pretrained(args.model, **overrides)
    query = (args.query_row, args.query_col) if args.query_row is not None else None
    with Image.open(args.image) as image:
        paths = save_visualizations(
            model, processor, image, args.output_dir, query=query, layers=args.layers, heads=args.heads,
            model_name=args.model.rstrip("/"), image_name=os.path.basename(args.image),
        )
    for name, path in paths.items():
        print(f"{name:10s} {path}")


if __name__ == "__main__":
    main()
