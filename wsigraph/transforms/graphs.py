r"""Spatial edges of a :class:`SlideGraph`: the region kNN graph and the patch lattice."""
from __future__ import annotations

import torch
from torch_geometric.data import HeteroData
from torch_geometric.transforms import BaseTransform

from wsigraph.data.neighbors import knn_graph, radius_pairs
from wsigraph.data.schema import REGION, REGION_GRAPH, adjacency_edge, patch_levels


class RegionKNNGraph(BaseTransform):
    r"""Symmetric kNN graph over region centroids with row-normalised heat-kernel weights,

    .. math::
        w_{ij} = \frac{\exp(-\|c_i - c_j\|^2 / \sigma^2)}{\sum_{j' \in \mathcal{N}(i)}
        \exp(-\|c_i - c_{j'}\|^2 / \sigma^2)},

    with :math:`\sigma` the median edge length of the slide and self loops excluded. Stored as
    ``("region", "knn", "region")`` with ``edge_index`` (neighbour → centre) and ``edge_weight``
    (rows of the centre sum to one). Needs a region transform first.

    Args:
        k (int): neighbours per region before symmetrisation. (default: :obj:`8`)
    """

    def __init__(self, k: int = 8):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k = int(k)

    def forward(self, data: HeteroData) -> HeteroData:
        if REGION not in data.node_types:
            raise ValueError("RegionKNNGraph needs region nodes: apply a region transform first")
        pos = data[REGION].pos.double()
        edge_index = knn_graph(pos, self.k)
        # Symmetrise: keep each undirected pair once per direction.
        n = pos.size(0)
        both = torch.cat([edge_index, edge_index.flip(0)], dim=1)
        key = torch.unique(both[1] * max(n, 1) + both[0])
        edge_index = torch.stack([key % max(n, 1), key // max(n, 1)])
        source, target = edge_index
        length = (pos[source] - pos[target]).norm(dim=1)
        if length.numel():
            sigma = length.median().clamp(min=1e-6)
            weight = torch.exp(-(length / sigma) ** 2)
            total = torch.zeros(n, dtype=torch.float64).index_add_(0, target, weight)
            weight = weight / total[target]
        else:
            weight = length
        store = data[REGION_GRAPH]
        store.edge_index = edge_index
        store.edge_weight = weight.float()
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(k={self.k})"


class PatchGrid(BaseTransform):
    r"""8-neighbourhood of every patch level on the patch lattice.

    Two patches are neighbours when their top-left corners differ by at most
    :math:`(1 + \tau)\,s` in each axis (:math:`s` the patch side in level-0 pixels, :math:`\tau`
    the tolerance), so lattices offset by a fraction of a patch still connect. Stored as
    ``(level, "adjacent", level)``.

    Args:
        tolerance (float): the slack :math:`\tau` in patch sides. (default: :obj:`0.5`)
    """

    def __init__(self, tolerance: float = 0.5):
        if not 0 <= tolerance < 1:
            raise ValueError("tolerance must be in [0, 1)")
        self.tolerance = float(tolerance)

    def forward(self, data: HeteroData) -> HeteroData:
        for level in patch_levels(data):
            store = data[level]
            radius = (1.0 + self.tolerance) * store.patch_size
            data[adjacency_edge(level)].edge_index = radius_pairs(store.pos, radius)
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(tolerance={self.tolerance})"
