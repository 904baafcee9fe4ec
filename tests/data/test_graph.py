import numpy as np
import pytest
import torch
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader

from conftest import lattice
from wsigraph.data.graph import build_slide_graph, link_levels
from wsigraph.data.readers import SlideLevel, read_slide
from wsigraph.data.schema import member_edge, patch_levels, region_of_patch, zoom_edge
from wsigraph.transforms import graph_transform


def make_level(mag, coords, size, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    return SlideLevel(float(mag), rng.normal(size=(len(coords), dim)).astype(np.float32),
                      np.asarray(coords, dtype=np.int64), float(size), f"{mag}x.h5")


def test_zoom_edges_and_slots_on_three_level_grid():
    top = lattice((0, 0), 256, 4, 4)
    missing = [0, 5]  # two 20x children absent (background)
    top = np.delete(top, missing, axis=0)
    levels = [make_level(5, lattice((0, 0), 1024, 1, 1), 1024), make_level(10, lattice((0, 0), 512, 2, 2), 512),
              make_level(20, top, 256)]
    data = build_slide_graph(levels, "s")
    assert patch_levels(data) == ["patch_5x", "patch_10x", "patch_20x"]
    edge = data[zoom_edge("patch_5x", "patch_10x")]
    assert edge.edge_index[0].tolist() == [0, 0, 0, 0]
    # slots in raster order (row-major, x fastest): (0,0)->0, (1,0)->1, (0,1)->2, (1,1)->3
    pos10 = data["patch_10x"].pos[edge.edge_index[1]]
    assert edge.slot.tolist() == ((pos10[:, 1] // 512) * 2 + pos10[:, 0] // 512).long().tolist()
    edge = data[zoom_edge("patch_10x", "patch_20x")]
    assert edge.edge_index.size(1) == 14  # every existing child, once
    assert sorted(edge.edge_index[1].tolist()) == list(range(14))
    parent_pos = data["patch_10x"].pos[edge.edge_index[0]]
    child_centre = data["patch_20x"].pos[edge.edge_index[1]] + 128
    assert ((child_centre >= parent_pos) & (child_centre < parent_pos + 512)).all()
    offset = ((child_centre - parent_pos) // 256).long()
    assert torch.equal(edge.slot, offset[:, 1] * 2 + offset[:, 0])
    # 20x patches 0 = (0, 0) and 5 = (1, 1) were both children of the top-left 10x patch
    assert sorted(edge.slot[edge.edge_index[0] == 0].tolist()) == [1, 2]


def test_linking_uses_geometry_not_order():
    # Offset lattices (CLAM per-contour origins), shuffled rows, a 40x-scanned slide (20x patches of
    # 512 level-0 px) and a non-power-of-two ratio of 3.
    rng = np.random.default_rng(1)
    parents = np.concatenate([lattice((13, 7), 1536, 3, 2), lattice((9000, 5003), 1536, 2, 2)])
    children = np.concatenate([lattice((13, 7), 512, 9, 6), lattice((9000, 5003), 512, 6, 6)])
    children = children[rng.permutation(len(children))]
    parent, child, slot = link_levels(torch.tensor(parents).float(), 1536, torch.tensor(children).float(), 512)
    assert child.numel() == len(children)
    centre = children[child.numpy()] + 256
    box = parents[parent.numpy()]
    assert ((centre >= box) & (centre < box + 1536)).all()
    assert slot.max() == 8 and slot.min() == 0
    # each parent's 9 children take 9 distinct slots
    pairs = torch.unique(parent * 9 + slot)
    assert pairs.numel() == len(children)


def test_child_outside_every_parent_gets_no_parent():
    parents = torch.tensor([[0.0, 0.0]])
    children = torch.tensor([[0.0, 0.0], [256.0, 0.0], [2000.0, 0.0]])
    parent, child, slot = link_levels(parents, 512, children, 256)
    assert child.tolist() == [0, 1] and slot.tolist() == [0, 1]


@pytest.mark.parametrize("graph", [
    {"regions": {"strategy": "grid", "grid_size": 3}},
    {"regions": {"strategy": "sequential", "num_regions": 5}},
    {"regions": {"strategy": "fixed_size", "region_size": 7}},
    {"regions": {"strategy": "fixed_size", "region_size": 7, "order": "hilbert"}},
])
def test_regions_identical_at_every_level(write_slide, graph):
    dirs = write_slide("a", cols=12, rows=8, drop_children=[3, 4, 40])
    data = graph_transform(graph)(build_slide_graph(read_slide("a", dirs), "a"))
    levels = patch_levels(data)
    num_regions = data["region"].num_nodes
    for level in levels:
        edge_index = data[member_edge(level)].edge_index
        assert torch.equal(edge_index[0], torch.arange(data[level].num_nodes))  # every patch, once
        assert edge_index[1].max() < num_regions
    # Each parent holds the region of the majority of its children (ties: the smaller index),
    # checked against a plain per-parent count.
    for low, high in zip(levels[:-1], levels[1:]):
        parent, child = data[zoom_edge(low, high)].edge_index
        region_low = region_of_patch(data, low)
        region_high = region_of_patch(data, high)
        for p in parent.unique().tolist():
            counts = torch.bincount(region_high[child[parent == p]], minlength=num_regions)
            assert region_low[p] == int(torch.argmax(counts))
    assert int(data["region"].mass.sum()) == data[levels[-1]].num_nodes


def test_grid_regions_propagate_exactly_on_aligned_grid(write_slide):
    # With bins aligned to 5x patches, every child is in its parent's region exactly.
    dirs = write_slide("a", cols=8, rows=8, origin=(0, 0))
    data = graph_transform({"regions": {"strategy": "grid", "grid_size": 2}})(build_slide_graph(read_slide("a", dirs)))
    levels = patch_levels(data)
    for low, high in zip(levels[:-1], levels[1:]):
        parent, child = data[zoom_edge(low, high)].edge_index
        assert torch.equal(region_of_patch(data, low)[parent], region_of_patch(data, high)[child])
    assert data["region"].num_nodes == 4


def test_region_graph_weights(write_slide):
    dirs = write_slide("a", cols=12, rows=8)
    data = graph_transform({"regions": {"strategy": "grid", "grid_size": 4}, "region_knn": 3})(
        build_slide_graph(read_slide("a", dirs)))
    store = data["region", "knn", "region"]
    source, target = store.edge_index
    assert (source != target).all()
    pairs = set(zip(source.tolist(), target.tolist()))
    assert all((t, s) in pairs for s, t in pairs)  # symmetric
    total = torch.zeros(data["region"].num_nodes).index_add_(0, target, store.edge_weight)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_patch_grid_degree_with_offset_lattices():
    # Two contours with sub-patch offsets still connect; interior patches have 8 neighbours.
    coords = np.concatenate([lattice((0, 0), 256, 6, 6), lattice((6 * 256 + 90, 40), 256, 6, 6)])
    for size_scale in (1, 2):  # 20x scanned at 20x (256 px) and at 40x (512 px)
        level = make_level(20, coords * size_scale, 256 * size_scale)
        data = graph_transform({"regions": {"strategy": "grid"}})(build_slide_graph([level]))
        edge_index = data["patch_20x", "adjacent", "patch_20x"].edge_index
        degree = torch.bincount(edge_index[1], minlength=len(coords))
        interior = torch.tensor([7, 8, 14, 21])  # rows/cols 1..4 of the first contour
        assert (degree[interior] == 8).all()
        bridge = (edge_index[0] < 36) & (edge_index[1] >= 36)
        assert bridge.any()


def test_loader_batches_index_the_right_nodes(write_slide):
    graphs = []
    for i, (cols, rows) in enumerate([(8, 6), (5, 4), (12, 9)]):
        dirs = write_slide(f"s{i}", cols=cols, rows=rows, seed=i)
        graphs.append(graph_transform({"regions": {"strategy": "grid", "grid_size": 3}})(
            build_slide_graph(read_slide(f"s{i}", dirs), f"s{i}", label=i % 2)))
    batch = next(iter(DataLoader(graphs, batch_size=3)))
    assert batch.num_graphs == 3 and batch.y.tolist() == [0, 1, 0]
    for level in patch_levels(batch):
        store = batch[level]
        region = region_of_patch(batch, level)
        # membership edges point into regions of the same slide
        assert torch.equal(batch["region"].batch[region], store.batch)
        for edge_type in batch.edge_types:
            src, _, dst = edge_type
            edge_index = batch[edge_type].edge_index
            assert torch.equal(batch[src].batch[edge_index[0]], batch[dst].batch[edge_index[1]])
        # node features of slide i in the batch are slide i's features
        for i, graph in enumerate(graphs):
            assert torch.equal(store.x[store.batch == i], graph[level].x)
    zoom = batch[zoom_edge("patch_10x", "patch_20x")]
    for i, graph in enumerate(graphs):
        own = zoom.edge_index[:, batch["patch_10x"].batch[zoom.edge_index[0]] == i]
        shift = torch.tensor([[batch["patch_10x"].ptr[i]], [batch["patch_20x"].ptr[i]]])
        assert torch.equal(own - shift, graph[zoom_edge("patch_10x", "patch_20x")].edge_index)


def test_batch_from_data_list_keeps_slots(write_slide):
    dirs = write_slide("a")
    graph = graph_transform({})(build_slide_graph(read_slide("a", dirs)))
    batch = Batch.from_data_list([graph, graph])
    slot = graph[zoom_edge("patch_5x", "patch_10x")].slot
    assert torch.equal(batch[zoom_edge("patch_5x", "patch_10x")].slot, torch.cat([slot, slot]))
