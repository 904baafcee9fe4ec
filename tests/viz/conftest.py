import pytest

from conftest import nested_levels

from wsigraph.data.graph import build_slide_graph
from wsigraph.transforms import graph_transform

DIM = 8
NUM_CLASSES = 3


def viz_slide(cols, rows, origin, drop, seed, label=0, levels=((5, 1024), (10, 512), (20, 256)), grid=3):
    r"""A small multi-level slide graph: a 20x lattice with holes, its 10x/5x parents, grid regions."""
    data = nested_levels(cols, rows, origin, drop, seed, DIM, scales=levels)
    graph = build_slide_graph(data, f"slide{seed}", f"case{seed}", label=label)
    return graph_transform({"regions": {"strategy": "grid", "grid_size": grid}, "region_knn": 3})(graph)


@pytest.fixture(scope="session")
def slides():
    r"""Three slides of different shapes (offset lattices, holes, a two-patch slide)."""
    return [viz_slide(7, 5, (37, 11), [0, 9, 20], seed=0, label=1),
            viz_slide(2, 1, (300, 200), [], seed=1, label=0),
            viz_slide(6, 4, (1000, 90), [3, 4], seed=2, label=2)]


@pytest.fixture
def make_slide():
    return viz_slide
