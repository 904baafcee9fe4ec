r"""Child tables along zoom edges: for every parent patch, its children by slot.

A zoom edge ``parent → child`` carries the child's ``slot``, its raster cell inside the parent
(row-major, :math:`x` fastest, ``0 .. r^2 - 1``; see :func:`wsigraph.data.schema.child_slot`). A
child table is the dense ``[num_parents, r^2]`` array of child indices with ``-1`` where a
child is missing (background at high magnification).

Slots come from geometry, so on misaligned lattices (independent extractions, offsets that are
not a multiple of the child size) two children of one parent can fall into the same cell. The
table keeps, deterministically, the child whose centre is nearest to the cell centre (then the
lower child index); the other child is not reachable by zooming. On aligned lattices (the
official ZoomMIL preprocessing, CLAM/TRIDENT grids of one extraction) collisions do not occur.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["child_table", "cell_centre_distance", "compose_child_tables", "gather_rows"]


def cell_centre_distance(parent_pos: Tensor, parent_size: Union[float, Tensor], child_pos: Tensor,
                         child_size: Union[float, Tensor], slot: Tensor) -> Tensor:
    r"""Squared distance (level-0 pixels) between each child's centre and the centre of the
    cell ``slot`` of its parent, with :math:`r = \mathrm{round}(s_\mathrm{parent}/s_\mathrm{child})`
    cells per side.

    Args:
        parent_pos (torch.Tensor): ``[E, 2]`` top-left corner of each edge's parent.
        parent_size (float or torch.Tensor): parent side, scalar or ``[E]``.
        child_pos (torch.Tensor): ``[E, 2]`` top-left corner of each edge's child.
        child_size (float or torch.Tensor): child side, scalar or ``[E]``.
        slot (torch.Tensor): ``[E]`` slots.
    """
    parent_size = torch.as_tensor(parent_size, dtype=torch.float64, device=slot.device)
    child_size = torch.as_tensor(child_size, dtype=torch.float64, device=slot.device)
    ratio = torch.round(parent_size / child_size).clamp_min(1)
    cell = parent_size / ratio
    column, row = slot.double().remainder(ratio), torch.div(slot.double(), ratio, rounding_mode="floor")
    if cell.dim() == 0:
        cell = cell.expand_as(column)
    centre = parent_pos.double() + torch.stack([(column + 0.5) * cell, (row + 0.5) * cell], dim=1)
    half = child_size / 2.0
    child_centre = child_pos.double() + (half.unsqueeze(1) if half.dim() else half)
    return (child_centre - centre).pow(2).sum(dim=1)


def child_table(parent: Tensor, child: Tensor, slot: Tensor, num_parents: int, num_slots: int,
                distance: Optional[Tensor] = None) -> Tensor:
    r"""Dense ``[num_parents, num_slots]`` table of child indices from zoom edges.

    Entry :math:`(p, j)` is the child in slot :math:`j` of parent :math:`p`, ``-1`` if none. When
    several edges share :math:`(p, j)` the one with the smallest ``distance`` is kept (then the
    lowest child index), so the table is deterministic and every child appears at most once.

    Args:
        parent (torch.Tensor): ``[E]`` parent index of each edge.
        child (torch.Tensor): ``[E]`` child index of each edge.
        slot (torch.Tensor): ``[E]`` slot of each edge, in ``[0, num_slots)``.
        num_parents (int): number of parents (rows).
        num_slots (int): slots per parent (columns), :math:`r^2`.
        distance (torch.Tensor, optional): ``[E]`` tie-break key, e.g.
            :func:`cell_centre_distance`.

    Returns:
        torch.Tensor: ``[num_parents, num_slots]`` long.
    """
    device = child.device
    table = torch.full((int(num_parents) * int(num_slots),), -1, dtype=torch.long, device=device)
    if child.numel() == 0:
        return table.view(int(num_parents), int(num_slots))
    parent, child, slot = parent.long(), child.long(), slot.long()
    if int(slot.min()) < 0 or int(slot.max()) >= num_slots:
        raise ValueError(f"slots must lie in [0, {num_slots}) (got {int(slot.min())}..{int(slot.max())})")
    key = parent * num_slots + slot
    # Order by (key, distance, child) with stable sorts applied from the last key to the first.
    order = torch.argsort(child, stable=True)
    if distance is not None:
        order = order[torch.argsort(distance[order], stable=True)]
    order = order[torch.argsort(key[order], stable=True)]
    key, child = key[order], child[order]
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    table[key[first]] = child[first]
    return table.view(int(num_parents), int(num_slots))


def compose_child_tables(first: Tensor, second: Tensor) -> Tensor:
    r"""Descendants two levels down: ``[N_0, R_1]`` and ``[N_1, R_2]`` tables give the
    ``[N_0, R_1 R_2]`` table whose column :math:`j R_2 + j'` is child :math:`j'` of child
    :math:`j` (depth-first order: all descendants of one child are consecutive)."""
    if second.size(0) == 0:
        return first.new_full((first.size(0), first.size(1) * second.size(1)), -1)
    exists = (first >= 0).unsqueeze(-1)
    grandchildren = second.index_select(0, first.clamp(min=0).reshape(-1)).view(first.size(0), first.size(1), -1)
    grandchildren = torch.where(exists, grandchildren, grandchildren.new_full((), -1))
    return grandchildren.reshape(first.size(0), -1)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    r"""``x[index]`` with zero rows where ``index == -1``; ``index`` of any shape, output
    ``index.shape + x.shape[1:]``."""
    exists = index >= 0
    if x.size(0) == 0:
        return x.new_zeros(*index.shape, *x.shape[1:])
    rows = x.index_select(0, index.clamp(min=0).reshape(-1)).view(*index.shape, *x.shape[1:])
    return rows * exists.view(*index.shape, *([1] * (x.dim() - 1))).to(rows.dtype)
