#!/usr/bin/env python
r"""Share of M2OTCA's forward pass spent in the OT cross-attention step (FLOPs and time).

The paper reports that the OT step adds < 0.5 % (0.04 % of a single-magnification ABMIL) in
FLOPs. For slides of a given size (20x / 10x / 5x patches on a regular lattice, sequential
regions m = 30, prototype size d = 256) this measures:

* FLOPs of the whole forward with :class:`torch.utils.flop_counter.FlopCounterMode` (it counts
  matrix products only: linear layers, ``bmm``, also those of the Grad-CAM ``autograd.grad``),
  plus, for the OT step, its element-wise work counted analytically, since the counter ignores
  ``exp``/``logsumexp``/``sqrt``: per lower level and slide with :math:`m \times m'` prototypes,
  :math:`m m' (3d + 1)` for the Euclidean cost, :math:`2 m m'` for its normalisation,
  :math:`12\,m m'` per Sinkhorn iteration (two log-sum-exp passes of about five operations per
  entry plus the potential additions), :math:`3 m m'` for the final plan and :math:`2 m m'` for
  the row normalisation; the transport product (:math:`2 m m' d`) is counted by the counter.
  The rest of the model's element-wise work (tanh, sigmoid, softmax) is *not* added, which makes
  the reported OT share an overestimate.
* time: the OT calls (forward hooks on ``model.transport``, both lower levels) against the whole
  forward, summed over many repeats, in evaluation (``torch.no_grad``) and in a training-mode
  forward; likewise the Grad-CAM step.

    python benchmarks/m2otca_overhead.py [--repeats 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from wsigraph.data.graph import build_slide_graph
from wsigraph.data.readers import SlideLevel
from wsigraph.models import build_model
from wsigraph.transforms import graph_transform


def make_slide(side: int, dim: int, seed: int = 0):
    r"""A square tissue of ``side``² 20x patches and its 10x and 5x parents."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(side), np.arange(side))
    top = np.stack([xs.ravel(), ys.ravel()], 1) * 256 + np.array([13, 7])
    levels = []
    for mag, size in ((5, 1024), (10, 512), (20, 256)):
        cells = np.unique((top - np.array([13, 7])) // size, axis=0)
        coords = cells * size + np.array([13, 7])
        levels.append(SlideLevel(float(mag), rng.normal(size=(len(coords), dim)).astype(np.float32),
                                 coords.astype(np.int64), float(size), f"{mag}x.h5"))
    graph = build_slide_graph(levels, "bench", "bench", label=0)
    return graph_transform({"regions": {"strategy": "sequential", "num_regions": 30}, "region_knn": 8,
                            "patch_grid": False})(graph)


class _GlobalOnly:
    r"""Stand-in for FlopCounterMode's module tracker: its per-module backward hooks do not
    support ``torch.autograd.grad`` on a leaf (the Grad-CAM step in evaluation), and only the
    global total is needed here."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def flop_counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    return counter


def ot_elementwise_flops(m: int, n: int, d: int, iterations: int) -> int:
    return m * n * ((3 * d + 1) + 2 + 12 * iterations + 3 + 2)


class Stopwatch:
    r"""Wall time spent inside a module's forward, via forward hooks."""

    def __init__(self, module):
        self.total = 0.0
        self.calls = 0
        self._start = None
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.total += time.perf_counter() - self._start
        self.calls += 1

    def reset(self):
        self.total, self.calls = 0.0, 0


def timed(model, graph, repeats: int, train: bool):
    ot_clock, cam_clock = Stopwatch(model.transport), Stopwatch(model.gradcam)
    model.train(train)
    context = torch.enable_grad if train else torch.no_grad
    with context():
        for _ in range(3):
            model(graph)
        ot_clock.reset()
        cam_clock.reset()
        total = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            model(graph)
            total += time.perf_counter() - start
    return total / repeats, ot_clock.total / repeats, cam_clock.total / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="32x512,64x512,128x1024",
                        help="comma-separated <20x side>x<feature dim> (side² 20x patches)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats")
    rows = []
    for spec in args.sizes.split(","):
        side, dim = (int(v) for v in spec.split("x"))
        graph = make_slide(side, dim)
        torch.manual_seed(0)
        model = build_model("m2otca", in_channels=dim, num_classes=2).eval()
        abmil = build_model("abmil", in_channels=dim, num_classes=2).eval()
        m = graph["region"].num_nodes
        d = model.prototype_channels
        iterations = model.transport.num_iterations
        with torch.no_grad():
            with flop_counter() as counter:
                model(graph)
            total_counted = counter.get_total_flops()
            with flop_counter() as counter:
                abmil(graph)
            abmil_flops = counter.get_total_flops()
            # The OT step alone, on the model's own prototypes.
            slots = model.prototype_slots(graph)
            protos = {level: model.encoders[i](graph[level].x, slots.slot[level], slots.size)[0].view(1, slots.size, -1)
                      for i, level in enumerate(model.input_levels(graph))}
            with flop_counter() as counter:
                for level in ("patch_5x", "patch_10x"):
                    model.transport(protos["patch_20x"], protos[level], slots.mask["patch_20x"], slots.mask[level])
            ot_counted = counter.get_total_flops()
        ot_analytic = sum(ot_elementwise_flops(int(slots.mask["patch_20x"].sum()), int(slots.mask[level].sum()), d,
                                               iterations) for level in ("patch_5x", "patch_10x"))
        ot_flops = ot_counted + ot_analytic
        model_flops = total_counted + ot_analytic
        eval_total, eval_ot, eval_cam = timed(model, graph, args.repeats, train=False)
        train_total, train_ot, train_cam = timed(model, graph, args.repeats, train=True)
        rows.append((f"{graph['patch_20x'].num_nodes} / {graph['patch_10x'].num_nodes} / {graph['patch_5x'].num_nodes}",
                     dim, m, model_flops / 1e9, ot_flops / 1e6, 100 * ot_flops / model_flops,
                     100 * ot_flops / abmil_flops, eval_total * 1e3, eval_ot * 1e3, 100 * eval_ot / eval_total,
                     100 * eval_cam / eval_total, train_total * 1e3, 100 * train_ot / train_total))
    print()
    print("| patches 20x / 10x / 5x | D | m | model GFLOP | OT MFLOP | OT % model FLOPs | OT % ABMIL-20x FLOPs "
          "| eval fwd ms | OT ms | OT % eval time | Grad-CAM % eval time | train fwd ms | OT % train fwd time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| {} | {} | {} | {:.2f} | {:.2f} | {:.3f} | {:.3f} | {:.1f} | {:.2f} | {:.2f} | {:.2f} | {:.1f} | {:.2f} |"
              .format(*row))


if __name__ == "__main__":
    main()
