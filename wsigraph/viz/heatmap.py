r"""Heatmaps of interpretation tensors over the slide layout, as PNG.

Every patch is a square at its level-0 position (``pos``, ``patch_size``). The squares are
rasterised onto one pixel grid covering the whole slide (vectorised fancy indexing, no Python
loop over patches), so drawing costs the same for 200 or 200,000 patches and all panels of a
slide share the same geometry. Drawing uses matplotlib's object API with the Agg canvas: no
display, no ``pyplot`` state.

* **continuous** maps (attention, scores): colour map with a colour bar, one panel per level
  side by side, plus a **merged** panel averaging the levels' per-slide percentiles;
* **categorical** maps (expert territories, clusters): one colour per category with a legend;
* **mask** maps (ZoomMIL selections, AINet anchors): selected patches in colour over a faint
  grey layout of all patches of the level.

Every panel first draws the level's patches in light grey, so patches without a value (NaN) and
the tissue outline stay visible.

Example::

    model.eval()
    output = model(graph)                      # one slide
    plot_slide_maps(graph, output, "s1.png", class_names=["normal", "tumour"])

    outputs = split_output(batch, model(batch))  # a batch: one MILOutput per slide
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch_geometric.data import HeteroData

from wsigraph.data.schema import patch_levels
from wsigraph.io import atomic_write
from wsigraph.models.base import MILOutput
from wsigraph.viz.maps import (CATEGORICAL, CONTINUOUS, MASK, Interpretation, SlideMap, _finite_range,
                               _percentile, category_colours, level_label, patch_boxes, slide_maps,
                               split_interpretation, split_output)

__all__ = ["SlideCanvas", "Panel", "draw_slide_maps", "plot_slide_maps", "slide_title", "merged_percentile", "MERGED",
           "split_interpretation", "split_output"]

#: ``Panel.level`` of a panel merging several levels.
MERGED = "merged"
LAYOUT_COLOUR = "#dcdcdc"
MASK_COLOUR = "#d62728"
SCALES = ("linear", "rank")
_MAX_LEGEND = 20
# Layout strips in inches.
_SIDE_STRIP, _TITLE_STRIP, _SUPTITLE_STRIP, _GAP = 1.35, 0.3, 0.45, 0.15


class SlideCanvas:
    r"""A pixel grid over the level-0 bounding box of a slide's patches.

    The finest patch side is an integer number of pixels :math:`p = \max(1,
    \lfloor \text{resolution} \cdot s_\text{min} / \text{extent} \rfloor)`, so the longer side of
    the grid is at most about ``resolution`` pixels (more only when a slide has more than
    ``resolution`` patches along a side: every patch keeps at least one pixel). One pixel spans
    ``scale`` level-0 pixels.

    Args:
        graph: one slide graph.
        levels: patch levels whose squares define the bounding box (default: all).
        resolution: target length of the longer side in pixels.
    """

    def __init__(self, graph: HeteroData, levels: Optional[Sequence[str]] = None, resolution: int = 768):
        levels = list(levels) if levels is not None else patch_levels(graph)
        self.boxes: Dict[str, Tuple[np.ndarray, float]] = {}
        for level in levels:
            if graph[level].num_nodes:
                self.boxes[level] = patch_boxes(graph, level)
        if not self.boxes:
            raise ValueError("the slide graph has no patches to draw")
        low = np.min([pos.min(axis=0) for pos, _ in self.boxes.values()], axis=0)
        high = np.max([pos.max(axis=0) + size for pos, size in self.boxes.values()], axis=0)
        finest = min(size for _, size in self.boxes.values())
        extent = float(max(high - low))
        per_patch = max(1, int(resolution * finest // extent))
        self.origin = low
        self.scale = finest / per_patch
        width, height = (np.ceil((high - low) / self.scale - 1e-9)).astype(int).tolist()
        self.shape = (max(height, 1), max(width, 1))

    @property
    def extent(self) -> Tuple[float, float, float, float]:
        r"""``(left, right, bottom, top)`` in level-0 pixels, for ``imshow`` (y grows downwards)."""
        height, width = self.shape
        x0, y0 = self.origin.tolist()
        return x0, x0 + width * self.scale, y0 + height * self.scale, y0

    def paint(self, level: str, values: Union[np.ndarray, float], out: Optional[np.ndarray] = None,
              where: Optional[np.ndarray] = None) -> np.ndarray:
        r"""Fill the squares of the patches of ``level`` with ``values`` (``[N]`` or a scalar).

        Returns ``out`` (default: a new float64 grid of NaN) with every pixel of patch ``i`` set
        to ``values[i]``; where patches overlap (or share a pixel when patches are smaller than a
        pixel), one of them wins. ``where`` (``[N]`` bool) paints only those patches.
        """
        if out is None:
            out = np.full(self.shape, np.nan)
        if level not in self.boxes:  # a level without patches
            return out
        pos, size = self.boxes[level]
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), (pos.shape[0],))
        if where is not None:
            pos, values = pos[where], values[where]
        side = max(1, int(round(size / self.scale)))
        start = np.rint((pos - self.origin) / self.scale).astype(np.int64)
        offsets = np.arange(side)
        rows = np.clip(start[:, 1, None] + offsets, 0, self.shape[0] - 1)
        cols = np.clip(start[:, 0, None] + offsets, 0, self.shape[1] - 1)
        out[rows[:, :, None], cols[:, None, :]] = values[:, None, None]
        return out


@dataclass
class Panel:
    r"""A drawn panel: its map name, the level drawn on (``"merged"`` for a merged panel), kind
    and the interpretation node type (for a merged panel, the merged levels joined by ``+``)."""
    name: str
    level: str
    kind: str
    source: str


def _class_name(index, class_names: Optional[Sequence[str]]) -> str:
    if class_names is not None and isinstance(index, (int, np.integer)) and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


def slide_title(graph: HeteroData, output: Union[MILOutput, Interpretation, None] = None,
                class_names: Optional[Sequence[str]] = None, label=None, prediction=None) -> str:
    r"""``"<slide id> | label: <label> | prediction: <class> (p = 0.93)"``.

    ``label`` defaults to the graph's ``y``; ``prediction`` (a class index or name) to the arg-max
    of ``output.logits`` when ``output`` is a one-slide :class:`MILOutput`, shown with its
    probability.
    """
    parts = []
    slide_id = getattr(graph, "slide_id", None)
    if isinstance(slide_id, (list, tuple)):
        slide_id = slide_id[0] if slide_id else None
    if slide_id:
        parts.append(str(slide_id))
    if label is None and getattr(graph, "y", None) is not None and torch.as_tensor(graph.y).numel() == 1:
        label = int(torch.as_tensor(graph.y).reshape(-1)[0])
    if label is not None:
        parts.append(f"label: {_class_name(label, class_names)}")
    probability = None
    if isinstance(output, MILOutput) and output.logits is not None and output.logits.dim() == 2 \
            and output.logits.size(0) == 1:
        probs = output.logits.detach().float().softmax(dim=-1).reshape(-1)
        if prediction is None:
            prediction = int(probs.argmax())
        if isinstance(prediction, (int, np.integer)) and 0 <= prediction < probs.numel():
            probability = float(probs[prediction])
    if prediction is not None:
        text = f"prediction: {_class_name(prediction, class_names)}"
        if probability is not None:
            text += f" (p = {probability:.2f})"
        parts.append(text)
    return " | ".join(parts)


def _format_category(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def _groups(maps: Sequence[SlideMap]) -> List[List[SlideMap]]:
    r"""Maps grouped by interpretation name (the columns of one tensor stay together)."""
    groups: Dict[str, List[SlideMap]] = {}
    for smap in maps:
        groups.setdefault(smap.name.split("[", 1)[0], []).append(smap)
    return list(groups.values())


def _pack(groups: Sequence[Sequence], width: int) -> List[List]:
    r"""Lines of at most ``width`` panels: consecutive groups share a line when they fit, a longer
    group wraps over several lines of its own."""
    lines: List[List] = []
    current: List = []
    for group in groups:
        group = list(group)
        if len(group) > width:
            if current:
                lines.append(current)
                current = []
            lines.extend(group[i:i + width] for i in range(0, len(group), width))
        elif len(current) + len(group) <= width:
            current.extend(group)
        else:
            lines.append(current)
            current = group
    if current:
        lines.append(current)
    return lines


def _mergeable(group: Sequence[SlideMap]) -> List[List[SlideMap]]:
    r"""Per map name, its continuous patch-level maps when they cover two or more levels."""
    by_name: Dict[str, List[SlideMap]] = {}
    for smap in group:
        if smap.kind == CONTINUOUS and smap.source == smap.level:
            by_name.setdefault(smap.name, []).append(smap)
    return [maps for maps in by_name.values() if len({m.level for m in maps}) >= 2]


def merged_percentile(canvas: SlideCanvas, maps: Sequence[SlideMap]) -> np.ndarray:
    r"""The merged image of one map on several levels: at every pixel, the mean over the levels
    covering it of the level's per-slide percentile,

    .. math::
        M(p) = \frac{1}{|L_p|} \sum_{\ell \in L_p} \operatorname{pct}_\ell\big(v_\ell(i_\ell(p))\big),

    with :math:`i_\ell(p)` the patch of level :math:`\ell` under pixel :math:`p`, :math:`L_p` the
    levels with a finite value there and :math:`\operatorname{pct}_\ell` the rank of a value
    among the level's values in [0, 1]. Percentiles make levels with different value scales
    (attention sums to one over far fewer patches at low magnification) comparable.
    """
    total = np.zeros(canvas.shape)
    count = np.zeros(canvas.shape)
    for smap in maps:
        image = canvas.paint(smap.level, _percentile(smap.values.astype(np.float64)))
        finite = np.isfinite(image)
        total[finite] += image[finite]
        count[finite] += 1
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _colorbar(figure, ax, image, label: Optional[str] = None) -> None:
    box = ax.get_position()
    width, _ = figure.get_size_inches()
    cax = figure.add_axes([box.x1 + 0.08 / width, box.y0, 0.12 / width, box.height])
    colorbar = figure.colorbar(image, cax=cax)
    colorbar.ax.tick_params(labelsize=7)
    if label:
        colorbar.set_label(label, fontsize=8)


def _panel_title(smap: SlideMap) -> str:
    where = level_label(smap.level)
    if smap.source != smap.level:
        where = f"{smap.source} → {where}"
    return f"{smap.name} ({where})"


def draw_slide_maps(graph: HeteroData, output: Union[MILOutput, Interpretation, None],
                    names: Optional[Sequence[str]] = None, *, kinds: Optional[Mapping[str, str]] = None,
                    region_level: Optional[str] = None, merge_levels: bool = True,
                    class_names: Optional[Sequence[str]] = None, label=None, prediction=None,
                    title: Optional[str] = None, cmap: str = "coolwarm", scale: str = "linear",
                    resolution: Optional[int] = None, panel_size: float = 3.5, columns: int = 4, dpi: int = 100,
                    max_columns: int = 16, attributes: Sequence[str] = ()):
    r"""Draw the maps of one slide into a new :class:`matplotlib.figure.Figure`.

    Maps of the same name sit side by side, one panel per level low → high (then the region
    map and the columns of a multi-column tensor); with ``merge_levels`` a continuous map present
    on two or more levels gets one more panel, the mean over levels of each level's per-slide
    percentile (rank in [0, 1]), pixel by pixel. Groups share a line of ``columns`` panels when
    they fit; a longer group wraps. A slide without maps is drawn as its patch layout.

    Args:
        graph: one slide graph.
        output: the slide's :class:`MILOutput` (then the title shows the prediction) or its
            interpretation dictionary.
        names, kinds, region_level, max_columns, attributes: which maps and how, see
            :func:`~wsigraph.viz.maps.slide_maps` (``attributes=["lesion"]`` adds the synthetic
            cohort's ground truth beside the model's maps).
        merge_levels: add the merged panel of multi-level continuous maps.
        class_names: names of the class indices in the title.
        label, prediction: title overrides (see :func:`slide_title`).
        title: the whole title (default :func:`slide_title`).
        cmap: colour map of continuous maps.
        scale: ``"linear"`` (raw values between the slide's minimum and maximum) or ``"rank"``
            (per-slide percentiles, as CLAM's heatmaps; robust to the heavy tail of attention).
        resolution: longer side of the raster grid in pixels (see :class:`SlideCanvas`); default
            the panel's width in output pixels (``panel_size * dpi``), so that no patch is lost to
            resampling.
        panel_size: width of a panel in inches.
        dpi: pixels per inch of the figure.
        columns: panels per line.

    Returns:
        ``(figure, panels)`` with one :class:`Panel` per drawn panel, in drawing order.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES} (got '{scale}')")
    maps = slide_maps(graph, output, names=names, kinds=kinds, region_level=region_level, max_columns=max_columns,
                      attributes=attributes)
    # The grid covers the levels drawn (a coarse level may reach beyond the finest one).
    drawn = [level for level in patch_levels(graph) if any(m.level == level for m in maps)] or None
    if resolution is None:
        resolution = int(round(panel_size * dpi))
    canvas = SlideCanvas(graph, levels=drawn, resolution=resolution)

    # Panels grouped by name (levels low → high, then the merged panel), packed into lines.
    groups: List[List[Union[SlideMap, List[SlideMap], None]]] = []
    for group in _groups(maps):
        entries: List[Union[SlideMap, List[SlideMap], None]] = list(group)
        if merge_levels:
            entries.extend(_mergeable(group))
        groups.append(entries)
    rows = _pack(groups, max(1, int(columns))) if groups else [[None]]
    nrows, ncols = len(rows), max(len(row) for row in rows)

    # Fixed layout in inches: each cell holds a title strip, the image and a strip on its right
    # for the colour bar or legend.
    height, width = canvas.shape
    image_w = float(panel_size)
    image_h = image_w * min(max(height / width, 0.25), 2.5)
    cell_w, cell_h = image_w + _SIDE_STRIP + _GAP, image_h + _TITLE_STRIP + _GAP
    figure_w, figure_h = ncols * cell_w + _GAP, nrows * cell_h + _SUPTITLE_STRIP
    figure = Figure(figsize=(figure_w, figure_h), dpi=dpi)
    layout_cmap = ListedColormap([LAYOUT_COLOUR])
    extent = canvas.extent
    panels: List[Panel] = []

    def show(ax, image, **kwargs):
        return ax.imshow(image, extent=extent, interpolation="nearest", origin="upper", **kwargs)

    for r, row in enumerate(rows):
        for c in range(len(row)):
            top = _SUPTITLE_STRIP + r * cell_h + _TITLE_STRIP
            ax = figure.add_axes([(_GAP + c * cell_w) / figure_w, 1.0 - (top + image_h) / figure_h,
                                  image_w / figure_w, image_h / figure_h])
            entry = row[c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if entry is None:  # layout only
                level = patch_levels(graph)[-1]
                show(ax, canvas.paint(level, 1.0), cmap=layout_cmap, vmin=0, vmax=1)
                ax.set_title(f"patches ({level_label(level)})", fontsize=9)
                panels.append(Panel("layout", level, MASK, level))
                continue
            if isinstance(entry, list):  # merged continuous panel
                levels = [m.level for m in entry]
                for smap in entry:
                    show(ax, canvas.paint(smap.level, 1.0), cmap=layout_cmap, vmin=0, vmax=1)
                im = show(ax, merged_percentile(canvas, entry), cmap=cmap, vmin=0.0, vmax=1.0)
                _colorbar(figure, ax, im, "mean percentile")
                ax.set_title(f"{entry[0].name} (merged {'+'.join(level_label(l) for l in levels)})", fontsize=9)
                panels.append(Panel(entry[0].name, MERGED, CONTINUOUS, "+".join(levels)))
                continue
            smap: SlideMap = entry
            show(ax, canvas.paint(smap.level, 1.0), cmap=layout_cmap, vmin=0, vmax=1)
            if smap.kind == CONTINUOUS:
                values = smap.values.astype(np.float64)
                if scale == "rank":
                    values, (low, high), label_text = _percentile(values), (0.0, 1.0), "percentile"
                else:
                    (low, high), label_text = _finite_range(values), None
                im = show(ax, canvas.paint(smap.level, values), cmap=cmap, vmin=low, vmax=high)
                _colorbar(figure, ax, im, label_text)
            elif smap.kind == CATEGORICAL:
                values = smap.values.astype(np.float64)
                finite = np.isfinite(values)
                categories, codes = np.unique(values[finite], return_inverse=True)
                coded = np.full(values.shape, np.nan)
                coded[finite] = codes
                # Colours from the categories of every panel of this name: the same across levels.
                palette = category_colours(np.concatenate([m.values.astype(np.float64).reshape(-1) for m in maps
                                                           if m.name == smap.name and m.kind == CATEGORICAL]))
                colours = [palette[float(v)] for v in categories] or [LAYOUT_COLOUR]
                show(ax, canvas.paint(smap.level, coded), cmap=ListedColormap(colours),
                     vmin=-0.5, vmax=max(len(categories), 1) - 0.5)
                if 0 < len(categories) <= _MAX_LEGEND:
                    handles = [Patch(color=colours[i], label=_format_category(v)) for i, v in enumerate(categories)]
                    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7,
                              frameon=False, borderaxespad=0.0, ncols=1 if len(handles) <= 10 else 2,
                              columnspacing=0.8, handlelength=1.2)
            else:  # mask
                selected = smap.values.astype(bool)
                # Only the selected squares are painted, so a selection is never hidden by a
                # neighbour sharing its pixel.
                show(ax, canvas.paint(smap.level, 1.0, where=selected),
                     cmap=ListedColormap([MASK_COLOUR]), vmin=0, vmax=1)
                handles = [Patch(color=MASK_COLOUR, label=f"selected ({int(selected.sum())} of {selected.size})"),
                           Patch(color=LAYOUT_COLOUR, label="other patches")]
                ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7,
                          frameon=False, borderaxespad=0.0, handlelength=1.2)
            ax.set_title(_panel_title(smap), fontsize=9)
            panels.append(Panel(smap.name, smap.level, smap.kind, smap.source))

    text = title if title is not None else slide_title(graph, output, class_names, label, prediction)
    if text:
        figure.suptitle(text, fontsize=10, y=1.0 - 0.1 / figure_h, va="top")
    return figure, panels


def plot_slide_maps(graph: HeteroData, output: Union[MILOutput, Interpretation, None], path,
                    names: Optional[Sequence[str]] = None, **kwargs) -> List[Panel]:
    r"""Draw the maps of one slide (:func:`draw_slide_maps`, same keyword arguments) and write
    the figure to ``path`` atomically; the format follows the suffix (``.png`` by default).

    Returns:
        the drawn :class:`Panel` list.
    """
    figure, panels = draw_slide_maps(graph, output, names, **kwargs)
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda handle: figure.savefig(handle, format=fmt, dpi=figure.dpi))
    return panels
