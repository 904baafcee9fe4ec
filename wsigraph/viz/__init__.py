r"""Heatmaps and routing maps of interpretation tensors over the slide layout (PNG), their
export as QuPath GeoJSON, and trained models of a run directory run on chosen slides."""
from wsigraph.viz.maps import (CATEGORICAL, CONTINUOUS, MASK, SlideMap, map_kind, slide_maps, split_interpretation,
                               split_output)
from wsigraph.viz.heatmap import Panel, SlideCanvas, draw_slide_maps, plot_slide_maps, slide_title
from wsigraph.viz.geojson import slide_features, write_geojson
from wsigraph.viz.explain import (explain_slides, find_fold_checkpoint, fold_slide_ids, load_checkpoint_model,
                                  load_fold_model, visualize_slides)

__all__ = [
    "SlideMap", "CONTINUOUS", "CATEGORICAL", "MASK", "map_kind", "slide_maps", "split_interpretation", "split_output",
    "SlideCanvas", "Panel", "draw_slide_maps", "plot_slide_maps", "slide_title", "slide_features", "write_geojson",
    "explain_slides", "find_fold_checkpoint", "fold_slide_ids", "load_checkpoint_model", "load_fold_model",
    "visualize_slides",
]
