r"""Functional cores of AINet's layers: dual-level similarity, region adjacency, region-local
attention over padded region blocks, and per-region masking of the lowest scores.

Everything works on flat node tensors with a ``region`` index (batch-global region of every
node) and a ``batch`` index (slide of every node); the attention packs the nodes of each region
into a padded block, so its memory grows with
:math:`N \cdot (2 n_\text{max} + A_\text{max})` (region size :math:`n`, anchors per slide
:math:`A`), never with :math:`N^2`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import scatter

from wsigraph.nn.functional.topk import topk_mask_per_group

__all__ = [
    "dual_level_similarity",
    "RegionBlocks",
    "region_blocks",
    "adjacent_region_by_order",
    "adjacent_region_by_graph",
    "region_local_attention",
    "keep_mask_per_group",
    "position_in_group",
    "hashed_uniform",
]


def dual_level_similarity(x: Tensor, region: Tensor, batch: Tensor, num_regions: int, num_slides: int,
                          alpha: float = 0.7, eps: float = 1e-8) -> Tuple[Tensor, Tensor, Tensor]:
    r"""AINet's dual-level anchor score of every node,

    .. math::
        l_r = \frac{1}{|r|} \sum_{i \in r} x_i, \qquad
        g_b = \frac{1}{|b|} \sum_{i \in b} x_i, \qquad
        s_i = \alpha \cos(x_i, l_{r(i)}) + (1 - \alpha) \cos(x_i, g_{b(i)}).

    Args:
        x (torch.Tensor): ``[N, F]`` node features.
        region (torch.Tensor): ``[N]`` region of every node, in ``[0, num_regions)``.
        batch (torch.Tensor): ``[N]`` slide of every node, in ``[0, num_slides)``.
        num_regions (int): number of regions :math:`R` (empty regions allowed).
        num_slides (int): number of slides :math:`B`.
        alpha (float): weight :math:`\alpha` of the regional similarity. (default: ``0.7``)
        eps (float): floor of the norms in the cosine. (default: ``1e-8``)

    Returns:
        (torch.Tensor, torch.Tensor, torch.Tensor): scores ``[N]``, region embeddings
        ``[R, F]`` (zero for an empty region), bag embeddings ``[B, F]``.
    """
    region_embedding = scatter(x, region, dim=0, dim_size=num_regions, reduce="mean")
    bag_embedding = scatter(x, batch, dim=0, dim_size=num_slides, reduce="mean")
    local = F.cosine_similarity(x, region_embedding.index_select(0, region), dim=-1, eps=eps)
    global_ = F.cosine_similarity(x, bag_embedding.index_select(0, batch), dim=-1, eps=eps)
    return alpha * local + (1.0 - alpha) * global_, region_embedding, bag_embedding


def position_in_group(group: Tensor, num_groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Stable sort of nodes by group and the position of every node inside its group.

    Returns:
        (torch.Tensor, torch.Tensor, torch.Tensor): ``perm`` ``[N]`` (node order sorted by group,
        ties by flat index), ``slot`` ``[N]`` (position of ``perm[j]`` inside its group) and
        ``count`` ``[num_groups]`` group sizes.
    """
    sorted_group, perm = torch.sort(group, stable=True)
    count = torch.bincount(group, minlength=num_groups)
    start = torch.cumsum(count, 0) - count
    slot = torch.arange(group.numel(), device=group.device) - start.index_select(0, sorted_group)
    return perm, slot, count


class RegionBlocks(NamedTuple):
    r"""Placement of flat nodes in padded ``[num_groups, size]`` blocks.

    Attributes:
        index: ``[N]`` flat position ``group * size + slot`` of every node (original order).
        mask: ``[num_groups, size]`` bool, ``True`` where a block slot holds a node.
        size: block length (the largest group, at least one).
    """
    index: Tensor
    mask: Tensor
    size: int


def region_blocks(group: Tensor, num_groups: int, size: Optional[int] = None) -> RegionBlocks:
    r"""Padded block layout of the nodes of every group (region or slide); nodes keep their
    relative flat order inside a block. ``size`` defaults to the largest group (one host sync)."""
    perm, slot, count = position_in_group(group, num_groups)
    if size is None:
        size = max(int(count.max()) if count.numel() else 0, 1)
    flat = torch.empty_like(perm)
    flat[perm] = group.index_select(0, perm) * size + slot
    mask = torch.arange(size, device=group.device).unsqueeze(0) < count.unsqueeze(1)
    return RegionBlocks(flat, mask, size)


def _to_blocks(x: Tensor, blocks: RegionBlocks, num_groups: int) -> Tensor:
    out = x.new_zeros(num_groups * blocks.size, *x.shape[1:])
    out.index_copy_(0, blocks.index, x)
    return out.view(num_groups, blocks.size, *x.shape[1:])


def adjacent_region_by_order(region_batch: Tensor) -> Tensor:
    r"""Adjacent region of every region by index order: :math:`r + 1`, or :math:`r - 1` for the
    last region of a slide, or ``-1`` for a slide's only region.

    Args:
        region_batch (torch.Tensor): ``[R]`` slide of every region (regions grouped by slide).
    """
    num_regions = region_batch.numel()
    index = torch.arange(num_regions, device=region_batch.device)
    same_next = torch.zeros(num_regions, dtype=torch.bool, device=region_batch.device)
    same_prev = torch.zeros_like(same_next)
    if num_regions > 1:
        same_next[:-1] = region_batch[1:] == region_batch[:-1]
        same_prev[1:] = same_next[:-1]
    return torch.where(same_next, index + 1, torch.where(same_prev, index - 1, index.new_full((), -1)))


def adjacent_region_by_graph(edge_index: Tensor, edge_weight: Optional[Tensor], num_regions: int) -> Tensor:
    r"""Adjacent region of every region on the region graph: the source of the heaviest edge
    into it (the nearest neighbour for heat-kernel weights; ties to the lower index), or ``-1``
    for a region without incoming edges.

    Args:
        edge_index (torch.Tensor): ``[2, E]`` region graph, messages source → target.
        edge_weight (torch.Tensor, optional): ``[E]`` weights (all ones if ``None``).
        num_regions (int): number of regions :math:`R`.
    """
    source, target = edge_index
    keep = source != target
    source, target = source[keep], target[keep]
    if edge_weight is None:
        weight = torch.ones(source.numel(), device=edge_index.device)
    else:
        weight = edge_weight[keep].float()
    best = scatter(weight, target, dim=0, dim_size=num_regions, reduce="max")
    is_best = weight == best.index_select(0, target)
    candidate = torch.where(is_best, source, source.new_full((), num_regions))
    chosen = scatter(candidate, target, dim=0, dim_size=num_regions, reduce="min")
    has_edge = torch.bincount(target, minlength=num_regions) > 0
    return torch.where(has_edge & (chosen < num_regions), chosen, chosen.new_full((), -1))


def region_local_attention(query: Tensor, key: Tensor, value: Tensor, region: Tensor, num_regions: int,
                           heads: int = 1, adjacent: Optional[Tensor] = None,
                           anchor_key: Optional[Tensor] = None, anchor_value: Optional[Tensor] = None,
                           anchor_batch: Optional[Tensor] = None, region_batch: Optional[Tensor] = None,
                           num_slides: Optional[int] = None) -> Tensor:
    r"""Scaled dot-product attention of every node over its own region, its region's adjacent
    region and the anchors of its slide,

    .. math::
        o_i = \sum_{j \in \mathcal{K}(r(i))} \operatorname{softmax}_j
        \Big(\frac{q_i^\top k_j}{\sqrt{d_h}}\Big)\, v_j, \qquad
        \mathcal{K}(r) = r \,\cup\, \mathrm{adj}(r) \,\cup\, \mathcal{A}_{b(r)},

    per head of width :math:`d_h = F / \text{heads}`. Nodes are packed into padded blocks
    ``[R, n_max]``; each block attends to the keys ``[own block ; adjacent block ; slide's
    anchors]`` with a key mask (:func:`torch.nn.functional.scaled_dot_product_attention`, whose
    fused kernels never store the score matrix). Memory:
    :math:`O(R\,(2 n_\text{max} + A_\text{max})\,F)`; no :math:`N \times N` matrix.

    Args:
        query, key, value (torch.Tensor): ``[N, F]`` projections of the nodes.
        region (torch.Tensor): ``[N]`` region of every node.
        num_regions (int): :math:`R`.
        heads (int): attention heads. (default: ``1``)
        adjacent (torch.Tensor, optional): ``[R]`` adjacent region of every region (``-1``: none);
            ``None`` for no adjacent block.
        anchor_key, anchor_value (torch.Tensor, optional): ``[M, F]`` projections of the anchors.
        anchor_batch (torch.Tensor, optional): ``[M]`` slide of every anchor.
        region_batch (torch.Tensor, optional): ``[R]`` slide of every region (needed with anchors).
        num_slides (int, optional): :math:`B` (needed with anchors).

    Returns:
        torch.Tensor: ``[N, F]`` attention outputs (before any output projection).
    """
    num_nodes, channels = query.shape
    if channels % heads:
        raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
    blocks = region_blocks(region, num_regions)

    def split(x: Tensor) -> Tensor:  # [G, L, F] -> [G, heads, L, F / heads]
        return x.view(x.size(0), x.size(1), heads, -1).transpose(1, 2)

    q = _to_blocks(query, blocks, num_regions)
    k_own = _to_blocks(key, blocks, num_regions)
    v_own = _to_blocks(value, blocks, num_regions)
    keys, values, masks = [k_own], [v_own], [blocks.mask]
    if adjacent is not None:
        neighbour = adjacent.clamp(min=0)
        keys.append(k_own.index_select(0, neighbour))
        values.append(v_own.index_select(0, neighbour))
        masks.append(blocks.mask.index_select(0, neighbour) & (adjacent >= 0).unsqueeze(1))
    if anchor_key is not None and anchor_key.numel() > 0:
        if anchor_batch is None or region_batch is None or num_slides is None:
            raise ValueError("anchors need anchor_batch, region_batch and num_slides")
        anchor_blocks = region_blocks(anchor_batch, num_slides)
        slide_of_region = region_batch
        keys.append(_to_blocks(anchor_key, anchor_blocks, num_slides).index_select(0, slide_of_region))
        values.append(_to_blocks(anchor_value, anchor_blocks, num_slides).index_select(0, slide_of_region))
        masks.append(anchor_blocks.mask.index_select(0, slide_of_region))
    k = torch.cat(keys, dim=1) if len(keys) > 1 else k_own
    v = torch.cat(values, dim=1) if len(values) > 1 else v_own
    mask = torch.cat(masks, dim=1) if len(masks) > 1 else blocks.mask
    # A block without any key (a region empty at this level, in a slide without anchors) would
    # give NaN; its queries are all padding, so any finite output will do.
    empty = ~mask.any(dim=1)
    mask = mask | (empty.unsqueeze(1) & (torch.arange(mask.size(1), device=mask.device) == 0))
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask[:, None, None, :])
    out = out.transpose(1, 2).reshape(num_regions * blocks.size, channels)
    return out.index_select(0, blocks.index)


def keep_mask_per_group(score: Tensor, group: Tensor, ratio: float, num_groups: int) -> Tensor:
    r"""Keep all but the lowest-scoring fraction :math:`\rho` of every group, never emptying a
    group: group :math:`r` with :math:`n_r` nodes keeps its
    :math:`\max(1,\ n_r - \lfloor \rho\, n_r \rfloor)` highest scores (ties: lower flat index).

    Args:
        score (torch.Tensor): ``[N]`` scores.
        group (torch.Tensor): ``[N]`` group (region) of every node.
        ratio (float): masked fraction :math:`\rho \in [0, 1]`.
        num_groups (int): number of groups.

    Returns:
        torch.Tensor: ``[N]`` bool, ``True`` for kept nodes.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the mask ratio must be in [0, 1] (got {ratio})")
    if ratio == 0.0:
        return torch.ones_like(score, dtype=torch.bool)
    count = torch.bincount(group, minlength=num_groups)
    # The small slack keeps e.g. 0.29 * 100 from flooring to 28.
    dropped = torch.floor(count.double() * ratio + 1e-9).long()
    keep = (count - dropped).clamp(min=1)
    return topk_mask_per_group(score, group, keep)


def hashed_uniform(position: Tensor) -> Tensor:
    r"""Deterministic pseudo-random numbers in :math:`[0, 1)` from integer positions
    (Knuth's multiplicative hash), so "random" choices at evaluation do not depend on the batch."""
    hashed = (position.long() * 2654435761 + 97) % 4294967296
    return hashed.double().div(4294967296.0).float()
