import h5py
import numpy as np
import pytest
import torch

from wsigraph.data.graph import build_slide_graph
from wsigraph.data.lazy import GraphZoomSource, H5FeatureSource
from wsigraph.data.readers import read_slide
from wsigraph.models import ZoomMIL

DIM = 6
SIZES = {5: 1024, 10: 512, 20: 256}


def write_trident(path, features, coords, size, three_d=False):
    r"""TRIDENT's layout: one chunk per row, resizable datasets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        data = features[None] if three_d else features
        handle.create_dataset("features", data=data, chunks=(1,) * (data.ndim - 1) + (DIM,),
                              maxshape=(None,) * (data.ndim - 1) + (DIM,))
        dataset = handle.create_dataset("coords", data=coords, chunks=(1, 2), maxshape=(None, 2))
        dataset.attrs["patch_size_level0"] = size
        dataset.attrs["patch_size"] = 256


def write_slide(root, slide_id, cols, rows, seed, origin=(70, 30), drop=(), extra_high=(), three_d=False):
    r"""A 5x/10x/20x slide with holes, shuffled rows, and optional extra 20x patches off the lattice
    (a second extraction: their slots collide with lattice patches)."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(cols), np.arange(rows))
    high = np.delete(np.stack([xs.ravel(), ys.ravel()], 1) * 256, list(drop), axis=0)
    dirs = {}
    for mag, size in SIZES.items():
        coords = np.unique(high // size, axis=0) * size
        if mag == 20 and len(extra_high):
            coords = np.concatenate([coords, np.asarray(extra_high)])
        coords = coords[rng.permutation(len(coords))] + np.asarray(origin)
        features = rng.normal(size=(len(coords), DIM)).astype(np.float32)
        directory = root / f"{mag}x"
        write_trident(directory / f"{slide_id}.h5", features, coords.astype(np.int64), size, three_d)
        dirs[mag] = directory
    return dirs


def full_graph(dirs, slide_id):
    return build_slide_graph(read_slide(slide_id, dirs), slide_id)


def assert_same_result(model, dirs, slide_id, source=None):
    graph = full_graph(dirs, slide_id)
    with torch.no_grad():
        expected = model(graph)
    with source or H5FeatureSource(dirs, slide_id) as source:
        lazy = model.lazy_forward(source)
    assert torch.equal(lazy.logits, expected.logits), (lazy.logits, expected.logits)
    for level, (rows, weights) in lazy.attention.items():
        dense = torch.zeros(graph[level].num_nodes).index_put_((rows,), weights, accumulate=True)
        torch.testing.assert_close(dense, expected.interpretation[level]["attention"], atol=0, rtol=0)
    for level, rows in lazy.selected.items():
        assert sorted(rows.tolist()) == torch.nonzero(expected.interpretation[level]["selected"]).view(-1).tolist()
    return graph, expected, lazy


@pytest.mark.parametrize("k", [3, 100])
def test_lazy_inference_equals_the_full_graph_and_reads_only_the_children(tmp_path, k):
    dirs = write_slide(tmp_path, "a", 20, 12, seed=0, drop=[0, 1, 2, 20, 21, 45, 100, 101, 102, 103, 239])
    torch.manual_seed(0)
    model = ZoomMIL(DIM, 3, hidden_channels=16, attention_channels=8, k=k).eval()
    graph, expected, lazy = assert_same_result(model, dirs, "a")
    stats = lazy.stats
    n_low = graph["patch_5x"].num_nodes
    assert stats.feature_rows["patch_5x"] == n_low
    for level in ("patch_10x", "patch_20x"):
        reached = int(expected.interpretation[level]["reached"].sum())
        assert stats.feature_rows[level] == reached <= 4 * min(k, graph[level].num_nodes)
        assert stats.feature_bytes[level] == reached * DIM * 4
    if k == 3:
        assert stats.total_feature_rows <= n_low + 2 * 4 * k < graph["patch_20x"].num_nodes
    # Coordinates are read once per level.
    assert stats.coord_rows == {level: graph[level].num_nodes for level in ("patch_5x", "patch_10x", "patch_20x")}


def test_lazy_inference_with_known_coordinates_and_skipped_levels(tmp_path):
    dirs = write_slide(tmp_path, "b", 12, 8, seed=1, drop=[5, 6, 7, 30], three_d=True)
    graph = full_graph(dirs, "b")
    coords = {mag: graph[f"patch_{mag}x"].pos.numpy() for mag in SIZES}
    torch.manual_seed(1)
    for model in (ZoomMIL(DIM, 2, hidden_channels=16, attention_channels=8, k=2, levels=["patch_5x", "patch_20x"]),
                  ZoomMIL(DIM, 2, hidden_channels=16, attention_channels=8, k=2, num_levels=2),
                  ZoomMIL(DIM, 2, hidden_channels=16, attention_channels=8, k=2, missing_children="zero")):
        model.eval()
        _, _, lazy = assert_same_result(model, dirs, "b", H5FeatureSource(dirs, "b", coords=coords))
        assert lazy.stats.coord_rows == {}
        # Features are read at the model's levels only (10x, when skipped, only links).
        assert set(lazy.stats.feature_rows) == set(lazy.levels)


def test_colliding_slots_are_resolved_like_the_graph(tmp_path):
    # Extra 20x patches 100 px off the lattice share slots with lattice patches.
    extra = [[100, 0], [356, 256], [612, 612], [1124, 100]]
    dirs = write_slide(tmp_path, "c", 8, 8, seed=2, extra_high=extra)
    graph = full_graph(dirs, "c")
    source = GraphZoomSource(graph)
    table = source.child_table("patch_10x", "patch_20x")
    linked = graph["patch_10x", "zooms_into", "patch_20x"].edge_index.size(1)
    assert (table >= 0).sum() < linked  # some children lost their slot to a nearer one
    torch.manual_seed(2)
    model = ZoomMIL(DIM, 2, hidden_channels=16, attention_channels=8, k=16).eval()  # selects every 5x patch
    assert_same_result(model, dirs, "c")


def test_rows_and_children_of_the_h5_source(tmp_path):
    dirs = write_slide(tmp_path, "d", 8, 4, seed=3, drop=[0])
    graph = full_graph(dirs, "d")
    with H5FeatureSource(dirs, "d") as source:
        assert source.levels() == ["patch_5x", "patch_10x", "patch_20x"]
        index = torch.tensor([[3, -1, 0, 3, 7]])
        rows = source.rows("patch_20x", index)
        torch.testing.assert_close(rows[0, [0, 2, 3, 4]], graph["patch_20x"].x[[3, 0, 3, 7]])
        assert (rows[0, 1] == 0).all()
        assert source.stats.feature_rows["patch_20x"] == 3  # unique rows
        parents = torch.tensor([[1, -1, 0]])
        expected = GraphZoomSource(graph).children("patch_5x", "patch_20x", parents)
        assert torch.equal(source.children("patch_5x", "patch_20x", parents), expected)
        assert expected.shape == (1, 3, 16) and (expected[0, 1] == -1).all()
        assert source.patch_size("patch_10x") == 512.0
        with pytest.raises(IndexError):
            source.rows("patch_5x", torch.tensor([[99]]))


@pytest.mark.parametrize("chunks,dtype,compression,fast", [((1, 2), "<i8", None, True), ((32, 2), ">i4", None, True),
                                                           ((1, 2), "<f8", "gzip", False), (None, "<i8", None, False)])
def test_row_chunked_coordinates_read_through_the_chunk_index(tmp_path, chunks, dtype, compression, fast):
    from wsigraph.data.lazy import _read_by_chunk_index, _read_whole
    values = np.random.default_rng(0).integers(0, 10**6, (1001, 2)).astype(dtype)
    with h5py.File(tmp_path / "a.h5", "w") as handle:
        handle.create_dataset("coords", data=values, chunks=chunks, compression=compression,
                              maxshape=(None, 2) if chunks else None)
    with h5py.File(tmp_path / "a.h5", "r") as handle:
        direct = _read_by_chunk_index(handle["coords"])
        assert (direct is not None) == fast
        if fast:
            assert direct.dtype == np.dtype(dtype) and np.array_equal(direct, values)
        assert np.array_equal(_read_whole(handle["coords"]), values)
