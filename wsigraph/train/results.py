r"""Run outputs: CLAM-compatible per-slide predictions, per-fold summaries and printed tables.

* ``fold_{k}.csv``: ``slide_id, Y, Y_hat, p_0 .. p_{C-1}`` (CLAM's ``eval.py`` columns) plus
  ``case_id`` and ``fold``, one row per test slide.
* ``summary.csv``: one row per fold (``folds`` = fold index, then ``test_auc``, ``test_acc``,
  ``test_balanced_acc``, ``test_f1`` [``test_qwk``], the same for ``val_``, the bootstrap 95 % CI
  bounds ``test_<metric>_low`` / ``_high``, ``threshold``, ``best_epoch``, ``num_test``), then the
  rows ``mean`` and ``std`` over folds and, when the test sets are disjoint, ``pooled`` (all
  out-of-fold predictions together, with its own bootstrap CI).
* ``summary.json``: the same numbers, nested.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from wsigraph.io import atomic_write_text
from wsigraph.train.metrics import METRIC_NAMES

__all__ = ["write_predictions", "read_predictions", "summary_rows", "write_summary_csv",
           "format_table", "format_comparison", "metric_names"]


def metric_names(ordinal: bool) -> List[str]:
    return [m for m in METRIC_NAMES if ordinal or m != "qwk"]


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "nan" if not math.isfinite(float(value)) else f"{float(value):.6g}"
    return str(value)


def _csv_text(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(columns))
    for row in rows:
        writer.writerow([_number(row.get(c)) for c in columns])
    return buffer.getvalue()


def write_predictions(path, slide_ids: Sequence[str], case_ids: Sequence[str], targets: Sequence[int],
                      probs: np.ndarray, predicted: Sequence[int], fold: Optional[Any] = None) -> None:
    r"""Write one CLAM-style per-slide predictions CSV atomically."""
    probs = np.asarray(probs, dtype=np.float64)
    if not (len(slide_ids) == len(case_ids) == len(targets) == len(predicted) == probs.shape[0]):
        raise ValueError("one row per slide is needed in every column")
    columns = ["slide_id", "Y", "Y_hat"] + [f"p_{c}" for c in range(probs.shape[1])] + ["case_id"]
    if fold is not None:
        columns.append("fold")
    rows = []
    for i, slide_id in enumerate(slide_ids):
        row = {"slide_id": slide_id, "Y": int(targets[i]), "Y_hat": int(predicted[i]), "case_id": case_ids[i]}
        row.update({f"p_{c}": float(probs[i, c]) for c in range(probs.shape[1])})
        if fold is not None:
            row["fold"] = fold
        rows.append(row)
    atomic_write_text(path, _csv_text(columns, rows))


def read_predictions(path) -> Dict[str, Any]:
    r"""Read a predictions CSV back: ``slide_id``, ``case_id`` lists, ``Y``, ``Y_hat`` and ``probs`` arrays."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {"slide_id": [], "case_id": [], "Y": np.zeros(0, np.int64), "Y_hat": np.zeros(0, np.int64),
                "probs": np.zeros((0, 0))}
    num_classes = sum(1 for key in rows[0] if key.startswith("p_"))
    return {
        "slide_id": [r["slide_id"] for r in rows],
        "case_id": [r.get("case_id", "") for r in rows],
        "Y": np.asarray([int(r["Y"]) for r in rows], dtype=np.int64),
        "Y_hat": np.asarray([int(r["Y_hat"]) for r in rows], dtype=np.int64),
        "probs": np.asarray([[float(r[f"p_{c}"]) for c in range(num_classes)] for r in rows], dtype=np.float64),
    }


def summary_rows(fold_results: Sequence[Mapping[str, Any]], pooled: Optional[Mapping[str, Any]],
                 ordinal: bool) -> List[Dict[str, Any]]:
    r"""The rows of ``summary.csv`` from per-fold results (see the module docstring)."""
    names = metric_names(ordinal)
    parts = ("test", "val") if any(result.get("val") for result in fold_results) else ("test",)
    rows = []
    for result in fold_results:
        row: Dict[str, Any] = {"folds": result["fold"]}
        for part in parts:
            for name in names:
                row[f"{part}_{name}"] = result.get(part, {}).get(name)
        for name in names:
            low, high = result.get("test_ci", {}).get(name, (None, None))
            row[f"test_{name}_low"], row[f"test_{name}_high"] = low, high
        row["threshold"] = result.get("threshold")
        row["best_epoch"] = result.get("best_epoch")
        row["num_test"] = result.get("num_test")
        rows.append(row)
    numeric = [c for c in (rows[0] if rows else {})
               if c.startswith(("test_", "val_")) and not c.endswith(("_low", "_high"))]
    for label, reduce in (("mean", _nanmean), ("std", _nanstd)):
        row = {"folds": label}
        for column in numeric:
            row[column] = reduce([r[column] for r in rows])
        rows.append(row)
    if pooled is not None:
        row = {"folds": "pooled", "num_test": pooled.get("num_test")}
        for name in names:
            row[f"test_{name}"] = pooled["test"].get(name)
            low, high = pooled.get("test_ci", {}).get(name, (None, None))
            row[f"test_{name}_low"], row[f"test_{name}_high"] = low, high
        rows.append(row)
    return rows


def _finite(values) -> np.ndarray:
    array = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return array[np.isfinite(array)]


def _nanmean(values) -> float:
    array = _finite(values)
    return float(array.mean()) if array.size else float("nan")


def _nanstd(values) -> float:
    # Sample standard deviation over folds (ddof = 1), as papers report mean ± sd.
    array = _finite(values)
    return float(array.std(ddof=1)) if array.size > 1 else float("nan")


def write_summary_csv(path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns: List[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    atomic_write_text(path, _csv_text(columns, rows))


def _cell(mean: float, std: float) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if std is None or not math.isfinite(std):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {std:.3f}"


def format_table(summary: Mapping[str, Any], title: Optional[str] = None) -> str:
    r"""Printable table of one run: per metric, mean ± std over folds and the pooled value with its CI."""
    names = metric_names(summary.get("ordinal", False))
    lines = []
    if title:
        lines.append(title)
    header = f"{'metric':<14}{'mean ± std over folds':<24}{'pooled [95% CI]':<28}"
    lines.append(header)
    lines.append("-" * len(header))
    pooled = summary.get("pooled")
    for name in names:
        cell = _cell(summary["mean"].get(f"test_{name}"), summary["std"].get(f"test_{name}"))
        pooled_cell = ""
        if pooled is not None:
            value = pooled["test"].get(name)
            low, high = pooled.get("test_ci", {}).get(name, (float("nan"), float("nan")))
            if value is not None and math.isfinite(value):
                pooled_cell = f"{value:.3f} [{low:.3f}, {high:.3f}]"
        lines.append(f"{name:<14}{cell:<24}{pooled_cell:<28}")
    return "\n".join(lines)


def format_comparison(summaries: Mapping[str, Mapping[str, Any]], title: Optional[str] = None) -> str:
    r"""Printable table of several runs: one row per model, mean ± std over folds per metric."""
    ordinal = any(s.get("ordinal", False) for s in summaries.values())
    names = metric_names(ordinal)
    width = max([len("model")] + [len(k) for k in summaries]) + 2
    lines = [title] if title else []
    header = f"{'model':<{width}}" + "".join(f"{'test ' + n:<19}" for n in names)
    lines.append(header)
    lines.append("-" * len(header))
    for label, summary in summaries.items():
        cells = "".join(f"{_cell(summary['mean'].get(f'test_{n}'), summary['std'].get(f'test_{n}')):<19}"
                        for n in names)
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)
