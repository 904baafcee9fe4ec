r"""Per-group top-k on flat tensors (groups = slides, regions, ...), without Python loops.

Every function sorts once by score (stable) and once by group (stable), so entries end up
ordered by ``(group, score)`` and ties in score are broken by the lower flat index, on every
device. NaN scores sort as larger than every number (PyTorch's sort order).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "group_sort",
    "rank_within_group",
    "topk_mask_per_group",
    "topk_per_group",
    "topk_per_group_dense",
    "dense_topk_mask",
]


def group_sort(score: Tensor, group: Tensor, largest: bool = True) -> Tuple[Tensor, Tensor]:
    r"""Permutation ordering flat entries by group, then by score within each group.

    Args:
        score (torch.Tensor): ``[N]`` scores.
        group (torch.Tensor): ``[N]`` group index of every entry (need not be sorted).
        largest (bool): order scores from largest to smallest. (default: :obj:`True`)

    Returns:
        (torch.Tensor, torch.Tensor): ``[N]`` permutation and ``[N]`` rank of each sorted entry
        within its group (0 for the best).
    """
    if score.dim() != 1 or group.shape != score.shape:
        raise ValueError("'score' and 'group' must be one-dimensional and of equal length")
    by_score = torch.sort(score, descending=largest, stable=True).indices
    by_group = torch.sort(group.index_select(0, by_score), stable=True)
    perm = by_score.index_select(0, by_group.indices)
    sorted_group = by_group.values
    # The first position of each entry's group in the sorted order.
    group_start = torch.searchsorted(sorted_group, sorted_group, right=False)
    rank = torch.arange(score.numel(), device=score.device) - group_start
    return perm, rank


def rank_within_group(score: Tensor, group: Tensor, largest: bool = True) -> Tensor:
    r"""Rank of every entry within its group (0 = largest, or smallest with
    ``largest=False``); ties go to the lower flat index.

    Args:
        score (torch.Tensor): ``[N]`` scores.
        group (torch.Tensor): ``[N]`` group index.
        largest (bool): rank from the largest score. (default: :obj:`True`)

    Returns:
        torch.Tensor: ``[N]`` ranks (long), in the original order.
    """
    perm, sorted_rank = group_sort(score, group, largest)
    return torch.empty_like(sorted_rank).scatter_(0, perm, sorted_rank)


def _per_entry_k(k: Union[int, Tensor], group: Tensor) -> Union[int, Tensor]:
    if isinstance(k, Tensor) and k.dim() > 0:
        return k.index_select(0, group)
    return k


def topk_mask_per_group(score: Tensor, group: Tensor, k: Union[int, Tensor],
                        largest: bool = True) -> Tensor:
    r"""Boolean mask of the :math:`k` largest (or smallest) entries of every group.

    Args:
        score (torch.Tensor): ``[N]`` scores.
        group (torch.Tensor): ``[N]`` group index.
        k (int or torch.Tensor): entries kept per group, an int or a ``[num_groups]`` tensor
            (e.g. a fraction of each group's size); clipped to the group size automatically.
        largest (bool): keep the largest scores. (default: :obj:`True`)

    Returns:
        torch.Tensor: ``[N]`` bool mask.
    """
    rank = rank_within_group(score, group, largest)
    return rank < _per_entry_k(k, group)


def topk_per_group(score: Tensor, group: Tensor, k: Union[int, Tensor],
                   num_groups: Optional[int] = None, largest: bool = True,
                   sorted_by_position: bool = False) -> Tensor:
    r"""Flat indices of the :math:`k` largest (or smallest) entries of every group.

    :math:`k` is clipped to each group's size (empty groups contribute nothing). The output
    length depends on the group sizes, so selecting it is one host sync; see
    :func:`topk_per_group_dense` for a fixed-shape, sync-free variant.

    Args:
        score (torch.Tensor): ``[N]`` scores.
        group (torch.Tensor): ``[N]`` group index (e.g. ``batch``).
        k (int or torch.Tensor): entries per group, int or ``[num_groups]`` tensor.
        num_groups (int, optional): number of groups; not needed for the result, accepted for
            symmetry with the other per-slide calls.
        largest (bool): select the largest scores. (default: :obj:`True`)
        sorted_by_position (bool): order the selected indices of each group by their flat
            position (as positional layers need) instead of by score. (default: :obj:`False`)

    Returns:
        torch.Tensor: ``[M]`` flat indices, grouped by increasing group index; within a group by
        decreasing score (increasing for ``largest=False``) or by position.
    """
    perm, rank = group_sort(score, group, largest)
    if isinstance(k, Tensor) and k.dim() > 0:
        keep = rank < k.index_select(0, group.index_select(0, perm))
    else:
        keep = rank < k
    index = perm[keep]
    if sorted_by_position and index.numel() > 0:
        # One sort on the combined key (group, position).
        key = group.index_select(0, index) * score.numel() + index
        index = index.index_select(0, torch.sort(key).indices)
    return index


def topk_per_group_dense(score: Tensor, group: Tensor, k: int, num_groups: int,
                         largest: bool = True,
                         sorted_by_position: bool = False) -> Tuple[Tensor, Tensor]:
    r"""Fixed-shape per-group top-:math:`k`: ``[num_groups, k]`` flat indices and a mask.

    Slot :math:`j` of group :math:`g` holds the :math:`j`-th selected entry of :math:`g`; slots
    beyond the group's size hold index 0 and ``mask == False``. No host sync.

    Args:
        score (torch.Tensor): ``[N]`` scores.
        group (torch.Tensor): ``[N]`` group index, values in ``[0, num_groups)``.
        k (int): slots per group.
        num_groups (int): number of groups.
        largest (bool): select the largest scores. (default: :obj:`True`)
        sorted_by_position (bool): order the slots by flat position instead of by score.

    Returns:
        (torch.Tensor, torch.Tensor): ``[num_groups, k]`` long indices and bool mask.
    """
    perm, rank = group_sort(score, group, largest)
    sorted_group = group.index_select(0, perm)
    keep = rank < k
    if sorted_by_position:
        # Among the kept entries of a group, the slot is the rank of the position.
        position_key = torch.where(keep, perm, perm.new_full((), score.numel()))
        order = torch.sort(sorted_group * (score.numel() + 1) + position_key, stable=True).indices
        perm, sorted_group, keep = perm[order], sorted_group[order], keep[order]
        group_start = torch.searchsorted(sorted_group, sorted_group, right=False)
        rank = torch.arange(score.numel(), device=score.device) - group_start
    # Entries that are not kept go to an extra dump slot at the end.
    slot = torch.where(keep, sorted_group * k + rank, rank.new_full((), num_groups * k))
    index = perm.new_zeros(num_groups * k + 1).scatter_(0, slot, perm)
    mask = torch.zeros(num_groups * k + 1, dtype=torch.bool,
                       device=score.device).scatter_(0, slot, keep)
    return index[:-1].view(num_groups, k), mask[:-1].view(num_groups, k)


def dense_topk_mask(score: Tensor, k: int, dim: int = -1, largest: bool = True) -> Tensor:
    r"""Boolean mask of the :math:`k` largest (or smallest) entries along ``dim`` of a dense
    tensor (e.g. the top-:math:`k` experts of every row of a plan); ties go to the lower
    index, deterministically.

    Args:
        score (torch.Tensor): dense scores.
        k (int): entries kept along ``dim`` (clipped to its size).
        dim (int): dimension to select along. (default: ``-1``)
        largest (bool): keep the largest. (default: :obj:`True`)
    """
    k = min(k, score.size(dim))
    order = torch.sort(score, dim=dim, descending=largest, stable=True).indices
    chosen = order.narrow(dim, 0, k)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(dim, chosen, True)
