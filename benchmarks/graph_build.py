#!/usr/bin/env python
"""Graph-building time and peak memory vs patches per slide (3 levels, 5x/10x/20x).

Each size runs in a fresh process so that its peak resident memory (ru_maxrss) is its own.
Prints a markdown table: patches at 20x, seconds per step, total seconds, µs per patch, peak MiB.

    python benchmarks/graph_build.py --sizes 1000 10000 100000 200000
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_levels(num_patches: int, dim: int, seed: int = 0):
    import numpy as np
    from wsigraph.data.readers import SlideLevel
    rng = np.random.default_rng(seed)
    # A round tissue blob on a 20x lattice with a sub-patch origin offset, and ~3 % holes.
    side = int(np.ceil(np.sqrt(num_patches * 4 / np.pi))) + 2
    xs, ys = np.meshgrid(np.arange(side), np.arange(side))
    cells = np.stack([xs.ravel(), ys.ravel()], 1)
    distance = np.linalg.norm(cells - side / 2, axis=1)
    cells = cells[np.argsort(distance, kind="stable")[: int(num_patches * 1.03)]]
    cells = cells[rng.permutation(len(cells))[:num_patches]]
    origin = np.array([37, 91])
    levels = []
    for mag, size in ((5, 1024), (10, 512), (20, 256)):
        level_cells = np.unique(cells * 256 // size, axis=0)
        coords = (level_cells * size + origin).astype(np.int64)
        features = rng.standard_normal((len(coords), dim), dtype=np.float32)
        levels.append(SlideLevel(float(mag), features, coords, float(size), f"{mag}x"))
    return levels


def run_one(num_patches: int, dim: int, partition: str) -> dict:
    import torch
    from wsigraph.data.graph import build_slide_graph
    from wsigraph.transforms import graph_transform
    torch.set_num_threads(1)
    levels = make_levels(num_patches, dim)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    regions = {"grid": {"strategy": "grid", "grid_size": 8}, "sequential": {"strategy": "sequential"},
               "fixed_size": {"strategy": "fixed_size", "region_size": 256}}[partition]
    steps = graph_transform({"regions": regions}).transforms
    timings = {}
    start = time.perf_counter()
    data = build_slide_graph(levels, "bench")
    timings["zoom edges"] = time.perf_counter() - start
    for step in steps:
        t0 = time.perf_counter()
        data = step(data)
        timings[type(step).__name__] = time.perf_counter() - t0
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"patches": num_patches, "timings": timings, "total": total,
            "peak_mib": peak / 1024, "build_mib": (peak - base_rss) / 1024,
            "nodes": sum(data[t].num_nodes for t in data.node_types),
            "edges": sum(data[e].edge_index.size(1) for e in data.edge_types)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000, 100000, 200000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--partition", default="grid", choices=["grid", "sequential", "fixed_size"])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.dim, args.partition)))
        return
    rows = []
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(size), "--dim", str(args.dim),
                              "--partition", args.partition], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    steps = list(rows[0]["timings"])
    print("| patches (20x) | nodes | edges | " + " | ".join(f"{s} (s)" for s in steps)
          + " | total (s) | µs / patch | build memory (MiB) | peak RSS (MiB) |")
    print("|" + "---|" * (len(steps) + 7))
    for row in rows:
        cells = " | ".join(f"{row['timings'][s]:.3f}" for s in steps)
        print(f"| {row['patches']} | {row['nodes']} | {row['edges']} | {cells} | {row['total']:.3f} | "
              f"{1e6 * row['total'] / row['patches']:.1f} | {row['build_mib']:.0f} | {row['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
