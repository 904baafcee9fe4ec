r"""A cached dataset of slide graphs over a labels CSV."""
from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch_geometric.data import Dataset
from tqdm.auto import tqdm

from wsigraph.data.graph import build_slide_graph
from wsigraph.data.readers import PathLike, SlideError, find_feature_file, read_slide
from wsigraph.data.schema import is_level, level_magnification
from wsigraph.io import atomic_write

#: Bumped whenever the graph layout written to the cache changes.
GRAPH_FORMAT_VERSION = 1
ON_ERROR = ("raise", "skip")


@dataclass
class SlideRecord:
    slide_id: str
    case_id: str
    label: str


def read_labels(path: PathLike) -> List[SlideRecord]:
    r"""Rows of a labels CSV with columns ``slide_id``, ``case_id`` and ``label``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"slide_id", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)} (need slide_id, case_id, label)")
        records = []
        for row in reader:
            slide_id = (row["slide_id"] or "").strip()
            if not slide_id:
                continue
            case_id = (row.get("case_id") or slide_id).strip()
            records.append(SlideRecord(slide_id, case_id, (row["label"] or "").strip()))
    seen = set()
    for record in records:
        if record.slide_id in seen:
            raise ValueError(f"{path}: slide_id '{record.slide_id}' appears twice")
        seen.add(record.slide_id)
    return records


def _source_signature(paths: Sequence[Optional[Path]]) -> List[Tuple[str, int, int]]:
    signature = []
    for path in paths:
        if path is None:
            signature.append(("", -1, -1))
        else:
            stat = path.stat()
            signature.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return signature


def _build_one(task) -> Tuple[str, Optional[Tuple[str, str]], Optional[dict]]:
    r"""Build and cache one slide graph; run in worker processes. Returns (slide_id, error, stats)."""
    (record, label_index, feature_dirs, patch_sizes, coords_dirs, pre_transform, cache_path, key) = task
    try:
        levels = read_slide(record.slide_id, feature_dirs, patch_sizes, coords_dirs)
        data = build_slide_graph(levels, record.slide_id, record.case_id, label_index)
        if pre_transform is not None:
            data = pre_transform(data)
        atomic_write(cache_path, lambda handle: torch.save({"key": key, "data": data}, handle))
        return record.slide_id, None, graph_stats(data)
    except SlideError as error:
        return record.slide_id, (error.path, error.reason), None


def graph_stats(data) -> dict:
    stats = {}
    for node_type in data.node_types:
        stats[f"nodes/{node_type}"] = int(data[node_type].num_nodes)
    stats["edges"] = int(sum(data[e].edge_index.size(1) for e in data.edge_types))
    return stats


class SlideGraphDataset(Dataset):
    r"""Slide graphs of a cohort, built once from feature files and cached on disk.

    Each slide's graph is stored as ``{root}/processed/{slide_id}.pt`` together with a key made
    of the source files' paths, sizes and modification times, the ``pre_transform``'s ``repr``
    and the graph format version; a slide is rebuilt when its key changes. Cache files are
    written atomically, so an interrupted build never leaves a half-written graph that would
    be taken for a good one.

    Args:
        root: cache directory.
        labels: labels CSV (``slide_id``, ``case_id``, ``label``).
        feature_dirs: magnification → directory of per-slide feature files.
        classes: the label set in class-index order; labels outside it are errors. Default:
            the sorted distinct labels of the CSV (as integers when all are integers).
        pre_transform: graph transform applied before caching (see
            :func:`wsigraph.transforms.graph_transform`); part of the cache key.
        transform: transform applied on access.
        patch_sizes: magnification → level-0 patch side, overriding the files.
        coords_dirs: magnification → CLAM patch directory (coords + geometry attributes).
        on_error: ``"raise"`` stops at the first bad slide; ``"skip"`` leaves it out and lists it
            with the reason in ``{root}/skipped.csv``.
        num_workers: processes that build graphs in parallel (0 = in this process).
        in_memory: keep every graph in memory after the first load.
        slide_ids: restrict the dataset to these slides (default: every row of the CSV).
        progress: show a progress bar while building.
    """

    def __init__(self, root: PathLike, labels: PathLike, feature_dirs: Mapping[float, PathLike],
                 classes: Optional[Sequence] = None, pre_transform: Optional[Callable] = None,
                 transform: Optional[Callable] = None, patch_sizes: Optional[Mapping[float, float]] = None,
                 coords_dirs: Optional[Mapping[float, PathLike]] = None, on_error: str = "raise",
                 num_workers: int = 0, in_memory: bool = True, slide_ids: Optional[Sequence[str]] = None,
                 progress: bool = True):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}")
        if not feature_dirs:
            raise ValueError("feature_dirs must name at least one magnification")
        self.labels_path = Path(labels)
        self.feature_dirs = {float(m): Path(d) for m, d in feature_dirs.items()}
        self.patch_sizes = {float(m): float(s) for m, s in (patch_sizes or {}).items()}
        self.coords_dirs = {float(m): Path(d) for m, d in (coords_dirs or {}).items()}
        self.on_error = on_error
        self.num_workers = int(num_workers)
        self.in_memory = in_memory
        self.progress = progress
        records = read_labels(self.labels_path)
        if slide_ids is not None:
            wanted = set(slide_ids)
            records = [r for r in records if r.slide_id in wanted]
        self.classes = self._class_list(records, classes)
        self.records = records
        self.skipped: List[Dict[str, str]] = []
        self.build_seconds = 0.0
        self._cache: Dict[int, object] = {}
        super().__init__(str(root), transform=transform, pre_transform=pre_transform)

    @staticmethod
    def _class_list(records, classes):
        if classes is not None:
            return [str(c) for c in classes]
        values = sorted({r.label for r in records})
        try:
            return [str(v) for v in sorted(values, key=float)]
        except ValueError:
            return values

    # PyG's Dataset hooks -------------------------------------------------------------------
    @property
    def raw_file_names(self) -> List[str]:
        return []

    @property
    def processed_file_names(self) -> List[str]:
        return [f"{r.slide_id}.pt" for r in self.records]

    def download(self) -> None:
        pass

    def _process(self) -> None:
        # PyG rebuilds only when files are missing; the per-slide keys also catch stale ones.
        self.process()

    def process(self) -> None:
        start = time.perf_counter()
        os.makedirs(self.processed_dir, exist_ok=True)
        tasks, errors = [], []
        transform_repr = repr(self.pre_transform)
        for record in self.records:
            if record.label not in self.classes:
                errors.append((record.slide_id, str(self.labels_path),
                               f"label '{record.label}' is not in the label set {self.classes}"))
                continue
            paths = [find_feature_file(d, record.slide_id) for d in self.feature_dirs.values()]
            key = hashlib.sha256(json.dumps([
                GRAPH_FORMAT_VERSION, transform_repr, _source_signature(paths),
                sorted(self.patch_sizes.items()), sorted((m, str(d)) for m, d in self.coords_dirs.items()),
                record.case_id, record.label, self.classes,
            ]).encode()).hexdigest()
            cache_path = Path(self.processed_dir) / f"{record.slide_id}.pt"
            if cache_path.is_file() and self._cached_key(cache_path) == key:
                continue
            tasks.append((record, self.classes.index(record.label), self.feature_dirs, self.patch_sizes,
                          self.coords_dirs, self.pre_transform, cache_path, key))
        if errors and self.on_error == "raise":
            slide_id, path, reason = errors[0]
            raise SlideError(slide_id, path, reason)
        results = []
        if tasks:
            bar = tqdm(total=len(tasks), desc="Building slide graphs", unit="slide", disable=not self.progress)
            if self.num_workers > 0 and len(tasks) > 1:
                # Forked children of a process that has run torch ops can deadlock in OpenMP.
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=self.num_workers, mp_context=context) as pool:
                    for result in pool.map(_build_one, tasks, chunksize=1):
                        results.append(result)
                        bar.update()
                        if result[1] is not None and self.on_error == "raise":
                            break
            else:
                for task in tasks:
                    results.append(_build_one(task))
                    bar.update()
                    if results[-1][1] is not None and self.on_error == "raise":
                        break
            bar.close()
        for slide_id, error, _ in results:
            if error is not None:
                errors.append((slide_id, error[0], error[1]))
        if errors and self.on_error == "raise":
            slide_id, path, reason = errors[0]
            raise SlideError(slide_id, path, reason)
        self.skipped = [{"slide_id": s, "file": p, "reason": r} for s, p, r in errors]
        skipped_path = Path(self.root) / "skipped.csv"
        if self.skipped:
            def write(handle):
                text = _csv_text(["slide_id", "file", "reason"], self.skipped)
                handle.write(text.encode())
            atomic_write(skipped_path, write)
        elif skipped_path.exists():
            skipped_path.unlink()
        bad = {row["slide_id"] for row in self.skipped}
        self.records = [r for r in self.records if r.slide_id not in bad]
        self.build_seconds = time.perf_counter() - start
        self.built_now = len(tasks)

    @staticmethod
    def _cached_key(path: Path) -> Optional[str]:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)["key"]
        except Exception:  # unreadable or foreign file: rebuild it
            return None

    # Access ------------------------------------------------------------------------------
    def len(self) -> int:
        return len(self.records)

    def get(self, idx: int):
        if idx in self._cache:
            return self._cache[idx]
        path = Path(self.processed_dir) / f"{self.records[idx].slide_id}.pt"
        data = torch.load(path, map_location="cpu", weights_only=False)["data"]
        if self.in_memory:
            self._cache[idx] = data
        return data

    @property
    def slide_ids(self) -> List[str]:
        return [r.slide_id for r in self.records]

    @property
    def case_ids(self) -> List[str]:
        return [r.case_id for r in self.records]

    @property
    def targets(self) -> List[int]:
        return [self.classes.index(r.label) for r in self.records]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> Dict[str, object]:
        r"""Slides, patches per level, regions and edges of the built cohort."""
        stats = [graph_stats(self.get(i)) for i in range(len(self))]
        out: Dict[str, object] = {"slides": len(self), "skipped": len(self.skipped),
                                  "build_seconds": round(self.build_seconds, 2)}
        def order(key):  # patch levels low → high, then regions, then edges
            name = key.split("/", 1)[-1]
            return (0, level_magnification(name)) if is_level(name) else (1 if name == "region" else 2, 0)
        keys = sorted({k for s in stats for k in s}, key=order)
        for key in keys:
            values = torch.tensor([s.get(key, 0) for s in stats], dtype=torch.float64)
            out[key] = {"total": int(values.sum()), "mean": round(float(values.mean()), 1),
                        "min": int(values.min()), "max": int(values.max())}
        return out


def _csv_text(columns, rows) -> str:
    import io
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
