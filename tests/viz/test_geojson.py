import json

import numpy as np
import pytest
import torch

from wsigraph.data.schema import member_edge, patch_levels
from wsigraph.models import MILOutput
from wsigraph.viz import slide_features, write_geojson


def square(x, y, size):
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]


def level_features(collection, level):
    return [f for f in collection["features"] if f["properties"]["name"].startswith(level + " ")]


def test_one_feature_per_patch_with_its_square_and_scores(slides, tmp_path):
    torch.manual_seed(0)
    graph = slides[0]
    n20, n5 = graph["patch_20x"].num_nodes, graph["patch_5x"].num_nodes
    attention = torch.rand(n20)
    attention[3] = float("nan")  # a missing value is left out, never written as NaN
    selected = torch.rand(n20) > 0.5
    per_class = torch.rand(n20, 2)
    coarse = torch.rand(n5)
    output = MILOutput(torch.zeros(1, 2), interpretation={
        "patch_20x": {"attention": attention, "selected": selected, "per_class": per_class},
        "patch_5x": {"attention": coarse}})
    path = tmp_path / "out" / "slide0.geojson"
    written = write_geojson(path, graph, output)

    with open(path) as handle:
        collection = json.load(handle)  # valid JSON (NaN would make it invalid)
    assert "NaN" not in path.read_text()
    assert written == len(collection["features"]) == n20 + n5
    assert collection["type"] == "FeatureCollection"
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # atomic: no temporary file left

    features = level_features(collection, "patch_20x")
    assert len(features) == n20
    pos = graph["patch_20x"].pos.numpy()
    for i, feature in enumerate(features):
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        ring = feature["geometry"]["coordinates"][0]
        np.testing.assert_array_equal(np.asarray(ring, dtype=float), square(*pos[i].astype(float), 256.0))
        properties = feature["properties"]
        assert properties["objectType"] == "detection"
        assert properties["name"] == f"patch_20x {i}"
        measurements = properties["measurements"]
        if i == 3:
            assert "attention" not in measurements
        else:
            assert measurements["attention"] == pytest.approx(float(attention[i]))
        assert measurements["selected"] == float(selected[i])
        assert measurements["per_class[0]"] == pytest.approx(float(per_class[i, 0]))
        assert measurements["per_class[1]"] == pytest.approx(float(per_class[i, 1]))
        assert measurements["magnification"] == 20.0
        assert "classification" not in properties

    features = level_features(collection, "patch_5x")
    pos = graph["patch_5x"].pos.numpy()
    for i, feature in enumerate(features):
        np.testing.assert_array_equal(np.asarray(feature["geometry"]["coordinates"][0], dtype=float),
                                      square(*pos[i].astype(float), 1024.0))
        assert feature["properties"]["measurements"] == {"attention": pytest.approx(float(coarse[i])),
                                                         "magnification": 5.0}


def test_region_scores_and_classification(slides):
    torch.manual_seed(1)
    graph = slides[2]
    regions = graph["region"].num_nodes
    expert = torch.randint(0, 3, (regions,))
    weight = torch.rand(regions)
    n20 = graph["patch_20x"].num_nodes
    anchor = torch.zeros(n20, dtype=torch.bool)
    anchor[::3] = True
    interpretation = {"region": {"expert": expert, "weight": weight}, "patch_20x": {"anchor": anchor}}

    collection = slide_features(graph, interpretation, classify="expert", object_type="tile")
    features = collection["features"]
    assert len(features) == n20  # region maps are written on the highest level
    patch, region = graph[member_edge("patch_20x")].edge_index
    region_of = dict(zip(patch.tolist(), region.tolist()))
    colours = {}
    for i, feature in enumerate(features):
        properties = feature["properties"]
        assert properties["objectType"] == "tile"
        r = region_of[i]
        assert properties["measurements"]["expert"] == float(expert[r])
        assert properties["measurements"]["weight"] == pytest.approx(float(weight[r]))
        assert properties["classification"]["name"] == f"expert {int(expert[r])}"
        colour = properties["classification"]["color"]
        assert len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        colours.setdefault(int(expert[r]), tuple(colour))
        assert colours[int(expert[r])] == tuple(colour)  # one colour per category
    assert len(set(colours.values())) == len(colours)

    # A mask classifies its selected patches only.
    collection = slide_features(graph, interpretation, classify="anchor", object_type="annotation")
    for i, feature in enumerate(collection["features"]):
        properties = feature["properties"]
        assert properties["objectType"] == "annotation"
        assert ("classification" in properties) == bool(anchor[i])
        if anchor[i]:
            assert properties["classification"]["name"] == "anchor"

    # Region values mapped onto another level's patches.
    collection = slide_features(graph, {"region": {"weight": weight}}, region_level="patch_10x")
    patch, region = graph[member_edge("patch_10x")].edge_index
    assert len(collection["features"]) == graph["patch_10x"].num_nodes
    for p, r in zip(patch.tolist(), region.tolist()):
        value = collection["features"][p]["properties"]["measurements"]["weight"]
        assert value == pytest.approx(float(weight[r]))


def test_levels_names_and_errors(slides):
    graph = slides[1]
    # Without maps: every patch of every level, squares only.
    collection = slide_features(graph)
    assert len(collection["features"]) == sum(graph[level].num_nodes for level in patch_levels(graph))
    n = graph["patch_20x"].num_nodes
    interpretation = {"patch_20x": {"a": torch.rand(n), "b": torch.rand(n)}}
    collection = slide_features(graph, interpretation, names=["b"], levels=["patch_10x", "patch_20x"])
    assert len(collection["features"]) == graph["patch_10x"].num_nodes + n
    assert set(level_features(collection, "patch_20x")[0]["properties"]["measurements"]) == {"b", "magnification"}
    assert set(level_features(collection, "patch_10x")[0]["properties"]["measurements"]) == {"magnification"}

    with pytest.raises(ValueError, match="object_type"):
        slide_features(graph, interpretation, object_type="cell_blob")
    with pytest.raises(KeyError, match="classify"):
        slide_features(graph, interpretation, classify="missing")
    with pytest.raises(ValueError, match="categorical or mask"):
        slide_features(graph, interpretation, classify="a")
    with pytest.raises(KeyError, match="patch_40x"):
        slide_features(graph, interpretation, levels=["patch_40x"])
