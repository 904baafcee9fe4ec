#!/usr/bin/env python
r"""Where ZoomMIL zooms on the synthetic cohort: the share of selected patches that contain lesion.

ZoomMIL (``configs/zoommil.yaml``; variants: the full estimator, ZoomMIL-EFF on 10x -> 20x) is
trained with patient-level cross-validation on the synthetic cohort (lesions strong at 20x,
diluted at 5x; every patch carries its ground truth ``lesion``, a parent being a lesion patch
when any of its children is). Every fold's best checkpoint is then evaluated (hard top-K) on its
test slides, and on the held-out slides *with lesions*, per level of the model, we count

* below the last level: the share of the selected patches that are lesion patches (at the
  lowest level: contain lesion children), against the share expected by chance within the
  level's bag (a uniform random choice among the patches the model could select: every patch of
  the lowest level, the children of the previous selection above) and within the slide;
* at the last level: the share of lesion patches among the patches reached (zoomed into);

pooled over slides (lesion patches / patches; chance = the count-weighted mean of the per-slide
shares). The same numbers for the untrained model (initial weights) are the control. Also writes
a zoom-selection map of one held-out lesion slide.

Example::

    python benchmarks/zoommil_report.py --num-slides 160 --folds 3 --epochs 25 --k 6 --lr 5e-4 \
        --batch-size 4 --hidden 128 --attention 64 --root runs/zoommil_report
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

import wsigraph.data  # noqa: F401  (import order: the transforms need the data package)
from wsigraph.data.builder import dataset_from_config
from wsigraph.train import cross_validate, load_experiment_config, model_from_config
from wsigraph.viz import fold_slide_ids, load_fold_model, plot_slide_maps

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "zoommil.yaml"
FIGURE = Path(__file__).resolve().parent / "figures" / "zoommil_selection.png"
LEVELS = ("patch_5x", "patch_10x", "patch_20x")


VARIANTS = {
    "zoommil": ("ZoomMIL 5x-10x-20x, diagonal estimator", {}),
    "full": ("ZoomMIL 5x-10x-20x, full estimator", {"model.estimator": "full"}),
    "eff": ("ZoomMIL-EFF 10x-20x", {"model.num_levels": 2}),
}


def experiment_config(args, variant: str) -> Dict:
    overrides = [f"{key}={value}" for key, value in VARIANTS[variant][1].items()] + [
        f"data.root={args.root / 'data'}", f"run.dir={args.root / variant}", f"run.folds={args.folds}",
        f"train.epochs={args.epochs}", f"train.lr={args.lr}", f"train.batch_size={args.batch_size}",
        f"model.k={args.k}", f"model.hidden_channels={args.hidden}", f"model.attention_channels={args.attention}",
        f"data.synthetic.num_slides={args.num_slides}", "train.bootstrap=0", "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu"]
    return load_experiment_config(CONFIG, overrides)


@torch.no_grad()
def localisation(model, graphs) -> List[Dict[str, float]]:
    r"""Per level of the model, pooled over the slides ``graphs``: the share of lesion patches among
    the patches selected (levels below the last) or reached (the last level), the share expected
    by chance within the level's bag (all patches of the lowest level; the children of the
    previous selection above) and within the slide (each slide's share weighted by its count)."""
    model.eval()
    levels = model.resolve_levels([t for t in graphs[0].node_types if t.startswith("patch_")])
    levels = sorted(levels, key=LEVELS.index)
    rows = []
    for depth, level in enumerate(levels):
        chosen_name = "selected" if depth < len(levels) - 1 else "reached"
        picked, hits, bag_share, slide_share = [], [], [], []
        for graph in graphs:
            out = model(graph).interpretation[level]
            lesion = graph[level].lesion.bool()
            chosen = out[chosen_name]
            bag = out["reached"] if depth > 0 else torch.ones_like(lesion)
            picked.append(int(chosen.sum()))
            hits.append(int(lesion[chosen].sum()))
            bag_share.append(float(lesion[bag].float().mean()) if bag.any() else 0.0)
            slide_share.append(float(lesion.float().mean()))
        weights = np.asarray(picked, dtype=np.float64)
        rows.append({"level": level, "what": chosen_name, "patches": int(weights.sum()),
                     "share": float(np.sum(hits) / max(weights.sum(), 1)),
                     "bag": float(np.dot(bag_share, weights) / max(weights.sum(), 1)),
                     "slide": float(np.dot(slide_share, weights) / max(weights.sum(), 1))})
    return rows


def pooled_localisation(models_and_graphs) -> List[Dict[str, float]]:
    r""":func:`localisation` of several (model, slides) pairs (the folds), pooled by patch counts."""
    per_fold = [localisation(model, graphs) for model, graphs in models_and_graphs if graphs]
    rows = []
    for level_rows in zip(*per_fold):
        weights = np.asarray([r["patches"] for r in level_rows], dtype=np.float64)
        row = dict(level_rows[0])
        row["patches"] = int(weights.sum())
        for key in ("share", "bag", "slide"):
            row[key] = float(np.dot([r[key] for r in level_rows], weights) / max(weights.sum(), 1))
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs/zoommil_report"))
    parser.add_argument("--num-slides", type=int, default=60, help="slides of the synthetic cohort (demo: 60)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--attention", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="zoommil,full,eff",
                        help="comma-separated among: zoommil (3 levels, diagonal estimator), full (3 levels, "
                             "full estimator), eff (ZoomMIL-EFF: 10x -> 20x)")
    parser.add_argument("--figure", type=Path, default=FIGURE)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results, figure_slide = {}, None
    for variant in args.variants.split(","):
        config = experiment_config(args, variant)
        start = time.perf_counter()
        summary = cross_validate(config, verbose=True)
        train_seconds = time.perf_counter() - start
        run_dir = Path(config["run"]["dir"])
        dataset = dataset_from_config(config, progress=False)
        position = {s: i for i, s in enumerate(dataset.slide_ids)}
        trained = []
        for fold in range(args.folds):
            model = load_fold_model(run_dir, fold)
            graphs = [dataset[position[s]] for s in fold_slide_ids(run_dir, fold, "test")]
            trained.append((model, [g for g in graphs if int(g.y) > 0]))
        if figure_slide is None and variant == "zoommil" and trained[0][1]:
            figure_slide = (trained[0][0], max(trained[0][1], key=lambda g: float(g["patch_5x"].lesion.float().mean())))
        torch.manual_seed(int(config["run"]["seed"]))
        untrained = model_from_config(config["model"], in_channels=trained[0][0].in_channels,
                                      num_classes=trained[0][0].num_classes)
        results[variant] = {
            "auc_mean": summary["mean"]["test_auc"], "auc_std": summary["std"]["test_auc"],
            "train_seconds": round(train_seconds, 1), "slides": sum(len(g) for _, g in trained),
            "trained": pooled_localisation(trained),
            "untrained": pooled_localisation([(untrained, [g for _, graphs in trained for g in graphs])])}

    args.root.mkdir(parents=True, exist_ok=True)
    (args.root / "zoommil_report.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"ZoomMIL on the synthetic cohort ({args.num_slides} slides): {args.folds}-fold CV, {args.epochs} epochs, "
          f"K = {args.k}, lr {args.lr:g}, batch {args.batch_size}, widths {args.hidden}/{args.attention}; "
          f"statistics on the held-out lesion slides of every fold")
    print("| variant (test AUC, mean ± std over folds) | weights | level | patches | with lesion | chance in the bag "
          "| chance in the slide | lift over the bag | lift over the slide |")
    print("|" + "---|" * 9)
    for variant, result in results.items():
        name = f"{VARIANTS[variant][0]} ({result['auc_mean']:.3f} ± {result['auc_std']:.3f})"
        for weights in ("trained", "untrained"):
            for row in result[weights]:
                over_bag = row["share"] / row["bag"] if row["bag"] > 0 and row["what"] == "selected" else float("nan")
                over_slide = row["share"] / row["slide"] if row["slide"] > 0 else float("nan")
                bag = f"{row['bag']:.3f}" if row["what"] == "selected" else "—"
                print(f"| {name} | {weights} | {row['level']} {row['what']} | {row['patches']} | {row['share']:.3f} "
                      f"| {bag} | {row['slide']:.3f} | {'—' if np.isnan(over_bag) else f'{over_bag:.2f}'} "
                      f"| {over_slide:.2f} |")

    if figure_slide is not None:
        model, graph = figure_slide
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            output = model.eval()(graph)
        plot_slide_maps(graph, output, args.figure,
                        names=["patch_5x/selected", "patch_10x/selected", "patch_20x/reached", "patch_20x/attention"],
                        attributes=["lesion"], merge_levels=False, class_names=["no lesion", "lesion"], columns=4,
                        panel_size=3.0)
        print(f"\nzoom-selection map of {graph.slide_id} (ZoomMIL, fold 0): {args.figure}")


if __name__ == "__main__":
    main()
