"""What a NEPA model looks at and predicts (the paper's attention and similarity maps), as arrays and as PNGs.

For a query patch:
- attention map: that patch's attention row, averaged over the chosen layers and heads, CLS column dropped;
- next-embedding similarity map: cosine similarity between the model's prediction at the query position
  (`last_hidden_state[:, t]`, which predicts the input embedding of token t + 1) and every patch's input embedding;
- PCA-to-RGB map of the patch features (first three principal components of `last_hidden_state`).

Works at any resolution divisible by the patch size and with any NEPA head (the base model is used). The maps
need only torch and numpy; the PNGs are drawn with matplotlib (`pip install 'nepa-hf[viz]'`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# Every PNG has a fixed size, so it stays readable on its own: (width, height) in pixels at FIGURE_DPI.
FIGURE_DPI = 100
FIGURE_SIZES_PX = {"attention": (1500, 620), "similarity": (1500, 620), "pca": (1100, 620)}

_QUERY_COLOUR = "#ff2a2a"
_MASKED_COLOUR = (0.82, 0.82, 0.82, 1.0)  # not in viridis: a masked cell cannot be read as a low value


@dataclass
class NepaMaps:
    """Maps on the patch grid for one image and one query patch, with what they were computed from."""

    attention: np.ndarray | None  # (grid_h, grid_w); with attention_to_cls, sums to 1
    similarity: np.ndarray  # (grid_h, grid_w), cosine similarities in [-1, 1]
    pca_rgb: np.ndarray  # (grid_h, grid_w, 3) in [0, 1]
    query: tuple[int, int]  # (row, col) of the query patch
    grid: tuple[int, int]
    layers: tuple[int, ...] = ()  # layers the attention map averages (non-negative indices)
    heads: tuple[int, ...] = ()  # heads it averages
    num_layers: int = 0
    num_heads: int = 0
    attention_to_cls: float | None = None  # mean attention of the query to CLS: the mass the map leaves out
    is_causal: bool = False
    predicts_next: bool = True  # config.pretraining_shift: the output at t predicts the input embedding of t + 1
    pca_explained_variance: tuple[float, ...] = ()  # share of the feature variance on components 1-3

    @property
    def target(self) -> tuple[int, int] | None:
        """The patch whose input embedding the prediction at the query is trained to match (None: the last patch,
        whose prediction is unused)."""
        if not self.predicts_next:
            return self.query
        index = self.query[0] * self.grid[1] + self.query[1] + 1
        return divmod(index, self.grid[1]) if index < self.grid[0] * self.grid[1] else None

    @property
    def masked(self) -> np.ndarray:
        """(grid_h, grid_w) bool: patches the query cannot attend to (after it in raster order, causal models)."""
        order = np.arange(self.grid[0] * self.grid[1]).reshape(self.grid)
        return order > self.query[0] * self.grid[1] + self.query[1] if self.is_causal else np.zeros(self.grid, bool)


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


def _resolve_indices(chosen: list[int] | None, count: int, what: str) -> list[int]:
    if chosen is None:
        return list(range(count))
    if len(chosen) == 0:
        raise ValueError(f"No {what} chosen: pass at least one {what[:-1]} index, or None for all {count}.")
    bad = [i for i in chosen if not -count <= i < count]
    if bad:
        raise ValueError(f"{what.capitalize()} {bad} out of range for a model with {count} {what}.")
    return [i % count for i in chosen]


def _pca(features: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    """(N, D) features -> ((N, 3) in [0, 1], share of the variance on each of the 3 components)."""
    centered = features - features.mean(0, keepdims=True)
    _, singular_values, components = np.linalg.svd(centered, full_matrices=False)
    projected = centered @ components[:3].T
    if projected.shape[1] < 3:
        projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    variance = singular_values**2
    explained = tuple(float(v) for v in variance[:3] / max(float(variance.sum()), 1e-12))
    low, high = projected.min(0, keepdims=True), projected.max(0, keepdims=True)
    return (projected - low) / np.maximum(high - low, 1e-8), explained


def pca_to_rgb(features: np.ndarray) -> np.ndarray:
    """(N, D) features -> (N, 3) in [0, 1]: projection on the first 3 principal components, min-max scaled."""
    return _pca(features)[0]


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
    map averages (default: all). The attention map needs attention weights: the call runs with eager attention.
    """
    base = _base_model(model)
    if pixel_values.ndim != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"Expected pixel_values of shape (1, C, H, W) for one image, got {tuple(pixel_values.shape)}.")
    config = base.config
    patch = config.patch_size
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    query = query if query is not None else (grid[0] // 2, grid[1] // 2)
    token = _query_token(query, grid)
    num_heads = config.num_attention_heads
    chosen_heads = _resolve_indices(heads, num_heads, "heads")
    was_training, implementation = base.training, config._attn_implementation
    base.eval()
    if with_attention:  # only eager attention materialises the attention maps
        base.set_attn_implementation("eager")
    try:
        outputs = base(pixel_values, output_attentions=with_attention)
    finally:
        base.train(was_training)
        base.set_attn_implementation(implementation)

    attention, attention_to_cls, chosen_layers = None, None, []
    num_layers = config.num_hidden_layers
    if with_attention:
        num_layers = len(outputs.attentions)
        chosen_layers = _resolve_indices(layers, num_layers, "layers")
        stacked = torch.stack([outputs.attentions[i][0] for i in chosen_layers])[:, chosen_heads]  # (l, h, N, N)
        query_row = stacked[:, :, token].float().mean((0, 1))
        attention = query_row[1:].reshape(grid).cpu().numpy()
        attention_to_cls = float(query_row[0])

    prediction = torch.nn.functional.normalize(outputs.last_hidden_state[0, token].float(), dim=-1)
    targets = torch.nn.functional.normalize(outputs.input_embeddings[0, 1:].float(), dim=-1)
    similarity = (targets @ prediction).reshape(grid).cpu().numpy()
    pca, explained = _pca(outputs.last_hidden_state[0, 1:].float().cpu().numpy())
    return NepaMaps(
        attention=attention, similarity=similarity, pca_rgb=pca.reshape(*grid, 3), query=query, grid=grid,
        layers=tuple(chosen_layers), heads=tuple(chosen_heads), num_layers=num_layers, num_heads=num_heads,
        attention_to_cls=attention_to_cls, is_causal=config.resolved_is_causal,
        predicts_next=bool(getattr(config, "pretraining_shift", True)), pca_explained_variance=explained,
    )


def _matplotlib_figure():
    """matplotlib's `Figure` class, drawn without pyplot (no global backend change, works headless)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Writing the visualisation PNGs needs matplotlib, which is not installed: pip install 'nepa-hf[viz]' "
            "(or pip install matplotlib). compute_maps() returns the same maps as arrays without it."
        ) from error
    return Figure


def model_label(model) -> str:
    """A short name for titles: the last two parts of the checkpoint path or Hub id, else the class name."""
    name = (getattr(_base_model(model).config, "name_or_path", "") or "").rstrip("/\\")
    if not name:
        return type(model).__name__
    return "/".join(name.replace("\\", "/").split("/")[-2:])


def _chosen(indices: tuple[int, ...], count: int, what: str) -> str:
    if list(indices) == list(range(count)):
        return f"all {count} {what}"
    return f"{what} {', '.join(map(str, indices))} of {count}"


def _rc(patch: tuple[int, int]) -> str:
    return f"(row {patch[0]}, col {patch[1]})"


def _new_figure(kind: str, panels: int, width_ratios: list[float]):
    Figure = _matplotlib_figure()
    width, height = FIGURE_SIZES_PX[kind]
    figure = Figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI, layout="constrained")
    figure.get_layout_engine().set(h_pad=0.12, w_pad=0.12)
    axes = figure.subplots(1, panels, gridspec_kw={"width_ratios": width_ratios})
    return figure, list(axes)


def _titles(figure, headline: str, model_name: str, image_name: str, subtitle: str, note: str) -> None:
    """Headline (what and where), a line naming the model and the image, then how the map was computed."""
    import textwrap

    source = textwrap.fill(f"model: {model_name}   ·   image: {image_name}", width=130)
    figure.suptitle(f"{headline}\n{source}\n{subtitle}", fontsize=11.5, linespacing=1.5)
    figure.supxlabel(note, fontsize=10, linespacing=1.4, color="#333333")


def _show_on_grid(axis, image, grid: tuple[int, int], title: str, **imshow_kwargs):
    """Draw `image` (any resolution) over the patch grid, so axes read in patch rows/columns."""
    from matplotlib.ticker import MaxNLocator

    extent = (-0.5, grid[1] - 0.5, grid[0] - 0.5, -0.5)
    shown = axis.imshow(image, extent=extent, **imshow_kwargs)
    axis.set_xlim(extent[0], extent[1])
    axis.set_ylim(extent[2], extent[3])
    axis.set_title(title, fontsize=10.5)
    axis.set_xlabel("patch column")
    axis.set_ylabel("patch row")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    return shown


def _mark_patch(axis, patch: tuple[int, int], dashed: bool = False) -> None:
    from matplotlib.patches import Rectangle
    from matplotlib.patheffects import withStroke

    axis.add_patch(Rectangle(
        (patch[1] - 0.5, patch[0] - 0.5), 1, 1, fill=False, edgecolor=_QUERY_COLOUR, linewidth=2.2,
        linestyle=(0, (2.5, 1.5)) if dashed else "-", path_effects=[withStroke(linewidth=4.2, foreground="white")],
    ))


def _heat_map_figure(
    kind: str, values: np.ndarray, maps: NepaMaps, image: Image.Image, headline: str, model_name: str,
    image_name: str, subtitle: str, note: str,
    scale_label: str, low: float, high: float, masked: np.ndarray | None = None, target: tuple[int, int] | None = None,
):
    """Input | map | map over the input (greyscale), query marked everywhere, one colourbar for both maps."""
    from matplotlib import colormaps

    figure, (photo_axis, map_axis, overlay_axis) = _new_figure(kind, 3, [1, 1, 1])
    colours = colormaps["viridis"].with_extremes(bad=_MASKED_COLOUR)
    data = np.ma.masked_array(values, mask=masked if masked is not None else np.zeros(values.shape, bool))
    _show_on_grid(photo_axis, np.asarray(image), maps.grid, "input (the region the model sees)")
    heat = _show_on_grid(map_axis, data, maps.grid, "map", cmap=colours, vmin=low, vmax=high, interpolation="nearest")
    _show_on_grid(overlay_axis, np.asarray(image.convert("L")), maps.grid, "map over the input (greyscale)",
                  cmap="gray", vmin=0, vmax=255)
    overlay_axis.imshow(data, extent=(-0.5, maps.grid[1] - 0.5, maps.grid[0] - 0.5, -0.5), cmap=colours, vmin=low,
                        vmax=high, interpolation="nearest", alpha=0.6)
    for axis in (photo_axis, map_axis, overlay_axis):
        _mark_patch(axis, maps.query)
        if target is not None and target != maps.query:
            _mark_patch(axis, target, dashed=True)
    bar = figure.colorbar(heat, ax=[map_axis, overlay_axis], fraction=0.035, pad=0.02)
    bar.set_label(scale_label)
    _titles(figure, headline, model_name, image_name, subtitle, note)
    return figure


def render_attention(maps: NepaMaps, image: Image.Image, model_name: str, image_name: str):
    """The attention PNG's figure (matplotlib `Figure`)."""
    if maps.attention is None:
        raise ValueError("These maps have no attention map: compute them with with_attention=True.")
    masked = maps.masked
    visible = maps.attention[~masked]
    headline = f"Attention of query patch {_rc(maps.query)}"
    subtitle = (
        f"query's attention row averaged over {_chosen(maps.layers, maps.num_layers, 'layers')} and "
        f"{_chosen(maps.heads, maps.num_heads, 'heads')}; CLS column dropped (CLS got "
        f"{maps.attention_to_cls:.1%} of the weight, not shown)"
    )
    if maps.is_causal:
        note = (
            "Causal model: the query attends only to itself and the patches before it in raster order (left to "
            "right, top to bottom).\nGrey cells come after it: masked out (weight 0), not low attention. "
        )
    else:
        note = "Bidirectional model: the query attends to every patch.\n"
    note += f"Query patch: red box. Colour scale: 0 to this map's maximum ({visible.max():.3f})."
    return _heat_map_figure(
        "attention", maps.attention, maps, image, headline, model_name, image_name, subtitle, note,
        "attention weight (the query's row, CLS included, sums to 1)", 0.0, float(max(visible.max(), 1e-8)),
        masked=masked if maps.is_causal else None,
    )


def render_similarity(maps: NepaMaps, image: Image.Image, model_name: str, image_name: str):
    """The next-embedding similarity PNG's figure (matplotlib `Figure`)."""
    target = maps.target
    headline = f"Next-embedding similarity for query patch {_rc(maps.query)}"
    subtitle = (
        "cosine similarity between the model's prediction at the query (final-layer output; no layer or head "
        "averaging) and every patch's input embedding"
    )
    if target is None:
        note = "The query is the last patch: its prediction has no next patch to match (unused in training)."
    else:
        order = np.argsort(-maps.similarity.reshape(-1), kind="stable")
        rank = int(np.nonzero(order == target[0] * maps.grid[1] + target[1])[0][0]) + 1
        what = "the next patch in raster order" if maps.predicts_next else "its own input embedding (no shift)"
        note = (
            f"The prediction at the query is trained to match {what}: {_rc(target)}, dashed box; similarity there "
            f"{maps.similarity[target]:+.3f}, rank {rank} of {maps.similarity.size}."
        )
    note += (
        "\nEvery patch is compared, later ones included: input embeddings are computed before attention, so "
        "causal masking plays no part here. Query patch: red box. Colour scale: this map's range."
    )
    return _heat_map_figure(
        "similarity", maps.similarity, maps, image, headline, model_name, image_name, subtitle, note,
        "cosine similarity",
        float(maps.similarity.min()), float(max(maps.similarity.max(), maps.similarity.min() + 1e-6)), target=target,
    )


def render_pca(maps: NepaMaps, image: Image.Image, model_name: str, image_name: str):
    """The PCA PNG's figure (matplotlib `Figure`)."""
    figure, (photo_axis, pca_axis) = _new_figure("pca", 2, [1, 1])
    _show_on_grid(photo_axis, np.asarray(image), maps.grid, "input (the region the model sees)")
    _show_on_grid(pca_axis, maps.pca_rgb, maps.grid, "PCA of the patch features as RGB", interpolation="nearest")
    shares = ", ".join(f"{share:.0%}" for share in maps.pca_explained_variance)
    headline = "PCA of final-layer patch features"
    subtitle = (
        f"red, green, blue = projection on principal components 1, 2, 3 (of the feature variance: {shares}),\n"
        "each min-max scaled over this image: similar colours = similar features. No query patch, no colour scale."
    )
    note = (
        "Causal model: each patch's feature sees only itself and the patches before it in raster order, so the "
        "first rows are built from little context." if maps.is_causal
        else "Bidirectional model: each patch's feature sees every patch."
    )
    _titles(figure, headline, model_name, image_name, subtitle, note)
    return figure


def save_visualizations(
    model, processor, image, output_dir: str | os.PathLike, query: tuple[int, int] | None = None,
    layers: list[int] | None = None, heads: list[int] | None = None, prefix: str = "",
    model_name: str | None = None, image_name: str | None = None,
) -> dict[str, str]:
    """Write `{prefix}attention.png`, `{prefix}similarity.png` and `{prefix}pca.png` for one image.

    Each PNG stands on its own (sizes in `FIGURE_SIZES_PX`): a title naming the model, the image, the query patch
    and how layers and heads are aggregated; the input beside the map; a colourbar; a note on causal masking.
    `model_name` defaults to the checkpoint path's last two parts, `image_name` to the PIL image's file name.
    Returns {map name: path}. The image is preprocessed with `processor` (any size it produces works).
    """
    _matplotlib_figure()  # fail before the forward pass when matplotlib is missing
    os.makedirs(output_dir, exist_ok=True)
    if image_name is None:
        image_name = os.path.basename(getattr(image, "filename", "") or "") or "image"
    image = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)).convert("RGB")
    model_name = model_name or model_label(model)
    device = next(_base_model(model).parameters()).device
    pixel_values = processor(image, return_tensors="pt").pixel_values.to(device)
    maps = compute_maps(model, pixel_values, query=query, layers=layers, heads=heads)
    shown = processor_view(image, pixel_values.shape[-2:], processor)
    image_name = f"{image_name} ({pixel_values.shape[-2]}x{pixel_values.shape[-1]} px input)"
    renderers = {"attention": render_attention, "similarity": render_similarity, "pca": render_pca}
    paths = {}
    for name, render in renderers.items():
        path = os.path.join(output_dir, f"{prefix}{name}.png")
        render(maps, shown, model_name, image_name).savefig(path, dpi=FIGURE_DPI)
        paths[name] = path
    return paths


def processor_view(image: Image.Image, size: tuple[int, int], processor) -> Image.Image:
    """The region of `image` the model saw: the processor's centre crop mapped back to the image, else all of it."""
    if not getattr(processor, "do_center_crop", False):
        return image
    crop_h, crop_w = int(size[0]), int(size[1])
    # The processor's own resize, without its crop: the size the crop is taken from.
    resized_h, resized_w = processor(image, do_center_crop=False, return_tensors="pt").pixel_values.shape[-2:]
    scale_y, scale_x = resized_h / image.height, resized_w / image.width
    top, left = round((resized_h - crop_h) / 2 / scale_y), round((resized_w - crop_w) / 2 / scale_x)
    return image.crop((left, top, left + round(crop_w / scale_x), top + round(crop_h / scale_y)))


__all__ = [
    "FIGURE_SIZES_PX", "NepaMaps", "compute_maps", "model_label", "pca_to_rgb", "render_attention", "render_pca",
    "render_similarity", "save_visualizations",
]
