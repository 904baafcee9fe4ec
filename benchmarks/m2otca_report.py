#!/usr/bin/env python
r"""M2OTCA on the synthetic cohort: slide AUC of the full model (OT + Grad-CAM cross-attention)
against the concatenation-only ablation (the paper's M_A) and, optionally, the single-mechanism
ablations and the independent per-level chunking, each trained with patient-level
cross-validation on the same splits; plus statistics of the cross-attention on the held-out
slides and a map of one held-out slide.

Training goes through the library's API (:func:`~wsigraph.train.make_splits`,
:class:`~wsigraph.train.MILModule`, :class:`~wsigraph.train.SlideGraphDataModule`,
:func:`~wsigraph.train.predict`) with a **fixed** number of epochs on each fold's training and
validation slides and the last model scored on the fold's test slides: with about 8 validation
slides per fold, checkpoint selection and early stopping are mostly noise (and stop before the
attention has found the lesions), so none is done, identically for every variant.

Per variant, on the test slides of every fold (every slide of the cohort is a test slide once):

* the slide AUC (mean ± std over folds, and pooled over all test slides);
* the patch-level AUROC of the 20x interpretation ``attention`` (within-region attention × region
  relevance) against the ground-truth ``lesion`` of the 20x patches (lesion slides only);
* with Grad-CAM: the share of slides whose Grad-CAM weights all were non-positive (uniform
  fallback) and the mean normalised weight over the real prototypes;
* with OT: the share of each reference prototype's transported mass that comes from the
  prototype of the same region (diagonal of :math:`m\Pi` row-normalised; :math:`1/m` for a
  uniform plan), and the plan's normalised entropy (1 = uniform).

Example::

    python benchmarks/m2otca_report.py --folds 3 --epochs 15 --variants full,none --root runs/m2otca_report
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Dict, List

import lightning as L
import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch_geometric.data import Batch

import wsigraph.data  # noqa: F401  (import order: the transforms need the data package)
from wsigraph.data.builder import dataset_from_config
from wsigraph.data.schema import node_batch, patch_levels
from wsigraph.train import MILModule, SlideGraphDataModule, load_experiment_config, make_splits, predict
from wsigraph.viz import plot_slide_maps

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "m2otca.yaml"
VARIANTS = {
    "full (OT + Grad-CAM)": {"cross_attention": "full"},
    "concatenation only (M_A)": {"cross_attention": "none"},
    "Grad-CAM only (M_B)": {"cross_attention": "gradcam"},
    "OT only (M_C)": {"cross_attention": "ot"},
    "full, independent chunks": {"cross_attention": "full", "alignment": "independent"},
    "full, no patch embedding": {"cross_attention": "full", "embedding_channels": None},
    "concatenation only, no patch embedding": {"cross_attention": "none", "embedding_channels": None},
}
SHORT = {"full": "full (OT + Grad-CAM)", "none": "concatenation only (M_A)", "gradcam": "Grad-CAM only (M_B)",
         "ot": "OT only (M_C)", "independent": "full, independent chunks",
         "full_raw": "full, no patch embedding", "none_raw": "concatenation only, no patch embedding"}


def train_fold(model_config: Dict, dataset, train: List[int], args, seed: int) -> torch.nn.Module:
    in_channels = int(dataset[0][patch_levels(dataset[0])[-1]].x.size(-1))
    module = MILModule(model_config, in_channels, int(dataset.num_classes), optimizer="adam", lr=args.lr,
                       weight_decay=args.weight_decay, scheduler="none", epochs=args.epochs, seed=seed)
    data = SlideGraphDataModule(dataset, train, [], batch_size=args.batch_size, seed=seed)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return module.model.eval()


@torch.no_grad()
def held_out_statistics(model, dataset, indices: List[int], stats: Dict[str, List[float]]) -> None:
    for start in range(0, len(indices), 8):
        batch = Batch.from_data_list([dataset[i] for i in indices[start:start + 8]])
        output = model(batch)
        top = patch_levels(batch)[-1]
        index = node_batch(batch, top)
        attention = output.interpretation[top]["attention"]
        lesion = batch[top].lesion
        for b in range(output.logits.size(0)):
            truth = lesion[index == b].bool().numpy()
            if 0 < truth.sum() < truth.size:
                stats["lesion_auroc"].append(roc_auc_score(truth, attention[index == b].numpy()))
        mask = output.extras[f"prototype_mask_{top}"]
        if "gradcam_uniform" in output.extras:
            stats["uniform"] += output.extras["gradcam_uniform"].float().tolist()
            weights = output.extras["gradcam_weights"]
            stats["weight"] += ((weights * mask).sum(-1) / mask.sum(-1).clamp_min(1)).tolist()
        for key, plan in output.extras.items():
            if not key.startswith("plan_"):
                continue
            rows = plan.sum(-1, keepdim=True).clamp_min(1e-30)
            conditional = plan / rows  # each reference prototype's distribution over the columns
            size = min(plan.size(1), plan.size(2))
            diagonal = torch.diagonal(conditional[:, :size, :size], dim1=1, dim2=2)
            real = mask[:, :size].float()
            stats["diagonal"] += ((diagonal * real).sum(-1) / real.sum(-1).clamp_min(1)).tolist()
            level = key[len("plan_"):]
            columns = output.extras[f"prototype_mask_{level}"].sum(-1).clamp_min(2).float()
            entropy = -(conditional * conditional.clamp_min(1e-30).log()).sum(-1)  # [B, M]
            normalised = (entropy * mask).sum(-1) / mask.sum(-1).clamp_min(1) / columns.log()
            stats["plan_entropy"] += normalised.tolist()


@torch.no_grad()
def attention_map(model, dataset, indices: List[int], path: Path) -> str:
    r"""Per-level attention of the held-out slide with the largest lesion."""
    candidates = [dataset[i] for i in indices]
    top = patch_levels(candidates[0])[-1]
    graph = max(candidates, key=lambda g: float(g[top].lesion.float().sum()) if "lesion" in g[top] else 0.0)
    output = model(graph)
    interpretation = {level: {"attention": output.interpretation[level]["attention"]}
                      for level in patch_levels(graph)}
    interpretation[top]["lesion"] = graph[top].lesion.bool()
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_slide_maps(graph, interpretation, path, dpi=70)
    return str(getattr(graph, "slide_id", "?"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/m2otca_report"))
    parser.add_argument("--variants", default="full,none", help=f"comma-separated, from {sorted(SHORT)}")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (on a shared 2-core machine one thread was ~9x faster per step)")
    parser.add_argument("--figure", type=Path,
                        default=Path(__file__).resolve().parent / "figures" / "m2otca_attention.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*val_dataloader.*")

    start = time.perf_counter()
    config = load_experiment_config(CONFIG, [f"data.root={args.root / 'data'}"])
    dataset = dataset_from_config(config, progress=False)
    splits = make_splits(list(dataset.slide_ids), list(dataset.case_ids), list(dataset.targets), folds=args.folds,
                         seed=0)
    position = {s: i for i, s in enumerate(dataset.slide_ids)}
    names = [SHORT[v.strip()] for v in args.variants.split(",")]
    results = {}
    figure_slide = None
    for name in names:
        model_config = {**config["model"], **VARIANTS[name]}
        stats: Dict[str, List[float]] = {key: [] for key in ("lesion_auroc", "uniform", "weight", "diagonal",
                                                             "plan_entropy")}
        fold_auc, pooled_y, pooled_p = [], [], []
        for fold, split in enumerate(splits):
            L.seed_everything(fold, verbose=False)
            train = [position[s] for s in split["train"] + split["val"]]
            test = [position[s] for s in split["test"]]
            model = train_fold(model_config, dataset, train, args, seed=fold)
            scored = predict(model, dataset, test)
            fold_auc.append(roc_auc_score(scored["target"], scored["probs"][:, 1]))
            pooled_y.append(scored["target"])
            pooled_p.append(scored["probs"][:, 1])
            held_out_statistics(model, dataset, test, stats)
            if name == names[0] and fold == 0:
                figure_slide = attention_map(model, dataset, test, args.figure)
        summary = {key: (float(np.mean(v)) if v else float("nan")) for key, v in stats.items()}
        summary.update(auc=float(np.mean(fold_auc)), auc_std=float(np.std(fold_auc)), fold_auc=fold_auc,
                       pooled_auc=float(roc_auc_score(np.concatenate(pooled_y), np.concatenate(pooled_p))))
        results[name] = summary
        print(f"# {name}: fold AUCs {np.round(fold_auc, 3).tolist()} ({time.perf_counter() - start:.0f} s)", flush=True)

    model = config["model"]
    print(f"\nsynthetic cohort {config['data']['synthetic']}, {len(dataset)} slides; graph {config['graph']}; "
          f"{args.folds}-fold patient-level CV (library splits, seed 0), {args.epochs} epochs on each fold's "
          f"train + validation slides, last model scored; Adam lr {args.lr}, weight decay {args.weight_decay}, "
          f"batch {args.batch_size}, no scheduler; model {model}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); {time.perf_counter() - start:.0f} s\n")
    print("| variant | slide AUC (mean ± std over test folds) | pooled test AUC | 20x attention lesion AUROC | "
          "Grad-CAM uniform fallback | mean Grad-CAM weight | OT mass from the same region | OT plan entropy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in results.items():
        print(f"| {name} | {s['auc']:.3f} ± {s['auc_std']:.3f} | {s['pooled_auc']:.3f} | {s['lesion_auroc']:.3f} | "
              f"{s['uniform']:.2f} | {s['weight']:.3f} | {s['diagonal']:.3f} | {s['plan_entropy']:.3f} |")
    print(f"\nmap of held-out slide {figure_slide} (fold 0, {names[0]}): {args.figure}")
    args.root.mkdir(parents=True, exist_ok=True)
    (args.root / "report.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
