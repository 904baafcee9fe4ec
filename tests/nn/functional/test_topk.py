import pytest
import torch

from wsigraph.nn.functional import (
    dense_topk_mask,
    rank_within_group,
    topk_mask_per_group,
    topk_per_group,
    topk_per_group_dense,
)


def random_groups(sizes, seed=0, ties=False, shuffle=False):
    generator = torch.Generator().manual_seed(seed)
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if shuffle:
        group = group[torch.randperm(group.numel(), generator=generator)]
    if ties:  # few distinct values: many ties
        score = torch.randint(0, 3, (group.numel(),), generator=generator).float()
    else:
        score = torch.randn(group.numel(), generator=generator)
    return score, group


def reference(score, group, k, num_groups, largest=True, sorted_by_position=False):
    r"""A loop over groups with torch.topk; ties resolved towards the lower index by sorting
    (score, index) explicitly."""
    selected = []
    for g in range(num_groups):
        members = (group == g).nonzero().view(-1)
        if members.numel() == 0:
            continue
        kk = min(int(k[g]) if isinstance(k, torch.Tensor) else k, members.numel())
        values = score[members].tolist()
        order = sorted(range(members.numel()),
                       key=lambda i: ((-values[i] if largest else values[i]), int(members[i])))
        chosen = members[order[:kk]]
        # torch.topk on the untied case must agree with the explicit sort.
        if kk > 0 and len(set(values)) == len(values):
            top = torch.topk(score[members], kk, largest=largest).indices
            assert torch.equal(members[top], chosen)
        if sorted_by_position:
            chosen = chosen.sort().values
        selected.append(chosen)
    return torch.cat(selected) if selected else torch.empty(0, dtype=torch.long)


SIZES = [4, 0, 1, 7, 2, 10]


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("sorted_by_position", [False, True])
@pytest.mark.parametrize("ties,shuffle", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("k", [0, 1, 3, 20])
def test_matches_per_group_loop(k, largest, sorted_by_position, ties, shuffle):
    score, group = random_groups(SIZES, seed=k, ties=ties, shuffle=shuffle)
    index = topk_per_group(score, group, k, len(SIZES), largest=largest,
                           sorted_by_position=sorted_by_position)
    expected = reference(score, group, k, len(SIZES), largest, sorted_by_position)
    assert torch.equal(index, expected)

    mask = topk_mask_per_group(score, group, k, largest=largest)
    assert torch.equal(mask.nonzero().view(-1), expected.sort().values)

    dense, dense_mask = topk_per_group_dense(score, group, k, len(SIZES), largest=largest,
                                             sorted_by_position=sorted_by_position)
    assert dense.shape == dense_mask.shape == (len(SIZES), k)
    assert torch.equal(dense[dense_mask], expected)
    counts = torch.tensor(SIZES).clamp(max=k)
    assert torch.equal(dense_mask.sum(-1), counts)  # k clipped to the group size


def test_per_group_k_tensor():
    # Per-group counts, e.g. the lowest half of every region (never all of it).
    score, group = random_groups(SIZES, seed=5)
    sizes = torch.tensor(SIZES)
    k = torch.minimum(sizes // 2, (sizes - 1).clamp(min=0))
    index = topk_per_group(score, group, k, len(SIZES), largest=False)
    assert torch.equal(index, reference(score, group, k, len(SIZES), largest=False))
    mask = topk_mask_per_group(score, group, k, largest=False)
    assert torch.equal(mask.nonzero().view(-1), index.sort().values)


def test_rank_within_group():
    score, group = random_groups([3, 5, 1], seed=6, shuffle=True)
    rank = rank_within_group(score, group)
    for g in range(3):
        members = (group == g).nonzero().view(-1)
        order = torch.argsort(score[members], descending=True)
        assert torch.equal(rank[members[order]], torch.arange(members.numel()))
    # Ties go to the lower index, for the largest and the smallest.
    tied = torch.tensor([1.0, 2.0, 2.0, 1.0])
    same = torch.zeros(4, dtype=torch.long)
    assert rank_within_group(tied, same).tolist() == [2, 0, 1, 3]
    assert rank_within_group(tied, same, largest=False).tolist() == [0, 2, 3, 1]


def test_empty_input():
    score = torch.empty(0)
    group = torch.empty(0, dtype=torch.long)
    assert topk_per_group(score, group, 3, 2).numel() == 0
    index, mask = topk_per_group_dense(score, group, 3, 2)
    assert index.shape == (2, 3) and not mask.any()


def test_dense_topk_mask():
    generator = torch.Generator().manual_seed(7)
    score = torch.randn(4, 6, 8, generator=generator)
    mask = dense_topk_mask(score, 2)
    expected = torch.zeros_like(mask).scatter_(-1, score.topk(2, dim=-1).indices, True)
    assert torch.equal(mask, expected)
    assert dense_topk_mask(score, 20).all()
    assert torch.equal(dense_topk_mask(score, 3, dim=1, largest=False),
                       torch.zeros_like(mask).scatter_(1, score.topk(3, dim=1, largest=False)
                                                       .indices, True))
    tied = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    assert dense_topk_mask(tied, 2).tolist() == [[True, True, False, False]]
