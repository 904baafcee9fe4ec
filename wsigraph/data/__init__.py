r"""Slide graphs: schema, readers of CLAM/TRIDENT feature files, graph building, datasets and
the synthetic cohort."""
from wsigraph.data.schema import (ADJACENT, MEMBER, REGION, REGION_GRAPH, REGION_KNN, ZOOM, adjacency_edge,
                                  level_magnification, level_name, member_edge, node_batch, num_slides,
                                  patch_levels, region_of_patch, zoom_edge)
from wsigraph.data.readers import SlideError, SlideLevel, read_slide, read_slide_level
from wsigraph.data.graph import SlideGraph, build_slide_graph, link_levels
from wsigraph.data.dataset import SlideGraphDataset, read_labels
from wsigraph.data.builder import dataset_from_config
from wsigraph.data.synthetic import SyntheticCohort, make_synthetic_cohort

__all__ = [
    "REGION", "ZOOM", "MEMBER", "REGION_KNN", "ADJACENT", "REGION_GRAPH", "level_name", "level_magnification",
    "patch_levels", "zoom_edge", "member_edge", "adjacency_edge", "region_of_patch", "node_batch", "num_slides",
    "SlideError", "SlideLevel", "read_slide", "read_slide_level", "SlideGraph", "build_slide_graph",
    "link_levels", "SlideGraphDataset", "read_labels", "dataset_from_config", "SyntheticCohort",
    "make_synthetic_cohort",
]
from wsigraph.data.lazy import GraphZoomSource, H5FeatureSource, ZoomSource  # noqa: E402
__all__ += ["ZoomSource", "GraphZoomSource", "H5FeatureSource"]
