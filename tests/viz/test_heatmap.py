import copy
import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from scipy.stats import rankdata
from torch_geometric.data import Batch, HeteroData

from wsigraph.data.schema import member_edge, patch_levels
from wsigraph.models import MODEL_REGISTRY, MILOutput, build_model
from wsigraph.viz import (CATEGORICAL, CONTINUOUS, MASK, SlideCanvas, draw_slide_maps, map_kind, plot_slide_maps,
                          slide_maps, slide_title, split_interpretation, split_output)
from wsigraph.viz.heatmap import MERGED, merged_percentile

DIM, NUM_CLASSES = 8, 3


def batch_of(graphs):
    return Batch.from_data_list([copy.copy(g) for g in graphs])


def expected_panels(interpretation, graph):
    r"""Panel count from the interpretation alone: one per column of every tensor on a patch level
    or the region, plus one merged panel per floating map name present on two or more levels."""
    count, levels_of = 0, {}
    for node_type, values in interpretation.items():
        for name, value in values.items():
            columns = int(np.prod(value.shape[1:])) if value.dim() > 1 else 1
            count += columns
            if node_type in patch_levels(graph) and value.is_floating_point():
                for k in range(columns):
                    levels_of.setdefault((name, k, columns), set()).add(node_type)
    return count + sum(len(levels) >= 2 for levels in levels_of.values())


def assert_png(path):
    image = imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert float(image[..., :3].std()) > 0.01  # not blank


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_every_registered_model_draws_its_maps(name, slides, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, in_channels=DIM, num_classes=NUM_CLASSES).eval()
    batch = batch_of(slides)
    with torch.no_grad():
        outputs = split_output(batch, model(batch))
    assert len(outputs) == len(slides)
    for index in (2,):
        graph, output = slides[index], outputs[index]
        assert output.logits.shape == (1, NUM_CLASSES)
        path = tmp_path / f"{name}_{index}.png"
        panels = plot_slide_maps(graph, output, path, class_names=["a", "b", "c"], panel_size=1.5, dpi=40)
        assert path.is_file() and path.stat().st_size > 0
        assert_png(path)
        assert len(panels) == expected_panels(output.interpretation, graph)
        assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_split_interpretation_matches_each_slide(slides):
    torch.manual_seed(1)
    per_slide = []
    for graph in slides:
        per_slide.append({
            "patch_20x": {"attention": torch.rand(graph["patch_20x"].num_nodes),
                          "per_class": torch.rand(graph["patch_20x"].num_nodes, 3)},
            "patch_5x": {"selected": torch.rand(graph["patch_5x"].num_nodes) > 0.5},
            "region": {"expert": torch.randint(0, 4, (graph["region"].num_nodes,))},
        })
    batch = batch_of(slides)
    joined = {t: {n: torch.cat([s[t][n] for s in per_slide]) for n in per_slide[0][t]} for t in per_slide[0]}
    parts = split_interpretation(batch, joined)
    assert len(parts) == len(slides)
    for part, reference in zip(parts, per_slide):
        for node_type, values in reference.items():
            for key, value in values.items():
                assert part[node_type][key].dtype == value.dtype
                assert torch.equal(part[node_type][key], value)

    logits = torch.randn(len(slides), NUM_CLASSES)
    outputs = split_output(batch, MILOutput(logits, interpretation=joined))
    for b, output in enumerate(outputs):
        assert torch.equal(output.logits, logits[b:b + 1])
        assert float(output.aux_loss) == 0.0

    bad = {"patch_20x": {"attention": torch.rand(3)}}
    with pytest.raises(ValueError, match="rows"):
        split_interpretation(batch, bad)


def test_kind_follows_dtype_and_overrides(slides):
    assert map_kind(torch.zeros(3, dtype=torch.bool)) == MASK
    for dtype in (torch.int64, torch.int32, torch.uint8):
        assert map_kind(torch.zeros(3, dtype=dtype)) == CATEGORICAL
    for dtype in (torch.float16, torch.float32, torch.float64):
        assert map_kind(torch.zeros(3, dtype=dtype)) == CONTINUOUS

    graph = slides[0]
    n = graph["patch_20x"].num_nodes
    interpretation = {"patch_20x": {"score": torch.rand(n), "cluster": torch.randint(0, 3, (n,)),
                                    "chosen": torch.rand(n) > 0.5, "code": torch.randint(0, 3, (n,)).float()}}
    kinds = {m.name: m.kind for m in slide_maps(graph, interpretation)}
    assert kinds == {"score": CONTINUOUS, "cluster": CATEGORICAL, "chosen": MASK, "code": CONTINUOUS}
    kinds = {m.name: m.kind for m in slide_maps(graph, interpretation, kinds={"code": CATEGORICAL})}
    assert kinds["code"] == CATEGORICAL
    # The drawing follows the same choice.
    _, panels = draw_slide_maps(graph, interpretation, kinds={"code": "categorical"}, panel_size=1.5, dpi=40)
    assert {p.name: p.kind for p in panels} == {"score": CONTINUOUS, "cluster": CATEGORICAL, "chosen": MASK,
                                                "code": CATEGORICAL}
    with pytest.raises(ValueError, match="kind"):
        slide_maps(graph, interpretation, kinds={"code": "fancy"})

    # names filter, by name, column or node_type/name.
    interpretation["patch_20x"]["per_class"] = torch.rand(n, 3)
    assert [m.name for m in slide_maps(graph, interpretation, names=["per_class"])] == \
        ["per_class[0]", "per_class[1]", "per_class[2]"]
    assert [m.name for m in slide_maps(graph, interpretation, names=["per_class[1]", "patch_20x/score"])] == \
        ["score", "per_class[1]"]


@pytest.mark.parametrize("level", [None, "patch_5x", "patch_10x"])
def test_region_tensor_reaches_the_patches_of_its_region(slides, level):
    torch.manual_seed(2)
    graph = slides[2]
    regions = graph["region"].num_nodes
    expert = torch.randint(0, 5, (regions,))
    load = torch.rand(regions, 2)
    maps = slide_maps(graph, {"region": {"expert": expert, "load": load}}, region_level=level)
    target = level or patch_levels(graph)[-1]
    assert [m.name for m in maps] == ["expert", "load[0]", "load[1]"]
    patch, region = graph[member_edge(target)].edge_index
    for smap in maps:
        assert smap.source == "region" and smap.level == target
        assert smap.values.shape == (graph[target].num_nodes,)
    expected = np.zeros(graph[target].num_nodes, dtype=np.int64)
    expected[patch.numpy()] = expert[region].numpy()
    np.testing.assert_array_equal(maps[0].values, expected)
    assert maps[0].kind == CATEGORICAL
    expected_load = np.zeros(graph[target].num_nodes)
    expected_load[patch.numpy()] = load[region, 1].double().numpy()
    np.testing.assert_allclose(maps[2].values, expected_load)


def test_canvas_paints_each_patch_square(make_slide):
    graph = make_slide(5, 3, (131, 77), [4, 7], seed=5, levels=((10, 512), (20, 256)))
    values = torch.arange(graph["patch_20x"].num_nodes, dtype=torch.float64) + 1
    canvas = SlideCanvas(graph, levels=["patch_20x"], resolution=40)
    image = canvas.paint("patch_20x", values.numpy())
    left, right, bottom, top = canvas.extent
    assert left == pytest.approx(131) and top == pytest.approx(77)
    # Reference: every pixel centre takes the value of the patch square containing it.
    height, width = image.shape
    centres_x = left + (np.arange(width) + 0.5) * canvas.scale
    centres_y = top + (np.arange(height) + 0.5) * canvas.scale
    reference = np.full(image.shape, np.nan)
    pos = graph["patch_20x"].pos.numpy()
    for i, (x, y) in enumerate(pos):
        cols = (centres_x >= x) & (centres_x < x + 256)
        rows = (centres_y >= y) & (centres_y < y + 256)
        reference[np.ix_(rows, cols)] = values[i].item()
    np.testing.assert_array_equal(image, reference)
    # A patch is a whole number of pixels; the two dropped patches (inside the box) stay empty.
    side = 256 / canvas.scale
    assert side.is_integer() and image.shape == (3 * side, 5 * side)
    assert np.isnan(image).sum() == 2 * side ** 2
    # ``where`` paints a subset only.
    subset = canvas.paint("patch_20x", 7.0, where=np.arange(len(pos)) == 3)
    assert np.isfinite(subset).sum() == side ** 2 and np.nanmax(subset) == 7.0


def test_merged_panel_is_the_mean_percentile_over_levels(make_slide):
    torch.manual_seed(3)
    graph = make_slide(4, 4, (0, 0), [5], seed=6, levels=((10, 512), (20, 256)))
    coarse = torch.rand(graph["patch_10x"].num_nodes)
    fine = torch.rand(graph["patch_20x"].num_nodes)
    interpretation = {"patch_10x": {"attention": coarse}, "patch_20x": {"attention": fine}}
    maps = slide_maps(graph, interpretation)
    canvas = SlideCanvas(graph, resolution=32)
    merged = merged_percentile(canvas, maps)

    def percentile(v):
        v = v.double().numpy()
        return (rankdata(v) - 1) / (len(v) - 1)

    # Reference at the centre of every 20x patch: the mean of its percentile and its parent's.
    parent_of = {}
    parents, children = graph["patch_10x", "zooms_into", "patch_20x"].edge_index
    for p, c in zip(parents.tolist(), children.tolist()):
        parent_of[c] = p
    left, _, _, top = canvas.extent
    pc, pf = percentile(coarse), percentile(fine)
    for child, (x, y) in enumerate(graph["patch_20x"].pos.numpy()):
        row, col = int((y + 128 - top) / canvas.scale), int((x + 128 - left) / canvas.scale)
        assert merged[row, col] == pytest.approx((pf[child] + pc[parent_of[child]]) / 2)

    _, panels = draw_slide_maps(graph, interpretation, panel_size=1.5, dpi=40)
    assert [(p.name, p.level) for p in panels] == [("attention", "patch_10x"), ("attention", "patch_20x"),
                                                   ("attention", MERGED)]
    _, panels = draw_slide_maps(graph, interpretation, merge_levels=False, panel_size=1.5, dpi=40)
    assert len(panels) == 2


def test_title_and_ground_truth_attributes(slides, tmp_path):
    graph = slides[0]
    n = graph["patch_20x"].num_nodes
    output = MILOutput(torch.tensor([[0.0, math.log(3.0), 0.0]]),
                       interpretation={"patch_20x": {"attention": torch.rand(n)}})
    title = slide_title(graph, output, class_names=["normal", "tumour", "other"])
    assert title == "slide0 | label: tumour | prediction: tumour (p = 0.60)"
    assert slide_title(graph, output.interpretation, label=2) == "slide0 | label: 2"

    graph = copy.copy(graph)
    graph["patch_20x"].lesion = (torch.arange(n) % 3 == 0).long()
    _, panels = draw_slide_maps(graph, output, attributes=["lesion"], names=["attention"], panel_size=1.5, dpi=40)
    assert [(p.name, p.kind) for p in panels] == [("attention", CONTINUOUS), ("lesion", CATEGORICAL)]

    # Without any map the layout is drawn.
    path = tmp_path / "layout.png"
    panels = plot_slide_maps(graph, None, path, panel_size=1.5, dpi=40)
    assert [p.name for p in panels] == ["layout"]
    assert_png(path)


def test_rank_scale_and_bad_input(slides, tmp_path):
    graph = slides[0]
    n = graph["patch_20x"].num_nodes
    values = torch.rand(n)
    values[0] = float("nan")
    panels = plot_slide_maps(graph, {"patch_20x": {"attention": values}}, tmp_path / "rank.png", scale="rank",
                             panel_size=1.5, dpi=40)
    assert [p.kind for p in panels] == [CONTINUOUS]
    with pytest.raises(ValueError, match="scale"):
        draw_slide_maps(graph, {"patch_20x": {"attention": values}}, scale="log")
    with pytest.raises(ValueError, match="one row per node"):
        slide_maps(graph, {"patch_20x": {"attention": torch.rand(n + 1)}})
    with pytest.raises(ValueError, match="batch"):
        slide_maps(batch_of(slides), {})
    with pytest.warns(UserWarning, match="left out"):
        assert slide_maps(graph, {"cells": {"score": torch.rand(4)}}) == []


def test_level_without_patches(tmp_path):
    graph = HeteroData()
    graph["patch_10x"].pos = torch.zeros(0, 2)
    graph["patch_10x"].patch_size = 512.0
    graph["patch_20x"].pos = torch.tensor([[0.0, 0.0], [256.0, 0.0]])
    graph["patch_20x"].patch_size = 256.0
    interpretation = {"patch_10x": {"attention": torch.zeros(0)}, "patch_20x": {"attention": torch.tensor([1.0, 2.0])}}
    canvas = SlideCanvas(graph, resolution=8)
    assert canvas.shape == (4, 8) and np.isnan(canvas.paint("patch_10x", 1.0)).all()
    image = canvas.paint("patch_20x", np.array([1.0, 2.0]))
    assert (image[:, :4] == 1).all() and (image[:, 4:] == 2).all()
    panels = plot_slide_maps(graph, interpretation, tmp_path / "two.png", panel_size=1.5, dpi=40)
    assert [p.level for p in panels] == ["patch_10x", "patch_20x", MERGED]
