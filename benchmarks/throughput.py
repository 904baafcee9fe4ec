r"""Training and inference throughput (slides/s) of the registered MIL models, batched over
B slides vs a one-slide-at-a-time loop over the same slides.

Synthetic slides are generated in memory: an elliptical tissue blob of about ``--patches``
patches at 20x (each slide's size drawn within +-25 %), with its 10x and 5x parents, grid
regions, the region kNN graph and the patch grid, as a graph built from feature files would
have. Collation (``Batch.from_data_list``) and the host -> device copy happen before timing:
the numbers are the models' own cost.

Example::

    python benchmarks/throughput.py --device cpu --models abmil transmil --patches 1000
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, List, Tuple

import numpy as np
import torch
from torch_geometric.data import Batch

from wsigraph.data.graph import build_slide_graph
from wsigraph.data.readers import SlideLevel
from wsigraph.models import build_model, list_models
from wsigraph.transforms import graph_transform

LEVELS = ((5.0, 1024), (10.0, 512), (20.0, 256))


def synthetic_slide(num_patches: int, dim: int, num_classes: int, seed: int):
    r"""One slide graph with about ``num_patches`` 20x patches in an elliptical blob."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(num_patches * 4 / np.pi))) + 1
    cols, rows = np.meshgrid(np.arange(side), np.arange(side))
    cells = np.stack([cols.ravel(), rows.ravel()], 1)
    centre = (side - 1) / 2
    radius = np.hypot(cells[:, 0] - centre, cells[:, 1] - centre)
    cells = cells[np.argsort(radius, kind="stable")[:num_patches]]  # the num_patches most central cells
    origin = rng.integers(0, 5000, size=2)
    levels = []
    for magnification, size in LEVELS:
        level_cells = np.unique(cells // (size // 256), axis=0)
        coords = level_cells * size + origin
        features = rng.standard_normal((len(coords), dim), dtype=np.float32)
        levels.append(SlideLevel(magnification, features, coords.astype(np.int64), float(size), "memory"))
    graph = build_slide_graph(levels, f"synthetic{seed}", f"case{seed}", label=int(rng.integers(num_classes)))
    return graph_transform({"regions": {"strategy": "grid", "grid_size": 8}, "region_knn": 8})(graph)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pair(first: Callable[[], None], second: Callable[[], None], repeats: int,
               device: torch.device) -> Tuple[float, float]:
    r"""Median seconds of two steps over ``repeats`` runs each, after one warm-up run each.

    The runs alternate, so that a change of load on a shared machine affects both alike.
    """
    times = ([], [])
    for repeat in range(repeats + 1):
        for step, record in ((first, times[0]), (second, times[1])):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if repeat:  # the first round warms up
                record.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def benchmark_model(name: str, graphs: List, batch_sizes: List[int], args, device: torch.device) -> List[dict]:
    torch.manual_seed(0)
    model = build_model(name, in_channels=args.dim, num_classes=args.classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def infer(data):
        with torch.no_grad():
            model(data)

    def train(data):
        optimizer.zero_grad(set_to_none=True)
        output = model(data)
        model.loss(output, data.y).backward()
        optimizer.step()

    rows = []
    for size in batch_sizes:
        slides = [graph.to(device) for graph in graphs[:size]]
        batch = Batch.from_data_list(graphs[:size]).to(device)
        for mode, step in (("train", train), ("infer", infer)):
            model.train(mode == "train")
            batched, loop = timed_pair(lambda: step(batch), lambda: [step(slide) for slide in slides],
                                       args.repeats, device)
            rows.append({"model": name, "B": size, "mode": mode, "batched": size / batched,
                         "loop": size / loop, "ratio": loop / batched})
            print(f"  {name:<10} B={size:<3} {mode:<5} batched {size / batched:9.1f} slides/s   "
                  f"loop {size / loop:9.1f} slides/s", file=sys.stderr, flush=True)
    return rows


def markdown(rows: List[dict]) -> str:
    lines = ["| model | B | mode | batched slides/s | loop slides/s | batched / loop |",
             "|---|---:|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['B']} | {row['mode']} | {row['batched']:.1f} | "
                     f"{row['loop']:.1f} | {row['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=None, help="registered names (default: all)")
    parser.add_argument("--patches", type=int, default=None,
                        help="approximate 20x patches per slide (default: 2000 on CPU, 4000 on GPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--dim", type=int, default=1024, help="feature size D")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    patches = args.patches or (4000 if device.type == "cuda" else 2000)
    names = args.models or list_models()
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        parser.error(f"unknown models {unknown}; registered: {list_models()}")

    rng = np.random.default_rng(args.seed)
    sizes = rng.integers(int(patches * 0.75), int(patches * 1.25) + 1, size=max(args.batch_sizes))
    start = time.perf_counter()
    graphs = [synthetic_slide(int(n), args.dim, args.classes, seed=args.seed + i) for i, n in enumerate(sizes)]
    print(f"built {len(graphs)} slides ({int(sizes.min())}-{int(sizes.max())} patches at 20x) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)

    rows = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    start = time.perf_counter()
    for name in names:
        rows.extend(benchmark_model(name, graphs, args.batch_sizes, args, device))
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={device.type} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"patches~{patches} D={args.dim} classes={args.classes} repeats={args.repeats} "
          f"time={time.perf_counter() - start:.0f}s load average (1 min) {load_before:.2f} -> {load_after:.2f}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
