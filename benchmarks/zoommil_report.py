#!/usr/bin/env python
r"""Where ZoomMIL zooms on the synthetic cohort: the share of selected patches that contain lesion.

ZoomMIL (``configs/zoommil.yaml``) is trained with patient-level cross-validation on the synthetic
cohort (lesions strong at 20x, diluted at 5x; every patch carries its ground truth ``lesion``, a
parent being a lesion patch when any of its children is). Every fold's best checkpoint is then
evaluated (hard top-K) on its test slides, and on the test slides *with lesions* we count

* at 5x: the share of the K selected patches that contain lesion children, against the share
  expected by chance, the slide's share of 5x lesion patches (a uniform random choice of K);
* at 10x: the share of the selected patches among the children of the 5x selection that are
  lesion patches, against chance within that bag (the share of lesion patches among the
  children reached) and across the slide;
* at 20x: the share of lesion patches among the patches reached (the zoomed-in children);

pooled over slides (selected lesion patches / selected patches; chance = the selection-count
weighted mean of the per-slide shares). The same numbers for the untrained model (initial weights,
same seed) are the control. Also writes a zoom-selection map of one held-out lesion slide.

Example::

    python benchmarks/zoommil_report.py --folds 3 --epochs 20 --k 4 --root runs/zoommil_report
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


def experiment_config(args) -> Dict:
    overrides = [f"data.root={args.root / 'data'}", f"run.dir={args.root / 'zoommil'}", f"run.folds={args.folds}",
                 f"train.epochs={args.epochs}", f"train.lr={args.lr}", f"model.k={args.k}", "train.bootstrap=0",
                 "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]
    return load_experiment_config(CONFIG, overrides)


def _counts() -> Dict[str, List[float]]:
    return {key: [] for key in ("sel5", "hit5", "chance5", "sel10", "hit10", "bag10", "chance10", "reached20",
                                "hit20", "chance20")}


@torch.no_grad()
def localisation(model, graphs) -> Dict[str, float]:
    r"""Pooled shares of lesion patches among the selections, over the slides ``graphs``."""
    model.eval()
    counts = _counts()
    for graph in graphs:
        out = model(graph).interpretation
        lesion = {level: graph[level].lesion.bool() for level in LEVELS}
        sel5 = out["patch_5x"]["selected"]
        counts["sel5"].append(int(sel5.sum()))
        counts["hit5"].append(int(lesion["patch_5x"][sel5].sum()))
        counts["chance5"].append(float(lesion["patch_5x"].float().mean()))
        sel10, reached10 = out["patch_10x"]["selected"], out["patch_10x"]["reached"]
        counts["sel10"].append(int(sel10.sum()))
        counts["hit10"].append(int(lesion["patch_10x"][sel10].sum()))
        counts["bag10"].append(float(lesion["patch_10x"][reached10].float().mean()) if reached10.any() else 0.0)
        counts["chance10"].append(float(lesion["patch_10x"].float().mean()))
        reached20 = out["patch_20x"]["reached"]
        counts["reached20"].append(int(reached20.sum()))
        counts["hit20"].append(int(lesion["patch_20x"][reached20].sum()))
        counts["chance20"].append(float(lesion["patch_20x"].float().mean()))
    c = {k: np.asarray(v, dtype=np.float64) for k, v in counts.items()}

    def weighted(shares, weights):
        return float((shares * weights).sum() / max(weights.sum(), 1))

    return {"slides": len(graphs),
            "share5": float(c["hit5"].sum() / max(c["sel5"].sum(), 1)), "chance5": weighted(c["chance5"], c["sel5"]),
            "share10": float(c["hit10"].sum() / max(c["sel10"].sum(), 1)),
            "bag10": weighted(c["bag10"], c["sel10"]), "chance10": weighted(c["chance10"], c["sel10"]),
            "share20": float(c["hit20"].sum() / max(c["reached20"].sum(), 1)),
            "chance20": weighted(c["chance20"], c["reached20"])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs/zoommil_report"))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = experiment_config(args)
    start = time.perf_counter()
    summary = cross_validate(config, verbose=True)
    train_seconds = time.perf_counter() - start
    run_dir = Path(config["run"]["dir"])
    dataset = dataset_from_config(config, progress=False)
    position = {s: i for i, s in enumerate(dataset.slide_ids)}

    rows, figure_slide = {}, None
    trained: List = []
    for fold in range(args.folds):
        model = load_fold_model(run_dir, fold)
        graphs = [dataset[position[s]] for s in fold_slide_ids(run_dir, fold, "test")]
        lesion_graphs = [g for g in graphs if int(g.y) > 0]
        trained.append((model, lesion_graphs))
        if figure_slide is None and lesion_graphs:
            figure_slide = (model, max(lesion_graphs, key=lambda g: float(g["patch_5x"].lesion.float().mean())))
    all_lesion = [g for _, graphs in trained for g in graphs]

    def pooled(models_and_graphs):
        per_fold = [localisation(model, graphs) for model, graphs in models_and_graphs]
        weights = np.asarray([r["slides"] for r in per_fold], dtype=np.float64)
        return {key: float(np.average([r[key] for r in per_fold], weights=weights)) if key != "slides"
                else int(weights.sum()) for key in per_fold[0]}

    rows["trained"] = pooled(trained)
    torch.manual_seed(int(config["run"]["seed"]))
    untrained = model_from_config(config["model"], in_channels=trained[0][0].in_channels,
                                  num_classes=trained[0][0].num_classes)
    rows["untrained (control)"] = pooled([(untrained, all_lesion)])

    auc = summary.get("test", {}).get("auc", {}) if isinstance(summary, dict) else {}
    print()
    print(f"ZoomMIL on the synthetic cohort: {len(dataset)} slides, {args.folds}-fold CV, {args.epochs} epochs, "
          f"K = {args.k}, lr {args.lr:g}; training {train_seconds:.0f} s; test AUC {json.dumps(auc)}")
    header = ("| model | lesion test slides | 5x: selected with lesion | 5x: chance | 10x: selected with lesion "
              "| 10x: chance in the zoomed bag | 10x: chance in the slide | 20x: reached with lesion "
              "| 20x: chance in the slide |")
    print(header)
    print("|" + "---|" * 9)
    for name, r in rows.items():
        print(f"| {name} | {r['slides']} | {r['share5']:.3f} | {r['chance5']:.3f} | {r['share10']:.3f} "
              f"| {r['bag10']:.3f} | {r['chance10']:.3f} | {r['share20']:.3f} | {r['chance20']:.3f} |")
    (args.root / "zoommil_report.json").write_text(json.dumps({"rows": rows, "summary_auc": auc}, indent=2))

    if figure_slide is not None:
        model, graph = figure_slide
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            output = model.eval()(graph)
        plot_slide_maps(graph, output, args.figure,
                        names=["patch_5x/selected", "patch_10x/selected", "patch_20x/reached", "patch_20x/attention"],
                        attributes=["lesion"], merge_levels=False, class_names=["no lesion", "lesion"], columns=4,
                        panel_size=3.0)
        print(f"\nzoom-selection map of {graph.slide_id}: {args.figure}")


if __name__ == "__main__":
    main()
