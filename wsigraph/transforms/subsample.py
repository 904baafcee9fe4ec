r"""Random bag subsampling of a :class:`SlideGraph` that keeps the graph consistent."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Union

import torch
from torch import Tensor
from torch_geometric.data import HeteroData
from torch_geometric.transforms import BaseTransform

from wsigraph.data.schema import REGION, REGION_GRAPH, member_edge, patch_levels, zoom_edge


class RandomPatchSubsample(BaseTransform):
    r"""Keeps at most ``max_patches`` random patches per level and the subgraph they induce.

    Levels are sampled from the highest magnification down. The highest level keeps a uniform
    random subset of :math:`\min(N, K)` patches. A lower level with more than :math:`K` patches
    keeps, first, the parents of the children kept one level up (in random order when there are
    more of them than :math:`K`), then uniformly random other patches up to :math:`K`. With the
    same cap :math:`K` on every level the parents of kept children never exceed :math:`K`, so every
    kept child keeps its parent: the zoom hierarchy stays intact and only children go missing,
    which the :class:`SlideGraph` schema allows.

    Edges are restricted to kept nodes with :meth:`~torch_geometric.data.HeteroData.subgraph`, so
    every edge type stays consistent (zoom edges and their ``slot``, region membership, the patch
    grid). Regions left without any member patch are removed, the ``mass`` of the remaining
    regions is recounted over the kept highest-level patches, and the region graph's
    ``edge_weight`` is renormalised so that the in-weights of every region sum to one again.

    The input graph is not modified; a slide with no level over its cap keeps all its nodes.
    Randomness comes from :mod:`torch`'s global generator (seed it for reproducible runs), or
    from ``generator`` when given.

    Args:
        max_patches (int or dict): cap on the patches of every level, or a mapping from level
            node type (``"patch_20x"``) to its cap; levels missing from the mapping are not
            subsampled.
        generator (torch.Generator, optional): random generator to draw from.
            (default: :obj:`None`)
    """

    def __init__(self, max_patches: Union[int, Mapping[str, int]],
                 generator: Optional[torch.Generator] = None):
        if isinstance(max_patches, Mapping):
            caps = {str(k): int(v) for k, v in max_patches.items()}
        else:
            caps = int(max_patches)
        for cap in (caps.values() if isinstance(caps, dict) else [caps]):
            if cap < 1:
                raise ValueError(f"max_patches must be >= 1 (got {cap})")
        self.max_patches = caps
        self.generator = generator

    def _cap(self, level: str) -> Optional[int]:
        if isinstance(self.max_patches, dict):
            return self.max_patches.get(level)
        return self.max_patches

    def _choose(self, num_nodes: int, cap: int, preferred: Optional[Tensor]) -> Tensor:
        # Random keys; preferred nodes get +1 so that they are taken first, in random order.
        score = torch.rand(num_nodes, generator=self.generator)
        if preferred is not None:
            score = score + preferred.to(score.dtype)
        return score.topk(cap).indices.sort().values

    def forward(self, data: HeteroData) -> HeteroData:
        levels = patch_levels(data)
        keep: Dict[str, Tensor] = {}
        kept_mask: Dict[str, Tensor] = {}
        for position in range(len(levels) - 1, -1, -1):
            level = levels[position]
            num_nodes = data[level].num_nodes
            cap = self._cap(level)
            preferred = None
            if position + 1 < len(levels):
                child_level = levels[position + 1]
                edge_type = zoom_edge(level, child_level)
                if child_level in kept_mask and edge_type in data.edge_types:
                    parent, child = data[edge_type].edge_index
                    preferred = torch.zeros(num_nodes, dtype=torch.bool)
                    preferred[parent[kept_mask[child_level][child]]] = True
            if cap is None or num_nodes <= cap:
                continue
            index = self._choose(num_nodes, cap, preferred)
            keep[level] = index
            mask = torch.zeros(num_nodes, dtype=torch.bool)
            mask[index] = True
            kept_mask[level] = mask
        if not keep:
            return data

        has_regions = REGION in data.node_types
        if has_regions:
            num_regions = data[REGION].num_nodes
            used = torch.zeros(num_regions, dtype=torch.bool)
            for level in levels:
                edge_type = member_edge(level)
                if edge_type not in data.edge_types:
                    continue
                patch, region = data[edge_type].edge_index
                if level in kept_mask:
                    region = region[kept_mask[level][patch]]
                used[region] = True
            if not bool(used.all()):
                keep[REGION] = used.nonzero().view(-1)

        out = data.subgraph(keep)

        if has_regions:
            top_edge = member_edge(levels[-1])
            if "mass" in out[REGION] and top_edge in out.edge_types:
                mass = out[REGION].mass
                count = torch.zeros(out[REGION].num_nodes, dtype=mass.dtype)
                region = out[top_edge].edge_index[1]
                count.index_add_(0, region, torch.ones_like(region, dtype=mass.dtype))
                out[REGION].mass = count
            if REGION in keep and REGION_GRAPH in out.edge_types and "edge_weight" in out[REGION_GRAPH]:
                store = out[REGION_GRAPH]
                target = store.edge_index[1]
                weight = store.edge_weight
                total = torch.zeros(out[REGION].num_nodes, dtype=weight.dtype).index_add_(0, target, weight)
                store.edge_weight = weight / total[target].clamp(min=torch.finfo(weight.dtype).tiny)
        return out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(max_patches={self.max_patches})"
