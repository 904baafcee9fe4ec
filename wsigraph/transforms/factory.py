r"""The graph-building transform described by a config's ``graph`` section."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch_geometric.transforms as T

from wsigraph.transforms.graphs import PatchGrid, RegionKNNGraph
from wsigraph.transforms.regions import FixedSizeRegions, GridRegions, SequentialRegions

REGION_STRATEGIES = {"grid": GridRegions, "sequential": SequentialRegions, "fixed_size": FixedSizeRegions}


def graph_transform(config: Optional[Mapping[str, Any]] = None) -> T.Compose:
    r"""Compose the region partition, region kNN graph and patch grid from a config.

    Example config::

        regions: {strategy: grid, grid_size: 8}
        region_knn: 8
        patch_grid: {tolerance: 0.5}     # or false to skip
    """
    config = dict(config or {})
    regions = dict(config.pop("regions", {"strategy": "grid"}))
    strategy = regions.pop("strategy", "grid")
    if strategy not in REGION_STRATEGIES:
        raise ValueError(f"Unknown region strategy '{strategy}' (choose from {sorted(REGION_STRATEGIES)})")
    steps = [REGION_STRATEGIES[strategy](**regions), RegionKNNGraph(int(config.pop("region_knn", 8)))]
    patch_grid = config.pop("patch_grid", {})
    if patch_grid is not False and patch_grid is not None:
        steps.append(PatchGrid(**(patch_grid if isinstance(patch_grid, Mapping) else {})))
    if config:
        raise ValueError(f"Unknown graph settings: {sorted(config)}")
    return T.Compose(steps)
