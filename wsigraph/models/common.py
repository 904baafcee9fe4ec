r"""Shared plumbing of the single-level MIL models: picking the patch level of a batch,
its per-slide index, and small helpers used by several models."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch_geometric.data import HeteroData
from torch_geometric.utils import scatter

from wsigraph.data.schema import node_batch, num_slides, patch_levels
from wsigraph.models.base import MILModel

__all__ = ["LevelInput", "level_input", "PatchLevelMILModel", "column_of_prediction",
           "per_node_patch_size", "segment_argmax"]


class LevelInput(NamedTuple):
    r"""The nodes of one patch level of a (batched) slide graph.

    Attributes:
        level: node type, e.g. ``"patch_20x"``.
        x: ``[N, D]`` node features.
        index: ``[N]`` slide of every node (zeros for an unbatched slide).
        ptr: ``[B + 1]`` CSR offsets of the slides' nodes (nodes are grouped by slide).
        num_slides: :math:`B`.
    """
    level: str
    x: Tensor
    index: Tensor
    ptr: Tensor
    num_slides: int


def level_input(batch: HeteroData, level: Optional[str] = None) -> LevelInput:
    r"""Collect the node features of ``level`` (default: the highest magnification present)."""
    if level is None:
        levels = patch_levels(batch)
        if not levels:
            raise ValueError("the slide graph has no patch level node type (patch_<mag>x)")
        level = levels[-1]
    elif level not in batch.node_types:
        raise KeyError(f"node type '{level}' is not in the slide graph "
                       f"(patch levels present: {patch_levels(batch)})")
    store = batch[level]
    x = store.x
    index = node_batch(batch, level)
    ptr = getattr(store, "ptr", None)
    if ptr is None:  # an unbatched slide: one segment holding every node
        ptr = torch.tensor([0, x.size(0)], dtype=torch.long, device=x.device)
    return LevelInput(level, x, index, ptr, num_slides(batch))


def column_of_prediction(values: Tensor, logits: Tensor, index: Tensor) -> Tensor:
    r"""For per-node, per-class ``values`` ``[N, C]``, the column of each node's slide's
    predicted class (``argmax`` of ``logits`` ``[B, C]``), shape ``[N]``."""
    predicted = logits.detach().argmax(dim=-1).index_select(0, index)
    return values.gather(1, predicted.unsqueeze(1)).squeeze(1)


def per_node_patch_size(batch: HeteroData, level: str, index: Tensor) -> Tensor:
    r"""Patch side in level-0 pixels of every node of ``level``, ``[N]`` float.

    A batch stores one ``patch_size`` per slide (``[B]``), a single slide a number.
    """
    store = batch[level]
    size = getattr(store, "patch_size", None)
    if size is None:
        raise ValueError(f"'{level}' has no patch_size: the lattice of its patches is unknown")
    size = torch.as_tensor(size, dtype=torch.float32, device=index.device)
    if size.dim() == 0:
        return size.expand(index.numel())
    return size.index_select(0, index)


def segment_argmax(values: Tensor, index: Tensor, num_slides: int) -> Tensor:
    r"""Per slide and column, the flat index of the node with the largest value.

    Ties go to the lowest flat index, so a slide gives the same answer alone and in a batch.

    Args:
        values: ``[N, C]``.
        index: ``[N]`` slide of every node.
        num_slides: :math:`B`.

    Returns:
        ``[B, C]`` long node indices (0 for an empty slide).
    """
    num_nodes = values.size(0)
    maxima = scatter(values.detach(), index, dim=0, dim_size=num_slides, reduce="max")
    is_max = values.detach() == maxima.index_select(0, index)
    position = torch.arange(num_nodes, device=values.device).unsqueeze(1).expand_as(values)
    candidate = torch.where(is_max, position, position.new_full((), num_nodes))
    first = scatter(candidate, index, dim=0, dim_size=num_slides, reduce="min")
    return first.clamp_(max=max(num_nodes - 1, 0))


class PatchLevelMILModel(MILModel):
    r"""Base of the models that read one patch level (``level=None``: the highest present)."""

    def __init__(self, in_channels: int, num_classes: int, level: Optional[str] = None):
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be positive "
                             f"(got {in_channels}, {num_classes})")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.level = level

    def level_input(self, batch: HeteroData) -> LevelInput:
        return level_input(batch, self.level)

    def labels(self, batch: HeteroData) -> Optional[Tensor]:
        r"""Slide labels ``[B]`` when training with labels present, else ``None`` (the
        label-dependent auxiliary losses are training-only)."""
        if not self.training:
            return None
        y = getattr(batch, "y", None)
        return None if y is None else y.view(-1).long()

    def __repr__(self) -> str:
        level = f", level='{self.level}'" if self.level is not None else ""
        return f"{self.__class__.__name__}({self.in_channels}, num_classes={self.num_classes}{level})"
