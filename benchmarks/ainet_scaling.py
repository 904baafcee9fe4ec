r"""AINet's cost against the number of patches per slide, next to TransMIL.

For every bag size N (one slide, 1024-d features, a full rectangular lattice split into
``fixed_size`` regions of 256 patches in raster order — what :class:`FixedSizeRegions` builds for
it), one training step (forward + backward of the loss) is timed, and its peak memory measured,
in a fresh Python process per (model, N):

* CPU: the peak resident set size of the process during the step minus its resident size just
  before it. The kernel's high-water mark (``VmHWM``) is reset right before the step by writing
  ``5`` to ``/proc/self/clear_refs`` (Linux), so earlier peaks (imports, input creation) do not
  hide the step's; ``tracemalloc`` cannot see torch's allocations. It includes everything the
  step allocates: activations kept for backward, gradients, and the allocator's slack.
* GPU (when available): ``torch.cuda.max_memory_allocated`` around the step.

Time: the process CPU time of the step with one intra-op thread (``--threads 1``), i.e. the work
done, which a shared machine does not inflate; the wall time is printed beside it. The fastest
of ``--repeats`` steps counts (one step above ``--repeat-limit`` patches, 50k by default), after a
warm-up step on a small bag.

FLOPs of one forward pass are counted with :class:`torch.utils.flop_counter.FlopCounterMode`; its
registry has no entry for the CPU fused attention kernel, so this script adds the standard
scaled-dot-product formula for it (the count is then the same as on a GPU).

    python benchmarks/ainet_scaling.py                       # full table
    python benchmarks/ainet_scaling.py --sizes 1000 10000    # chosen sizes
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch
from torch.utils import flop_counter
from torch_geometric.data import HeteroData

DIM = 1024
REGION_SIZE = 256
LEVEL = "patch_20x"
MODELS = {
    "ainet": ("ainet", {}),
    "ainet_slide_top64": ("ainet", {"anchor_scope": "slide", "num_anchors": 64}),
    "transmil": ("transmil", {}),
}


def make_slide(num_patches: int, dim: int = DIM, seed: int = 0) -> HeteroData:
    r"""One slide: a raster-ordered lattice of ``num_patches`` patches, regions of 256 consecutive
    patches, a region graph is not needed (ARC's default adjacency is the region order)."""
    generator = torch.Generator().manual_seed(seed)
    cols = max(1, int(round(num_patches ** 0.5)))
    index = torch.arange(num_patches)
    data = HeteroData()
    store = data[LEVEL]
    store.x = torch.randn(num_patches, dim, generator=generator)
    store.pos = torch.stack([index % cols, index // cols], dim=1).float() * 256
    store.patch_size = 256.0
    store.magnification = 20.0
    region = index // REGION_SIZE
    num_regions = int(region[-1]) + 1
    data["region"].num_nodes = num_regions
    data["region"].mass = torch.bincount(region).float()
    data["region"].pos = torch.zeros(num_regions, 2).index_add_(0, region, store.pos) / data["region"].mass[:, None]
    data[LEVEL, "belongs_to", "region"].edge_index = torch.stack([index, region])
    data.y = torch.tensor([1])
    return data


def build(name: str, dim: int = DIM):
    from wsigraph.models import build_model
    registered, options = MODELS[name]
    torch.manual_seed(0)
    return build_model(registered, in_channels=dim, num_classes=2, **options)


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(model, data, backward: bool = False) -> int:
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        if backward:
            model.train()
            output = model(data)
            model.loss(output, data.y).backward()
        else:
            model.eval()
            with torch.no_grad():
                model(data)
    return counter.get_total_flops()


def parameters(model, skip=()) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(tuple(skip)))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def measure_one(name: str, num_patches: int, repeats: int, threads: int) -> dict:
    r"""Time and peak memory of forward + backward, in this (fresh) process."""
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = build(name).to(device).train()
    # Warm up kernels and thread pools on a small bag, so their one-off allocations are not counted.
    small = make_slide(600).to(device)
    model.loss(model(small), small.y.to(device)).backward()
    model.zero_grad(set_to_none=True)
    del small
    data = make_slide(num_patches).to(device)
    times, cpu_times, peak = [], [], 0.0
    for step in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _reset_peak()
            before = _status_mib("VmRSS")
        start, start_cpu = time.perf_counter(), time.process_time()
        output = model(data)
        model.loss(output, data.y.to(device)).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
        if step == 0:
            if cuda:
                peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
            else:
                peak = _status_mib("VmHWM") - before
        model.zero_grad(set_to_none=True)
        del output
    # The machine is shared: the fastest repeat is the least disturbed one.
    return {"model": name, "patches": num_patches, "seconds": min(times), "cpu_seconds": min(cpu_times),
            "peak_mib": peak,
            "device": "cuda" if cuda else "cpu", "threads": threads}


def run_isolated(name: str, num_patches: int, repeats: int, threads: int, timeout: float) -> dict:
    command = [sys.executable, __file__, "--one", name, str(num_patches), "--repeats", str(repeats),
               "--threads", str(threads)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"model": name, "patches": num_patches, "seconds": float("nan"), "peak_mib": float("nan"),
                "note": f"> {timeout:.0f} s"}
    except subprocess.CalledProcessError as error:
        tail = (error.stderr or "").strip().splitlines()[-1:] or ["failed"]
        return {"model": name, "patches": num_patches, "seconds": float("nan"), "peak_mib": float("nan"),
                "note": tail[0][:80]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--transmil-max", type=int, default=10000,
                        help="largest bag for TransMIL (its exact attention is O(N^2) in time)")
    parser.add_argument("--flop-sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; with 1, the process CPU time is the work done, even on a "
                             "shared machine")
    parser.add_argument("--repeat-limit", type=int, default=50000,
                        help="bags larger than this are stepped once (no repeats)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.repeats, args.threads)))
        return

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, features {DIM}-d, regions of {REGION_SIZE} patches\n")

    # Parameters and FLOPs on the same inputs.
    print("| model | params (D=1024) | params (D=512) | " +
          " | ".join(f"fwd GFLOPs N={n}" for n in args.flop_sizes) + " | fwd GFLOPs / 1k patches (largest N) |")
    print("|---|---|---|" + "---|" * len(args.flop_sizes) + "---|")
    for name in args.models:
        model = build(name)
        skip = ("decoder",) if name.startswith("ainet") else ()
        counts = [count_flops(model, make_slide(n)) / 1e9 for n in args.flop_sizes]
        small = build(name, dim=512)
        note = " (+ decoder {:.3f} M in training)".format(parameters(model) / 1e6 - parameters(model, skip) / 1e6) \
            if skip else ""
        print(f"| {name} | {parameters(model, skip) / 1e6:.3f} M{note} | {parameters(small, skip) / 1e6:.3f} M | " +
              " | ".join(f"{c:.2f}" for c in counts) + f" | {counts[-1] / args.flop_sizes[-1] * 1000:.3f} |")
    print()

    # Time and peak memory of one training step.
    print("| model | patches | fwd+bwd CPU time (s) | wall time (s) | peak memory (MiB) | CPU time / 1k patches (ms) "
          "| memory / 1k patches (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for n in args.sizes:
            if name == "transmil" and n > args.transmil_max:
                continue
            repeats = args.repeats if n <= args.repeat_limit else 1
            row = run_isolated(name, n, repeats, args.threads, args.timeout)
            note = f" {row['note']}" if "note" in row else ""
            cpu = row.get("cpu_seconds", float("nan"))
            print(f"| {name} | {n} | {cpu:.3f}{note} | {row['seconds']:.3f} | {row['peak_mib']:.0f} | "
                  f"{cpu / n * 1e6:.2f} | {row['peak_mib'] / n * 1000:.2f} |", flush=True)


if __name__ == "__main__":
    main()
