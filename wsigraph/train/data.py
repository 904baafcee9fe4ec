r"""Loading slides of one fold: subsets, reproducible samplers and the Lightning data module.

Randomness in the data is a pure function of ``(seed, epoch, slide)``: the training order and the
per-slide random transforms (bag subsampling) are drawn from generators seeded with these
numbers, never from the global random state. A resumed run, a different number of loader
workers or another process therefore sees exactly the same batches.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator, List, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torch_geometric.loader import DataLoader


def derived_seed(*numbers: int) -> int:
    r"""A 63-bit seed mixing integers (NumPy's ``SeedSequence``), so nearby inputs give unrelated streams."""
    return int(np.random.SeedSequence([int(n) & 0xFFFFFFFF for n in numbers]).generate_state(2, np.uint64)[0] >> 1)


class SlideSubset(Dataset):
    r"""The slides ``indices`` of a slide-graph dataset, each tagged with its position in it.

    Every item is a shallow copy of the cached graph carrying ``dataset_index`` [1] (its index in
    ``dataset``; batched into ``[B]``), which identifies slides when predictions are gathered
    across processes. ``transform`` runs under a private random state seeded from
    ``(seed, epoch, dataset_index)``; set the epoch with :meth:`set_epoch`.

    Args:
        dataset: indexable slide graphs (e.g. :class:`~wsigraph.data.SlideGraphDataset`).
        indices: positions in ``dataset``.
        transform: applied to each slide on access (e.g.
            :class:`~wsigraph.transforms.RandomPatchSubsample`).
        seed: seed of the transform's randomness.
    """

    def __init__(self, dataset, indices: Sequence[int], transform: Optional[Callable] = None, seed: int = 0):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        index = self.indices[item]
        # The cached graph is shared: attach attributes to a shallow copy only.
        data = copy.copy(self.dataset[index])
        data.dataset_index = torch.tensor([index], dtype=torch.long)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derived_seed(self.seed, self.epoch, index))
                data = self.transform(data)
        return data


class EpochSampler(Sampler[int]):
    r"""Shuffled (or class-weighted) order of ``num_items`` items, a function of ``(seed, epoch)``.

    Without ``weights``, a permutation per epoch. With ``weights``, ``num_items`` draws with
    replacement proportional to the weights (class-balanced sampling). Lightning calls
    :meth:`set_epoch` at every epoch; when it does not (a distributed wrapper around this sampler)
    each iteration advances the epoch by one.
    """

    def __init__(self, num_items: int, seed: int = 0, weights: Optional[Sequence[float]] = None):
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if self.weights is not None and self.weights.numel() != self.num_items:
            raise ValueError("one weight per item is needed")
        self.epoch = 0
        self._epoch_given = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_given = True

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        if not self._epoch_given:
            self.epoch += 1
        self._epoch_given = False
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, 0x5A))
        if self.weights is None:
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.num_items, replacement=True, generator=generator)
        return iter(order.tolist())


def class_balanced_weights(targets: Sequence[int]) -> List[float]:
    r"""Per-item weights :math:`1 / n_{y_i}`, so that every class is drawn equally often."""
    targets = np.asarray(targets, dtype=np.int64)
    counts = np.bincount(targets)
    return (1.0 / counts[targets]).tolist()


class SlideGraphDataModule(L.LightningDataModule):
    r"""Training, validation and test loaders over the slides of one fold.

    Args:
        dataset: the cohort's slide graphs (with a ``targets`` list for weighted sampling).
        train, val, test: dataset positions of the three parts (``test`` may be empty).
        batch_size: slides per step (PyG disjoint-union batches).
        train_transform: random transform for training slides only (bag subsampling).
        class_weighted_sampling: draw training slides with probability inverse to their class
            frequency (with replacement) instead of shuffling.
        seed: seed of the training order and of ``train_transform``.
        num_workers: loader processes.
        eval_batch_size: slides per step for validation and test (default ``batch_size``).
        pin_memory: pin batches in page-locked memory (faster host → GPU copies).
    """

    def __init__(self, dataset, train: Sequence[int], val: Sequence[int], test: Sequence[int] = (),
                 batch_size: int = 1, train_transform: Optional[Callable] = None,
                 class_weighted_sampling: bool = False, seed: int = 0, num_workers: int = 0,
                 eval_batch_size: Optional[int] = None, pin_memory: bool = False):
        super().__init__()
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.seed = int(seed)
        self.train_set = SlideSubset(dataset, train, transform=train_transform, seed=seed)
        self.val_set = SlideSubset(dataset, val)
        self.test_set = SlideSubset(dataset, test)
        weights = None
        if class_weighted_sampling:
            targets = list(dataset.targets)
            weights = class_balanced_weights([targets[i] for i in self.train_set.indices])
        self.sampler = EpochSampler(len(self.train_set), seed=seed, weights=weights)

    def set_epoch(self, epoch: int) -> None:
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def _loader(self, subset, batch_size, sampler=None) -> DataLoader:
        # A private generator: creating the iterator must not draw from the global random state,
        # or a resumed epoch (whose iterator is created earlier) would see other dropout masks.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(subset, batch_size=batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, generator=generator)

    def train_dataloader(self) -> DataLoader:
        # When resuming, the first epoch's iterator is created before any epoch hook runs.
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.set_epoch(trainer.current_epoch)
        return self._loader(self.train_set, self.batch_size, self.sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)
