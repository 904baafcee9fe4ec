r"""Cross-validated training runs and external evaluation, driven by a config.

A config has the sections ``data`` and ``graph`` (the cohort, see
:func:`~wsigraph.data.dataset_from_config`), ``model`` (``name`` of a registered model and its
arguments), ``train`` (:data:`TRAIN_DEFAULTS`), ``run`` (:data:`RUN_DEFAULTS`) and ``trainer``
(keyword arguments of :class:`lightning.pytorch.Trainer`, e.g. ``accelerator``, ``devices``,
``strategy``, ``precision``). A top-level ``models`` list trains several models on the same
splits and prints them side by side (:func:`run_experiment`).

Run directory of one model::

    config.yaml            the resolved config (a different config is refused)
    splits_{k}.csv         CLAM layout (+ splits_{k}_descriptor.csv)
    fold_{k}.csv           test predictions (CLAM columns + case_id, fold); written last = fold done
    fold_{k}/              checkpoints/ (best.ckpt, last.ckpt while training), history.csv,
                           val_predictions.csv, metrics.json, fit_done.json
    summary.csv, summary.json

Every file is written atomically; a rerun skips finished folds and resumes an interrupted fold
from its last checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml

from wsigraph.config import load_config, merge
from wsigraph.io import atomic_write_json, atomic_write_text
from wsigraph.train.callbacks import EpochHistory, FoldProgressBar
from wsigraph.train.metrics import (bootstrap_ci, classification_metrics, predict_labels,
                                    youden_threshold)
from wsigraph.train.results import (format_comparison, format_table, read_predictions,
                                    summary_rows, write_predictions, write_summary_csv)
from wsigraph.train.splits import (check_patient_disjoint, make_splits, read_splits, splits_equal,
                                   write_splits, find_split_files)

__all__ = ["TRAIN_DEFAULTS", "RUN_DEFAULTS", "TRAINER_DEFAULTS", "load_experiment_config", "result_table",
           "resolve_config", "run_experiment", "cross_validate", "compare_models", "evaluate_run",
           "ConfigMismatchError"]

#: ``train`` section defaults.
TRAIN_DEFAULTS: Dict[str, Any] = {
    "epochs": 20,                    # maximum epochs per fold
    "min_epochs": 0,                 # no early stop before this many epochs
    "lr": 2.0e-4,
    "weight_decay": 1.0e-5,
    "optimizer": "adam",             # adam | adamw | sgd
    "scheduler": "cosine",           # cosine (with linear warm-up) | plateau (on val_loss) | none
    "warmup_epochs": 0,
    "plateau_patience": 5,
    "plateau_factor": 0.5,
    "grad_clip": None,               # gradient norm clipping (Trainer gradient_clip_val)
    "batch_size": 1,                 # slides per step
    "eval_batch_size": None,         # slides per validation / test step (default batch_size)
    "max_patches_train": None,       # RandomPatchSubsample cap per patch level, training only
    "early_stopping_patience": None,  # epochs without improvement of `monitor`; None: off
    "monitor": "val_loss",           # model selection / early stopping: val_loss or val_<metric>
    "class_weighted_sampling": False,
    "class_weighted_loss": False,
    "num_workers": 0,
    "ordinal": False,                # labels are ordered grades: also report QWK
    "threshold": "argmax",           # argmax | youden (binary: chosen on validation slides only)
    "bootstrap": 1000,               # bootstrap resamples of the 95 % CIs (0: none)
    "val_fraction": 0.2,             # share of a fold's non-test patients used for validation
}

#: ``run`` section defaults.
RUN_DEFAULTS: Dict[str, Any] = {
    "dir": None,                     # run directory (default runs/<config file name>)
    "seed": 0,
    "folds": 5,
    "splits": None,                  # directory of existing splits_{k}.csv (ours or CLAM's) to use
    "deterministic": False,          # deterministic algorithms (Trainer deterministic=True)
    "num_threads": None,             # CPU threads of this process (torch.set_num_threads); None: unchanged
}

#: ``trainer`` section defaults (any other Trainer argument may be given).
TRAINER_DEFAULTS: Dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "precision": 32,                 # "bf16-mixed" on a GPU
    "enable_progress_bar": True,
}

#: Keys that identify an experiment and are therefore not inherited through ``base:``.
NOT_INHERITED = (("models",), ("run", "dir"))
#: Settings that do not change results: a rerun may change them.
IGNORED_IN_COMPARISON = (("trainer", "enable_progress_bar"), ("train", "num_workers"), ("data", "num_workers"),
                         ("run", "num_threads"))
MAXIMISED = ("val_auc", "val_balanced_acc", "val_f1", "val_acc", "val_qwk")


class ConfigMismatchError(RuntimeError):
    r"""The run directory was created with another config."""


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def load_experiment_config(path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    r"""Load a config (with ``base:`` inheritance and ``a.b=value`` overrides) for a run.

    ``models`` and ``run.dir`` name *this* experiment, so they are taken from the file itself or
    the overrides, never inherited from its base: ``configs/abmil.yaml`` with ``base: demo.yaml``
    trains ABMIL alone into ``runs/abmil`` even though the demo config compares several models in
    ``runs/demo``. ``run.dir`` defaults to ``runs/<config file name>``.
    """
    path = Path(path)
    config = load_config(path, overrides)
    with open(path) as handle:
        own = yaml.safe_load(handle) or {}
    overridden = {item.split("=", 1)[0].strip() for item in overrides}
    for key in NOT_INHERITED:
        dotted = ".".join(key)
        if _get(own, key) is None and not any(o == dotted or o.startswith(dotted + ".") for o in overridden):
            _pop(config, key)
    config.setdefault("run", {})
    if config["run"].get("dir") is None:
        config["run"]["dir"] = str(Path("runs") / path.stem)
    return config


def _get(config: Mapping, key: Tuple[str, ...]):
    node: Any = config
    for part in key:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _pop(config: Dict, key: Tuple[str, ...]) -> None:
    node = config
    for part in key[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(key[-1], None)


def resolve_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    r"""Fill the defaults of ``train``, ``run`` and ``trainer`` and check the settings."""
    config = copy.deepcopy(dict(config))
    for section, defaults in (("train", TRAIN_DEFAULTS), ("run", RUN_DEFAULTS)):
        given = dict(config.get(section) or {})
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"unknown {section} setting(s) {unknown}; known: {sorted(defaults)}")
        config[section] = {**defaults, **given}
    config["trainer"] = {**TRAINER_DEFAULTS, **dict(config.get("trainer") or {})}
    if config["run"]["dir"] is None:
        raise ValueError("run.dir is not set")
    train = config["train"]
    if train["monitor"] != "val_loss" and train["monitor"] not in MAXIMISED:
        raise ValueError(f"train.monitor must be val_loss or one of {MAXIMISED}")
    if train["threshold"] not in ("argmax", "youden"):
        raise ValueError("train.threshold must be 'argmax' or 'youden'")
    if "models" not in config:
        model = config.get("model")
        if not isinstance(model, Mapping) or "name" not in model:
            raise ValueError("the config needs model.name (or a models list)")
    return config


def _comparable(config: Mapping[str, Any]) -> Dict[str, Any]:
    config = json.loads(json.dumps(config, default=str))  # plain types, as after a YAML round trip
    for key in IGNORED_IN_COMPARISON:
        _pop(config, key)
    return config


def _differences(old: Any, new: Any, prefix: str = "") -> List[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{name}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{name}: {old[key]!r} -> (absent)")
            else:
                out += _differences(old[key], new[key], name)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def claim_run_dir(run_dir, config: Mapping[str, Any]) -> None:
    r"""Write ``config.yaml`` into a new run directory, or check that an existing one was created
    with the same config (raising :class:`ConfigMismatchError` otherwise)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if path.is_file():
        with open(path) as handle:
            stored = yaml.safe_load(handle) or {}
        differences = _differences(_comparable(stored), _comparable(config))
        if differences:
            listed = "\n  ".join(differences[:20])
            raise ConfigMismatchError(
                f"{run_dir} holds a run made with a different config:\n  {listed}\n"
                f"Choose another directory (run.dir=...) or remove {run_dir} to start over.")
        return
    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def run_experiment(config: Mapping[str, Any], dataset=None, callbacks: Sequence = (),
                   verbose: bool = True) -> Dict[str, Any]:
    r"""Train what a config describes: :func:`compare_models` when it has a ``models`` list,
    else :func:`cross_validate`. Returns the summary (or the summaries by model)."""
    threads = (config.get("run") or {}).get("num_threads")
    if threads:
        # Small per-slide tensors gain little from more threads, and on a shared machine an
        # oversubscribed thread team makes every operator wait for a descheduled thread.
        torch.set_num_threads(int(threads))
    if config.get("models"):
        return compare_models(config, dataset=dataset, callbacks=callbacks, verbose=verbose)
    return cross_validate(config, dataset=dataset, callbacks=callbacks, verbose=verbose)


def result_table(result: Mapping[str, Any]) -> str:
    r"""The printed table of what :func:`run_experiment` or :func:`evaluate_run` returned."""
    if "mean" in result:
        return format_table(result, f"{result.get('model', '')} ({result.get('run_dir', '')})")
    return format_comparison(result)


def _is_main_process() -> bool:
    from lightning.pytorch.utilities import rank_zero_only
    return getattr(rank_zero_only, "rank", 0) == 0


def _echo(verbose: bool, *args) -> None:
    if verbose and _is_main_process():
        print(*args, flush=True)


def _model_entries(config: Mapping[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    base_model = dict(config.get("model") or {})
    entries, seen = [], {}
    for entry in config["models"]:
        if isinstance(entry, str):
            model = base_model if base_model.get("name") == entry else {"name": entry}
        elif isinstance(entry, Mapping) and "name" in entry:
            model = dict(entry)
        else:
            raise ValueError(f"models entries are model names or model sections with a name (got {entry!r})")
        label = str(model["name"])
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}_{seen[label]}"
        entries.append((label, model))
    return entries


def compare_models(config: Mapping[str, Any], dataset=None, callbacks: Sequence = (),
                   verbose: bool = True) -> Dict[str, Dict[str, Any]]:
    r"""Cross-validate every model of ``config["models"]`` on the same splits.

    Entries are model names (the ``model`` section is used for the entry naming the same model)
    or full model sections. Model ``m`` trains into ``{run.dir}/{m}``; the splits are made once
    in ``{run.dir}`` and shared, and ``{run.dir}/comparison.csv`` / ``comparison.json`` hold the
    side-by-side summary, also printed.
    """
    config = resolve_config(config)
    run_dir = Path(config["run"]["dir"])
    if _is_main_process():
        claim_run_dir(run_dir, config)
    dataset = dataset if dataset is not None else _dataset(config, verbose)
    _fold_splits(config, dataset, run_dir, verbose=verbose)
    summaries: Dict[str, Dict[str, Any]] = {}
    for label, model in _model_entries(config):
        sub = copy.deepcopy(config)
        sub.pop("models")
        sub["model"] = model
        sub["run"]["dir"] = str(run_dir / label)
        sub["run"]["splits"] = str(run_dir)
        summaries[label] = cross_validate(sub, dataset=dataset, callbacks=callbacks, verbose=verbose,
                                          print_table=False, announce_splits=False)
    if _is_main_process():
        _write_comparison(run_dir, summaries)
        names = ", ".join(summaries)
        _echo(verbose, "\n" + format_comparison(
            summaries, f"{run_dir}: {config['run']['folds']}-fold cross-validation, test folds ({names})"))
    return summaries


def _write_comparison(run_dir: Path, summaries: Mapping[str, Mapping[str, Any]]) -> None:
    rows = []
    for label, summary in summaries.items():
        row = {"model": label}
        for key, value in summary["mean"].items():
            if key.startswith("test_"):
                row[f"{key}_mean"] = value
                row[f"{key}_std"] = summary["std"].get(key)
        rows.append(row)
    write_summary_csv(run_dir / "comparison.csv", rows)
    atomic_write_json(run_dir / "comparison.json",
                      {label: {"mean": s["mean"], "std": s["std"], "pooled": s.get("pooled")}
                       for label, s in summaries.items()})


def _dataset(config: Mapping[str, Any], verbose: bool):
    from wsigraph.data.builder import dataset_from_config
    start = time.perf_counter()
    dataset = dataset_from_config(config, progress=verbose and _is_main_process())
    skipped = getattr(dataset, "skipped", [])
    _echo(verbose, f"[data] {len(dataset)} slides, classes {list(dataset.classes)}"
                   + (f", {len(skipped)} skipped (see {Path(dataset.root) / 'skipped.csv'})" if skipped else "")
                   + f" ({time.perf_counter() - start:.1f} s)")
    return dataset


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------
def _fold_splits(config: Mapping[str, Any], dataset, run_dir: Path, verbose: bool) -> List[Dict[str, List[str]]]:
    r"""The run's splits: those already in the run directory, else imported from ``run.splits``,
    else generated; written into the run directory and checked for patient leakage."""
    run = config["run"]
    folds = int(run["folds"])
    slide_ids = list(dataset.slide_ids)
    slide_to_case = dict(zip(slide_ids, dataset.case_ids))
    targets = list(dataset.targets)
    imported = None
    if run.get("splits"):
        imported = read_splits(run["splits"], folds)
    if find_split_files(run_dir):
        splits = read_splits(run_dir)
        if len(splits) != folds:
            raise ConfigMismatchError(f"{run_dir} holds {len(splits)} split files, run.folds is {folds}")
        if imported is not None and not splits_equal(splits, imported):
            raise ConfigMismatchError(f"the splits in {run_dir} differ from those in {run['splits']}")
        source = "reused"
    elif imported is not None:
        splits, source = imported, f"imported from {run['splits']}"
    else:
        splits = make_splits(slide_ids, dataset.case_ids, targets, folds=folds,
                             val_fraction=float(config["train"]["val_fraction"]), seed=int(run["seed"]))
        source = "generated"
    # Slides the dataset skipped (bad input) leave the splits, loudly.
    skipped = {row["slide_id"] for row in getattr(dataset, "skipped", [])}
    dropped = sorted({s for split in splits for part in split.values() for s in part if s in skipped})
    if dropped:
        warnings.warn(f"{len(dropped)} slide(s) of the splits were skipped when the dataset was built "
                      f"and are left out: {dropped[:10]}")
        splits = [{part: [s for s in ids if s not in skipped] for part, ids in split.items()} for split in splits]
    if _is_main_process():
        if not find_split_files(run_dir):
            labels = dict(zip(slide_ids, targets))
            write_splits(run_dir, splits, labels=labels, classes=list(dataset.classes))
        _echo(verbose, f"[splits] {folds} folds {source} ({run_dir})")
    for fold, split in enumerate(splits):
        check_patient_disjoint(split, slide_to_case, fold=fold, verbose=verbose and _is_main_process())
    return splits


# ---------------------------------------------------------------------------------------------
# Cross-validation of one model
# ---------------------------------------------------------------------------------------------
def cross_validate(config: Mapping[str, Any], dataset=None, callbacks: Sequence = (), verbose: bool = True,
                   print_table: bool = True, announce_splits: bool = True) -> Dict[str, Any]:
    r"""Patient-level k-fold cross-validation of ``config["model"]``.

    Finished folds (``fold_{k}.csv`` present) are read back, an interrupted fold resumes from its
    last checkpoint, the others train from scratch. Writes the run directory's files (see the
    module docstring), prints the summary table and returns the summary.

    Args:
        config: the experiment config.
        dataset: the cohort (default: built from the config's ``data`` and ``graph`` sections).
        callbacks: extra Lightning callbacks added to every fold's trainer.
        verbose: print progress, the leakage check and the table.
        print_table: print the summary table at the end.
        announce_splits: print the per-fold leakage check (a comparison prints it once for all).
    """
    config = resolve_config(config)
    run_dir = Path(config["run"]["dir"])
    if _is_main_process():
        claim_run_dir(run_dir, config)
    dataset = dataset if dataset is not None else _dataset(config, verbose)
    splits = _fold_splits(config, dataset, run_dir, verbose=verbose and announce_splits)
    name = config["model"]["name"]
    results = []
    for fold, split in enumerate(splits):
        result = _finished_fold(run_dir, fold)
        if result is not None:
            _echo(verbose, f"[{name}] fold {fold}: finished earlier (test AUC {result['test']['auc']:.3f})")
        else:
            result = train_fold(config, dataset, split, fold, run_dir, callbacks=callbacks, verbose=verbose)
        results.append(result)
    if not _is_main_process() or any(r is None for r in results):
        return {}
    summary = summarize_run(config, dataset, splits, results, run_dir)
    if print_table:
        _echo(verbose, "\n" + format_table(summary, f"{name} ({run_dir}): {len(results)}-fold cross-validation, "
                                                    f"test folds"))
    return summary


def _finished_fold(run_dir: Path, fold: int) -> Optional[Dict[str, Any]]:
    predictions, metrics = run_dir / f"fold_{fold}.csv", run_dir / f"fold_{fold}" / "metrics.json"
    if predictions.is_file() and metrics.is_file():
        with open(metrics) as handle:
            return json.load(handle)
    return None


def _trainer_kwargs(config: Mapping[str, Any], fold_dir: Path, callbacks: List, has_val: bool) -> Dict[str, Any]:
    train = config["train"]
    kwargs = dict(config["trainer"])
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_model_summary", False)
    kwargs.setdefault("num_sanity_val_steps", 0)
    kwargs.setdefault("log_every_n_steps", 1)
    kwargs.setdefault("deterministic", bool(config["run"]["deterministic"]))
    kwargs["default_root_dir"] = str(fold_dir)
    kwargs["max_epochs"] = int(train["epochs"])
    kwargs["min_epochs"] = int(train["min_epochs"] or 0)
    if train["grad_clip"]:
        kwargs["gradient_clip_val"] = float(train["grad_clip"])
    if not has_val:
        kwargs["limit_val_batches"] = 0
    kwargs["callbacks"] = callbacks
    return kwargs


@contextlib.contextmanager
def _quiet_lightning():
    r"""Silence Lightning's per-fit banners and the warnings that do not apply to these runs."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
             "lightning.fabric.utilities.seed", "lightning.pytorch.trainer.connectors.signal_connector")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for message in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                        ".*exists and is not empty.*", ".*is a positional-only.*",
                        ".*Trying to infer the `batch_size`.*", ".*sync_dist=True.*",
                        ".*The number of training batches.*", ".*treespec, LeafSpec.*"):
            warnings.filterwarnings("ignore", message=message)
        try:
            yield
        finally:
            for n, level in zip(names, levels):
                logging.getLogger(n).setLevel(level)


def _model_dims(dataset) -> Tuple[int, int]:
    from wsigraph.data.schema import patch_levels
    sample = dataset[0]
    levels = patch_levels(sample)
    if not levels:
        raise ValueError("the slide graphs have no patch level")
    return int(sample[levels[-1]].x.size(-1)), int(dataset.num_classes)


def _module_kwargs(config: Mapping[str, Any], dataset, train_indices: Sequence[int], seed: int) -> Dict[str, Any]:
    train = config["train"]
    in_channels, num_classes = _model_dims(dataset)
    class_weights = None
    if train["class_weighted_loss"]:
        targets = np.asarray(dataset.targets)[list(train_indices)]
        counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
        class_weights = (counts.sum() / (num_classes * np.maximum(counts, 1))).tolist()
    return dict(model=dict(config["model"]), in_channels=in_channels, num_classes=num_classes,
                optimizer=train["optimizer"], lr=float(train["lr"]), weight_decay=float(train["weight_decay"]),
                scheduler=train["scheduler"], warmup_epochs=int(train["warmup_epochs"]),
                epochs=int(train["epochs"]), class_weights=class_weights, ordinal=bool(train["ordinal"]),
                seed=seed, plateau_patience=int(train["plateau_patience"]),
                plateau_factor=float(train["plateau_factor"]))


def _eval_device(config: Mapping[str, Any]) -> torch.device:
    accelerator = str(config["trainer"].get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def train_fold(config: Mapping[str, Any], dataset, split: Mapping[str, Sequence[str]], fold: int, run_dir,
               callbacks: Sequence = (), verbose: bool = True) -> Optional[Dict[str, Any]]:
    r"""Train (or resume) one fold, then score its best checkpoint on the validation and test
    slides and write the fold's files. Returns the fold result (``None`` on non-zero ranks)."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from wsigraph.train.data import SlideGraphDataModule
    from wsigraph.train.module import MILModule
    from wsigraph.transforms.subsample import RandomPatchSubsample

    config = resolve_config(config)
    train = config["train"]
    run_dir = Path(run_dir)
    fold_dir = run_dir / f"fold_{fold}"
    checkpoint_dir = fold_dir / "checkpoints"
    position = {s: i for i, s in enumerate(dataset.slide_ids)}
    parts = {part: [position[s] for s in split.get(part, [])] for part in ("train", "val", "test")}
    if not parts["train"]:
        raise ValueError(f"fold {fold}: no training slides")
    seed = int(config["run"]["seed"]) + fold
    name = config["model"]["name"]
    fit_done = fold_dir / "fit_done.json"
    start = time.perf_counter()

    if not fit_done.is_file():
        last = checkpoint_dir / "last.ckpt"
        resume = last if last.is_file() else None
        if resume is None and checkpoint_dir.exists() and _is_main_process():
            shutil.rmtree(checkpoint_dir)  # leftovers of a fold that never saved a full epoch
        _echo(verbose, f"[{name}] fold {fold}: " + (f"resuming from {resume}" if resume else "training")
              + f" ({len(parts['train'])} train / {len(parts['val'])} val / {len(parts['test'])} test slides)")
        L.seed_everything(seed, workers=True, verbose=False)
        module = MILModule(**_module_kwargs(config, dataset, parts["train"], seed))
        transform = RandomPatchSubsample(train["max_patches_train"]) if train["max_patches_train"] else None
        datamodule = SlideGraphDataModule(
            dataset, parts["train"], parts["val"], parts["test"], batch_size=int(train["batch_size"]),
            eval_batch_size=train["eval_batch_size"], train_transform=transform,
            class_weighted_sampling=bool(train["class_weighted_sampling"]), seed=seed,
            num_workers=int(train["num_workers"]), pin_memory=_eval_device(config).type == "cuda")
        has_val = bool(parts["val"])
        monitor = train["monitor"] if has_val else None
        mode = "min" if monitor == "val_loss" else "max"
        fold_callbacks: List = [
            ModelCheckpoint(dirpath=str(checkpoint_dir), filename="best", monitor=monitor, mode=mode,
                            save_top_k=1, save_last=True, enable_version_counter=False),
            EpochHistory(fold_dir / "history.csv"),
        ]
        if has_val and train["early_stopping_patience"]:
            fold_callbacks.append(EarlyStopping(monitor=monitor, mode=mode,
                                                patience=int(train["early_stopping_patience"])))
        if config["trainer"].get("enable_progress_bar", True):
            fold_callbacks.append(FoldProgressBar(f"{name} fold {fold}"))
        fold_callbacks += list(callbacks)
        for callback in callbacks:
            if hasattr(callback, "fold"):
                callback.fold = fold
        with _quiet_lightning():
            trainer = L.Trainer(**_trainer_kwargs(config, fold_dir, fold_callbacks, has_val))
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
        if not trainer.is_global_zero or not _is_main_process():
            return None
        best = trainer.checkpoint_callback.best_model_path or str(checkpoint_dir / "last.ckpt")
        atomic_write_json(fit_done, {"best_checkpoint": str(Path(best).resolve().relative_to(run_dir.resolve())),
                                     "epochs_run": int(trainer.current_epoch),
                                     "fit_seconds": round(time.perf_counter() - start, 2)})
    elif not _is_main_process():
        return None

    with open(fit_done) as handle:
        fit_info = json.load(handle)
    best_path = run_dir / fit_info["best_checkpoint"]
    result = evaluate_fold(config, dataset, parts, fold, best_path, run_dir)
    result["fit_seconds"] = fit_info.get("fit_seconds")
    result["epochs_run"] = fit_info.get("epochs_run")
    test = result.pop("_test_predictions")
    atomic_write_json(fold_dir / "metrics.json", result)
    # fold_{k}.csv is written last: its presence marks the fold as finished.
    write_predictions(run_dir / f"fold_{fold}.csv", **test, fold=fold)
    last = checkpoint_dir / "last.ckpt"
    if last.is_file() and last.resolve() != best_path.resolve():
        last.unlink()
    _echo(verbose, f"[{name}] fold {fold}: best epoch {result['best_epoch']}, "
                   f"val AUC {result['val'].get('auc', float('nan')):.3f}, "
                   f"test AUC {result['test']['auc']:.3f}, "
                   f"balanced acc {result['test']['balanced_acc']:.3f} "
                   f"({time.perf_counter() - start:.1f} s)")
    return result


def _load_module(path, device: torch.device):
    from wsigraph.train.module import MILModule
    module = MILModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=False)
    return module.to(device).eval()


def evaluate_fold(config: Mapping[str, Any], dataset, parts: Mapping[str, Sequence[int]], fold: int,
                  checkpoint, run_dir) -> Dict[str, Any]:
    r"""Score a fold's checkpoint on its validation and test slides (one process, every slide
    exactly once); the decision threshold, if any, is chosen on the validation slides."""
    from wsigraph.train.module import predict
    train = config["train"]
    ordinal = bool(train["ordinal"])
    device = _eval_device(config)
    module = _load_module(checkpoint, device)
    batch_size = int(train["eval_batch_size"] or train["batch_size"])
    slide_ids, case_ids = list(dataset.slide_ids), list(dataset.case_ids)
    out: Dict[str, Any] = {"fold": fold, "checkpoint": str(Path(checkpoint).relative_to(run_dir))}
    out["best_epoch"] = int(torch.load(str(checkpoint), map_location="cpu", weights_only=False).get("epoch", -1))
    val = predict(module.model, dataset, parts["val"], batch_size, device) if parts["val"] else None
    test = predict(module.model, dataset, parts["test"], batch_size, device)
    if len(test["index"]) != len(parts["test"]):
        raise RuntimeError(f"fold {fold}: {len(test['index'])} test predictions for {len(parts['test'])} slides")
    threshold = None
    if train["threshold"] == "youden" and test["probs"].shape[1] == 2:
        threshold = youden_threshold(val["target"], val["probs"]) if val is not None else 0.5
    out["threshold"] = threshold
    out["num_val"], out["num_test"] = len(parts["val"]), len(parts["test"])
    out["val"] = classification_metrics(val["target"], val["probs"], threshold, ordinal) if val is not None else {}
    out["test"] = classification_metrics(test["target"], test["probs"], threshold, ordinal)
    if int(train["bootstrap"]) > 0:
        out["test_ci"] = bootstrap_ci(test["target"], test["probs"], threshold, ordinal,
                                      num_samples=int(train["bootstrap"]), seed=int(config["run"]["seed"]) + fold)
    if val is not None:
        write_predictions(Path(run_dir) / f"fold_{fold}" / "val_predictions.csv",
                          [slide_ids[i] for i in val["index"]], [case_ids[i] for i in val["index"]],
                          val["target"], val["probs"], predict_labels(val["probs"], threshold), fold=fold)
    out["_test_predictions"] = dict(
        slide_ids=[slide_ids[i] for i in test["index"]], case_ids=[case_ids[i] for i in test["index"]],
        targets=test["target"], probs=test["probs"], predicted=predict_labels(test["probs"], threshold))
    return out


def summarize_run(config: Mapping[str, Any], dataset, splits, results: Sequence[Mapping[str, Any]],
                  run_dir) -> Dict[str, Any]:
    r"""Write ``summary.csv`` / ``summary.json`` from the fold results and return the summary."""
    run_dir = Path(run_dir)
    train = config["train"]
    ordinal = bool(train["ordinal"])
    test_sets = [set(split["test"]) for split in splits]
    disjoint = sum(len(t) for t in test_sets) == len(set().union(*test_sets))
    pooled = None
    if disjoint:
        frames = [read_predictions(run_dir / f"fold_{r['fold']}.csv") for r in results]
        y = np.concatenate([f["Y"] for f in frames])
        probs = np.concatenate([f["probs"] for f in frames])
        y_hat = np.concatenate([f["Y_hat"] for f in frames])
        pooled = {"num_test": int(len(y)),
                  "test": classification_metrics(y, probs, ordinal=ordinal, y_pred=y_hat)}
        if int(train["bootstrap"]) > 0:
            pooled["test_ci"] = bootstrap_ci(y, probs, ordinal=ordinal, num_samples=int(train["bootstrap"]),
                                             seed=int(config["run"]["seed"]), y_pred=y_hat)
    rows = summary_rows(results, pooled, ordinal)
    write_summary_csv(run_dir / "summary.csv", rows)
    by_label = {str(row["folds"]): row for row in rows}
    summary = {
        "model": config["model"]["name"],
        "run_dir": str(run_dir),
        "classes": list(dataset.classes),
        "ordinal": ordinal,
        "num_slides": len(dataset),
        "folds": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "mean": {k: v for k, v in by_label["mean"].items() if k != "folds"},
        "std": {k: v for k, v in by_label["std"].items() if k != "folds"},
        "pooled": pooled,
        "disjoint_test_sets": disjoint,
    }
    atomic_write_json(run_dir / "summary.json", _json_safe(summary))
    return summary


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ---------------------------------------------------------------------------------------------
# External evaluation
# ---------------------------------------------------------------------------------------------
def evaluate_run(run_dir, data_config, ensemble: bool = False, out_dir=None, overrides: Sequence[str] = (),
                 verbose: bool = True, dataset=None) -> Dict[str, Any]:
    r"""Score every fold's best checkpoint of a trained run on another cohort.

    Args:
        run_dir: a run directory (of one model, or of a comparison: then every model in it).
        data_config: path of (or mapping with) a config whose ``data`` section, and ``graph``
            section when present, describe the external cohort; the class list is the run's.
        ensemble: also score the mean of the folds' probabilities (the decision threshold, if
            any, is the mean of the folds' validation thresholds).
        out_dir: output directory (default ``{run_dir}/eval/<config name>``).
        overrides: ``a.b=value`` overrides of ``data_config``.
        dataset: the external cohort, already built (default: from the configs).

    Writes ``fold_{k}.csv`` per fold (and ``ensemble.csv``), ``summary.csv`` and ``summary.json``
    into ``out_dir``, prints the table and returns the summary.
    """
    run_dir = Path(run_dir)
    with open(run_dir / "config.yaml") as handle:
        run_config = yaml.safe_load(handle)
    if isinstance(data_config, (str, Path)):
        name = Path(data_config).stem
        external = load_config(data_config, overrides)
    else:
        name, external = "external", dict(data_config)
    if run_config.get("models"):
        summaries = {}
        for label, _ in _model_entries(run_config):
            sub_out = Path(out_dir) / label if out_dir else None
            summaries[label] = evaluate_run(run_dir / label, external, ensemble, sub_out, verbose=verbose,
                                            dataset=dataset)
        _echo(verbose, "\n" + format_comparison(summaries, f"{run_dir} on {name}"))
        return summaries
    with open(run_dir / "summary.json") as handle:
        trained = json.load(handle)
    config = resolve_config(run_config)
    if "data" not in external:
        raise ValueError("the external config has no data section")
    config["data"] = dict(external["data"])
    config["data"]["classes"] = trained["classes"]
    if external.get("graph") is not None:
        config["graph"] = external["graph"]
    out_dir = Path(out_dir) if out_dir else run_dir / "eval" / name
    if dataset is None:
        dataset = _dataset(config, verbose)
    if list(dataset.classes) != list(trained["classes"]):
        raise ValueError(f"class lists differ: run {trained['classes']}, cohort {list(dataset.classes)}")
    ordinal = bool(config["train"]["ordinal"])
    device = _eval_device(config)
    indices = list(range(len(dataset)))
    slide_ids, case_ids = list(dataset.slide_ids), list(dataset.case_ids)
    from wsigraph.train.module import predict
    results, fold_probs, thresholds = [], [], []
    targets = None
    batch_size = int(config["train"]["eval_batch_size"] or config["train"]["batch_size"])
    bootstrap = int(config["train"]["bootstrap"])
    for fold_result in trained["folds"]:
        fold = fold_result["fold"]
        module = _load_module(run_dir / fold_result["checkpoint"], device)
        prediction = predict(module.model, dataset, indices, batch_size, device)
        if len(prediction["index"]) != len(dataset):
            raise RuntimeError(f"fold {fold}: {len(prediction['index'])} predictions for {len(dataset)} slides")
        threshold = fold_result.get("threshold")
        targets = prediction["target"]
        predicted = predict_labels(prediction["probs"], threshold)
        write_predictions(out_dir / f"fold_{fold}.csv", slide_ids, case_ids, targets, prediction["probs"],
                          predicted, fold=fold)
        result = {"fold": fold, "threshold": threshold, "num_test": len(dataset),
                  "test": classification_metrics(targets, prediction["probs"], threshold, ordinal)}
        if bootstrap > 0:
            result["test_ci"] = bootstrap_ci(targets, prediction["probs"], threshold, ordinal, num_samples=bootstrap,
                                             seed=fold)
        results.append(result)
        fold_probs.append(prediction["probs"])
        thresholds.append(threshold)
        _echo(verbose, f"[eval] {trained['model']} fold {fold}: AUC {result['test']['auc']:.3f}")
    ensemble_result = None
    if ensemble:
        probs = np.mean(fold_probs, axis=0)
        threshold = None if any(t is None for t in thresholds) else float(np.mean(thresholds))
        predicted = predict_labels(probs, threshold)
        write_predictions(out_dir / "ensemble.csv", slide_ids, case_ids, targets, probs, predicted, fold="ensemble")
        ensemble_result = {"num_test": len(dataset), "threshold": threshold,
                           "test": classification_metrics(targets, probs, threshold, ordinal)}
        if bootstrap > 0:
            ensemble_result["test_ci"] = bootstrap_ci(targets, probs, threshold, ordinal, num_samples=bootstrap)
    rows = summary_rows(results, ensemble_result, ordinal)
    if ensemble_result is not None:
        rows[-1]["folds"] = "ensemble"
    write_summary_csv(out_dir / "summary.csv", rows)
    by_label = {str(row["folds"]): row for row in rows}
    summary = {
        "model": trained["model"], "run_dir": str(run_dir), "cohort": name, "classes": trained["classes"],
        "ordinal": ordinal, "num_slides": len(dataset), "skipped": list(getattr(dataset, "skipped", [])),
        "folds": results,
        "mean": {k: v for k, v in by_label["mean"].items() if k != "folds"},
        "std": {k: v for k, v in by_label["std"].items() if k != "folds"},
        "pooled": ensemble_result,   # printed in the table's last column
        "ensemble": ensemble_result,
    }
    atomic_write_json(out_dir / "summary.json", _json_safe(summary))
    title = f"{trained['model']} ({run_dir}) on {name}: {len(results)} fold models"
    if ensemble_result is not None:
        title += " (last column: their ensemble)"
    _echo(verbose, "\n" + format_table(summary, title))
    return summary
