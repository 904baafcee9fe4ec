import os
import warnings

import h5py
import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")

os.environ.setdefault("OMP_NUM_THREADS", "2")


def lattice(origin, step, cols, rows):
    xs, ys = np.meshgrid(np.arange(cols), np.arange(rows))
    return np.stack([xs.ravel(), ys.ravel()], 1) * step + np.asarray(origin)


def write_h5(path, features, coords, attrs=None, extra=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle["features"] = features
        handle["coords"] = coords
        for key, value in (attrs or {}).items():
            handle["coords"].attrs[key] = value
        for key, value in (extra or {}).items():
            handle[key] = value


@pytest.fixture
def write_slide(tmp_path):
    r"""Writes a regular 3-level slide (5x/10x/20x, TRIDENT layout) and returns the directories."""
    def write(slide_id, cols=8, rows=6, dim=4, seed=0, origin=(100, 60), drop_children=()):
        rng = np.random.default_rng(seed)
        top = lattice(origin, 256, cols, rows)
        keep = np.ones(len(top), bool)
        keep[list(drop_children)] = False
        top = top[keep]
        dirs = {}
        for mag, size in ((5, 1024), (10, 512), (20, 256)):
            cells = np.unique((top - np.asarray(origin)) // size, axis=0)
            coords = cells * size + np.asarray(origin)
            directory = tmp_path / f"{mag}x"
            write_h5(str(directory / f"{slide_id}.h5"), rng.normal(size=(len(coords), dim)).astype(np.float32),
                     coords.astype(np.int64), {"patch_size_level0": size, "patch_size": 256})
            dirs[mag] = directory
        return dirs
    return write


def nested_levels(cols, rows, origin, drop, seed, dim, scales=((5, 1024), (10, 512), (20, 256)), keep=None):
    r"""In-memory levels of a slide: a lattice at the last scale (``drop`` removed, or each patch
    kept with probability ``keep``) and its parents at the other scales."""
    from wsigraph.data.readers import SlideLevel
    rng = np.random.default_rng(seed)
    top = np.delete(lattice(origin, scales[-1][1], cols, rows), list(drop), axis=0)
    if keep is not None:
        top = top[rng.random(len(top)) < keep]
    levels = []
    for mag, size in scales:
        cells = np.unique((top - np.asarray(origin)) // size, axis=0)
        coords = cells * size + np.asarray(origin)
        levels.append(SlideLevel(float(mag), rng.normal(size=(len(coords), dim)).astype(np.float32),
                                 coords.astype(np.int64), float(size), f"{mag}x.h5"))
    return levels
