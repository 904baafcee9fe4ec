from wsigraph.transforms.regions import (FixedSizeRegions, GridRegions, SequentialRegions,
                                         propagate_regions, raster_order, hilbert_order)
from wsigraph.transforms.graphs import PatchGrid, RegionKNNGraph
from wsigraph.transforms.factory import graph_transform
from wsigraph.transforms.subsample import RandomPatchSubsample

__all__ = [
    "GridRegions", "SequentialRegions", "FixedSizeRegions", "propagate_regions", "raster_order",
    "hilbert_order", "PatchGrid", "RegionKNNGraph", "graph_transform", "RandomPatchSubsample",
]
