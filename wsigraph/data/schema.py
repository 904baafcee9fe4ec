r"""Names and accessors of the :class:`SlideGraph` schema.

One slide is a :class:`~torch_geometric.data.HeteroData` with

* one patch node type per magnification, ``patch_5x``, ``patch_10x``, ``patch_20x``
  (``patch_2p5x`` for 2.5x), each holding ``x`` [N, D] float32 features, ``pos`` [N, 2]
  top-left corners in level-0 pixels, the scalar ``patch_size`` (the patch side in level-0
  pixels) and ``magnification``; optional per-patch ground truth ``lesion`` [N] and
  ``tissue`` [N] when the source files carry it;
* ``region`` nodes with ``pos`` [R, 2] (centroid of the highest-level member patches,
  level-0 pixels) and ``mass`` [R] (number of highest-level member patches);

and the edge types

* ``(patch_low, "zooms_into", patch_high)`` between consecutive levels, parent → child, with
  ``slot`` [E] (the child's position inside its parent, see :func:`child_slot`);
* ``(patch_level, "belongs_to", "region")``, one edge per patch, sorted by patch, so that
  ``edge_index[1]`` is the region of every patch (also after batching);
* ``("region", "knn", "region")`` symmetric kNN over centroids with row-normalised heat-kernel
  ``edge_weight``;
* ``(patch_level, "adjacent", patch_level)``, the 8-neighbourhood on the patch lattice.

Graph-level attributes: ``y`` [1] label, ``slide_id`` and ``case_id`` strings.
"""
from __future__ import annotations

import math
import re
from typing import List, Tuple

from torch import Tensor
from torch_geometric.data import HeteroData

REGION = "region"
ZOOM = "zooms_into"
MEMBER = "belongs_to"
REGION_KNN = "knn"
ADJACENT = "adjacent"

_LEVEL_RE = re.compile(r"^patch_(\d+)(?:p(\d+))?x$")


def level_name(magnification: float) -> str:
    r"""Node type of a magnification: ``20 -> "patch_20x"``, ``2.5 -> "patch_2p5x"``."""
    magnification = float(magnification)
    if not math.isfinite(magnification) or magnification <= 0:
        raise ValueError(f"Magnification must be positive (got {magnification})")
    text = f"{magnification:g}"
    if "e" in text:
        raise ValueError(f"Magnification {magnification} cannot be named")
    return "patch_" + text.replace(".", "p") + "x"


def level_magnification(node_type: str) -> float:
    r"""Inverse of :func:`level_name`."""
    match = _LEVEL_RE.match(node_type)
    if match is None:
        raise ValueError(f"'{node_type}' is not a patch level node type")
    whole, frac = match.groups()
    return float(f"{whole}.{frac}") if frac else float(whole)


def is_level(node_type: str) -> bool:
    return _LEVEL_RE.match(node_type) is not None


def patch_levels(data: HeteroData) -> List[str]:
    r"""Patch node types of a slide graph (or batch), ordered low → high magnification."""
    levels = [t for t in data.node_types if is_level(t)]
    return sorted(levels, key=level_magnification)


def zoom_edge(parent_level: str, child_level: str) -> Tuple[str, str, str]:
    return (parent_level, ZOOM, child_level)


def member_edge(level: str) -> Tuple[str, str, str]:
    return (level, MEMBER, REGION)


def adjacency_edge(level: str) -> Tuple[str, str, str]:
    return (level, ADJACENT, level)


REGION_GRAPH = (REGION, REGION_KNN, REGION)


def region_of_patch(data: HeteroData, level: str) -> Tensor:
    r"""Region index of every patch of ``level`` (batch-global indices in a batch)."""
    edge_index = data[member_edge(level)].edge_index
    return edge_index[1]


def num_slides(data: HeteroData) -> int:
    r"""Number of slides in a slide graph or a batch of them."""
    return int(getattr(data, "num_graphs", 1) or 1)


def node_batch(data: HeteroData, node_type: str) -> Tensor:
    r"""Slide index of every node of ``node_type``; zeros for an unbatched slide."""
    store = data[node_type]
    batch = getattr(store, "batch", None)
    if batch is not None:
        return batch
    import torch
    return torch.zeros(store.num_nodes, dtype=torch.long, device=_device(store))


def _device(store) -> "torch.device":
    import torch
    for value in store.values():
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def child_slot(parent_pos: Tensor, parent_size: float, child_pos: Tensor, child_size: float) -> Tensor:
    r"""Slot of each child inside its parent, in raster order (row-major, x fastest).

    With ratio :math:`r = \mathrm{round}(s_\mathrm{parent}/s_\mathrm{child})` children per side, the
    child whose centre lies in column :math:`c` and row :math:`q` of the parent's box has slot
    :math:`q \cdot r + c`, so slots run ``0 .. r^2 - 1``.
    """
    import torch
    ratio = max(1, int(round(parent_size / child_size)))
    centre = child_pos.to(torch.float64) + child_size / 2.0
    offset = (centre - parent_pos.to(torch.float64)) / (parent_size / ratio)
    cell = offset.floor().long().clamp_(0, ratio - 1)
    return cell[:, 1] * ratio + cell[:, 0]
