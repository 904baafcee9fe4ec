#!/usr/bin/env python
r"""ZoomMIL lazy inference vs full-graph inference, from feature files in the TRIDENT layout.

For synthetic slides of about 10k and 100k patches at the highest magnification (5x/10x/20x, an
elliptic tissue piece, so parents at the border miss children), the three feature files are
written like TRIDENT writes them (float32 ``features`` [N, D] and int64 ``coords`` [N, 2], one
chunk per row, resizable) to a temporary directory. Then, for an untrained ZoomMIL (K = 12):

* **full**: read every level with the library reader (:func:`wsigraph.data.read_slide`), build the
  slide graph (:func:`wsigraph.data.build_slide_graph`: geometric zoom edges) and evaluate;
* **lazy**: :meth:`ZoomMIL.lazy_forward` on an :class:`wsigraph.data.H5FeatureSource`, which
  reads the lowest level, the coordinates of every level (through the files' chunk index), and
  only the selected parents' children's feature rows; also with the coordinates read by plain
  h5py reads (one HDF5 chunk lookup per row);
* **lazy, coordinates known**: the same with the coordinates given (e.g. from the graph cache or
  the patching step), so only feature rows are read;
* **full, from the graph cache**: for reference, evaluating the slide graph already built and
  cached contiguously (``torch.save`` of the graph, as :class:`wsigraph.data.SlideGraphDataset`
  stores it) — the setting of training, where every slide is read once and cached.

Each is timed end to end (file open to logits) ``--repeats`` times with the page cache warm and
after dropping the files from it (``posix_fadvise(DONTNEED)``; a virtual machine's host cache may
still help); the median is reported. The lazy logits are checked to equal the full ones exactly.

    python benchmarks/zoommil_lazy.py [--sizes 10000 100000] [--dim 1024] [--k 12]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from wsigraph.data import H5FeatureSource, build_slide_graph, read_slide
from wsigraph.models import ZoomMIL

MAGNIFICATIONS = {5: 1024, 10: 512, 20: 256}  # level-0 patch side at a 20x scan


def tissue_cells(num_patches: int, seed: int) -> np.ndarray:
    r"""Lattice cells (20x) of an ellipse holding about ``num_patches`` cells."""
    rng = np.random.default_rng(seed)
    minor = np.sqrt(num_patches / (1.3 * np.pi))
    major = 1.3 * minor
    xs, ys = np.meshgrid(np.arange(int(2 * major) + 4), np.arange(int(2 * minor) + 4))
    cells = np.stack([xs.ravel(), ys.ravel()], 1)
    inside = ((cells[:, 0] - major - 1.5) / major) ** 2 + ((cells[:, 1] - minor - 1.5) / minor) ** 2 <= 1.0
    cells = cells[inside]
    drop = rng.choice(len(cells), size=max(0, len(cells) - num_patches), replace=False)
    return np.delete(cells, drop, axis=0)


def write_trident_h5(path: Path, features: np.ndarray, coords: np.ndarray, size: int, magnification: int) -> None:
    with h5py.File(path, "w") as handle:
        dim = features.shape[1]
        data = handle.create_dataset("features", shape=features.shape, dtype="float32", chunks=(1, dim),
                                     maxshape=(None, dim))
        data[...] = features
        dataset = handle.create_dataset("coords", shape=coords.shape, dtype="int64", chunks=(1, 2), maxshape=(None, 2))
        dataset[...] = coords
        dataset.attrs["patch_size"] = 256
        dataset.attrs["patch_size_level0"] = size
        dataset.attrs["target_magnification"] = magnification
        dataset.attrs["level0_magnification"] = 20


def write_slide(root: Path, slide_id: str, num_patches: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    high = tissue_cells(num_patches, seed) * 256 + np.array([113, 57])
    dirs, counts = {}, {}
    for magnification, size in MAGNIFICATIONS.items():
        cells = np.unique((high - np.array([113, 57])) // size, axis=0)
        cells = cells[np.lexsort((cells[:, 0], cells[:, 1]))]  # raster order, as extraction writes them
        coords = (cells * size + np.array([113, 57])).astype(np.int64)
        features = rng.standard_normal((len(coords), dim), dtype=np.float32)
        directory = root / f"{magnification}x"
        directory.mkdir(parents=True, exist_ok=True)
        write_trident_h5(directory / f"{slide_id}.h5", features, coords, size, magnification)
        dirs[magnification] = directory
        counts[magnification] = len(coords)
    return dirs, counts


def drop_cache(dirs, slide_id: str, suffix: str = ".h5") -> None:
    for directory in dirs.values():
        path = Path(directory) / f"{slide_id}{suffix}"
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_full(model, dirs, slide_id):
    start = time.perf_counter()
    levels = read_slide(slide_id, dirs)
    read = time.perf_counter()
    graph = build_slide_graph(levels, slide_id)
    built = time.perf_counter()
    with torch.no_grad():
        logits = model(graph).logits
    done = time.perf_counter()
    rows = sum(level.num_patches for level in levels)
    nbytes = sum(level.features.nbytes for level in levels)
    return logits, done - start, {"read": read - start, "build": built - read, "model": done - built,
                                  "rows": rows, "bytes": nbytes, "coord_rows": rows}


def run_cached(model, path):
    start = time.perf_counter()
    graph = torch.load(path, map_location="cpu", weights_only=False)["data"]
    loaded = time.perf_counter()
    with torch.no_grad():
        logits = model(graph).logits
    done = time.perf_counter()
    rows = sum(graph[level].num_nodes for level in graph.levels)
    nbytes = sum(graph[level].x.numel() * graph[level].x.element_size() for level in graph.levels)
    return logits, done - start, {"load": loaded - start, "model": done - loaded, "rows": rows, "bytes": nbytes,
                                  "coord_rows": rows}


def run_lazy(model, dirs, slide_id, coords=None, chunk_index=True):
    start = time.perf_counter()
    with H5FeatureSource(dirs, slide_id, coords=coords, chunk_index=chunk_index) as source:
        for level in source.levels():
            source.coords(level)
        linked = time.perf_counter()
        result = model.lazy_forward(source)
    done = time.perf_counter()
    stats = result.stats
    return result.logits, done - start, {"coords": linked - start, "rest": done - linked,
                                         "rows": stats.total_feature_rows, "bytes": stats.total_feature_bytes,
                                         "coord_rows": sum(stats.coord_rows.values()),
                                         "per_level": dict(stats.feature_rows)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ZoomMIL(args.dim, 3, k=args.k).eval()

    print(f"torch {torch.__version__}, h5py {h5py.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), D = {args.dim}, K = {args.k}, median of {args.repeats}")
    header = ("| 20x patches (5x / 10x / 20x) | path | page cache | feature rows read | feature MB read "
              "| coordinate rows read | time (s) | split (s) | speed-up vs full |")
    lines = [header, "|" + "---|" * 9]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            slide_id = f"slide_{size}"
            dirs, counts = write_slide(Path(tmp), slide_id, size, args.dim, seed=size)
            known = {mag: read_slide(slide_id, {mag: dirs[mag]})[0].coords for mag in dirs}
            cache_path = Path(tmp) / f"{slide_id}.pt"
            torch.save({"key": "benchmark", "data": build_slide_graph(read_slide(slide_id, dirs), slide_id)}, cache_path)
            reference = None
            for cache in ("warm", "cold"):
                times = {}
                for name, runner in (("full", lambda: run_full(model, dirs, slide_id)),
                                     ("lazy", lambda: run_lazy(model, dirs, slide_id)),
                                     ("lazy, coordinates by plain h5py reads",
                                      lambda: run_lazy(model, dirs, slide_id, chunk_index=False)),
                                     ("lazy, coordinates known", lambda: run_lazy(model, dirs, slide_id, known)),
                                     ("full, from the graph cache", lambda: run_cached(model, cache_path))):
                    samples = []
                    if cache == "warm":
                        runner()  # fill the page cache
                    for _ in range(args.repeats):
                        if cache == "cold":
                            drop_cache(dirs, slide_id)
                            drop_cache({"cache": Path(tmp)}, slide_id, suffix=".pt")
                        logits, seconds, info = runner()
                        samples.append((seconds, info))
                        if reference is None:
                            reference = logits
                        elif not torch.equal(logits, reference):
                            raise AssertionError(f"{name} logits differ from the full graph's: {logits} vs {reference}")
                    seconds = statistics.median(s for s, _ in samples)
                    info = min(samples, key=lambda s: abs(s[0] - seconds))[1]
                    times[name] = seconds
                    if name == "full":
                        split = f"read {info['read']:.3f}, graph {info['build']:.3f}, model {info['model']:.3f}"
                    elif "load" in info:
                        split = f"load {info['load']:.3f}, model {info['model']:.3f}"
                    else:
                        split = f"coords {info['coords']:.3f}, rest {info['rest']:.3f}"
                    speedup = times["full"] / seconds
                    level_counts = " / ".join(f"{counts[m]:,}" for m in MAGNIFICATIONS)
                    rows = f"{info['rows']:,}"
                    if "per_level" in info:
                        rows += " (" + " + ".join(f"{v:,}" for v in info["per_level"].values()) + ")"
                    lines.append(f"| {level_counts} | {name} | {cache} | {rows} | {info['bytes'] / 2**20:.1f} "
                                 f"| {info['coord_rows']:,} | {seconds:.3f} | {split} | {speedup:.1f}x |")
                    print(lines[-1], flush=True)
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
