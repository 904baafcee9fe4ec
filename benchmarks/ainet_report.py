r"""Anchor report of AINet on the synthetic cohort: where the anchors, the kept patches and the
attention fall with respect to the ground-truth lesions, and the slide AUC, for AINet trained
with patient-level cross-validation (every variant on the same splits); plus a map of one
held-out lesion slide.

For every variant, each fold's best checkpoint runs on the fold's test slides (every slide of
the cohort is a test slide exactly once). On the test slides that hold lesion patches (at the
level the model reads) we measure, per slide, then average over slides:

* ``anchors on lesion``: share of the anchors that are lesion patches, against its chance level
  — the expected share for one uniformly random anchor per region (the mean over the slide's
  regions of their lesion fraction, for region-scope anchors) — and the slide's lesion
  fraction;
* ``kept on lesion``: share of the patches kept by the masking that are lesion patches (chance:
  the slide's lesion fraction);
* ``attention on lesion``: bag attention mass on lesion patches, and whether the top-attention
  patch is a lesion patch.

Example::

    python benchmarks/ainet_report.py --folds 3 --epochs 30 --root runs/ainet_report
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torch_geometric.data import Batch

import wsigraph.data  # noqa: F401  (import order: the transforms need the data package)
from wsigraph.data.builder import dataset_from_config
from wsigraph.data.schema import REGION, node_batch, patch_levels, region_of_patch
from wsigraph.train import cross_validate, load_experiment_config
from wsigraph.viz import fold_slide_ids, load_fold_model, plot_slide_maps

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ainet.yaml"
VARIANTS = {
    "AINet (DAM, regions of 256)": {"regions": 256, "model": {}},
    "AINet (DAM, regions of 64)": {"regions": 64, "model": {}},
    "attention anchors, regions of 64": {"regions": 64, "model": {"anchor_mode": "attention"}},
    "random anchors, regions of 64": {"regions": 64, "model": {"anchor_mode": "random"}},
    "no ARC, regions of 64": {"regions": 64, "model": {"correction": False}},
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def variant_config(root: Path, name: str, settings: Dict, args) -> Dict:
    overrides = [f"data.root={root / 'data'}", f"run.dir={root / slug(name)}", f"run.folds={args.folds}",
                 f"train.epochs={args.epochs}", f"train.min_epochs={min(args.epochs, args.min_epochs)}",
                 f"train.lr={args.lr}",
                 f"train.batch_size={args.batch_size}", f"train.early_stopping_patience={args.patience}",
                 "train.bootstrap=0", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]
    if args.slides:
        overrides.append(f"data.synthetic.num_slides={args.slides}")
    config = load_experiment_config(CONFIG, overrides)
    # The partition is replaced, not merged with the base config's grid settings.
    config["graph"]["regions"] = {"strategy": "fixed_size", "region_size": int(settings["regions"])}
    config["model"].update(settings["model"])
    return config


def _mean(values: List[float]) -> float:
    return float(np.nanmean(values)) if values else float("nan")


@torch.no_grad()
def anchor_statistics(run_dir: Path, dataset, folds: int) -> Dict[str, float]:
    position = {s: i for i, s in enumerate(dataset.slide_ids)}
    values: Dict[str, List[float]] = {key: [] for key in (
        "anchor_lesion", "anchor_chance_region", "lesion_fraction", "kept_lesion", "attention_lesion",
        "top_attention_lesion", "anchors_per_slide", "regions_per_slide", "kept_fraction")}
    for fold in range(folds):
        model = load_fold_model(run_dir, fold)
        indices = [position[s] for s in fold_slide_ids(run_dir, fold, "test")]
        for start in range(0, len(indices), 8):
            batch = Batch.from_data_list([dataset[i] for i in indices[start:start + 8]])
            top = patch_levels(batch)[-1]
            output = model(batch)
            lesion = batch[top].lesion.bool()
            index = node_batch(batch, top)
            region = region_of_patch(batch, top)
            patch = output.interpretation[top]
            anchor, kept, attention = patch["anchor"].bool(), patch["kept"].bool(), patch["attention"]
            num_regions = batch[REGION].num_nodes
            region_lesion = torch.zeros(num_regions).index_add_(0, region, lesion.float())
            region_size = torch.bincount(region, minlength=num_regions).float()
            region_fraction = region_lesion / region_size.clamp(min=1)
            for b in range(output.logits.size(0)):
                mine = index == b
                if not lesion[mine].any():
                    continue
                regions = region[mine].unique()
                values["anchor_lesion"].append(float(lesion[mine & anchor].float().mean()))
                values["anchor_chance_region"].append(float(region_fraction[regions].mean()))
                values["lesion_fraction"].append(float(lesion[mine].float().mean()))
                values["kept_lesion"].append(float(lesion[mine & kept].float().mean()))
                values["kept_fraction"].append(float(kept[mine].float().mean()))
                values["attention_lesion"].append(float(attention[mine & lesion].sum() / attention[mine].sum()))
                values["top_attention_lesion"].append(float(lesion[mine][attention[mine].argmax()]))
                values["anchors_per_slide"].append(float(anchor[mine].sum()))
                values["regions_per_slide"].append(float(regions.numel()))
    stats = {key: _mean(v) for key, v in values.items()}
    stats["slides_with_lesions"] = len(values["anchor_lesion"])
    return stats


@torch.no_grad()
def anchor_map(run_dir: Path, dataset, path: Path) -> str:
    r"""Anchors, kept patches, attention and lesions of the fold-0 test slide with the most lesion patches."""
    model = load_fold_model(run_dir, 0)
    position = {s: i for i, s in enumerate(dataset.slide_ids)}
    graphs = [dataset[position[s]] for s in fold_slide_ids(run_dir, 0, "test")]
    top = patch_levels(graphs[0])[-1]
    graph = max(graphs, key=lambda g: int(g[top].lesion.sum()))
    output = model(graph)
    patch = output.interpretation[top]
    interpretation = {top: {"lesion": graph[top].lesion.long(), "anchor": patch["anchor"].long(),
                            "kept": patch["kept"].long(), "attention": patch["attention"],
                            "anchor_score": patch["anchor_score"]},
                      REGION: {"probability": output.interpretation[REGION]["probability"]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_slide_maps(graph, interpretation, path, dpi=70)
    return str(getattr(graph, "slide_id", "?"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/ainet_report"))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--min-epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slides", type=int, default=None, help="cohort size (default: the demo config's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS)[:4], choices=list(VARIANTS))
    parser.add_argument("--figure", type=Path,
                        default=Path(__file__).resolve().parent / "figures" / "ainet_anchors.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    configs = {name: variant_config(args.root, name, VARIANTS[name], args) for name in args.variants}
    datasets = {}
    results = {}
    splits_dir = None
    for name, config in configs.items():
        regions = config["graph"]["regions"]["region_size"]
        if regions not in datasets:
            datasets[regions] = dataset_from_config(config, progress=False)
        dataset = datasets[regions]
        if splits_dir is not None:
            config["run"]["splits"] = splits_dir  # the same patient-level splits for every variant
        summary = cross_validate(config, dataset=dataset, verbose=False)
        splits_dir = splits_dir or config["run"]["dir"]
        stats = anchor_statistics(Path(config["run"]["dir"]), dataset, args.folds)
        stats["auc"], stats["auc_std"] = summary["mean"]["test_auc"], summary["std"]["test_auc"]
        results[name] = stats
        print(f"# {name}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    first_name = args.variants[0]
    first = configs[first_name]
    slide = anchor_map(Path(first["run"]["dir"]), datasets[first["graph"]["regions"]["region_size"]], args.figure)

    model = first["model"]
    dataset = next(iter(datasets.values()))
    print(f"\nsynthetic cohort {first['data']['synthetic']}, {len(dataset)} slides; "
          f"{args.folds}-fold patient-level CV, {args.epochs} epochs max (at least {args.min_epochs}, "
          f"then early stopping on validation loss, patience {args.patience}), "
          f"{first['train']['optimizer']} lr {args.lr}, weight decay {first['train']['weight_decay']}, "
          f"batch {args.batch_size}, full bags; d = {model['hidden_channels']}, alpha = {model['alpha']}, "
          f"rho = {model['mask_ratio']}, lambda_r = {model['region_loss_weight']}, "
          f"lambda_m = {model['consistency_weight']}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| variant | regions / anchors per lesion slide | anchors on lesion | chance (random anchor per region) "
          "| slide lesion fraction | kept on lesion (kept share) | attention mass on lesion "
          "| top-attention patch is lesion | slide AUC |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in results.items():
        print(f"| {name} | {s['regions_per_slide']:.1f} / {s['anchors_per_slide']:.1f} | {s['anchor_lesion']:.3f} | "
              f"{s['anchor_chance_region']:.3f} | {s['lesion_fraction']:.3f} | "
              f"{s['kept_lesion']:.3f} ({s['kept_fraction']:.2f}) | {s['attention_lesion']:.3f} | "
              f"{s['top_attention_lesion']:.2f} | {s['auc']:.3f} ± {s['auc_std']:.3f} |")
    count = next(iter(results.values()))["slides_with_lesions"]
    print(f"\nstatistics over the {count} test slides with lesion patches (mean over slides); "
          f"anchor map of held-out slide {slide} (fold 0, {first_name}): {args.figure}")
    args.root.mkdir(parents=True, exist_ok=True)
    (args.root / "report.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
