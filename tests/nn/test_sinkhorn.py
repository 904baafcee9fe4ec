import warnings

import numpy as np
import ot
import pytest
import torch

from wsigraph.nn import GraphSinkhorn, Sinkhorn
from wsigraph.nn.functional import (
    padded_row_index,
    plan_marginals,
    sinkhorn_log,
    sinkhorn_log_flat,
    smooth_log_plan,
)

SIZES = [7, 1, 12, 4]  # rows per slide, one batch of slides of different sizes
NUM_COLS = 5


def random_problem(sizes=SIZES, num_cols=NUM_COLS, dtype=torch.float32, seed=0, max_cost=1.0):
    generator = torch.Generator().manual_seed(seed)
    num_graphs = len(sizes)
    batch = torch.repeat_interleave(torch.arange(num_graphs), torch.tensor(sizes))
    cost = max_cost * torch.rand(batch.numel(), num_cols, generator=generator, dtype=dtype)
    mass = torch.rand(batch.numel(), generator=generator, dtype=dtype) + 0.1
    totals = torch.zeros(num_graphs, dtype=dtype).index_add_(0, batch, mass)
    row = mass / totals[batch]
    col = torch.rand(num_graphs, num_cols, generator=generator, dtype=dtype) + 0.1
    col = col / col.sum(-1, keepdim=True)
    return cost, row, col, batch


def knn_edges(batch, seed=1):
    # A symmetric kNN graph over random 2-D centroids, within slides only.
    generator = torch.Generator().manual_seed(seed)
    position = torch.rand(batch.numel(), 2, generator=generator)
    distance = torch.cdist(position, position)
    distance[batch[:, None] != batch[None, :]] = float("inf")
    distance.fill_diagonal_(float("inf"))
    k = min(3, batch.numel())
    neighbour = distance.topk(k, largest=False).indices
    target = torch.arange(batch.numel()).repeat_interleave(k)
    edge_index = torch.stack([neighbour.reshape(-1), target])
    edge_index = edge_index[:, torch.isfinite(distance[edge_index[1], edge_index[0]])]
    return torch.cat([edge_index, edge_index.flip(0)], 1).unique(dim=1)


def slide_slices(batch):
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(batch).cumsum(0)])
    return [slice(int(ptr[i]), int(ptr[i + 1])) for i in range(ptr.numel() - 1)]


def pot_plan(cost, row, col, epsilon, num_iterations=None):
    r"""POT's log-domain Sinkhorn in float64. POT updates columns first, so the transposed
    problem gives our row-then-column order exactly for a fixed number of pairs."""
    cost, row, col = (t.detach().double().numpy() for t in (cost, row, col))
    # Equal totals in float64, or POT's stopping test can never be met.
    row, col = row / row.sum(), col / col.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if num_iterations is None:  # to convergence
            return ot.bregman.sinkhorn_log(row, col, cost, epsilon, numItermax=20000,
                                           stopThr=1e-11)
        plan_t = ot.bregman.sinkhorn_log(col, row, cost.T, epsilon, numItermax=num_iterations,
                                         stopThr=0.0)
    return plan_t.T


@pytest.mark.parametrize("num_iterations", [1, 3, 10])
def test_fixed_iterations_match_pot(num_iterations):
    cost, row, col, batch = random_problem(seed=num_iterations)
    plan = sinkhorn_log_flat(cost, row, col, batch, epsilon=0.1, num_iterations=num_iterations)
    assert plan.dtype == torch.float32 and plan.shape == cost.shape
    for b, rows in enumerate(slide_slices(batch)):
        reference = pot_plan(cost[rows], row[rows], col[b], 0.1, num_iterations)
        np.testing.assert_allclose(plan[rows].numpy(), reference, atol=1e-6, rtol=1e-5)


def test_converged_plan_matches_pot():
    cost, row, col, batch = random_problem(seed=3)
    plan = sinkhorn_log_flat(cost, row, col, batch, epsilon=0.05, num_iterations=300)
    for b, rows in enumerate(slide_slices(batch)):
        reference = pot_plan(cost[rows], row[rows], col[b], 0.05)
        np.testing.assert_allclose(plan[rows].numpy(), reference, atol=1e-5)
    row_sums, col_sums = plan_marginals(plan, batch, len(SIZES))
    torch.testing.assert_close(row_sums, row, atol=1e-5, rtol=0)
    torch.testing.assert_close(col_sums, col, atol=1e-5, rtol=0)


def test_dense_uniform_square_matches_pot():
    # The prototype-matching case: B x m x m with uniform marginals (defaults).
    generator = torch.Generator().manual_seed(4)
    cost = torch.rand(3, 6, 6, generator=generator)
    plan = Sinkhorn(epsilon=0.1, num_iterations=20)(cost)
    uniform = torch.full((6,), 1 / 6)
    for b in range(3):
        reference = pot_plan(cost[b], uniform, uniform, 0.1, 20)
        np.testing.assert_allclose(plan[b].numpy(), reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plan.sum(-2), uniform.expand(3, 6), atol=1e-6, rtol=0)


def test_batched_equals_per_slide_and_padding_is_empty():
    cost, row, col, batch = random_problem(seed=5)
    edge_index = knn_edges(batch)
    plan = sinkhorn_log_flat(cost, row, col, batch, epsilon=0.05, num_iterations=10,
                             edge_index=edge_index, smoothing=0.5, smoothing_steps=3)
    for b, rows in enumerate(slide_slices(batch)):
        keep = (edge_index >= rows.start).all(0) & (edge_index < rows.stop).all(0)
        single = sinkhorn_log_flat(cost[rows], row[rows], col[b], None, epsilon=0.05,
                                   num_iterations=10, edge_index=edge_index[:, keep] - rows.start,
                                   smoothing=0.5, smoothing_steps=3)
        torch.testing.assert_close(plan[rows], single, atol=1e-7, rtol=1e-6)

    # Dense padded layout: padded rows (zero mass, garbage cost) get exactly zero mass.
    index, max_rows = padded_row_index(batch, len(SIZES))
    dense_cost = torch.full((len(SIZES) * max_rows, NUM_COLS), float("inf"))
    dense_cost[index] = cost
    dense_row = torch.zeros(len(SIZES) * max_rows)
    dense_row[index] = row
    mask = torch.zeros(len(SIZES) * max_rows, dtype=torch.bool)
    mask[index] = True
    dense = sinkhorn_log(dense_cost.view(len(SIZES), max_rows, -1), dense_row.view(len(SIZES), -1),
                         col, epsilon=0.05, num_iterations=10, mask=mask.view(len(SIZES), -1),
                         edge_index=index[edge_index], smoothing=0.5, smoothing_steps=3)
    assert torch.isfinite(dense).all()
    assert (dense.view(-1, NUM_COLS)[~mask] == 0).all()
    torch.testing.assert_close(dense.view(-1, NUM_COLS)[index], plan)


def test_smoothing_marginals():
    # Row marginals converge with more pairs; column marginals hold after every final pair.
    cost, row, col, batch = random_problem(seed=6)
    edge_index = knn_edges(batch)
    for num_iterations, row_tolerance in ((10, 1e-3), (200, 1e-6)):
        plan = sinkhorn_log_flat(cost, row, col, batch, epsilon=0.05,
                                 num_iterations=num_iterations, edge_index=edge_index,
                                 smoothing=0.5, smoothing_steps=3)
        row_sums, col_sums = plan_marginals(plan, batch, len(SIZES))
        torch.testing.assert_close(col_sums, col, atol=1e-6, rtol=0)
        torch.testing.assert_close(row_sums, row, atol=row_tolerance, rtol=0)
    # More smoothing steps than pairs: the last pair is still a projection pair.
    plan = sinkhorn_log_flat(cost, row, col, batch, epsilon=0.05, num_iterations=2,
                             edge_index=edge_index, smoothing=0.9, smoothing_steps=5)
    torch.testing.assert_close(plan_marginals(plan, batch, len(SIZES))[1], col, atol=1e-6, rtol=0)


def test_smoothing_changes_plan_and_zero_is_plain():
    cost, row, col, batch = random_problem(seed=7)
    edge_index = knn_edges(batch)
    plain = sinkhorn_log_flat(cost, row, col, batch, epsilon=0.05, num_iterations=10)
    zero = sinkhorn_log_flat(cost, row, col, batch, epsilon=0.05, num_iterations=10,
                             edge_index=edge_index, smoothing=0.0, smoothing_steps=3)
    smoothed = sinkhorn_log_flat(cost, row, col, batch, epsilon=0.05, num_iterations=10,
                                 edge_index=edge_index, smoothing=0.5, smoothing_steps=3)
    assert torch.equal(zero, plain)
    assert (smoothed - plain).abs().max() > 1e-3
    # Smoothing makes neighbouring rows agree more on their preferred column.
    agree = lambda p: (p.argmax(-1)[edge_index[0]] == p.argmax(-1)[edge_index[1]]).float().mean()
    assert agree(smoothed) >= agree(plain)


def test_smoothing_step_matches_dense_formula():
    generator = torch.Generator().manual_seed(8)
    log_plan = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    edge_index = torch.tensor([[1, 2, 0, 3, 5], [0, 0, 1, 2, 4]])
    weight = torch.rand(5, generator=generator, dtype=torch.float64)
    dense_weight = torch.zeros(6, 6, dtype=torch.float64)
    dense_weight[edge_index[1], edge_index[0]] = weight
    expected = 0.7 * log_plan + 0.3 * dense_weight @ log_plan
    torch.testing.assert_close(smooth_log_plan(log_plan, edge_index, weight, 0.3), expected)


def test_gradients_finite_at_small_epsilon():
    cost, row, col, batch = random_problem(seed=9, max_cost=2.0)
    edge_index = knn_edges(batch)
    cost.requires_grad_(True)
    layer = GraphSinkhorn(epsilon=0.01, num_iterations=10)
    plan = layer(cost, row, col, batch, edge_index)
    (plan * torch.randn_like(plan)).sum().backward()
    assert torch.isfinite(plan).all() and torch.isfinite(cost.grad).all()
    assert cost.grad.abs().sum() > 0


def test_gradcheck_float64():
    cost, row, col, batch = random_problem(sizes=[3, 2], num_cols=3, dtype=torch.float64, seed=10)
    edge_index = torch.tensor([[0, 1, 1, 2, 3], [1, 0, 2, 1, 4]])
    cost.requires_grad_(True)
    row.requires_grad_(True)

    def function(cost, row):
        return sinkhorn_log_flat(cost, row, col, batch, epsilon=0.2, num_iterations=4,
                                 edge_index=edge_index, smoothing=0.5, smoothing_steps=2)

    assert function(cost, row).dtype == torch.float64
    assert torch.autograd.gradcheck(function, (cost, row))


def test_half_precision_input_computed_in_float32():
    cost, row, col, batch = random_problem(seed=11)
    reference = sinkhorn_log_flat(cost.half().float(), row, col, batch, epsilon=0.05)
    plan = sinkhorn_log_flat(cost.half(), row.half(), col, batch, epsilon=0.05)
    assert plan.dtype == torch.float32
    torch.testing.assert_close(plan, reference, atol=1e-3, rtol=0)


def test_module_defaults_and_repr():
    layer = GraphSinkhorn()
    assert (layer.epsilon, layer.num_iterations, layer.smoothing, layer.smoothing_steps) == \
        (0.05, 10, 0.5, 3)
    assert repr(layer) == ("GraphSinkhorn(epsilon=0.05, num_iterations=10, smoothing=0.5, "
                           "smoothing_steps=3)")
    assert repr(Sinkhorn()) == "Sinkhorn(epsilon=0.1, num_iterations=20)"
    cost, row, col, batch = random_problem(seed=12)
    log_plan = layer(cost, row, col, batch, knn_edges(batch), return_log=True)
    torch.testing.assert_close(log_plan.exp(), layer(cost, row, col, batch, knn_edges(batch)))
