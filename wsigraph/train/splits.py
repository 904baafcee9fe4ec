r"""Patient-level stratified k-fold splits, CLAM-compatible split files and the leakage check.

A split is a mapping ``{"train": [...], "val": [...], "test": [...]}`` of slide ids. Files use
CLAM's layout, ``splits_{k}.csv`` with an unnamed index column and the columns ``train``,
``val``, ``test`` (shorter columns padded with empty cells), so CLAM's own split directories can
be imported and ours read by CLAM's scripts.
"""
from __future__ import annotations

import csv
import io
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from wsigraph.io import atomic_write_text

SPLIT_NAMES = ("train", "val", "test")
Split = Dict[str, List[str]]

__all__ = ["SPLIT_NAMES", "make_splits", "write_splits", "read_splits", "find_split_files",
           "check_patient_disjoint", "splits_equal", "LeakageError"]


class LeakageError(ValueError):
    r"""A patient appears in two of train / val / test of one fold."""


def _group_kfold(targets: np.ndarray, groups: np.ndarray, n_splits: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold
    with warnings.catch_warnings():
        # "The least populated class has only n members": expected for small cohorts.
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(targets)), targets, groups))


def make_splits(slide_ids: Sequence[str], case_ids: Sequence[str], targets: Sequence[int],
                folds: int = 5, val_fraction: float = 0.2, seed: int = 0) -> List[Split]:
    r"""Patient-level stratified k-fold cross-validation with a validation split in each fold.

    The test sets of the ``folds`` folds partition the cohort
    (:class:`~sklearn.model_selection.StratifiedGroupKFold` with patients as groups), so every
    slide is tested exactly once. Inside each fold, a patient-level stratified split of the
    remaining slides puts about ``val_fraction`` of them into the validation set (early stopping,
    model selection, decision thresholds); the rest is the training set.

    Args:
        slide_ids: slide identifiers [N].
        case_ids: patient of each slide [N] (the grouping unit).
        targets: class index of each slide [N] (the stratification variable).
        folds: number of folds :math:`k \ge 2`.
        val_fraction: share of each fold's non-test slides used for validation, in (0, 0.5].
        seed: shuffling seed.
    """
    slide_ids = [str(s) for s in slide_ids]
    groups = np.asarray([str(c) for c in case_ids])
    targets = np.asarray(targets, dtype=np.int64)
    if not (len(slide_ids) == len(groups) == len(targets)):
        raise ValueError("slide_ids, case_ids and targets must have the same length")
    folds = int(folds)
    if folds < 2:
        raise ValueError("folds must be >= 2")
    num_patients = len(set(groups.tolist()))
    if num_patients < folds:
        raise ValueError(f"{num_patients} patients cannot fill {folds} folds")
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError("val_fraction must be in (0, 0.5]")
    if np.bincount(targets).max() < folds:
        raise ValueError(f"no class has {folds} slides: too few for {folds} stratified folds")
    splits = []
    for fold, (rest, test) in enumerate(_group_kfold(targets, groups, folds, seed)):
        # About val_fraction of the rest, in as many parts as small cohorts allow.
        inner_splits = min(int(round(1.0 / val_fraction)), len(set(groups[rest].tolist())),
                           int(np.bincount(targets[rest]).max()))
        if inner_splits < 2:
            raise ValueError(f"fold {fold}: too few patients outside the test set for a validation split")
        train_part, val_part = _group_kfold(targets[rest], groups[rest], inner_splits, seed + 1 + fold)[0]
        splits.append({
            "train": [slide_ids[i] for i in sorted(rest[train_part])],
            "val": [slide_ids[i] for i in sorted(rest[val_part])],
            "test": [slide_ids[i] for i in sorted(test)],
        })
    return splits


def check_patient_disjoint(split: Mapping[str, Sequence[str]], slide_to_case: Mapping[str, str],
                           fold: Optional[int] = None, verbose: bool = True) -> None:
    r"""Raise :class:`LeakageError` when a slide or a patient is in two of train / val / test.

    Prints a one-line confirmation with the patient counts when ``verbose``, so a reader sees that
    the check ran.
    """
    name = f"fold {fold}" if fold is not None else "split"
    patients = {}
    for part in SPLIT_NAMES:
        ids = list(split.get(part, []))
        duplicates = [s for s, n in Counter(ids).items() if n > 1]
        if duplicates:
            raise LeakageError(f"{name}: slide(s) listed twice in {part}: {duplicates[:5]}")
        unknown = [s for s in ids if s not in slide_to_case]
        if unknown:
            raise KeyError(f"{name}: {part} lists slide(s) unknown to the dataset: {unknown[:5]}")
        patients[part] = {slide_to_case[s] for s in ids}
    for i, first in enumerate(SPLIT_NAMES):
        for second in SPLIT_NAMES[i + 1:]:
            shared = patients[first] & patients[second]
            if shared:
                raise LeakageError(f"{name}: patient(s) {sorted(shared)[:5]} in both {first} and {second} "
                                   f"({len(shared)} in all)")
    if verbose:
        counts = ", ".join(f"{part} {len(split.get(part, []))} slides / {len(patients[part])} patients"
                           for part in SPLIT_NAMES)
        print(f"[splits] {name}: no patient in two of train/val/test ({counts})")


def write_splits(directory, splits: Sequence[Mapping[str, Sequence[str]]],
                 labels: Optional[Mapping[str, int]] = None, classes: Optional[Sequence[str]] = None) -> None:
    r"""Write ``splits_{k}.csv`` (CLAM layout) for every fold, atomically; with ``labels``
    (slide id → class index) also CLAM's ``splits_{k}_descriptor.csv`` of class counts."""
    directory = Path(directory)
    for fold, split in enumerate(splits):
        columns = [list(split.get(part, [])) for part in SPLIT_NAMES]
        rows = max((len(c) for c in columns), default=0)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([""] + list(SPLIT_NAMES))
        for row in range(rows):
            writer.writerow([row] + [c[row] if row < len(c) else "" for c in columns])
        atomic_write_text(directory / f"splits_{fold}.csv", buffer.getvalue())
        if labels is not None:
            num_classes = len(classes) if classes is not None else max(labels.values()) + 1
            names = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow([""] + list(SPLIT_NAMES))
            for index, name in enumerate(names):
                writer.writerow([name] + [sum(labels[s] == index for s in c) for c in columns])
            atomic_write_text(directory / f"splits_{fold}_descriptor.csv", buffer.getvalue())


_SPLIT_FILE = re.compile(r"^splits_(\d+)\.csv$")


def find_split_files(directory) -> List[Path]:
    r"""``splits_0.csv, splits_1.csv, ...`` of a directory, in fold order (must be consecutive)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = {}
    for path in directory.iterdir():
        match = _SPLIT_FILE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    if found and sorted(found) != list(range(len(found))):
        raise ValueError(f"{directory}: split files are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return [found[k] for k in sorted(found)]


def read_splits(directory, folds: Optional[int] = None) -> List[Split]:
    r"""Read ``splits_{k}.csv`` files (ours or CLAM's: ``train``, ``val``, ``test`` columns, an
    optional leading index column, empty cells as padding). ``folds`` keeps the first ``folds``."""
    paths = find_split_files(directory)
    if not paths:
        raise FileNotFoundError(f"no splits_{{k}}.csv files in {directory}")
    if folds is not None:
        if len(paths) < folds:
            raise ValueError(f"{directory} holds {len(paths)} split files, {folds} folds were asked for")
        paths = paths[:folds]
    splits = []
    for path in paths:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = set(SPLIT_NAMES) - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: missing column(s) {sorted(missing)} (need train, val, test)")
            split: Split = {part: [] for part in SPLIT_NAMES}
            for row in reader:
                for part in SPLIT_NAMES:
                    value = (row.get(part) or "").strip()
                    if value and value.lower() != "nan":
                        split[part].append(value)
        splits.append(split)
    return splits


def splits_equal(first: Sequence[Mapping[str, Sequence[str]]], second: Sequence[Mapping[str, Sequence[str]]]) -> bool:
    r"""Same folds with the same slide sets (order inside a column ignored)."""
    if len(first) != len(second):
        return False
    return all(sorted(a.get(p, [])) == sorted(b.get(p, [])) for a, b in zip(first, second) for p in SPLIT_NAMES)
