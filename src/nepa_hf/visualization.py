"""What a NEPA model looks at and predicts (reference §10), as arrays and as PNGs.

For a query patch:
- attention map: that patch's attention row, averaged over the chosen layers and heads, CLS column dropped;
- next-embedding similarity map: cosine similarity between the model's prediction at the query position
  (`last_hidden_state[:, t]`, which predicts the input embedding of token t + 1) and every patch's input embedding;
- PCA-to-RGB map of the patch features (first three principal components of `last_hidden_state`).

Works at any resolution divisible by the patch size and with any NEPA head (the base model is used). Rendering
uses only numpy and PIL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# A perceptually ordered colormap (viridis anchors), interpolated: no plotting library needed for heat maps.
_VIRIDIS = np.array(
    [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
     [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]],
    dtype=np.float32,
)


@dataclass
class NepaMaps:
    """Maps on the patch grid for one image and one query patch."""

    attention: np.ndarray | None  # (grid_h, grid_w), sums to 1 over visible patches
    similarity: np.ndarray  # (grid_h, grid_w), cosine similarities in [-1, 1]
    pca_rgb: np.ndarray  # (grid_h, grid_w, 3) in [0, 1]
    query: tuple[int, int]  # (row, col) of the query patch
    grid: tuple[int, int]


def _base_model(model):
    base = getattr(model, "base_model", model)
    if not hasattr(base, "rope_embeddings"):
        raise TypeError(f"Expected a NEPA model (NepaModel or a Nepa* head), got {type(model).__name__}.")
    return base


def _query_token(query: tuple[int, int], grid: tuple[int, int]) -> int:
    row, col = query
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        raise ValueError(f"Query patch {query} is outside the {grid[0]}x{grid[1]} patch grid.")
    return 1 + row * grid[1] + col  # token 0 is CLS


def pca_to_rgb(features: np.ndarray) -> np.ndarray:
    """(N, D) features -> (N, 3) in [0, 1]: projection on the first 3 principal components, min-max scaled."""
    centered = features - features.mean(0, keepdims=True)
    _, _, components = np.linalg.svd(centered, full_matrices=False)
    projected = centered @ components[:3].T
    if projected.shape[1] < 3:
        projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    low, high = projected.min(0, keepdims=True), projected.max(0, keepdims=True)
    return (projected - low) / np.maximum(high - low, 1e-8)


@torch.no_grad()
def compute_maps(
    model,
    pixel_values: torch.Tensor,
    query: tuple[int, int] | None = None,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    with_attention: bool = True,
) -> NepaMaps:
    """Attention, next-embedding similarity and PCA maps for one image (`pixel_values` of shape (1, C, H, W)).

    `query` is the (row, col) of a patch (default: the centre patch); `layers`/`heads` select what the attention
    map averages (default: all). The attention map needs attention weights: under sdpa/flex the model computes
    that call with eager attention and says so once in a warning.
    """
    base = _base_model(model)
    if pixel_values.ndim != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"Expected pixel_values of shape (1, C, H, W) for one image, got {tuple(pixel_values.shape)}.")
    patch = base.config.patch_size
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    query = query if query is not None else (grid[0] // 2, grid[1] // 2)
    token = _query_token(query, grid)
    was_training = base.training
    base.eval()
    try:
        outputs = base(pixel_values, output_attentions=with_attention)
    finally:
        base.train(was_training)

    attention = None
    if with_attention:
        num_layers = len(outputs.attentions)
        chosen_layers = layers if layers is not None else list(range(num_layers))
        bad = [i for i in chosen_layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(f"Layers {bad} out of range for a model with {num_layers} layers.")
        stacked = torch.stack([outputs.attentions[i][0] for i in chosen_layers])  # (layers, heads, N, N)
        if heads is not None:
            stacked = stacked[:, heads]
        attention = stacked[:, :, token, 1:].float().mean((0, 1)).reshape(grid).cpu().numpy()

    prediction = torch.nn.functional.normalize(outputs.last_hidden_state[0, token].float(), dim=-1)
    targets = torch.nn.functional.normalize(outputs.input_embeddings[0, 1:].float(), dim=-1)
    similarity = (targets @ prediction).reshape(grid).cpu().numpy()
    pca = pca_to_rgb(outputs.last_hidden_state[0, 1:].float().cpu().numpy()).reshape(*grid, 3)
    return NepaMaps(attention=attention, similarity=similarity, pca_rgb=pca, query=query, grid=grid)


def colorize(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """(h, w) values -> (h, w, 3) uint8 viridis colours, scaled between `low` and `high` (default: min/max)."""
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    scaled = np.clip((values - low) / max(high - low, 1e-8), 0, 1) * (len(_VIRIDIS) - 1)
    index = np.floor(scaled).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (scaled - index)[..., None]
    return ((1 - frac) * _VIRIDIS[index] + frac * _VIRIDIS[index + 1]).astype(np.uint8)


def render_overlay(
    image: Image.Image, grid_rgb: np.ndarray, query: tuple[int, int] | None = None, alpha: float = 0.6,
    size: int = 448,
) -> Image.Image:
    """Side by side: the image with the query patch outlined | the map over the image (nearest-upsampled grid)."""
    image = image.convert("RGB")
    width = size
    height = max(1, round(size * image.height / image.width))
    photo = image.resize((width, height), Image.Resampling.BICUBIC)
    heat = Image.fromarray(grid_rgb.astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST)
    blended = Image.blend(photo, heat, alpha)
    if query is not None:
        grid_h, grid_w = grid_rgb.shape[:2]
        cell_w, cell_h = width / grid_w, height / grid_h
        box = (query[1] * cell_w, query[0] * cell_h, (query[1] + 1) * cell_w - 1, (query[0] + 1) * cell_h - 1)
        for canvas in (photo, blended):
            ImageDraw.Draw(canvas).rectangle(box, outline=(255, 40, 40), width=max(2, size // 150))
    panel = Image.new("RGB", (2 * width + 8, height), (255, 255, 255))
    panel.paste(photo, (0, 0))
    panel.paste(blended, (width + 8, 0))
    return panel


def save_visualizations(
    model, processor, image, output_dir: str | os.PathLike, query: tuple[int, int] | None = None,
    layers: list[int] | None = None, heads: list[int] | None = None, prefix: str = "",
) -> dict[str, str]:
    """Write `{prefix}attention.png`, `{prefix}similarity.png` and `{prefix}pca.png` for one PIL image.

    Returns {map name: path}. The image is preprocessed with `processor` (any size it produces works).
    """
    os.makedirs(output_dir, exist_ok=True)
    image = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)).convert("RGB")
    device = next(_base_model(model).parameters()).device
    pixel_values = processor(image, return_tensors="pt").pixel_values.to(device)
    maps = compute_maps(model, pixel_values, query=query, layers=layers, heads=heads)
    shown = processor_view(image, pixel_values.shape[-2:], processor)
    panels = {
        "attention": render_overlay(shown, colorize(maps.attention, low=0.0), maps.query),
        "similarity": render_overlay(shown, colorize(maps.similarity, low=-1.0, high=1.0), maps.query),
        "pca": render_overlay(shown, maps.pca_rgb * 255, None, alpha=0.85),
    }
    paths = {}
    for name, panel in panels.items():
        path = os.path.join(output_dir, f"{prefix}{name}.png")
        panel.save(path)
        paths[name] = path
    return paths


def processor_view(image: Image.Image, size: tuple[int, int], processor) -> Image.Image:
    """The region of `image` the model saw: centre-cropped like the processor when it crops, else the whole image."""
    if not getattr(processor, "do_center_crop", False):
        return image
    height, width = int(size[0]), int(size[1])
    scale = max(width / image.width, height / image.height)
    crop_w, crop_h = round(width / scale), round(height / scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


__all__ = ["NepaMaps", "colorize", "compute_maps", "pca_to_rgb", "render_overlay", "save_visualizations"]
