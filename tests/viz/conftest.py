import numpy as np
import pytest

from wsigraph.data.graph import build_slide_graph
from wsigraph.data.readers import SlideLevel
from wsigraph.transforms import graph_transform

DIM = 8
NUM_CLASSES = 3


def _lattice(origin, step, cols, rows):
    xs, ys = np.meshgrid(np.arange(cols), np.arange(rows))
    return np.stack([xs.ravel(), ys.ravel()], 1) * step + np.asarray(origin)


def viz_slide(cols, rows, origin, drop, seed, label=0, levels=((5, 1024), (10, 512), (20, 256)), grid=3):
    r"""A small multi-level slide graph: a 20x lattice with holes, its 10x/5x parents, grid regions."""
    rng = np.random.default_rng(seed)
    finest = levels[-1][1]
    top = np.delete(_lattice(origin, finest, cols, rows), list(drop), axis=0)
    data = []
    for mag, size in levels:
        cells = np.unique((top - np.asarray(origin)) // size, axis=0)
        coords = cells * size + np.asarray(origin)
        data.append(SlideLevel(float(mag), rng.normal(size=(len(coords), DIM)).astype(np.float32),
                               coords.astype(np.int64), float(size), f"{mag}x.h5"))
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
