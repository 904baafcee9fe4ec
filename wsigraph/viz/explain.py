r"""Trained models of a run directory, run in evaluation mode on chosen slides, and the maps of
their outputs written per slide (PNG heatmap and QuPath GeoJSON).

A run directory written by :func:`wsigraph.train.run_experiment` holds per fold
``fold_{k}/fit_done.json`` (naming the best checkpoint) and ``fold_{k}/checkpoints/best.ckpt``:
Lightning checkpoints of :class:`wsigraph.train.MILModule`, whose ``model`` attribute is the
MIL model. A comparison run (a config with a ``models`` list) holds one such directory per model,
``{run}/{model}``.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch_geometric.data import Batch, HeteroData

from wsigraph.models.base import MILModel, MILOutput
from wsigraph.viz.geojson import write_geojson
from wsigraph.viz.heatmap import plot_slide_maps
from wsigraph.viz.maps import split_output

__all__ = ["find_fold_checkpoint", "load_checkpoint_model", "load_fold_model", "fold_slide_ids", "explain_slides",
           "visualize_slides", "safe_file_name"]


def _model_dir(run_dir: Path, model: Optional[str]) -> Path:
    r"""The directory of one model's folds: ``run_dir`` itself, or ``run_dir/model`` in a comparison."""
    if model is not None:
        path = run_dir / model
        if not path.is_dir():
            raise FileNotFoundError(f"no model directory '{model}' in {run_dir}")
        return path
    if any(run_dir.glob("fold_*")):
        return run_dir
    models = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and any(p.glob("fold_*"))) \
        if run_dir.is_dir() else []
    if len(models) == 1:
        return run_dir / models[0]
    if models:
        raise ValueError(f"{run_dir} is a comparison run of several models {models}: choose one (model=..., --model on the command line)")
    raise FileNotFoundError(f"{run_dir} holds no trained fold (fold_*/)")


def find_fold_checkpoint(run_dir, fold: int = 0, model: Optional[str] = None) -> Path:
    r"""Path of the best checkpoint of ``fold`` in a run directory.

    Looks, in order, at ``fold_{k}/fit_done.json`` (the checkpoint chosen by the trainer),
    ``summary.json``'s fold entries, ``fold_{k}/checkpoints/best.ckpt`` and, for a fold still
    training, ``fold_{k}/checkpoints/last.ckpt``.

    Args:
        run_dir: the run directory (``run.dir`` of the config).
        fold: fold index.
        model: the model's name in a comparison run (``None``: the run's only model).
    """
    run_dir = _model_dir(Path(run_dir), model)
    fold_dir = run_dir / f"fold_{int(fold)}"
    candidates: List[Path] = []
    fit_done = fold_dir / "fit_done.json"
    if fit_done.is_file():
        with open(fit_done) as handle:
            relative = json.load(handle).get("best_checkpoint")
        if relative:
            candidates.append(run_dir / relative)
    summary = run_dir / "summary.json"
    if summary.is_file():
        with open(summary) as handle:
            folds = json.load(handle).get("folds") or []
        candidates += [run_dir / f["checkpoint"] for f in folds
                       if isinstance(f, dict) and f.get("fold") == int(fold) and f.get("checkpoint")]
    candidates += [fold_dir / "checkpoints" / "best.ckpt", fold_dir / "checkpoints" / "last.ckpt"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no checkpoint of fold {fold} in {run_dir} (looked at "
                            f"{', '.join(str(p) for p in dict.fromkeys(candidates))})")


def load_checkpoint_model(path, device: Union[str, torch.device] = "cpu") -> MILModel:
    r"""The MIL model stored in a Lightning checkpoint of :class:`~wsigraph.train.MILModule`,
    in evaluation mode on ``device``.

    The module's hyper-parameters (saved in the checkpoint) rebuild the model from the registry;
    the weights are then loaded strictly.
    """
    from wsigraph.train.module import MILModule
    module = MILModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=False)
    return module.model.to(device).eval()


def load_fold_model(run_dir, fold: int = 0, model: Optional[str] = None,
                    device: Union[str, torch.device] = "cpu") -> MILModel:
    r"""The trained model of ``fold`` of a run directory (its best checkpoint, see
    :func:`find_fold_checkpoint`), in evaluation mode on ``device``."""
    return load_checkpoint_model(find_fold_checkpoint(run_dir, fold, model), device)


def fold_slide_ids(run_dir, fold: int = 0, part: str = "test", model: Optional[str] = None) -> List[str]:
    r"""Slide ids of ``part`` (``"train"``, ``"val"`` or ``"test"``) of ``fold``, read from the
    run's ``splits_{k}.csv`` (in the model's directory, or the comparison run above it)."""
    from wsigraph.train.splits import find_split_files, read_splits
    run_dir = Path(run_dir)
    try:
        model_dir = _model_dir(run_dir, model)
    except (FileNotFoundError, ValueError):
        model_dir = run_dir
    for directory in (model_dir, model_dir.parent, run_dir):
        if find_split_files(directory):
            splits = read_splits(directory)
            if not 0 <= int(fold) < len(splits):
                raise IndexError(f"fold {fold} out of range: {directory} holds {len(splits)} folds")
            return list(splits[int(fold)][part])
    raise FileNotFoundError(f"no splits_{{k}}.csv beside {run_dir}")


@torch.no_grad()
def explain_slides(model: torch.nn.Module, graphs: Sequence[HeteroData], batch_size: int = 1,
                   device: Union[str, torch.device, None] = None) -> List[MILOutput]:
    r"""Run ``model`` in evaluation mode on ``graphs`` (batches of ``batch_size`` slides) and
    return one :class:`MILOutput` per slide (logits ``[1, C]`` and the slide's interpretation,
    on the CPU), in the order of ``graphs``. The model's training mode is restored afterwards."""
    if device is None:
        parameter = next(iter(model.parameters()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    outputs: List[MILOutput] = []
    try:
        for start in range(0, len(graphs), max(1, int(batch_size))):
            chunk = [copy.copy(g) for g in graphs[start:start + max(1, int(batch_size))]]
            batch = Batch.from_data_list(chunk).to(device)
            for output in split_output(batch, model(batch)):
                output.logits = output.logits.cpu()
                output.aux_loss = output.aux_loss.cpu()
                output.interpretation = {t: {n: v.cpu() for n, v in values.items()}
                                         for t, values in output.interpretation.items()}
                outputs.append(output)
    finally:
        model.train(was_training)
    return outputs


def safe_file_name(name: str) -> str:
    r"""A slide id usable as a file name (path separators and odd characters replaced by ``_``)."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return text or "slide"


def visualize_slides(model: torch.nn.Module, graphs: Sequence[HeteroData], out_dir,
                     class_names: Optional[Sequence[str]] = None, names: Optional[Sequence[str]] = None,
                     batch_size: int = 1, device: Union[str, torch.device, None] = None, png: bool = True,
                     geojson: bool = True, geojson_kwargs: Optional[Dict] = None, **plot_kwargs) -> List[Dict]:
    r"""Write ``{slide_id}.png`` (:func:`~wsigraph.viz.plot_slide_maps`) and
    ``{slide_id}.geojson`` (:func:`~wsigraph.viz.write_geojson`) for every slide of ``graphs``.

    Args:
        model: a MIL model (see :func:`load_fold_model`).
        graphs: slide graphs (e.g. items of a :class:`~wsigraph.data.SlideGraphDataset`).
        out_dir: output directory (created).
        class_names: class names for the titles.
        names: maps to draw and export (default: all).
        batch_size, device: inference settings (:func:`explain_slides`).
        png, geojson: which files to write.
        geojson_kwargs: keyword arguments of :func:`~wsigraph.viz.write_geojson`.
        **plot_kwargs: keyword arguments of :func:`~wsigraph.viz.plot_slide_maps`.

    Returns:
        one record per slide: ``slide_id``, ``prediction`` (class index), ``probabilities``,
        ``png`` / ``geojson`` paths (``None`` when not written), ``panels`` and ``features``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = explain_slides(model, graphs, batch_size=batch_size, device=device)
    records = []
    used: Dict[str, int] = {}
    for graph, output in zip(graphs, outputs):
        slide_id = str(getattr(graph, "slide_id", "") or f"slide_{len(records)}")
        stem = safe_file_name(slide_id)
        used[stem] = used.get(stem, 0) + 1
        if used[stem] > 1:  # two ids that differ only in odd characters
            stem = f"{stem}_{used[stem]}"
        probabilities = output.logits.float().softmax(dim=-1).reshape(-1)
        record = {"slide_id": slide_id, "prediction": int(probabilities.argmax()),
                  "probabilities": probabilities.tolist(), "png": None, "geojson": None,
                  "panels": [], "features": 0}
        if png:
            path = out_dir / f"{stem}.png"
            record["panels"] = plot_slide_maps(graph, output, path, names, class_names=class_names, **plot_kwargs)
            record["png"] = str(path)
        if geojson:
            path = out_dir / f"{stem}.geojson"
            record["features"] = write_geojson(path, graph, output, names, **dict(geojson_kwargs or {}))
            record["geojson"] = str(path)
        records.append(record)
    return records
