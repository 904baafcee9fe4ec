r"""Per-slide sequential chunking of patches in raster order, vectorised over a batch of slides.

This is the region construction of M2OTCA's *independent* alignment, computed inside the model
for each patch level on its own: the patches of every slide are sorted top-left → bottom-right
(rows of one patch height, then :math:`x`) and split into :math:`m` balanced consecutive chunks.
On the highest level it reproduces :class:`~wsigraph.transforms.SequentialRegions` exactly.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["raster_rank", "sequential_chunk_index"]


def raster_rank(pos: Tensor, patch_size: Tensor, index: Tensor, num_slides: int) -> Tuple[Tensor, Tensor]:
    r"""Rank of every patch in its slide's raster order, and the slides' patch counts.

    A patch's row is :math:`\mathrm{round}(y / s)` with its patch side :math:`s` (level-0
    pixels), so lattices offset by a fraction of a patch still fall into rows; within a row the
    order is by :math:`x`. Three stable sorts (by :math:`x`, then row, then slide) give the
    lexicographic order (slide, row, :math:`x`) without any loop over slides.

    Args:
        pos (torch.Tensor): ``[N, 2]`` patch top-left corners (level-0 pixels).
        patch_size (torch.Tensor): ``[N]`` patch side of every patch (level-0 pixels).
        index (torch.Tensor): ``[N]`` slide of every patch.
        num_slides (int): :math:`B`.

    Returns:
        (torch.Tensor, torch.Tensor): ``[N]`` rank of each patch within its slide (0-based) and
        ``[B]`` number of patches per slide.
    """
    pos = pos.double()
    row = torch.round(pos[:, 1] / patch_size.double())
    order = torch.argsort(pos[:, 0], stable=True)
    order = order.index_select(0, torch.argsort(row.index_select(0, order), stable=True))
    order = order.index_select(0, torch.argsort(index.index_select(0, order), stable=True))
    counts = torch.zeros(num_slides, dtype=torch.long, device=index.device)
    counts.index_add_(0, index, torch.ones_like(index))
    start = torch.cumsum(counts, 0) - counts
    position = torch.arange(index.numel(), device=index.device)
    rank = torch.empty_like(index)
    rank[order] = position - start.index_select(0, index.index_select(0, order))
    return rank, counts


def sequential_chunk_index(pos: Tensor, patch_size: Tensor, index: Tensor, num_slides: int,
                           num_chunks: int) -> Tuple[Tensor, Tensor]:
    r"""Chunk of every patch when each slide's patches, in raster order, are split into
    :math:`m_b = \min(m, n_b)` balanced consecutive chunks.

    The patch of rank :math:`k` in a slide of :math:`n_b` patches goes to chunk
    :math:`\lfloor k\, m_b / n_b \rfloor` (chunk sizes differ by at most one, as
    :func:`numpy.array_split`); a slide with fewer than :math:`m` patches gets one chunk per patch.

    Args:
        pos (torch.Tensor): ``[N, 2]`` patch top-left corners (level-0 pixels).
        patch_size (torch.Tensor): ``[N]`` patch side of every patch (level-0 pixels).
        index (torch.Tensor): ``[N]`` slide of every patch.
        num_slides (int): :math:`B`.
        num_chunks (int): :math:`m`.

    Returns:
        (torch.Tensor, torch.Tensor): ``[N]`` padded chunk index ``b * m + chunk`` (the layout of a
        dense ``[B, m]`` tensor) and ``[B]`` number of chunks :math:`m_b` of every slide.
    """
    if num_chunks < 1:
        raise ValueError(f"'num_chunks' must be >= 1 (got {num_chunks})")
    rank, counts = raster_rank(pos, patch_size, index, num_slides)
    chunks = counts.clamp(max=num_chunks)
    chunk = torch.div(rank * chunks.index_select(0, index), counts.index_select(0, index).clamp_min(1),
                      rounding_mode="floor")
    return index * num_chunks + chunk, chunks
