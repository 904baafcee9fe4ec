r"""Lightning callbacks of the training runs."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Dict, List

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from wsigraph.io import atomic_write_text


class EpochHistory(L.Callback):
    r"""Writes one row per epoch (the logged epoch metrics and the learning rate) to a CSV file.

    The file is rewritten atomically after every epoch by the global-zero process. The rows are
    part of the checkpoint, so a resumed fold continues the same file.

    Args:
        path: the CSV file.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.rows: List[Dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row: Dict[str, Any] = {"epoch": trainer.current_epoch}
        for name, value in sorted(trainer.callback_metrics.items()):
            value = float(value)
            row[name] = value if math.isfinite(value) else float("nan")
        if trainer.optimizers:
            row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        if trainer.is_global_zero:
            self._write()

    def _write(self) -> None:
        columns: List[str] = []
        for row in self.rows:
            columns += [key for key in row if key not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(self.path, buffer.getvalue())

    def state_dict(self) -> Dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))


class FoldProgressBar(TQDMProgressBar):
    r"""A transient progress bar per fold: epoch, batches and the logged losses, no validation bar.

    Args:
        description: prefix of the bar (e.g. ``"abmil fold 2"``).
    """

    def __init__(self, description: str = ""):
        super().__init__()
        self.description = description

    def init_train_tqdm(self) -> Tqdm:
        bar = super().init_train_tqdm()
        bar.leave = False  # the fold's result line replaces it
        return bar

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        prefix = f"{self.description} " if self.description else ""
        self.train_progress_bar.set_description(f"{prefix}epoch {trainer.current_epoch}")
