r"""Routing report of ROAM on the synthetic cohort: expert balance, spatial coherence and slide
AUC of the graph-smoothed OT router (lambda = 0.5) against plain OT (lambda = 0) and softmax
routing, each trained with patient-level cross-validation on the same splits; plus an
expert-territory map of one held-out slide.

For every variant, every fold's best checkpoint is run on the fold's test slides (every slide
of the cohort is a test slide exactly once) and per slide we measure

* the normalised entropy of the expert loads (1 = balanced, 0 = one expert takes everything),
  of the plan :math:`\sum_r \Pi_{re}` (before top-k) and of the dispatch :math:`\sum_r D_{re}`
  (after top-k);
* the spatial coherence: the share of region-graph edges whose two regions have the same top
  expert :math:`\arg\max_e D_{re}`, and its chance-corrected form
  :math:`(\kappa - p)/(1 - p)` with :math:`p = \sum_e q_e^2` the agreement expected from the
  slide's shares :math:`q_e` of regions per top expert alone (a routing that sends every region
  to one expert is trivially "coherent": :math:`\kappa = 1`, :math:`p = 1`, left out);
* the number of experts that receive a region as top expert;

averaged over the cohort's slides. The slide AUC is the mean over the test folds.

Example::

    python benchmarks/roam_report.py --folds 3 --epochs 30 --root runs/roam_report
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
from wsigraph.data.schema import REGION, REGION_GRAPH, node_batch, patch_levels
from wsigraph.nn import load_entropy, routing_coherence
from wsigraph.train import cross_validate, load_experiment_config, make_splits, write_splits
from wsigraph.train.splits import find_split_files
from wsigraph.viz import fold_slide_ids, load_fold_model, plot_slide_maps

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "roam.yaml"
VARIANTS = {
    "ot, lambda 0.5": {"model.smoothing": 0.5},
    "ot, lambda 0": {"model.smoothing": 0.0},
    "softmax": {"model.router": "softmax"},
}
# Same data, splits and training settings, for scale: patch-level gated attention (no routing).
REFERENCE = {"abmil (reference)": {"model": "{name: abmil, hidden_channels: 256, attention_channels: 128, dropout: 0.25}"}}


def variant_config(root: Path, name: str, settings: Dict, args) -> Dict:
    overrides = [f"{key}={value}" for key, value in settings.items()] + [
        f"data.root={root / 'data'}", f"run.dir={root / slug(name)}", f"run.folds={args.folds}",
        f"train.epochs={args.epochs}", f"train.min_epochs={min(args.epochs, args.min_epochs)}",
        f"train.lr={args.lr}", f"train.warmup_epochs={args.warmup}", f"train.batch_size={args.batch_size}",
        f"train.early_stopping_patience={args.patience}", f"train.monitor={args.monitor}", "train.bootstrap=0",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]
    if args.hidden and "model" not in settings:
        overrides.append(f"model.hidden_channels={args.hidden}")
    return load_experiment_config(CONFIG, overrides)


def splits_without_validation(directory: Path, dataset, folds: int, seed: int) -> Path:
    r"""The library's patient-level folds with each fold's validation slides moved into its
    training set: every model then trains for the fixed number of epochs and the last epoch is
    scored (selecting on ~8 validation slides picks an epoch-0 model on this small cohort)."""
    if not find_split_files(directory):
        splits = make_splits(dataset.slide_ids, dataset.case_ids, dataset.targets, folds=folds, seed=seed)
        merged = [{"train": sorted(s["train"] + s["val"]), "val": [], "test": s["test"]} for s in splits]
        write_splits(directory, merged, labels=dict(zip(dataset.slide_ids, dataset.targets)),
                     classes=list(dataset.classes))
    return directory


def slug(name: str) -> str:
    return name.split(" (")[0].replace(", ", "_").replace(" ", "").replace(".", "")


@torch.no_grad()
def routing_statistics(run_dir: Path, dataset, folds: int) -> Dict[str, float]:
    position = {s: i for i, s in enumerate(dataset.slide_ids)}
    values: Dict[str, List[float]] = {"plan_entropy": [], "dispatch_entropy": [], "coherence": [],
                                      "coherence_corrected": [], "experts_used": [], "single_expert": [],
                                      "regions": []}
    for fold in range(folds):
        model = load_fold_model(run_dir, fold)
        indices = [position[s] for s in fold_slide_ids(run_dir, fold, "test")]
        for start in range(0, len(indices), 8):
            batch = Batch.from_data_list([dataset[i] for i in indices[start:start + 8]])
            output = model(batch)
            region_batch = node_batch(batch, REGION)
            num_slides = output.logits.size(0)
            expert = output.interpretation[REGION]["expert"]
            valid = expert >= 0
            coherence = routing_coherence(expert, batch[REGION_GRAPH].edge_index, region_batch, num_slides, valid)
            counts = torch.zeros(num_slides, model.num_experts)
            counts.index_put_((region_batch[valid], expert[valid]), torch.ones(int(valid.sum())), accumulate=True)
            share = counts / counts.sum(-1, keepdim=True)
            chance = (share ** 2).sum(-1)
            corrected = torch.where(chance < 1 - 1e-9, (coherence - chance) / (1 - chance),
                                    torch.full_like(chance, float("nan")))
            used = counts > 0
            values["plan_entropy"] += load_entropy(output.extras["plan_loads"]).tolist()
            values["dispatch_entropy"] += load_entropy(output.extras["loads"]).tolist()
            values["coherence"] += coherence.tolist()
            values["coherence_corrected"] += corrected.tolist()
            values["experts_used"] += used.sum(-1).tolist()
            values["single_expert"] += (used.sum(-1) == 1).float().tolist()
            values["regions"] += torch.bincount(region_batch, minlength=num_slides).float().tolist()
    return {key: float(np.nanmean(v)) for key, v in values.items()} | \
        {f"{key}_std": float(np.nanstd(v)) for key, v in values.items()}


@torch.no_grad()
def territory_map(run_dir: Path, dataset, path: Path) -> str:
    r"""Expert territories of the held-out lesion slide of fold 0 with the most regions."""
    model = load_fold_model(run_dir, 0)
    position = {s: i for i, s in enumerate(dataset.slide_ids)}
    candidates = [dataset[position[s]] for s in fold_slide_ids(run_dir, 0, "test")]
    top = patch_levels(candidates[0])[-1]
    lesion = [g for g in candidates if getattr(g[top], "lesion", None) is not None and g[top].lesion.any()]
    graph = max(lesion or candidates, key=lambda g: g[REGION].num_nodes)
    output = model(graph)
    interpretation = {top: {"expert": output.interpretation[top]["expert"]},
                      REGION: {"attention": output.interpretation[REGION]["attention"]}}
    for name in ("lesion", "tissue"):
        value = getattr(graph[top], name, None)
        if value is not None:
            interpretation[top][name] = value.long()  # categorical maps
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_slide_maps(graph, interpretation, path, dpi=80)
    return str(getattr(graph, "slide_id", "?"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/roam_report"))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--min-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--no-reference", action="store_true", help="skip the ABMIL reference run")
    parser.add_argument("--selection", choices=["last", "validation"], default="last",
                        help="score the last epoch (no validation split) or the best validation checkpoint")
    parser.add_argument("--monitor", default="val_auc",
                        help="checkpoint selection / early stopping (val_loss on ~8 validation slides picks epoch 0)")
    parser.add_argument("--hidden", type=int, default=None, help="override d (default: the config's 256)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a loaded 2-core machine more threads are far slower)")
    parser.add_argument("--figure", type=Path,
                        default=Path(__file__).resolve().parent / "figures" / "roam_territories.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    variants = dict(VARIANTS, **({} if args.no_reference else REFERENCE))
    configs = {name: variant_config(args.root, name, settings, args) for name, settings in variants.items()}
    first = next(iter(configs.values()))
    dataset = dataset_from_config(first, progress=False)
    results = {}
    splits_dir = None
    if args.selection == "last":
        splits_dir = str(splits_without_validation(args.root / "splits_without_validation", dataset, args.folds,
                                                   int(first["run"].get("seed", 0))))
    for name, config in configs.items():
        if splits_dir is not None:
            config["run"]["splits"] = splits_dir  # the same patient-level splits for every variant
        summary = cross_validate(config, dataset=dataset, verbose=False)
        splits_dir = splits_dir or config["run"]["dir"]
        run_dir = Path(config["run"]["dir"])
        stats = routing_statistics(run_dir, dataset, args.folds) if name in VARIANTS else {}
        stats["auc"] = summary["mean"]["test_auc"]
        stats["auc_std"] = summary["std"]["test_auc"]
        results[name] = stats
        print(f"# {name}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    slide = territory_map(Path(configs["ot, lambda 0.5"]["run"]["dir"]), dataset, args.figure)

    model = first["model"]
    print(f"\nsynthetic cohort {first['data']['synthetic']}, {len(dataset)} slides; graph {first['graph']}; "
          f"{args.folds}-fold patient-level CV, "
          + (f"{args.epochs} epochs, validation slides merged into training, last epoch scored, "
             if args.selection == "last" else
             f"{args.epochs} epochs max (at least {args.min_epochs}, early-stopping patience {args.patience} "
             f"on {args.monitor}, best validation checkpoint), ")
          + f"AdamW lr {args.lr}, warm-up {args.warmup}, batch {args.batch_size}, "
          f"d = {args.hidden or model['hidden_channels']}, E = {model['num_experts']}, k = {model['top_k']}, "
          f"eps = {model['epsilon']}, T = {model['num_iterations']}, S = {model['smoothing_steps']}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {time.perf_counter() - start:.0f} s\n")
    print("| routing | load entropy, plan (before top-k) | load entropy, dispatch (after top-k) | "
          "spatial coherence | chance-corrected coherence | experts used as top expert | "
          "slides on one expert | slide AUC |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in results.items():
        if name not in VARIANTS:
            print(f"| {name} | – | – | – | – | – | – | {s['auc']:.3f} ± {s['auc_std']:.3f} |")
            continue
        print(f"| {name} | {s['plan_entropy']:.4f} ± {s['plan_entropy_std']:.4f} | "
              f"{s['dispatch_entropy']:.3f} ± {s['dispatch_entropy_std']:.3f} | "
              f"{s['coherence']:.3f} ± {s['coherence_std']:.3f} | "
              f"{s['coherence_corrected']:.3f} ± {s['coherence_corrected_std']:.3f} | "
              f"{s['experts_used']:.2f} of {model['num_experts']} | {100 * s['single_expert']:.0f} % | {s['auc']:.3f} ± {s['auc_std']:.3f} |")
    print(f"\nmean regions per slide {results['ot, lambda 0.5']['regions']:.1f}; "
          f"territory map of held-out slide {slide} (fold 0, lambda 0.5): {args.figure}")
    (args.root / "report.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
