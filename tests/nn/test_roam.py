import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import HeteroData

import wsigraph.data  # noqa: F401  (import order: the transforms need the data package)
from wsigraph.data.schema import REGION, REGION_GRAPH
from wsigraph.nn import (ExpertAttentionPooling, ExpertFusion, GraphSinkhorn, OTRouter, RegionPooling,
                         RoutingContext, load_entropy, routing_coherence, topk_dispatch)
from wsigraph.nn.functional import sinkhorn_log
from wsigraph.transforms import RegionKNNGraph

SIZES = [9, 1, 3, 14]  # regions per slide: one region, fewer regions than experts, more
DIM = 6
EXPERTS = 4


def knn_region_graph(pos, k=4):
    r"""The library's region graph (symmetric kNN, row-normalised heat-kernel weights)."""
    data = HeteroData()
    data[REGION].pos = pos
    data[REGION].num_nodes = pos.size(0)
    data = RegionKNNGraph(k)(data)
    return data[REGION_GRAPH].edge_index, data[REGION_GRAPH].edge_weight


def region_batch(sizes=SIZES, seed=0, dim=DIM):
    r"""Region tokens, masses, slide index and the per-slide region graphs of a batch."""
    generator = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    z = torch.randn(batch.numel(), dim, generator=generator)
    mass = torch.randint(1, 30, (batch.numel(),), generator=generator).float()
    edges, weights, offset = [], [], 0
    for size in sizes:
        edge_index, edge_weight = knn_region_graph(100 * torch.rand(size, 2, generator=generator))
        edges.append(edge_index + offset)
        weights.append(edge_weight)
        offset += size
    return z, mass, batch, torch.cat(edges, 1), torch.cat(weights)


def slide_part(index, batch, edge_index, edge_weight, slide):
    r"""Rows of one slide and its edges, renumbered from zero."""
    rows = (batch == slide).nonzero().view(-1)
    keep = batch[edge_index[1]] == slide
    return rows, edge_index[:, keep] - rows[0], edge_weight[keep]


def dense_plan(router, z, mass, edge_index, edge_weight):
    r"""One slide's plan from the dense functional core."""
    cost = router.cost(z).unsqueeze(0)
    a = (mass / mass.sum()).unsqueeze(0)
    return sinkhorn_log(cost, a, None, epsilon=router.epsilon, num_iterations=router.sinkhorn.num_iterations,
                        edge_index=edge_index, edge_weight=edge_weight, smoothing=router.sinkhorn.smoothing,
                        smoothing_steps=router.sinkhorn.smoothing_steps)[0]


# ----------------------------------------------------------------------------- region pooling


def test_region_pooling_is_mean_of_members():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=generator)
    region = torch.randint(0, 7, (40,), generator=generator)
    region[region == 3] = 4  # region 3 has no member patch
    pooling = RegionPooling()
    content, mass = pooling(x, region, dim_size=8, return_mass=True)
    assert content.shape == (8, 5) and mass.shape == (8,)
    for r in range(8):
        members = x[region == r]
        assert mass[r] == members.size(0)
        expected = members.mean(0) if members.size(0) else torch.zeros(5)
        torch.testing.assert_close(content[r], expected)
    torch.testing.assert_close(pooling(x, region, dim_size=8), content)
    assert repr(pooling) == "RegionPooling()"


# ----------------------------------------------------------------------------- routing context


def test_routing_context_matches_dense_graphsage():
    torch.manual_seed(2)
    z, _, batch, edge_index, _ = region_batch(seed=2)
    context = RoutingContext(DIM, 8)
    out = context(z, edge_index)
    assert out.shape == (z.size(0), 8)
    # Dense reference: mean over in-neighbours (an adjacency matrix), root term, ReLU between.
    adjacency = torch.zeros(z.size(0), z.size(0))
    adjacency[edge_index[1], edge_index[0]] = 1.0
    mean = adjacency / adjacency.sum(1, keepdim=True).clamp_min(1)
    h = z
    for position, conv in enumerate(context.convs):
        h = conv.lin_l(mean @ h) + conv.lin_r(h)
        if position == 0:
            h = torch.relu(h)
    torch.testing.assert_close(out, h, atol=1e-5, rtol=1e-5)
    # Slides never interact.
    for slide in range(len(SIZES)):
        rows, slide_edges, _ = slide_part(None, batch, edge_index, torch.ones(edge_index.size(1)), slide)
        torch.testing.assert_close(context(z[rows], slide_edges), out[rows], atol=1e-5, rtol=1e-5)
    assert "\n" not in repr(context) and "RoutingContext" in repr(context)


# ----------------------------------------------------------------------------- OT router


@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_ot_loads_are_balanced_on_every_slide(smoothing):
    torch.manual_seed(3)
    z, mass, batch, edge_index, edge_weight = region_batch(seed=3)
    router = OTRouter(DIM, num_experts=EXPERTS, smoothing=smoothing)
    out = router(z, mass, batch, edge_index, edge_weight, num_graphs=len(SIZES))
    assert out.plan.shape == out.dispatch.shape == out.cost.shape == (z.size(0), EXPERTS)
    # Before top-k every expert receives exactly 1/E of every slide's mass.
    assert (out.plan_loads - 1.0 / EXPERTS).abs().max() < 1e-4
    totals = torch.zeros(len(SIZES)).index_add_(0, batch, mass)
    torch.testing.assert_close(out.row_marginals, mass / totals[batch])
    # The realised loads after top-k still add up to the slide's mass.
    torch.testing.assert_close(out.loads.sum(-1), torch.ones(len(SIZES)))
    assert torch.isfinite(out.plan).all() and torch.isfinite(out.dispatch).all()


def test_zero_smoothing_is_plain_sinkhorn():
    torch.manual_seed(4)
    z, mass, batch, edge_index, edge_weight = region_batch(seed=4)
    router = OTRouter(DIM, num_experts=EXPERTS, smoothing=0.0)
    out = router(z, mass, batch, edge_index, edge_weight, num_graphs=len(SIZES))
    smoothed = OTRouter(DIM, num_experts=EXPERTS, smoothing=0.5)
    smoothed.load_state_dict(router.state_dict())
    plan_smoothed = smoothed(z, mass, batch, edge_index, edge_weight).plan
    for slide in range(len(SIZES)):
        rows = (batch == slide).nonzero().view(-1)
        plain = dense_plan(router, z[rows], mass[rows], None, None)  # no graph at all
        torch.testing.assert_close(out.plan[rows], plain, atol=1e-6, rtol=1e-5)
        if rows.numel() > 2:  # smoothing changes the plan wherever there are neighbours
            assert (plan_smoothed[rows] - plain).abs().max() > 1e-3


def test_converged_plan_matches_pot():
    torch.manual_seed(5)
    z, mass, _, _, _ = region_batch(sizes=[12], seed=5)
    router = OTRouter(DIM, num_experts=EXPERTS, epsilon=0.1, num_iterations=2000, smoothing=0.0)
    plan = router(z.double(), mass.double()).plan
    a = (mass.double() / mass.double().sum()).numpy()
    b = np.full(EXPERTS, 1.0 / EXPERTS)
    cost = router.cost(z).double().detach().numpy()
    reference = ot.sinkhorn(a, b, cost, reg=0.1, method="sinkhorn_log", numItermax=10000, stopThr=1e-10)
    np.testing.assert_allclose(plan.detach().numpy(), reference, atol=1e-6)


def test_smoothed_plan_matches_dense_reference_per_slide():
    torch.manual_seed(6)
    z, mass, batch, edge_index, edge_weight = region_batch(seed=6)
    router = OTRouter(DIM, num_experts=EXPERTS, smoothing=0.5, smoothing_steps=3)
    out = router(z, mass, batch, edge_index, edge_weight, num_graphs=len(SIZES))
    for slide in range(len(SIZES)):
        rows, slide_edges, slide_weight = slide_part(None, batch, edge_index, edge_weight, slide)
        expected = dense_plan(router, z[rows], mass[rows], slide_edges, slide_weight)
        torch.testing.assert_close(out.plan[rows], expected, atol=1e-6, rtol=1e-5)
        alone = router(z[rows], mass[rows], None, slide_edges, slide_weight)
        torch.testing.assert_close(alone.plan, out.plan[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(alone.dispatch, out.dispatch[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(alone.loads, out.loads[slide:slide + 1], atol=1e-6, rtol=1e-5)


def test_zero_mass_regions_do_not_disturb_their_neighbours():
    torch.manual_seed(7)
    z, mass, _, edge_index, edge_weight = region_batch(sizes=[10], seed=7)
    router = OTRouter(DIM, num_experts=EXPERTS, smoothing=0.5)
    empty = torch.tensor([2, 5])
    hollow = mass.clone()
    hollow[empty] = 0
    out = router(z, hollow, None, edge_index, edge_weight)
    assert torch.isfinite(out.plan).all()
    assert out.plan[empty].abs().max() == 0 and out.dispatch[empty].abs().max() == 0
    assert (out.plan_loads - 1.0 / EXPERTS).abs().max() < 1e-4
    # Same as the graph without the empty regions (their edges removed, weights renormalised).
    keep = torch.ones(10, dtype=torch.bool)
    keep[empty] = False
    renumber = torch.cumsum(keep.long(), 0) - 1
    edge_keep = keep[edge_index[0]] & keep[edge_index[1]]
    sub_edges = renumber[edge_index[:, edge_keep]]
    sub_weight = edge_weight[edge_keep]
    sub_weight = sub_weight / torch.zeros(8).index_add_(0, sub_edges[1], sub_weight)[sub_edges[1]]
    expected = router(z[keep], hollow[keep], None, sub_edges, sub_weight)
    torch.testing.assert_close(out.plan[keep], expected.plan, atol=1e-6, rtol=1e-5)


def test_softmax_router_is_unconstrained():
    torch.manual_seed(8)
    z, mass, batch, edge_index, edge_weight = region_batch(seed=8)
    router = OTRouter(DIM, num_experts=EXPERTS, router="softmax")
    out = router(z, mass, batch, edge_index, edge_weight, num_graphs=len(SIZES))
    expected = out.row_marginals[:, None] * torch.softmax(-router.cost(z) / router.epsilon, dim=-1)
    torch.testing.assert_close(out.plan, expected)
    assert "softmax" in repr(router)


def test_one_dominant_expert_collapses_softmax_but_not_ot():
    generator = torch.Generator().manual_seed(9)
    direction = torch.randn(DIM, generator=generator)
    z = direction + 0.3 * torch.randn(20, DIM, generator=generator)
    mass = torch.ones(20)
    loads = {}
    for router_name in ("softmax", "ot"):
        router = OTRouter(DIM, num_experts=EXPERTS, router=router_name, smoothing=0.0)
        with torch.no_grad():
            router.prototypes.copy_(torch.randn(EXPERTS, DIM, generator=generator))
            router.prototypes[1] = direction  # expert 1 is the nearest to every region
        cost = router.cost(z)
        assert (cost.argmin(-1) == 1).all()
        loads[router_name] = router(z, mass).plan_loads[0]
    assert loads["softmax"][1] > 0.9
    assert (loads["ot"] - 1.0 / EXPERTS).abs().max() < 1e-4


def test_smoothing_makes_routing_spatially_coherent():
    # Two spatial clusters (left and right half of an 8 x 8 grid of regions) with noisy
    # routing embeddings: smoothing raises the share of edges whose ends share the top expert.
    generator = torch.Generator().manual_seed(10)
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    pos = 100 * torch.stack([xs.flatten(), ys.flatten()], 1)
    cluster = (xs.flatten() >= 4).long()
    edge_index, edge_weight = knn_region_graph(pos, k=8)
    centres = torch.randn(2, DIM, generator=generator)
    z = centres[cluster] + 1.5 * torch.randn(64, DIM, generator=generator)
    coherence = {}
    for smoothing in (0.0, 0.5):
        torch.manual_seed(0)
        router = OTRouter(DIM, num_experts=EXPERTS, smoothing=smoothing)
        out = router(z, torch.ones(64), None, edge_index, edge_weight)
        coherence[smoothing] = float(routing_coherence(out.dispatch.argmax(-1), edge_index))
    assert coherence[0.5] > coherence[0.0] + 0.1


# ----------------------------------------------------------------------------- top-k dispatch


def test_topk_dispatch_keeps_row_mass():
    generator = torch.Generator().manual_seed(11)
    plan = torch.rand(30, 6, generator=generator) * (torch.rand(30, 6, generator=generator) > 0.2)
    plan[3] = 0.0  # a row without plan mass
    a = torch.rand(30, generator=generator)
    a[4] = 0.0  # a row without supply
    for k in (1, 2, 3, 6, 9):
        dispatch = topk_dispatch(plan, a, k)
        kept = dispatch > 0
        assert (kept.sum(-1) <= min(k, 6)).all()
        live = plan.sum(-1) > 0
        live[4] = False
        torch.testing.assert_close(dispatch.sum(-1)[live], a[live])
        assert dispatch[~live].abs().max() == 0
        for row in live.nonzero().view(-1).tolist():
            top = torch.topk(plan[row], min(k, 6)).indices
            expected = torch.zeros(6)
            expected[top] = plan[row, top] * a[row] / plan[row, top].sum()
            torch.testing.assert_close(dispatch[row], expected)
    with pytest.raises(ValueError):
        topk_dispatch(plan, a, 0)


def test_router_clips_top_k_and_handles_tiny_slides():
    torch.manual_seed(12)
    router = OTRouter(DIM, num_experts=3, top_k=5)
    assert router.top_k == 3
    for size in (1, 2):
        z = torch.randn(size, DIM)
        edge_index = torch.tensor([[0], [1]]) if size == 2 else torch.empty(2, 0, dtype=torch.long)
        out = router(z, torch.ones(size), None, edge_index, None)
        assert torch.isfinite(out.plan).all() and torch.isfinite(out.dispatch).all()
        torch.testing.assert_close(out.plan_loads, torch.full((1, 3), 1.0 / 3))
        torch.testing.assert_close(out.dispatch.sum(-1), torch.full((size,), 1.0 / size))


def test_router_gradients_reach_prototypes_and_embeddings():
    torch.manual_seed(13)
    z, mass, batch, edge_index, edge_weight = region_batch(seed=13)
    z.requires_grad_(True)
    router = OTRouter(DIM, num_experts=EXPERTS)
    out = router(z, mass, batch, edge_index, edge_weight, num_graphs=len(SIZES))
    (out.dispatch * torch.randn_like(out.dispatch)).sum().backward()
    assert torch.isfinite(router.prototypes.grad).all() and router.prototypes.grad.abs().sum() > 0
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        OTRouter(DIM, router="argmax")


# ----------------------------------------------------------------------------- expert pooling


def reference_expert_pooling(pooling, x, dispatch, ot_guided=True):
    r"""One slide, one expert at a time, independent scorers written out."""
    h = pooling.hidden_channels
    out = torch.zeros(pooling.num_experts, x.size(1))
    attention = torch.zeros(x.size(0), pooling.num_experts)
    for e in range(pooling.num_experts):
        rows = slice(e * h, (e + 1) * h)
        hidden = torch.tanh(x @ pooling.lin_tanh.weight[rows].T + pooling.lin_tanh.bias[rows]) * \
            torch.sigmoid(x @ pooling.lin_gate.weight[rows].T + pooling.lin_gate.bias[rows])
        score = hidden @ pooling.score_weight[e] + pooling.score_bias[e]
        support = dispatch[:, e] > 0
        if not support.any():
            continue
        logit = score[support] + (torch.log(dispatch[support, e]) if ot_guided else 0.0)
        weight = torch.softmax(logit, 0)
        attention[support, e] = weight
        out[e] = weight @ x[support]
    return out, attention


@pytest.mark.parametrize("ot_guided", [True, False])
def test_expert_pooling_matches_per_slide_reference(ot_guided):
    torch.manual_seed(14)
    z, mass, batch, edge_index, edge_weight = region_batch(seed=14)
    dispatch = OTRouter(DIM, num_experts=EXPERTS)(z, mass, batch, edge_index, edge_weight).dispatch
    pooling = ExpertAttentionPooling(DIM, 5, EXPERTS).eval()
    ptr = torch.tensor([0] + np.cumsum(SIZES).tolist())
    out = pooling(z, batch, dim_size=len(SIZES), dispatch=dispatch, ot_guided=ot_guided)
    with_ptr = pooling(z, batch, ptr=ptr, dim_size=len(SIZES), dispatch=dispatch, ot_guided=ot_guided)
    torch.testing.assert_close(with_ptr.out, out.out)
    assert out.out.shape == (len(SIZES), EXPERTS, DIM) and out.attention.shape == (z.size(0), EXPERTS)
    saw_empty = False
    for slide in range(len(SIZES)):
        rows = batch == slide
        expected, attention = reference_expert_pooling(pooling, z[rows], dispatch[rows], ot_guided)
        torch.testing.assert_close(out.out[slide], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.attention[rows], attention, atol=1e-6, rtol=1e-5)
        support = (dispatch[rows] > 0).any(0)
        assert torch.equal(out.mask[slide], support)
        saw_empty |= bool((~support).any())
        alone = pooling(z[rows], None, dim_size=1, dispatch=dispatch[rows], ot_guided=ot_guided)
        torch.testing.assert_close(alone.out[0], out.out[slide], atol=1e-6, rtol=1e-5)
    assert saw_empty  # the one-region slide leaves experts without support: zero, masked, no NaN
    assert torch.isfinite(out.out).all()


def test_expert_pooling_gradients_are_finite_with_empty_experts():
    torch.manual_seed(15)
    x = torch.randn(3, DIM, requires_grad=True)
    dispatch = torch.tensor([[0.2, 0.1, 0.0, 0.0], [0.0, 0.3, 0.0, 0.0], [0.4, 0.0, 0.0, 0.0]],
                            requires_grad=True)
    pooling = ExpertAttentionPooling(DIM, 4, EXPERTS)
    out = pooling(x, None, dim_size=1, dispatch=dispatch)
    assert out.mask.tolist() == [[True, True, False, False]]
    assert out.out[0, 2:].abs().max() == 0 and out.attention[:, 2:].abs().max() == 0
    out.out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(dispatch.grad).all()
    assert dispatch.grad[0, 0] != 0  # log D reaches the routing
    assert "num_experts=4" in repr(pooling)


# ----------------------------------------------------------------------------- fusion


def test_expert_fusion_masks_empty_experts():
    torch.manual_seed(16)
    fusion = ExpertFusion(DIM, 5).eval()
    x = torch.randn(3, EXPERTS, DIM, requires_grad=True)
    mask = torch.tensor([[True] * EXPERTS, [True, False, True, False], [False] * EXPERTS])
    out, weights = fusion(x, mask)
    hidden = torch.tanh(fusion.lin_tanh(x)) * torch.sigmoid(fusion.lin_gate(x))
    logits = fusion.lin_score(hidden).squeeze(-1)
    for b in range(2):
        expected = torch.zeros(EXPERTS)
        expected[mask[b]] = torch.softmax(logits[b, mask[b]], 0)
        torch.testing.assert_close(weights[b], expected)
        torch.testing.assert_close(out[b], expected @ x[b])
    assert weights[2].abs().max() == 0 and out[2].abs().max() == 0  # nothing to fuse: zero, no NaN
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    unmasked, _ = fusion(x)
    torch.testing.assert_close(unmasked[0], out[0])


# ----------------------------------------------------------------------------- metrics


def test_routing_metrics():
    edge_index = torch.tensor([[0, 1, 1, 2, 3, 4], [1, 0, 2, 1, 4, 3]])
    expert = torch.tensor([0, 0, 1, 2, 2])
    batch = torch.tensor([0, 0, 0, 1, 1])
    torch.testing.assert_close(routing_coherence(expert, edge_index, batch, 2), torch.tensor([0.5, 1.0]))
    valid = torch.tensor([True, True, False, True, True])
    torch.testing.assert_close(routing_coherence(expert, edge_index, batch, 2, valid), torch.tensor([1.0, 1.0]))
    loads = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(load_entropy(loads), torch.tensor([1.0, 0.0, 0.5]))
    assert math.isclose(float(load_entropy(torch.full((1, 8), 3.0))), 1.0, rel_tol=1e-6)


def test_layers_reset_and_repr():
    layers = [RoutingContext(DIM), OTRouter(DIM), ExpertAttentionPooling(DIM, 4, 3), ExpertFusion(DIM, 4)]
    for layer in layers:
        before = [p.detach().clone() for p in layer.parameters()]
        layer.reset_parameters()
        assert any(not torch.equal(a, b) for a, b in zip(before, layer.parameters()))
        assert "\n" not in repr(layer) and type(layer).__name__ in repr(layer)
    assert isinstance(OTRouter(DIM).sinkhorn, GraphSinkhorn)
