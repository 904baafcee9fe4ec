r"""Layers of wsigraph: aggregations, message passing, optimal transport, top-k."""
from wsigraph.nn.aggregation import GatedAttentionAggregation, GatedAttentionOutput
from wsigraph.nn.sinkhorn import GraphSinkhorn, Sinkhorn
from wsigraph.nn.anchor import AnchorMining, AnchorMiningOutput, AnchorRegionCorrection
from wsigraph.nn.roam import (ExpertAttentionPooling, ExpertFusion, ExpertPoolingOutput, OTRouter, RegionPooling,
                              RoutingContext, RoutingOutput, load_entropy, routing_coherence, topk_dispatch)
from wsigraph.nn.prototype import GradCAMOutput, GradCAMWeights, OTAlignmentOutput, PrototypeOTAlignment, RegionPrototypes

__all__ = [
    "GatedAttentionAggregation",
    "GatedAttentionOutput",
    "GraphSinkhorn",
    "Sinkhorn",
]
__all__ += ["RegionPooling", "RoutingContext", "OTRouter", "RoutingOutput", "ExpertAttentionPooling",
            "ExpertPoolingOutput", "ExpertFusion", "topk_dispatch", "routing_coherence", "load_entropy"]  # ROAM
__all__ += ["RegionPrototypes", "PrototypeOTAlignment", "OTAlignmentOutput", "GradCAMWeights", "GradCAMOutput"]  # M2OTCA
__all__ += ["AnchorMining", "AnchorMiningOutput", "AnchorRegionCorrection"]  # AINet
from wsigraph.nn.perturbed_topk import PerturbedTopK, TopKSelection  # noqa: E402
from wsigraph.nn.zoom import ZoomBag, ZoomGather, ZoomStack  # noqa: E402
__all__ += ["PerturbedTopK", "TopKSelection", "ZoomGather", "ZoomStack", "ZoomBag"]  # ZoomMIL
