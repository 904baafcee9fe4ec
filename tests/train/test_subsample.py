r"""RandomPatchSubsample keeps every edge type of the slide graph consistent."""
import copy

import pytest
import torch
from torch_geometric.data import Batch

from wsigraph.data.schema import REGION, REGION_GRAPH, member_edge, patch_levels, zoom_edge
from wsigraph.transforms.subsample import RandomPatchSubsample


def _tagged(data):
    r"""A copy whose nodes carry their original index as ``node_id``."""
    data = copy.copy(data)
    for node_type in data.node_types:
        data[node_type].node_id = torch.arange(data[node_type].num_nodes)
    return data


def _edges(data, edge_type, extra=None):
    src, dst = edge_type[0], edge_type[2]
    edge_index = data[edge_type].edge_index
    source = data[src].node_id[edge_index[0]]
    target = data[dst].node_id[edge_index[1]]
    values = [] if extra is None else data[edge_type][extra].tolist()
    if extra is None:
        return set(zip(source.tolist(), target.tolist()))
    return set(zip(source.tolist(), target.tolist(), values))


@pytest.mark.parametrize("cap", [10, 25, {"patch_20x": 15}])
def test_subgraph_edges_equal_original_edges_among_kept_nodes(cohort, cap):
    torch.manual_seed(0)
    for i in range(4):
        original = _tagged(cohort[i])
        before = {t: original[t].num_nodes for t in original.node_types}
        out = RandomPatchSubsample(cap)(original)
        assert {t: original[t].num_nodes for t in original.node_types} == before  # input untouched
        kept = {t: set(out[t].node_id.tolist()) for t in out.node_types}
        for level in patch_levels(out):
            limit = cap if isinstance(cap, int) else cap.get(level)
            if limit is not None:
                assert out[level].num_nodes == min(limit, original[level].num_nodes)
            # node attributes follow their nodes
            ids = out[level].node_id
            assert torch.equal(out[level].x, original[level].x[ids])
            assert torch.equal(out[level].pos, original[level].pos[ids])
            assert out[level].patch_size == original[level].patch_size
        for edge_type in original.edge_types:
            extra = "slot" if edge_type[1] == "zooms_into" else None
            src, dst = edge_type[0], edge_type[2]
            expected = {e for e in _edges(original, edge_type, extra) if e[0] in kept[src] and e[1] in kept[dst]}
            assert _edges(out, edge_type, extra) == expected, edge_type
        levels = patch_levels(out)
        for level in levels:  # every kept patch is in exactly one kept region
            patch = out[member_edge(level)].edge_index[0]
            assert torch.equal(patch.sort().values, torch.arange(out[level].num_nodes))
        if isinstance(cap, int):  # same cap everywhere: every kept child keeps its parent
            for parent, child in zip(levels[:-1], levels[1:]):
                had_parent = set(original[zoom_edge(parent, child)].edge_index[1].tolist())
                children = {c for c in kept[child] if c in had_parent}
                linked = set(out[child].node_id[out[zoom_edge(parent, child)].edge_index[1]].tolist())
                assert linked == children
        # regions: non-empty, mass recounted, region-graph weights renormalised
        top = member_edge(levels[-1])
        mass = torch.bincount(out[top].edge_index[1], minlength=out[REGION].num_nodes).float()
        assert torch.equal(out[REGION].mass, mass)
        used = torch.zeros(out[REGION].num_nodes, dtype=torch.bool)
        for level in levels:
            used[out[member_edge(level)].edge_index[1]] = True
        assert bool(used.all())
        store = out[REGION_GRAPH]
        total = torch.zeros(out[REGION].num_nodes).index_add_(0, store.edge_index[1], store.edge_weight)
        has_edges = torch.bincount(store.edge_index[1], minlength=out[REGION].num_nodes) > 0
        torch.testing.assert_close(total[has_edges], torch.ones(int(has_edges.sum())))


def test_reproducible_and_identity_under_cap(cohort):
    data = cohort[0]
    first = RandomPatchSubsample(12, generator=torch.Generator().manual_seed(5))(data)
    second = RandomPatchSubsample(12, generator=torch.Generator().manual_seed(5))(data)
    third = RandomPatchSubsample(12, generator=torch.Generator().manual_seed(6))(data)
    assert torch.equal(first["patch_20x"].pos, second["patch_20x"].pos)
    assert not torch.equal(first["patch_20x"].pos, third["patch_20x"].pos)
    same = RandomPatchSubsample(10 ** 6)(data)
    for node_type in data.node_types:
        assert same[node_type].num_nodes == data[node_type].num_nodes
    for edge_type in data.edge_types:
        assert torch.equal(same[edge_type].edge_index, data[edge_type].edge_index)
    assert "max_patches=12" in repr(RandomPatchSubsample(12))
    with pytest.raises(ValueError):
        RandomPatchSubsample(0)


def test_subsampled_graphs_batch(cohort):
    graphs = [RandomPatchSubsample(20)(cohort[i]) for i in range(3)]
    batch = Batch.from_data_list(graphs)
    assert batch["patch_20x"].num_nodes == sum(g["patch_20x"].num_nodes for g in graphs)
    edge_index = batch[member_edge("patch_20x")].edge_index
    assert int(edge_index[1].max()) < batch[REGION].num_nodes
