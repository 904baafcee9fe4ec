r"""Functional cores of the :mod:`wsigraph.nn` layers."""
from wsigraph.nn.functional.sinkhorn import (
    padded_row_index,
    plan_marginals,
    sinkhorn_log,
    sinkhorn_log_flat,
    smooth_log_plan,
)
from wsigraph.nn.functional.anchor import (adjacent_region_by_graph, adjacent_region_by_order, dual_level_similarity,
                                          keep_mask_per_group, region_blocks, region_local_attention)
from wsigraph.nn.functional.topk import (
    dense_topk_mask,
    group_sort,
    rank_within_group,
    topk_mask_per_group,
    topk_per_group,
    topk_per_group_dense,
)
from wsigraph.nn.functional.prototype import raster_rank, sequential_chunk_index

__all__ = [
    "padded_row_index",
    "plan_marginals",
    "sinkhorn_log",
    "sinkhorn_log_flat",
    "smooth_log_plan",
    "dense_topk_mask",
    "group_sort",
    "rank_within_group",
    "topk_mask_per_group",
    "topk_per_group",
    "topk_per_group_dense",
]
__all__ += ["raster_rank", "sequential_chunk_index"]  # M2OTCA
__all__ += ["dual_level_similarity", "region_blocks", "adjacent_region_by_order", "adjacent_region_by_graph",
            "region_local_attention", "keep_mask_per_group"]  # AINet
from wsigraph.nn.functional.perturbed_topk import hard_topk, masked_softmax, perturbed_topk  # noqa: E402
from wsigraph.nn.functional.zoom import cell_centre_distance, child_table, compose_child_tables, gather_rows  # noqa: E402
__all__ += ["hard_topk", "perturbed_topk", "masked_softmax", "child_table", "cell_centre_distance",
            "compose_child_tables", "gather_rows"]  # ZoomMIL
