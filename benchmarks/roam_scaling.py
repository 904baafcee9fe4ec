r"""ROAM inference cost vs patches per slide: the routing (GraphSAGE context + graph-smoothed
Sinkhorn + top-k dispatch) runs on at most G x G region tokens, so once the regions are formed
its time should not grow with the number of patches (the paper's O(R E) routing claim), while
the patch projection and the region pooling grow linearly.

One synthetic slide per size: a square-ish lattice of ``N`` 20x patches with random features,
grid regions (G = 8, so R <= 64) and the region kNN graph (k = 8), built before timing. Each
stage is timed on its own, with the model's own layers, in evaluation mode without gradients
(median of ``--repeats`` runs after ``--warmup`` runs):

* ``projection``: :math:`h = \mathrm{ReLU}(W_p x)` over the N patches;
* ``region pooling``: the scatter-mean of :math:`h` along the membership edges;
* ``routing``: context GNN + cost + Sinkhorn + top-k dispatch on the R region tokens;
* ``experts + fusion``: per-expert attention pooling, fusion and classifier;
* ``forward``: the whole ``model(graph)``.

Example::

    python benchmarks/roam_scaling.py --sizes 1000 10000 50000 200000 --dim 1024
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import numpy as np
import torch

import wsigraph.data  # noqa: F401  (import order: the transforms need the data package)
from wsigraph.data.graph import build_slide_graph
from wsigraph.data.readers import SlideLevel
from wsigraph.data.schema import REGION, REGION_GRAPH, region_of_patch
from wsigraph.models import build_model
from wsigraph.transforms import graph_transform

TOP = "patch_20x"


def lattice_slide(num_patches: int, dim: int, seed: int = 0):
    r"""One slide with ``num_patches`` 20x patches on a square-ish lattice, grid regions (G = 8)
    and the region kNN graph (k = 8)."""
    rng = np.random.default_rng(seed)
    cols = int(np.ceil(np.sqrt(num_patches)))
    cells = np.stack(np.divmod(np.arange(num_patches), cols)[::-1], 1)
    coords = (cells * 256 + rng.integers(0, 5000, size=2)).astype(np.int64)
    features = rng.standard_normal((num_patches, dim), dtype=np.float32)
    graph = build_slide_graph([SlideLevel(20.0, features, coords, 256.0, "memory")], f"s{num_patches}",
                              f"c{num_patches}", label=0)
    config = {"regions": {"strategy": "grid", "grid_size": 8}, "region_knn": 8, "patch_grid": False}
    return graph_transform(config)(graph)


def median_time(function: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_times(model, graph, device, repeats, warmup) -> Dict[str, float]:
    x = graph[TOP].x
    region = region_of_patch(graph, TOP)
    num_regions = graph[REGION].num_nodes
    edge_index = graph[REGION_GRAPH].edge_index
    edge_weight = graph[REGION_GRAPH].edge_weight
    region_batch = torch.zeros(num_regions, dtype=torch.long, device=device)
    h = model.projection(x)
    content, mass = model.region_pooling(h, region, dim_size=num_regions, return_mass=True)

    def route():
        z = model.context(content, edge_index)
        return model.router(z, mass, region_batch, edge_index, edge_weight, num_graphs=1)

    routing = route()

    def experts():
        pooled = model.expert_pooling(content, region_batch, dim_size=1, dispatch=routing.dispatch)
        fused, _ = model.fusion(pooled.out, pooled.mask)
        return model.classifier(fused)

    return {
        "projection": median_time(lambda: model.projection(x), device, repeats, warmup),
        "region pooling": median_time(
            lambda: model.region_pooling(h, region, dim_size=num_regions, return_mass=True),
            device, repeats, warmup),
        "routing": median_time(route, device, repeats, warmup),
        "experts + fusion": median_time(experts, device, repeats, warmup),
        "forward": median_time(lambda: model(graph), device, repeats, warmup),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 50000, 100000, 200000])
    parser.add_argument("--dim", type=int, default=1024, help="patch feature size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("roam", in_channels=args.dim, num_classes=2).to(device).eval()

    rows = []
    for size in args.sizes:
        start = time.perf_counter()
        graph = lattice_slide(size, args.dim).to(device)
        build = time.perf_counter() - start
        with torch.no_grad():
            times = stage_times(model, graph, device, args.repeats, args.warmup)
        rows.append((size, graph[REGION].num_nodes, build, times))
        print(f"# {size} patches done", flush=True)

    stages = list(rows[0][3])
    print(f"\ndevice {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"feature dim {args.dim}, E = 8, k = 2, T = 10, S = 3; times in ms (median of {args.repeats})\n")
    print("| patches | regions | graph build (s) | " + " | ".join(stages) + " | routing share of forward |")
    print("|---:|---:|---:|" + "---:|" * len(stages) + "---:|")
    for size, regions, build, times in rows:
        cells = " | ".join(f"{1000 * times[stage]:.2f}" for stage in stages)
        share = times["routing"] / times["forward"]
        print(f"| {size} | {regions} | {build:.2f} | {cells} | {100 * share:.1f} % |")
    first, last = rows[0][3], rows[-1][3]
    print(f"\nratio {rows[-1][0]} / {rows[0][0]} patches: routing {last['routing'] / first['routing']:.2f}x, "
          f"region pooling {last['region pooling'] / first['region pooling']:.1f}x, "
          f"forward {last['forward'] / first['forward']:.1f}x")


if __name__ == "__main__":
    main()
