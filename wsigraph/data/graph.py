r"""Building the multi-level :class:`SlideGraph` of one slide from its patch levels."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from wsigraph.data.neighbors import knn
from wsigraph.data.readers import SlideError, SlideLevel
from wsigraph.data.schema import child_slot, level_name, patch_levels, zoom_edge

# Candidate parents examined per child. Non-overlapping parent boxes whose centres lie within
# ``parent_size / sqrt(2)`` of a point are at most four; eight also covers overlapping extraction.
_PARENT_CANDIDATES = 8


class SlideGraph(HeteroData):
    r"""A whole-slide image as a multi-level spatial graph (see :mod:`wsigraph.data.schema`)."""

    @property
    def levels(self):
        return patch_levels(self)


def link_levels(parent_pos: Tensor, parent_size: float, child_pos: Tensor,
                child_size: float) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Zoom edges between two magnifications from level-0 geometry.

    A child belongs to the parent whose level-0 box :math:`[p, p + s_\mathrm{parent})^2` contains
    the child's centre; when several do (overlapping extraction), the one overlapping the child's
    box most, then the nearest. Children outside every parent box get no parent.

    Returns:
        ``(parent, child, slot)`` index tensors of the edges, sorted by parent then slot.
    """
    parent_size, child_size = float(parent_size), float(child_size)
    child_centre = child_pos.double() + child_size / 2.0
    parent_centre = parent_pos.double() + parent_size / 2.0
    row, col = knn(parent_centre, child_centre, _PARENT_CANDIDATES)  # row: child, col: parent
    offset = child_centre[row] - parent_pos.double()[col]
    inside = ((offset >= 0) & (offset < parent_size)).all(dim=1)
    row, col = row[inside], col[inside]
    # Overlap area of the child box with the parent box, to break ties between overlapping parents.
    low = torch.maximum(child_pos.double()[row], parent_pos.double()[col])
    high = torch.minimum(child_pos.double()[row] + child_size, parent_pos.double()[col] + parent_size)
    overlap = (high - low).clamp(min=0).prod(dim=1)
    # knn lists candidates by distance, so a stable sort on -overlap keeps the nearest first.
    order = torch.argsort(-overlap, stable=True)
    order = order[torch.argsort(row[order], stable=True)]
    row, col = row[order], col[order]
    first = torch.ones_like(row, dtype=torch.bool)
    first[1:] = row[1:] != row[:-1]
    child, parent = row[first], col[first]
    slot = child_slot(parent_pos[parent], parent_size, child_pos[child], child_size)
    order = torch.argsort(parent * (slot.max().item() + 1 if slot.numel() else 1) + slot, stable=True)
    return parent[order], child[order], slot[order]


def build_slide_graph(levels: Sequence[SlideLevel], slide_id: str = "", case_id: str = "",
                      label: Optional[int] = None) -> SlideGraph:
    r"""Patch nodes of every level and the zoom edges between consecutive levels.

    Regions, the region graph and the patch grid are added by the transforms of
    :mod:`wsigraph.transforms`.

    Args:
        levels: the slide's levels (any order; sorted low → high here).
        slide_id: stored on the graph, used in error messages.
        case_id: patient identifier, stored on the graph.
        label: slide label (class index), stored as ``y`` [1].
    """
    if not levels:
        raise SlideError(slide_id, None, "no magnification given")
    levels = sorted(levels, key=lambda level: level.magnification)
    data = SlideGraph()
    names = []
    for level in levels:
        name = level_name(level.magnification)
        store = data[name]
        store.x = torch.from_numpy(level.features)
        store.pos = torch.from_numpy(level.coords).float()
        store.patch_size = float(level.patch_size)
        store.magnification = float(level.magnification)
        for key, values in level.annotations.items():
            store[key] = torch.from_numpy(values)
        names.append(name)
    for (parent_name, parent), (child_name, child) in zip(zip(names, levels), zip(names[1:], levels[1:])):
        p, c, slot = link_levels(data[parent_name].pos, parent.patch_size, data[child_name].pos, child.patch_size)
        if c.numel() == 0:
            raise SlideError(slide_id, child.path,
                             f"no {child.magnification:g}x patch lies inside any {parent.magnification:g}x patch: the "
                             "levels do not overlap (wrong coordinates or patch sizes?)")
        store = data[zoom_edge(parent_name, child_name)]
        store.edge_index = torch.stack([p, c])
        store.slot = slot
    data.slide_id = str(slide_id)
    data.case_id = str(case_id)
    if label is not None:
        data.y = torch.tensor([int(label)], dtype=torch.long)
    return data
