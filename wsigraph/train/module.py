r"""The :class:`~lightning.pytorch.LightningModule` that trains any registered MIL model."""
from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import random
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor

from wsigraph.models.base import MODEL_REGISTRY, MILModel, build_model
from wsigraph.train.data import derived_seed
from wsigraph.train.metrics import classification_metrics, cross_entropy

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "plateau", "none")


def _import_models() -> None:
    r"""Import every module of :mod:`wsigraph.models` so that all models are registered."""
    import wsigraph.models as package
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def model_from_config(model_config: Mapping[str, Any], in_channels: Optional[int] = None,
                      num_classes: Optional[int] = None) -> MILModel:
    r"""Build the registered model ``model_config["name"]`` with the other keys as arguments.

    ``in_channels`` and ``num_classes`` (taken from the data) are passed when the model's
    constructor accepts them and the config does not set them.
    """
    config = dict(model_config)
    if "name" not in config:
        raise ValueError("the model config needs a 'name' (one of the registered models)")
    name = config.pop("name")
    if name not in MODEL_REGISTRY:
        _import_models()
    if name in MODEL_REGISTRY:
        parameters = inspect.signature(MODEL_REGISTRY[name].__init__).parameters
        for key, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if value is not None and key in parameters and key not in config:
                config[key] = int(value)
    return build_model(name, **config)


class WarmupCosine:
    r"""Learning-rate factor per epoch: linear warm-up over ``warmup_epochs`` then cosine decay
    to ``min_factor`` at ``epochs``,

    .. math::
        f(e) = \begin{cases} \frac{e + 1}{w + 1} & e < w \\
        f_\min + \frac{1 - f_\min}{2}\left(1 + \cos\frac{\pi (e - w)}{E - w}\right) & e \ge w.
        \end{cases}
    """

    def __init__(self, epochs: int, warmup_epochs: int = 0, min_factor: float = 0.01):
        self.epochs = max(int(epochs), 1)
        self.warmup_epochs = max(int(warmup_epochs), 0)
        self.min_factor = float(min_factor)

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        span = max(self.epochs - self.warmup_epochs, 1)
        progress = min((epoch - self.warmup_epochs) / span, 1.0)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def gather_predictions(module: L.LightningModule, index: Tensor, logits: Tensor, target: Tensor):
    r"""Predictions of every process, each slide once, sorted by dataset index.

    Distributed samplers pad the last rank's share with repeated slides so that every process
    gets as many batches; gathering then de-duplicating by the slide's dataset index gives every
    slide exactly once. Shares of unequal length are padded to the longest before the gather.
    """
    world = module.trainer.world_size if module._trainer is not None else 1
    if world > 1:
        count = torch.tensor([index.numel()], device=index.device)
        counts = module.all_gather(count).view(-1)
        longest = int(counts.max())
        pad = longest - index.numel()
        if pad:
            index = torch.cat([index, index.new_full((pad,), -1)])
            logits = torch.cat([logits, logits.new_zeros((pad, logits.size(1)))])
            target = torch.cat([target, target.new_zeros((pad,))])
        index = module.all_gather(index).reshape(-1)
        logits = module.all_gather(logits).reshape(-1, logits.size(-1))
        target = module.all_gather(target).reshape(-1)
        keep = index >= 0
        index, logits, target = index[keep], logits[keep], target[keep]
    index, first = _unique_first(index)
    return index, logits[first], target[first]


def _unique_first(index: Tensor):
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    position = torch.arange(index.numel(), device=index.device)
    first = torch.full((unique.numel(),), index.numel(), dtype=torch.long, device=index.device)
    first = first.scatter_reduce(0, inverse, position, reduce="amin")
    return unique, first


class MILModule(L.LightningModule):
    r"""Trains a registered MIL model on batches of slide graphs.

    The loss is the model's :meth:`~wsigraph.models.MILModel.loss` (cross-entropy of the slide
    logits, optionally class-weighted, plus the model's auxiliary loss). Validation predictions
    are gathered over all processes and every validation slide is scored exactly once; the
    module logs ``val_loss`` (mean negative log-likelihood), ``val_auc``, ``val_balanced_acc``,
    ``val_f1``, ``val_acc`` (``val_qwk`` when ``ordinal``) and ``val_slides`` (the count).

    Global random state is reseeded from ``(seed, epoch)`` at the start of every training epoch,
    so that dropout and similar draws do not depend on what ran before (a resumed run repeats
    the uninterrupted one).

    Args:
        model: model config (``{"name": ..., **kwargs}``), built with :func:`model_from_config`.
        in_channels: patch feature size, passed to the model.
        num_classes: number of classes.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        lr: learning rate.
        weight_decay: weight decay.
        scheduler: ``"cosine"`` (linear warm-up then cosine, per epoch), ``"plateau"``
            (:class:`~torch.optim.lr_scheduler.ReduceLROnPlateau` on ``val_loss``) or ``"none"``.
        warmup_epochs: warm-up length of the cosine schedule.
        epochs: cosine schedule length.
        class_weights: per-class loss weights ``[C]`` (``None``: unweighted).
        ordinal: also log the quadratic-weighted kappa.
        seed: seed of the per-epoch random state.
        plateau_patience, plateau_factor: :class:`ReduceLROnPlateau` settings.
    """

    def __init__(self, model: Mapping[str, Any], in_channels: int, num_classes: int, optimizer: str = "adam",
                 lr: float = 2e-4, weight_decay: float = 1e-5, scheduler: str = "cosine", warmup_epochs: int = 0,
                 epochs: int = 20, class_weights: Optional[Sequence[float]] = None, ordinal: bool = False,
                 seed: int = 0, plateau_patience: int = 5, plateau_factor: float = 0.5):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS} (got '{optimizer}')")
        scheduler = "none" if scheduler in (None, False) else str(scheduler)
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS} (got '{scheduler}')")
        self.save_hyperparameters()
        self.model = model_from_config(model, in_channels, num_classes)
        self.num_classes = int(num_classes)
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        self._val_outputs: List[tuple] = []

    def forward(self, batch):
        return self.model(batch)

    def setup(self, stage: str) -> None:
        # Runs in every process (also in spawned workers, which do not inherit filters).
        for message in (".*all_gather is deprecated.*", ".*treespec, LeafSpec.*",
                        ".*does not have many workers.*"):
            warnings.filterwarnings("ignore", message=message)

    def teardown(self, stage: str) -> None:
        # Workers of a spawned strategy end with the fit: close their process group in order
        # (they exit without running atexit handlers, and a live gloo group can abort the exit).
        strategy = self.trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "_start_method", None) in ("spawn", "fork", "forkserver") \
                and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    # Training ----------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        seed = derived_seed(self.hparams.seed, self.current_epoch, 0xE9)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        output = self.model(batch)
        target = batch.y.view(-1).long()
        loss = self.model.loss(output, target, weight=self.class_weights)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, batch_size=target.numel(),
                 sync_dist=True, prog_bar=True)
        return loss

    # Validation --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch, batch_idx: int) -> None:
        output = self.model(batch)
        self._val_outputs.append((batch.dataset_index.view(-1), output.logits.detach().float(),
                                  batch.y.view(-1).long()))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        index, logits, target = (torch.cat(parts) for parts in zip(*self._val_outputs))
        self._val_outputs = []
        index, logits, target = gather_predictions(self, index, logits, target)
        probs = logits.softmax(dim=-1).cpu().numpy()
        target = target.cpu().numpy()
        metrics = classification_metrics(target, probs, ordinal=self.hparams.ordinal)
        values = {"val_loss": cross_entropy(target, probs), "val_slides": float(len(target))}
        values.update({f"val_{name}": value for name, value in metrics.items()})
        # Every process holds the same gathered values; the mean over processes leaves them as they are.
        for name, value in values.items():
            self.log(name, torch.tensor(value, dtype=torch.float32), sync_dist=True,
                     prog_bar=name in ("val_loss", "val_auc"))

    # Optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        parameters = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "adam":
            optimizer = torch.optim.Adam(parameters, lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(parameters, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(parameters, lr=hp.lr, weight_decay=hp.weight_decay, momentum=0.9)
        if hp.scheduler == "cosine":
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(hp.epochs, hp.warmup_epochs))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
        if hp.scheduler == "plateau":
            schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=hp.plateau_factor, patience=hp.plateau_patience)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": schedule, "interval": "epoch", "monitor": "val_loss"}}
        return optimizer


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, indices: Sequence[int], batch_size: int = 1,
            device: Optional[torch.device] = None) -> Dict[str, np.ndarray]:
    r"""Class probabilities of the slides ``indices`` of ``dataset`` in one process.

    Returns:
        ``{"index": [N], "probs": [N, C], "target": [N]}`` in the order of ``indices``; raises if
        any slide is missing from the output (evaluation never skips a slide silently).
    """
    from torch_geometric.loader import DataLoader
    from wsigraph.train.data import SlideSubset

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(SlideSubset(dataset, indices), batch_size=batch_size, shuffle=False)
    seen, probs, target = [], [], []
    try:
        for batch in loader:
            batch = batch.to(device)
            output = model(batch)
            seen.append(batch.dataset_index.view(-1).cpu())
            probs.append(output.logits.float().softmax(dim=-1).cpu())
            target.append(batch.y.view(-1).long().cpu())
    finally:
        model.train(was_training)
    index = torch.cat(seen).numpy() if seen else np.zeros(0, dtype=np.int64)
    if index.tolist() != [int(i) for i in indices]:
        raise RuntimeError(f"prediction returned {len(index)} slides for {len(indices)} requested")
    num_classes = probs[0].size(1) if probs else 0
    return {"index": index,
            "probs": torch.cat(probs).numpy() if probs else np.zeros((0, num_classes)),
            "target": torch.cat(target).numpy() if target else np.zeros(0, dtype=np.int64)}
