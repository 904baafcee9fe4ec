r"""Layers of wsigraph: aggregations, message passing, optimal transport, top-k."""
from wsigraph.nn.aggregation import GatedAttentionAggregation, GatedAttentionOutput
from wsigraph.nn.sinkhorn import GraphSinkhorn, Sinkhorn

__all__ = [
    "GatedAttentionAggregation",
    "GatedAttentionOutput",
    "GraphSinkhorn",
    "Sinkhorn",
]
