r"""Region partitions of a :class:`SlideGraph`.

Regions are defined on the highest magnification and propagated down the zoom edges (a parent
joins the region that holds most of its children), so region :math:`j` covers the same tissue
at every magnification. Each transform adds ``region`` nodes (``pos`` centroid and ``mass``
count of highest-level member patches) and one ``belongs_to`` edge per patch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import HeteroData
from torch_geometric.transforms import BaseTransform

from wsigraph.data.neighbors import knn
from wsigraph.data.schema import REGION, member_edge, patch_levels, zoom_edge


def raster_order(pos: Tensor, patch_size: float) -> Tensor:
    r"""Permutation sorting patches top-left → bottom-right (rows of one patch height, then x).

    Rows are found by rounding ``y / patch_size``, so lattices offset by a fraction of a patch
    (CLAM's per-contour origins) still fall into rows.
    """
    row = torch.round(pos[:, 1].double() / patch_size).long()
    key = np.lexsort((pos[:, 0].cpu().numpy(), row.cpu().numpy()))
    return torch.from_numpy(key).to(pos.device)


def hilbert_order(pos: Tensor, patch_size: float) -> Tensor:
    r"""Permutation along a Hilbert curve over the patch lattice (consecutive patches touch)."""
    cell = torch.round((pos.double() - pos.double().min(0).values) / patch_size).long().cpu().numpy()
    side = 1
    while side <= max(int(cell.max()) if cell.size else 0, 1):
        side *= 2
    x, y = cell[:, 0].copy(), cell[:, 1].copy()
    distance = np.zeros(len(cell), dtype=np.int64)
    s = side // 2
    while s > 0:  # loop over bits of the curve, vectorised over patches
        rx = (x & s) > 0
        ry = (y & s) > 0
        distance += s * s * ((3 * rx) ^ ry)
        # Rotate the quadrant so that the curve stays continuous.
        flip = ~ry
        swap_x = np.where(flip & rx, s - 1 - x, x)
        swap_y = np.where(flip & rx, s - 1 - y, y)
        x, y = np.where(flip, swap_y, swap_x), np.where(flip, swap_x, swap_y)
        s //= 2
    return torch.from_numpy(np.argsort(distance, kind="stable")).to(pos.device)


def propagate_regions(data: HeteroData, region_of_top: Tensor) -> None:
    r"""Assign every patch of every lower level to a region, and add region nodes and edges.

    A parent joins the region holding most of its children (ties: the smaller region index); a
    parent without children joins the region of the nearest patch one level up.
    """
    levels = patch_levels(data)
    top = levels[-1]
    # Drop empty region ids and renumber consecutively.
    used, region_of_top = torch.unique(region_of_top, return_inverse=True)
    num_regions = used.numel()
    assignment = {top: region_of_top}
    for parent_level, child_level in zip(reversed(levels[:-1]), reversed(levels[1:])):
        num_parents = data[parent_level].num_nodes
        child_region = assignment[child_level]
        region = torch.full((num_parents,), -1, dtype=torch.long)
        edge_type = zoom_edge(parent_level, child_level)
        if edge_type in data.edge_types and data[edge_type].edge_index.numel():
            parent, child = data[edge_type].edge_index
            pair = parent * num_regions + child_region[child]
            pairs, counts = torch.unique(pair, return_counts=True)
            pair_parent, pair_region = pairs // num_regions, pairs % num_regions
            # Sort by (parent, -count, region) and keep the first entry of each parent.
            order = np.lexsort((pair_region.numpy(), -counts.numpy(), pair_parent.numpy()))
            pair_parent, pair_region = pair_parent[order], pair_region[order]
            first = torch.ones_like(pair_parent, dtype=torch.bool)
            first[1:] = pair_parent[1:] != pair_parent[:-1]
            region[pair_parent[first]] = pair_region[first]
        orphans = (region < 0).nonzero().view(-1)
        if orphans.numel():
            size_parent = data[parent_level].patch_size
            size_child = data[child_level].patch_size
            centre_parent = data[parent_level].pos[orphans].double() + size_parent / 2
            centre_child = data[child_level].pos.double() + size_child / 2
            row, col = knn(centre_child, centre_parent, 1)
            region[orphans[row]] = child_region[col]
        assignment[parent_level] = region
    top_pos = data[top].pos.double() + data[top].patch_size / 2
    mass = torch.bincount(region_of_top, minlength=num_regions)
    centroid = torch.zeros(num_regions, 2, dtype=torch.float64).index_add_(0, region_of_top, top_pos)
    data[REGION].pos = (centroid / mass[:, None]).float()
    data[REGION].mass = mass.float()
    data[REGION].num_nodes = num_regions
    for level, region in assignment.items():
        patches = torch.arange(region.numel())
        data[member_edge(level)].edge_index = torch.stack([patches, region])


class GridRegions(BaseTransform):
    r"""Regions as the bins of a :math:`G \times G` grid over the slide's min–max normalised
    highest-level coordinates (ROAM); empty bins are dropped, so :math:`R \le G^2`.

    Args:
        grid_size (int): bins per side :math:`G`. (default: :obj:`8`)
    """

    def __init__(self, grid_size: int = 8):
        if grid_size < 1:
            raise ValueError("grid_size must be >= 1")
        self.grid_size = int(grid_size)

    def forward(self, data: HeteroData) -> HeteroData:
        top = patch_levels(data)[-1]
        centre = data[top].pos.double() + data[top].patch_size / 2
        low, high = centre.min(0).values, centre.max(0).values
        scaled = (centre - low) / (high - low).clamp(min=1e-9)
        cell = (scaled * self.grid_size).long().clamp_(0, self.grid_size - 1)
        propagate_regions(data, cell[:, 1] * self.grid_size + cell[:, 0])
        data[REGION].partition = "grid"
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(grid_size={self.grid_size})"


class SequentialRegions(BaseTransform):
    r"""Regions as :math:`m` equal consecutive batches of the highest-level patches in raster
    order (M2OTCA); slides with fewer than :math:`m` patches get one region per patch.

    Args:
        num_regions (int): number of regions :math:`m`. (default: :obj:`30`)
    """

    def __init__(self, num_regions: int = 30):
        if num_regions < 1:
            raise ValueError("num_regions must be >= 1")
        self.num_regions = int(num_regions)

    def forward(self, data: HeteroData) -> HeteroData:
        top = patch_levels(data)[-1]
        order = raster_order(data[top].pos, data[top].patch_size)
        n = order.numel()
        m = min(self.num_regions, n)
        # Balanced split: batch sizes differ by at most one, as numpy.array_split does.
        rank_region = torch.div(torch.arange(n) * m, n, rounding_mode="floor")
        region = torch.empty(n, dtype=torch.long)
        region[order] = rank_region
        propagate_regions(data, region)
        data[REGION].partition = "sequential"
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(num_regions={self.num_regions})"


class FixedSizeRegions(BaseTransform):
    r"""Regions as consecutive chunks of :math:`n` highest-level patches along a spatial order
    (AINet), so region :math:`r+1` is a spatial neighbour of region :math:`r`.

    Args:
        region_size (int): patches per region :math:`n`. (default: :obj:`256`)
        order (str): ``"raster"`` or ``"hilbert"`` (space-filling curve; chunks are compact
            blobs rather than strips). (default: :obj:`"raster"`)
    """

    def __init__(self, region_size: int = 256, order: str = "raster"):
        if region_size < 1:
            raise ValueError("region_size must be >= 1")
        if order not in ("raster", "hilbert"):
            raise ValueError("order must be 'raster' or 'hilbert'")
        self.region_size = int(region_size)
        self.order = order

    def forward(self, data: HeteroData) -> HeteroData:
        top = patch_levels(data)[-1]
        sorter = raster_order if self.order == "raster" else hilbert_order
        order = sorter(data[top].pos, data[top].patch_size)
        region = torch.empty(order.numel(), dtype=torch.long)
        region[order] = torch.arange(order.numel()) // self.region_size
        propagate_regions(data, region)
        data[REGION].partition = "fixed_size"
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(region_size={self.region_size}, order='{self.order}')"
