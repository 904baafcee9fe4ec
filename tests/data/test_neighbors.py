import pytest
import torch

from wsigraph.data.neighbors import knn, knn_graph, radius_pairs
from wsigraph.typing import WITH_TORCH_CLUSTER


def neighbour_distances(x, y, row, col, k):
    # Sorted distances per query: the backend-independent answer (lattices tie).
    dist = (x[col] - y[row]).norm(dim=1)
    out = torch.full((y.size(0), k), float("inf"))
    rank = torch.arange(row.numel()) - torch.searchsorted(row, row)
    out[row, rank] = dist
    return out.sort(dim=1).values


def clouds(seed):
    gen = torch.Generator().manual_seed(seed)
    lattice = torch.stack(torch.meshgrid(torch.arange(20.0), torch.arange(15.0), indexing="xy"), -1).view(-1, 2) * 256
    random = torch.rand(300, 2, generator=gen) * 5000
    pos = torch.cat([lattice, random])
    batch = torch.cat([torch.zeros(len(lattice), dtype=torch.long), torch.ones(300, dtype=torch.long)])
    return pos, batch


@pytest.mark.parametrize("backend", ["kdtree", "brute"] + (["torch_cluster"] if WITH_TORCH_CLUSTER else []))
def test_knn_backends_agree_with_exhaustive_reference(backend):
    pos, batch = clouds(0)
    query = pos[::7] + 13.0
    query_batch = batch[::7]
    k = 5
    row, col = knn(pos, query, k, batch, query_batch, backend=backend)
    assert torch.equal(batch[col], query_batch[row])  # never across slides
    got = neighbour_distances(pos, query, row, col, k)
    full = torch.cdist(query, pos, compute_mode="donot_use_mm_for_euclid_dist").masked_fill(query_batch[:, None] != batch[None, :], float("inf"))
    expected = full.topk(k, dim=1, largest=False).values
    assert torch.allclose(got, expected, atol=1e-3)


@pytest.mark.skipif(not WITH_TORCH_CLUSTER, reason="torch-cluster is not installed")
def test_fallback_equals_torch_cluster_knn_graph():
    pos, batch = clouds(1)
    k = 8
    graphs = {b: knn_graph(pos, k, batch, backend=b) for b in ("kdtree", "torch_cluster")}
    distances = {}
    for name, edge_index in graphs.items():
        assert (edge_index[0] != edge_index[1]).all()
        source, target = edge_index
        order = torch.argsort(target, stable=True)
        distances[name] = neighbour_distances(pos, pos, target[order], source[order], k)
    assert torch.allclose(distances["kdtree"], distances["torch_cluster"], atol=1e-3)


def test_small_slides_and_empty_input():
    pos = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0]])
    batch = torch.tensor([0, 0, 1])
    edge_index = knn_graph(pos, 4, batch)
    assert sorted(map(tuple, edge_index.t().tolist())) == [(0, 1), (1, 0)]
    row, col = knn(pos[:0], pos, 3)
    assert row.numel() == 0 and col.numel() == 0


def test_radius_pairs_chebyshev_and_slides():
    pos = torch.tensor([[0.0, 0.0], [300.0, 300.0], [700.0, 0.0], [0.0, 0.0]])
    batch = torch.tensor([0, 0, 0, 1])
    pairs = radius_pairs(pos, 400.0, batch)
    assert sorted(map(tuple, pairs.t().tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]
