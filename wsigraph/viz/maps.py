r"""Per-slide maps of a model's interpretation tensors over the patch layout.

A model returns ``MILOutput.interpretation[node_type][name]``: one value (or one row) per node.
This module turns that into :class:`SlideMap` records, one per drawable map, each holding one
value per patch of the level it is drawn on:

* patch-level tensors are drawn on their own level;
* ``region`` tensors are mapped to the patches of one level through the membership edges
  (:func:`~wsigraph.data.schema.region_of_patch`), by default the highest magnification;
* a tensor with several columns (``[N, K]``, e.g. attention per class) gives one map per column,
  named ``name[k]``.

The kind of a map decides how it is drawn and exported: ``bool`` tensors are **masks**
(selections, anchors), integer tensors **categorical** (expert territories, clusters), floating
tensors **continuous** (attention, scores). ``kinds`` overrides the choice per name.

Slides of a batch are split with :func:`split_interpretation` / :func:`split_output`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from wsigraph.data.schema import REGION, is_level, level_magnification, member_edge, node_batch, num_slides, \
    patch_levels, region_of_patch
from wsigraph.models.base import MILOutput

__all__ = ["SlideMap", "Interpretation", "CONTINUOUS", "CATEGORICAL", "MASK", "KINDS", "map_kind", "category_colours",
           "split_interpretation", "split_output", "slide_maps", "patch_boxes", "patch_size_of",
           "interpretation_of", "level_label"]

Interpretation = Dict[str, Dict[str, Tensor]]

CONTINUOUS = "continuous"
CATEGORICAL = "categorical"
MASK = "mask"
KINDS = (CONTINUOUS, CATEGORICAL, MASK)


@dataclass
class SlideMap:
    r"""One drawable map of one slide.

    Attributes:
        name: interpretation name, with ``[k]`` appended for column ``k`` of a multi-column tensor.
        source: node type of the interpretation tensor (a patch level or ``"region"``).
        level: patch level the map is drawn on (equal to ``source`` for patch-level tensors).
        values: ``[N]`` numpy array, one value per patch of ``level``.
        kind: ``"continuous"``, ``"categorical"`` or ``"mask"``.
    """
    name: str
    source: str
    level: str
    values: np.ndarray
    kind: str

    @property
    def key(self) -> str:
        r"""``"source/name"``, unique within a slide."""
        return f"{self.source}/{self.name}"


def map_kind(value: Tensor) -> str:
    r"""``"mask"`` for ``bool``, ``"categorical"`` for integer, ``"continuous"`` for floating
    (and complex) tensors."""
    if value.dtype == torch.bool:
        return MASK
    if not (value.is_floating_point() or value.is_complex()):
        return CATEGORICAL
    return CONTINUOUS


def interpretation_of(output: Union[MILOutput, Mapping[str, Mapping[str, Tensor]], None]) -> Interpretation:
    r"""The interpretation dictionary of a :class:`MILOutput` (or the dictionary itself)."""
    if output is None:
        return {}
    if isinstance(output, MILOutput):
        return output.interpretation
    if isinstance(output, Mapping):
        return {str(k): dict(v) for k, v in output.items()}
    raise TypeError(f"expected a MILOutput or an interpretation dictionary (got {type(output).__name__})")


# ---------------------------------------------------------------------------------------------
# Batches → slides
# ---------------------------------------------------------------------------------------------
def split_interpretation(batch: HeteroData, interpretation: Union[MILOutput, Interpretation]) -> List[Interpretation]:
    r"""Split the interpretation of a batch of :math:`B` slides into :math:`B` per-slide dicts.

    Every tensor of node type ``t`` is cut along its first dimension with ``t``'s ``batch``
    vector, so row ``j`` of slide ``b``'s tensor belongs to node ``j`` of slide ``b`` alone (PyG
    batching keeps each slide's nodes in order). Tensors are detached.

    Args:
        batch: the (batched or single) slide graph the model ran on.
        interpretation: ``MILOutput.interpretation`` (or the output itself).

    Returns:
        a list of :math:`B` dictionaries ``{node_type: {name: tensor}}``.
    """
    interpretation = interpretation_of(interpretation)
    count = num_slides(batch)
    slides: List[Interpretation] = [{} for _ in range(count)]
    for node_type, values in interpretation.items():
        if node_type not in batch.node_types:
            raise KeyError(f"interpretation node type '{node_type}' is not in the batch")
        index = node_batch(batch, node_type)
        order = torch.argsort(index, stable=True)
        sizes = torch.bincount(index, minlength=count).tolist()
        for name, value in values.items():
            if value.size(0) != index.numel():
                raise ValueError(f"interpretation '{node_type}/{name}' has {value.size(0)} rows for "
                                 f"{index.numel()} '{node_type}' nodes")
            parts = value.detach().index_select(0, order.to(value.device)).split(sizes, dim=0)
            for slide, part in zip(slides, parts):
                slide.setdefault(node_type, {})[name] = part
    return slides


def split_output(batch: HeteroData, output: MILOutput) -> List[MILOutput]:
    r"""Per-slide :class:`MILOutput` of a batch: logits row ``b`` (``[1, C]``) and slide ``b``'s
    interpretation (see :func:`split_interpretation`). ``aux_loss`` is zero and ``extras``
    (model-specific shapes) are left out."""
    logits = output.logits.detach()
    return [MILOutput(logits[b:b + 1], interpretation=part)
            for b, part in enumerate(split_interpretation(batch, output.interpretation))]


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def _check_single(graph: HeteroData) -> None:
    count = getattr(graph, "num_graphs", None)
    if count is not None and int(count) != 1:
        raise ValueError(f"expected one slide graph, got a batch of {int(count)}: split it first "
                         "(Batch.get_example / split_interpretation)")


def patch_size_of(graph: HeteroData, level: str) -> float:
    r"""Patch side of ``level`` in level-0 pixels (the store's ``patch_size``)."""
    size = getattr(graph[level], "patch_size", None)
    if size is None:
        raise ValueError(f"'{level}' has no patch_size: the squares of its patches are unknown")
    size = torch.as_tensor(size, dtype=torch.float64).reshape(-1)
    return float(size[0])


def patch_boxes(graph: HeteroData, level: str) -> Tuple[np.ndarray, float]:
    r"""Top-left corners ``[N, 2]`` (level-0 pixels, float64) and the patch side of ``level``."""
    pos = graph[level].pos
    if pos is None:
        raise ValueError(f"'{level}' has no pos")
    return pos.detach().cpu().to(torch.float64).numpy(), patch_size_of(graph, level)


def level_label(level: str) -> str:
    r"""``"patch_20x" -> "20x"``, ``"patch_2p5x" -> "2.5x"``."""
    try:
        return f"{level_magnification(level):g}x"
    except ValueError:
        return level


def _region_level(graph: HeteroData, region_level: Optional[str]) -> Optional[str]:
    if region_level is not None:
        if member_edge(region_level) not in graph.edge_types:
            raise ValueError(f"no membership edges {member_edge(region_level)} to map region values onto "
                             f"'{region_level}'")
        return region_level
    linked = [level for level in patch_levels(graph) if member_edge(level) in graph.edge_types]
    return linked[-1] if linked else None


def _columns(value: Tensor) -> List[Tensor]:
    if value.dim() <= 1:
        return [value.reshape(-1)]
    flat = value.reshape(value.size(0), -1)
    return [flat[:, k] for k in range(flat.size(1))]


def _to_numpy(value: Tensor, kind: str) -> np.ndarray:
    value = value.detach().cpu()
    if kind == MASK:
        return value.to(torch.bool).numpy()
    if kind == CATEGORICAL and not value.is_floating_point():
        return value.to(torch.int64).numpy()
    if value.is_complex():
        value = value.abs()
    return value.to(torch.float64).numpy()


def slide_maps(graph: HeteroData, output: Union[MILOutput, Interpretation, None], names: Optional[Iterable[str]] = None,
               kinds: Optional[Mapping[str, str]] = None, region_level: Optional[str] = None,
               max_columns: int = 16, attributes: Sequence[str] = ()) -> List[SlideMap]:
    r"""The drawable maps of one slide.

    Args:
        graph: one (unbatched) slide graph.
        output: the slide's :class:`MILOutput` or interpretation dictionary.
        names: keep only these maps; an entry matches an interpretation name (``"attention"``),
            a column (``"attention_per_class[1]"``) or a ``"node_type/name"`` key.
        kinds: override the automatic kind per name (same matching as ``names``), e.g.
            ``{"expert": "categorical"}`` for a float tensor holding category codes.
        region_level: patch level that ``region`` tensors are drawn on (default: the highest
            magnification with membership edges).
        max_columns: at most this many columns of a multi-column tensor become maps (a warning
            says when some are left out).
        attributes: node attributes of the graph to add as maps on every patch level (and for
            ``region``) that holds them with one row per node, e.g. the ground truth ``lesion``
            of the synthetic cohort, to compare with the model's maps. They are added after the
            interpretation maps and are not filtered by ``names``.

    Returns:
        the interpretation maps, patch levels low → high, then the region maps (within a node
        type in the order of the dictionary); then the attribute maps in the same order.
    """
    _check_single(graph)
    interpretation = interpretation_of(output)
    wanted = None if names is None else {str(n) for n in names}
    kinds = dict(kinds or {})
    for key, kind in kinds.items():
        if kind not in KINDS:
            raise ValueError(f"kind of '{key}' must be one of {KINDS} (got '{kind}')")
    order = {t: i for i, t in enumerate(patch_levels(graph) + [REGION])}
    node_types = sorted(interpretation, key=lambda t: order.get(t, len(order)))
    # (node type, name, tensor, filtered by `names`): the interpretation, then the attributes.
    entries = [(t, n, v, True) for t in node_types for n, v in interpretation[t].items()]
    for node_type in [t for t in order if t in graph.node_types]:
        store = graph[node_type]
        for attribute in attributes:
            value = store[attribute] if attribute in store else None
            if isinstance(value, Tensor) and value.dim() >= 1 and value.size(0) == store.num_nodes:
                entries.append((node_type, attribute, value, False))

    maps: List[SlideMap] = []
    targets: Dict[str, Optional[Tuple[str, Optional[Tensor]]]] = {}
    for node_type, name, value, filtered in entries:
        if not isinstance(value, Tensor):
            continue
        if node_type not in targets:
            targets[node_type] = _target(graph, node_type, region_level)
        if targets[node_type] is None:
            continue
        target, gather = targets[node_type]
        num_nodes = graph[node_type].num_nodes
        if value.dim() == 0 or value.size(0) != num_nodes:
            raise ValueError(f"interpretation '{node_type}/{name}' has shape {tuple(value.shape)}, "
                             f"expected one row per node ({num_nodes} '{node_type}' nodes)")
        value = value.detach().cpu()
        if gather is not None:
            value = value.index_select(0, gather)
        columns = _columns(value)
        multi = len(columns) > 1
        labels = [f"{name}[{k}]" if multi else name for k in range(len(columns))]
        chosen = [k for k, label in enumerate(labels)
                  if wanted is None or not filtered
                  or {name, label, f"{node_type}/{name}", f"{node_type}/{label}"} & wanted]
        if len(chosen) > max_columns:
            warnings.warn(f"'{node_type}/{name}' has {len(chosen)} columns; drawing the first {max_columns}")
            chosen = chosen[:max_columns]
        for k in chosen:
            label = labels[k]
            kind = next((kinds[key] for key in (f"{node_type}/{label}", label, f"{node_type}/{name}", name)
                         if key in kinds), None) or map_kind(columns[k])
            maps.append(SlideMap(label, node_type, target, _to_numpy(columns[k], kind), kind))
    return maps


def _target(graph: HeteroData, node_type: str, region_level: Optional[str]):
    r"""``(level drawn on, region index of its patches or None)``, or None to leave it out."""
    if node_type in graph.node_types and is_level(node_type):
        return node_type, None
    if node_type == REGION and REGION in graph.node_types:
        target = _region_level(graph, region_level)
        if target is None:
            warnings.warn("region interpretation left out: the slide graph has no membership edges")
            return None
        return target, region_of_patch(graph, target).detach().cpu()
    warnings.warn(f"interpretation of node type '{node_type}' left out: it is not a patch level "
                  "or 'region' of this slide graph")
    return None


def category_colours(categories: Sequence[float]) -> Dict[float, Tuple[float, float, float]]:
    r"""An RGB colour (floats in [0, 1]) for every category value.

    Integer categories in ``0 .. 19`` keep the colour of their value (``tab10`` up to 9,
    ``tab20`` beyond), so category ``k`` has the same colour in every panel and slide; other
    values are coloured by their rank, cycling through ``tab20``.
    """
    from matplotlib import colormaps
    values = sorted({float(v) for v in categories if np.isfinite(v)})
    by_value = all(v.is_integer() and 0 <= v < 20 for v in values)
    top = max(values) if values else 0
    base = colormaps["tab10"].colors if (top < 10 if by_value else len(values) <= 10) else colormaps["tab20"].colors
    return {v: tuple(base[(int(v) if by_value else i) % len(base)][:3]) for i, v in enumerate(values)}


def _finite_range(values: np.ndarray) -> Tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if not high > low:  # a constant map: widen so the colour scale is defined
        pad = abs(low) * 1e-6 or 1e-12
        low, high = low - pad, high + pad
    return low, high


def _percentile(values: np.ndarray) -> np.ndarray:
    r"""Rank of every finite value among the slide's finite values, in [0, 1] (ties averaged)."""
    from scipy.stats import rankdata
    out = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    count = int(finite.sum())
    if count:
        ranks = rankdata(values[finite], method="average")
        out[finite] = (ranks - 1) / max(count - 1, 1) if count > 1 else 0.5
    return out
