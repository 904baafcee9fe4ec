import math

import pytest
import torch
import torch.nn.functional as F

from wsigraph.nn import AnchorMining, AnchorRegionCorrection
from wsigraph.nn.functional.anchor import (adjacent_region_by_graph, adjacent_region_by_order,
                                           dual_level_similarity, keep_mask_per_group, region_blocks)

CHANNELS = 8
# Regions per slide and patches per region (the last region of a slide is the short one, as in
# the fixed_size partition); the third slide has a single region.
REGION_SIZES = [[5, 5, 3], [4, 4, 4, 2], [3]]


def flat_regions(region_sizes=REGION_SIZES, seed=0, shuffle=True):
    r"""Flat nodes grouped by slide, with regions numbered per slide in order; inside a slide the
    nodes of its regions are interleaved (membership does not follow node order)."""
    generator = torch.Generator().manual_seed(seed)
    region, batch, region_batch = [], [], []
    offset = 0
    for b, sizes in enumerate(region_sizes):
        ids = torch.repeat_interleave(torch.arange(len(sizes)) + offset, torch.tensor(sizes))
        if shuffle:
            ids = ids[torch.randperm(ids.numel(), generator=generator)]
        region.append(ids)
        batch.append(torch.full((ids.numel(),), b))
        region_batch.append(torch.full((len(sizes),), b))
        offset += len(sizes)
    region, batch, region_batch = torch.cat(region), torch.cat(batch), torch.cat(region_batch)
    x = torch.randn(region.numel(), CHANNELS, generator=generator)
    return x, region, batch, region_batch


def dense_dam(x, region, batch, alpha):
    r"""Score and top-1 anchor of every region, one region at a time."""
    score = torch.empty(x.size(0))
    anchors = []
    for b in batch.unique():
        bag = x[batch == b].mean(0)
        for r in region[batch == b].unique():
            members = (region == r).nonzero().view(-1)
            local = x[members].mean(0)
            for i in members.tolist():
                score[i] = alpha * F.cosine_similarity(x[i], local, dim=0) + \
                    (1 - alpha) * F.cosine_similarity(x[i], bag, dim=0)
            anchors.append(int(members[score[members].argmax()]))
    return score, sorted(anchors)


@pytest.mark.parametrize("alpha", [0.7, 1.0, 0.0, 0.3])
def test_dam_matches_dense_reference(alpha):
    x, region, batch, region_batch = flat_regions(seed=1)
    layer = AnchorMining(alpha=alpha)
    out = layer(x, region, batch, region_batch.numel(), 3)
    score, anchors = dense_dam(x, region, batch, alpha)
    torch.testing.assert_close(out.score, score)
    assert sorted(out.index.tolist()) == anchors
    assert out.mask.nonzero().view(-1).tolist() == anchors
    assert int(out.mask.sum()) == region_batch.numel()  # one anchor per region
    # The switches say what they do: alpha = 1 is the regional cosine, alpha = 0 the bag cosine.
    region_mean = torch.stack([x[region == r].mean(0) for r in range(region_batch.numel())])
    bag_mean = torch.stack([x[batch == b].mean(0) for b in range(3)])
    local = F.cosine_similarity(x, region_mean[region], dim=-1)
    global_ = F.cosine_similarity(x, bag_mean[batch], dim=-1)
    if alpha == 1.0:
        torch.testing.assert_close(out.score, local)
    if alpha == 0.0:
        torch.testing.assert_close(out.score, global_)
    torch.testing.assert_close(out.region_embedding, region_mean)
    torch.testing.assert_close(out.bag_embedding, bag_mean)


def test_dam_batched_equals_per_slide_and_slide_scope():
    x, region, batch, region_batch = flat_regions(seed=2)
    layer = AnchorMining(num_anchors=3, scope="slide")
    out = layer(x, region, batch, region_batch.numel(), 3)
    offset = 0
    for b, sizes in enumerate(REGION_SIZES):
        mask = batch == b
        local_region = region[mask] - region[mask].min()
        alone = layer(x[mask], local_region, torch.zeros(int(mask.sum()), dtype=torch.long), len(sizes), 1)
        torch.testing.assert_close(out.score[mask], alone.score)
        assert torch.equal(out.mask[mask], alone.mask)
        # Global top-K of the slide, clipped to its size.
        expected = torch.topk(alone.score, min(3, int(mask.sum()))).indices.sort().values
        assert alone.mask.nonzero().view(-1).tolist() == expected.tolist()
        offset += len(sizes)


def test_anchor_modes():
    x, region, batch, region_batch = flat_regions(seed=3)
    num_regions = region_batch.numel()
    maxed = AnchorMining(mode="max")(x, region, batch, num_regions, 3)
    attention = torch.randn(x.size(0))
    by_attention = AnchorMining(mode="attention")(x, region, batch, num_regions, 3, score=attention)
    for r in range(num_regions):
        members = (region == r).nonzero().view(-1)
        assert maxed.mask[members].nonzero().view(-1).tolist() == [int(x[members].max(1).values.argmax())]
        assert by_attention.mask[members].nonzero().view(-1).tolist() == [int(attention[members].argmax())]
    with pytest.raises(ValueError, match="attention scores"):
        AnchorMining(mode="attention")(x, region, batch, num_regions, 3)
    # Random anchors: one per region, fresh draws in training, fixed and batch-independent in evaluation.
    layer = AnchorMining(mode="random")
    draws = {tuple(layer(x, region, batch, num_regions, 3).index.sort().values.tolist()) for _ in range(10)}
    assert len(draws) > 1
    layer.eval()
    first = layer(x, region, batch, num_regions, 3)
    assert torch.equal(first.mask, layer(x, region, batch, num_regions, 3).mask)
    assert int(first.mask.sum()) == num_regions
    mask = batch == 1
    alone = layer(x[mask], region[mask] - 3, torch.zeros(int(mask.sum()), dtype=torch.long), 4, 1)
    assert torch.equal(first.mask[mask], alone.mask)


def test_adjacency():
    region_batch = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    assert adjacent_region_by_order(region_batch).tolist() == [1, 2, 1, 4, 5, 6, 5, -1]
    edge_index = torch.tensor([[1, 2, 0, 2, 3, 3], [0, 0, 1, 1, 1, 2]])
    edge_weight = torch.tensor([0.3, 0.7, 0.5, 0.5, 0.0, 1.0])
    # Region 1 has a tie between 0 and 2 (lower index wins); region 3 has no incoming edge.
    assert adjacent_region_by_graph(edge_index, edge_weight, 4).tolist() == [2, 0, 3, -1]


def test_region_blocks_keep_order():
    region = torch.tensor([2, 0, 2, 1, 0, 2])
    blocks = region_blocks(region, 4)
    assert blocks.size == 3
    assert blocks.index.tolist() == [6, 0, 7, 3, 1, 8]
    assert blocks.mask.sum(1).tolist() == [2, 1, 3, 0]


def dense_arc(layer, x, region, region_batch, anchors, batch, adjacent):
    r"""ARC one region at a time with explicit softmax attention."""
    z = layer.norm(x)
    q, k, v = (z @ layer.qkv.weight.T + layer.qkv.bias).chunk(3, dim=-1)
    out = torch.empty_like(x)
    heads = layer.heads
    width = x.size(1) // heads
    for r in range(region_batch.numel()):
        members = (region == r).nonzero().view(-1)
        if members.numel() == 0:
            continue
        keys = [members]
        if adjacent is not None and adjacent[r] >= 0:
            keys.append((region == adjacent[r]).nonzero().view(-1))
        if anchors is not None:
            keys.append(anchors[batch[anchors] == region_batch[r]])
        keys = torch.cat(keys)
        attended = []
        for h in range(heads):
            part = slice(h * width, (h + 1) * width)
            scores = q[members, part] @ k[keys, part].T / math.sqrt(width)
            attended.append(torch.softmax(scores, dim=-1) @ v[keys, part])
        out[members] = x[members] + torch.cat(attended, dim=1) @ layer.out.weight.T + layer.out.bias
    return out


@pytest.mark.parametrize("adjacent,heads", [("order", 1), ("order", 2), ("knn", 1), ("none", 1)])
def test_arc_matches_dense_reference(adjacent, heads):
    torch.manual_seed(4)
    x, region, batch, region_batch = flat_regions(seed=4)
    num_regions = region_batch.numel()
    anchors = AnchorMining()(x, region, batch, num_regions, 3).index
    # A region graph linking each region to an arbitrary other region of its slide.
    edge_index = torch.tensor([[2, 0, 1, 6, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6]])
    edge_weight = torch.ones(edge_index.size(1))
    layer = AnchorRegionCorrection(CHANNELS, heads=heads, adjacent=adjacent).eval()
    out = layer(x, region, region_batch, anchors, batch, 3, edge_index, edge_weight)
    neighbour = layer.adjacent_regions(region_batch, edge_index, edge_weight)
    if adjacent == "knn":
        assert neighbour.tolist() == [2, 0, 1, 6, 3, 4, 5, -1]
    with torch.no_grad():
        expected = dense_arc(layer, x, region, region_batch, anchors, batch, neighbour)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Without anchors, only the regions count.
    no_anchor = layer(x, region, region_batch, None, region_edge_index=edge_index, region_edge_weight=edge_weight)
    with torch.no_grad():
        torch.testing.assert_close(no_anchor, dense_arc(layer, x, region, region_batch, None, batch, neighbour),
                                   atol=1e-5, rtol=1e-5)


def test_arc_batched_equals_per_slide():
    torch.manual_seed(5)
    x, region, batch, region_batch = flat_regions(seed=5)
    anchors = AnchorMining()(x, region, batch, region_batch.numel(), 3).index
    layer = AnchorRegionCorrection(CHANNELS, heads=2).eval()
    out = layer(x, region, region_batch, anchors, batch, 3)
    offset = 0
    for b, sizes in enumerate(REGION_SIZES):
        mask = batch == b
        first = int(mask.nonzero()[0])
        local_anchors = anchors[batch[anchors] == b] - first
        alone = layer(x[mask], region[mask] - offset, torch.zeros(len(sizes), dtype=torch.long), local_anchors,
                      torch.zeros(int(mask.sum()), dtype=torch.long), 1)
        torch.testing.assert_close(out[mask], alone, atol=1e-5, rtol=1e-5)
        offset += len(sizes)


@pytest.mark.parametrize("adjacent", ["order", "none"])
def test_arc_is_region_local(adjacent):
    torch.manual_seed(6)
    sizes = [[4, 4, 4, 4, 3]]
    x, region, batch, region_batch = flat_regions(sizes, seed=6)
    anchors = AnchorMining()(x, region, batch, 5, 1).index
    layer = AnchorRegionCorrection(CHANNELS, adjacent=adjacent).eval()
    reference = layer(x, region, region_batch, anchors, batch, 1)
    target = 0  # adjacent region 1 (order) or none
    far = 3
    non_anchor = [i for i in (region == far).nonzero().view(-1).tolist() if i not in anchors.tolist()][0]
    anchor = [i for i in anchors.tolist() if region[i] == far][0]
    in_target = region == target
    changed = x.clone()
    changed[non_anchor] += torch.randn(CHANNELS)
    out = layer(changed, region, region_batch, anchors, batch, 1)
    torch.testing.assert_close(out[in_target], reference[in_target])
    assert not torch.allclose(out[region == far], reference[region == far])
    changed = x.clone()
    changed[anchor] += torch.randn(CHANNELS)
    out = layer(changed, region, region_batch, anchors, batch, 1)
    assert not torch.allclose(out[in_target], reference[in_target])
    # The adjacent region's instances count exactly when adjacency is on.
    neighbour = [i for i in (region == 1).nonzero().view(-1).tolist() if i not in anchors.tolist()][0]
    changed = x.clone()
    changed[neighbour] += torch.randn(CHANNELS)
    out = layer(changed, region, region_batch, anchors, batch, 1)
    assert torch.allclose(out[in_target], reference[in_target]) == (adjacent == "none")


def test_arc_handles_regions_without_patches():
    torch.manual_seed(7)
    x = torch.randn(6, CHANNELS, requires_grad=True)
    region = torch.tensor([0, 0, 2, 2, 2, 0])  # region 1 is empty at this level
    region_batch = torch.zeros(3, dtype=torch.long)
    batch = torch.zeros(6, dtype=torch.long)
    layer = AnchorRegionCorrection(CHANNELS)
    out = layer(x, region, region_batch, None, batch, 1)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 1.0])
def test_keep_mask_per_group(ratio):
    generator = torch.Generator().manual_seed(8)
    sizes = torch.tensor([1, 2, 3, 10, 7, 0, 100])
    group = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    group = group[torch.randperm(group.numel(), generator=generator)]
    score = torch.randn(group.numel(), generator=generator)
    keep = keep_mask_per_group(score, group, ratio, sizes.numel())
    for g, n in enumerate(sizes.tolist()):
        members = group == g
        kept = int(keep[members].sum())
        if n == 0:
            assert kept == 0
            continue
        assert kept == max(1, n - math.floor(ratio * n + 1e-9)) >= 1
        # The kept nodes are the highest scores of the group.
        if kept < n:
            assert score[members & keep].min() > score[members & ~keep].max()
    if ratio == 0.0:
        assert keep.all()
    if ratio == 1.0:
        assert int(keep.sum()) == int((sizes > 0).sum())
    with pytest.raises(ValueError):
        keep_mask_per_group(score, group, 1.5, sizes.numel())


def test_dual_level_similarity_handles_empty_regions():
    x = torch.randn(4, 3)
    score, region_embedding, _ = dual_level_similarity(x, torch.tensor([0, 0, 2, 2]), torch.zeros(4, dtype=torch.long),
                                                       3, 1)
    assert torch.isfinite(score).all() and torch.equal(region_embedding[1], torch.zeros(3))


def test_reprs():
    assert repr(AnchorMining()) == "AnchorMining(alpha=0.7, num_anchors=1, scope='region', mode='dam')"
    assert repr(AnchorRegionCorrection(8)) == "AnchorRegionCorrection(8, heads=1, adjacent='order')"
    with pytest.raises(ValueError):
        AnchorMining(mode="best")
    with pytest.raises(ValueError):
        AnchorRegionCorrection(8, adjacent="diagonal")
