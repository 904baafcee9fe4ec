r"""Export of per-patch interpretation maps as GeoJSON that QuPath imports.

Each patch becomes one ``Feature`` whose geometry is its square in level-0 pixels (QuPath's image
coordinates: x to the right, y downwards) and whose ``properties`` follow QuPath's GeoJSON
conventions:

* ``objectType``: ``"detection"`` (default; light-weight, meant for many tiles), ``"tile"`` or
  ``"annotation"``;
* ``name``: ``"<level> <index>"``, e.g. ``"patch_20x 17"`` (the node index in the slide graph);
* ``measurements``: ``{map name: value}`` with every map drawn on the patch's level, plus
  ``magnification``; booleans are written as 0/1 and non-finite values are left out;
* ``classification`` (optional, ``classify=<map name>``): ``{"name", "color"}`` from a
  categorical map (``"<map> <category>"``) or a mask (``"<map>"`` for selected patches only).

In QuPath: *File → Import objects from file* (or drag the file onto the image), then colour the
detections by a measurement (*Measure → Show measurement maps*).
"""
from __future__ import annotations

import gc
import json
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from torch_geometric.data import HeteroData

from wsigraph.data.schema import level_magnification, patch_levels
from wsigraph.io import atomic_write_text
from wsigraph.models.base import MILOutput
from wsigraph.viz.maps import CATEGORICAL, MASK, Interpretation, SlideMap, category_colours, patch_boxes, slide_maps

__all__ = ["OBJECT_TYPES", "slide_features", "write_geojson"]

OBJECT_TYPES = ("detection", "tile", "annotation")


def _number(value: float):
    r"""A JSON number: ``int`` when integral (coordinates of the usual integer lattice)."""
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2 ** 53 else value


def _classifications(smap: SlideMap) -> List[Optional[Dict[str, Any]]]:
    if smap.kind == MASK:
        entry = {"name": smap.name, "color": [214, 39, 40]}
        return [entry if selected else None for selected in smap.values.astype(bool).tolist()]
    if smap.kind != CATEGORICAL:
        raise ValueError(f"classify needs a categorical or mask map; '{smap.name}' is {smap.kind}")
    values = smap.values.astype(np.float64)
    finite = np.isfinite(values)
    categories, codes = np.unique(values[finite], return_inverse=True)
    palette = category_colours(categories)
    entries = [{"name": f"{smap.name} {_number(v)}",
                "color": [int(round(255 * c)) for c in palette[float(v)]]} for v in categories]
    out: List[Optional[Dict[str, Any]]] = [None] * len(values)
    for position, code in zip(np.flatnonzero(finite).tolist(), codes.tolist()):
        out[position] = entries[code]
    return out


def _features(graph: HeteroData, maps: Sequence[SlideMap], levels: Sequence[str], object_type: str,
              classify: Optional[str]) -> List[Dict[str, Any]]:
    features: List[Dict[str, Any]] = []
    for level in levels:
        pos, size = patch_boxes(graph, level)
        count = pos.shape[0]
        if count == 0:
            continue
        level_maps = [m for m in maps if m.level == level]
        # Two maps of one name on one level (a patch tensor and a region tensor) keep both.
        names_seen: Dict[str, int] = {}
        columns = []
        for smap in level_maps:
            key = smap.name if smap.name not in names_seen else f"{smap.source}/{smap.name}"
            names_seen[smap.name] = names_seen.get(smap.name, 0) + 1
            values = smap.values.astype(np.float64).tolist()
            columns.append((key, values))
        classes = None
        chosen = [m for m in level_maps if m.name == classify]
        if chosen:
            classes = _classifications(chosen[0])
        try:
            magnification = level_magnification(level)
        except ValueError:
            magnification = None
        x0, y0 = pos[:, 0].tolist(), pos[:, 1].tolist()
        for i in range(count):
            left, top = _number(x0[i]), _number(y0[i])
            right, bottom = _number(x0[i] + size), _number(y0[i] + size)
            measurements = {key: values[i] for key, values in columns if math.isfinite(values[i])}
            if magnification is not None:
                measurements["magnification"] = magnification
            properties: Dict[str, Any] = {"objectType": object_type, "name": f"{level} {i}",
                                          "measurements": measurements}
            if classes is not None and classes[i] is not None:
                properties["classification"] = classes[i]
            if object_type == "annotation":
                properties["isLocked"] = True
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon",
                             "coordinates": [[[left, top], [right, top], [right, bottom], [left, bottom],
                                              [left, top]]]},
                "properties": properties,
            })
    return features


def slide_features(graph: HeteroData, output: Union[MILOutput, Interpretation, None] = None,
                   names: Optional[Sequence[str]] = None, *, levels: Optional[Sequence[str]] = None,
                   object_type: str = "detection", classify: Optional[str] = None,
                   kinds: Optional[Mapping[str, str]] = None, region_level: Optional[str] = None,
                   max_columns: int = 16, attributes: Sequence[str] = ()) -> Dict[str, Any]:
    r"""The GeoJSON ``FeatureCollection`` of one slide's patches with their map values.

    Args:
        graph: one slide graph.
        output: the slide's :class:`MILOutput` or interpretation dictionary (``None``: the patch
            squares only).
        names, kinds, region_level, max_columns, attributes: which maps and how, as in
            :func:`~wsigraph.viz.maps.slide_maps` (region maps are written on ``region_level``'s
            patches).
        levels: patch levels to export (default: the levels carrying a map; all levels when
            there is none). One feature per patch of each.
        object_type: QuPath object type, one of :data:`OBJECT_TYPES`.
        classify: name of a categorical or mask map that sets each feature's classification.

    Returns:
        ``{"type": "FeatureCollection", "features": [...]}`` with the features of the levels low →
        high, patches in node order.
    """
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES} (got '{object_type}')")
    maps = slide_maps(graph, output, names=names, kinds=kinds, region_level=region_level, max_columns=max_columns,
                      attributes=attributes)
    if levels is None:
        levels = [level for level in patch_levels(graph) if any(m.level == level for m in maps)] \
            or patch_levels(graph)
    unknown = [level for level in levels if level not in graph.node_types]
    if unknown:
        raise KeyError(f"level(s) {unknown} not in the slide graph (levels: {patch_levels(graph)})")
    if classify is not None and not any(m.name == classify for m in maps):
        raise KeyError(f"classify: no map named '{classify}' (maps: {sorted({m.name for m in maps})})")

    # Building ~10 small containers per patch triggers the cyclic garbage collector over and
    # over (10x slower at 150k patches); none of them forms a cycle, so pause it meanwhile.
    paused = gc.isenabled()
    gc.disable()
    try:
        features = _features(graph, maps, levels, object_type, classify)
    finally:
        if paused:
            gc.enable()
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path, graph: HeteroData, output: Union[MILOutput, Interpretation, None] = None,
                  names: Optional[Sequence[str]] = None, **kwargs) -> int:
    r"""Write :func:`slide_features` (same keyword arguments) to ``path`` atomically.

    Returns:
        the number of features written.
    """
    collection = slide_features(graph, output, names, **kwargs)
    atomic_write_text(path, json.dumps(collection, separators=(",", ":"), allow_nan=False) + "\n")
    return len(collection["features"])
