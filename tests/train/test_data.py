import numpy as np
import torch

from wsigraph.train.data import EpochSampler, SlideGraphDataModule, SlideSubset, class_balanced_weights
from wsigraph.transforms.subsample import RandomPatchSubsample


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(20, seed=3)
    sampler.set_epoch(4)
    first = list(sampler)
    sampler.set_epoch(4)
    assert list(sampler) == first and sorted(first) == list(range(20))
    sampler.set_epoch(5)
    assert list(sampler) != first
    other = EpochSampler(20, seed=3)
    other.set_epoch(4)
    assert list(other) == first
    # without set_epoch (inside a distributed wrapper) every pass is a new epoch
    free = EpochSampler(20, seed=3)
    assert list(free) != list(free)


def test_class_weighted_sampling_balances_classes():
    targets = [0] * 90 + [1] * 10
    weights = class_balanced_weights(targets)
    np.testing.assert_allclose(weights[:2], [1 / 90, 1 / 90])
    sampler = EpochSampler(100, seed=0, weights=weights)
    drawn = []
    for epoch in range(30):
        sampler.set_epoch(epoch)
        drawn += [targets[i] for i in sampler]
    assert abs(np.mean(drawn) - 0.5) < 0.05


def test_subset_transform_randomness_depends_on_epoch_and_slide_only(cohort):
    subset = SlideSubset(cohort, [0, 1, 2], transform=RandomPatchSubsample(10), seed=7)
    subset.set_epoch(2)
    first = [subset[i]["patch_20x"].pos for i in (2, 0, 1)]
    torch.manual_seed(123)  # the global random state plays no part
    again = [subset[i]["patch_20x"].pos for i in (2, 0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    subset.set_epoch(3)
    assert not torch.equal(subset[2]["patch_20x"].pos, first[0])
    item = subset[1]
    assert int(item.dataset_index) == 1 and not hasattr(cohort[1], "dataset_index")  # cache untouched


def test_data_module_loaders(cohort):
    module = SlideGraphDataModule(cohort, train=[0, 1, 2, 3, 4], val=[5, 6, 7], test=[8], batch_size=2,
                                  train_transform=RandomPatchSubsample(8))
    batches = list(module.train_dataloader())
    assert [b.num_graphs for b in batches] == [2, 2, 1]
    assert sorted(torch.cat([b.dataset_index for b in batches]).tolist()) == [0, 1, 2, 3, 4]
    assert all(b["patch_20x"].num_nodes <= 8 * b.num_graphs for b in batches)
    val = torch.cat([b.dataset_index for b in module.val_dataloader()]).tolist()
    assert val == [5, 6, 7]
    assert sum(b["patch_20x"].num_nodes for b in module.val_dataloader()) == \
        sum(cohort[i]["patch_20x"].num_nodes for i in (5, 6, 7))  # no subsampling outside training
