import copy

import numpy as np
import ot
import pytest
import torch
from torch_geometric.data import Batch

from conftest import nested_levels
from wsigraph.data.graph import build_slide_graph
from wsigraph.data.schema import node_batch, num_slides, patch_levels, region_of_patch
from wsigraph.models.common import per_node_patch_size
from wsigraph.nn import GradCAMWeights, PrototypeOTAlignment, RegionPrototypes
from wsigraph.nn.functional import raster_rank, sequential_chunk_index
from wsigraph.transforms import graph_transform


def irregular_slide(cols, rows, origin, keep, seed, num_regions, dim=4):
    levels = nested_levels(cols, rows, origin, (), seed, dim, keep=keep)
    graph = build_slide_graph(levels, f"s{seed}", f"c{seed}", label=0)
    transform = graph_transform({"regions": {"strategy": "sequential", "num_regions": num_regions},
                                 "region_knn": 2, "patch_grid": False})
    return transform(graph)


# ----------------------------------------------------------------------------------------------
# Sequential chunking
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_chunks", [1, 5, 30])
def test_sequential_chunks_reproduce_the_region_transform(num_chunks):
    # Irregular tissue, lattices offset from 0, and a slide smaller than the number of chunks.
    slides = [irregular_slide(11, 9, (37, 11), 0.7, 0, num_chunks),
              irregular_slide(3, 2, (130, 7), 1.0, 1, num_chunks),
              irregular_slide(8, 13, (1000, 91), 0.8, 2, num_chunks)]
    batch = Batch.from_data_list([copy.copy(s) for s in slides])
    top = patch_levels(batch)[-1]
    index = node_batch(batch, top)
    chunk, chunks = sequential_chunk_index(batch[top].pos, per_node_patch_size(batch, top, index), index,
                                           num_slides(batch), num_chunks)
    # The transform's regions of the top level, renumbered per slide.
    region = region_of_patch(batch, top) - batch["region"].ptr[index]
    assert torch.equal(chunk, index * num_chunks + region)
    counts = torch.bincount(index, minlength=3)
    assert torch.equal(chunks, counts.clamp(max=num_chunks))
    # Balanced: chunk sizes of a slide differ by at most one.
    sizes = torch.bincount(chunk, minlength=3 * num_chunks).view(3, num_chunks)
    for b in range(3):
        used = sizes[b, :int(chunks[b])]
        assert int(used.max() - used.min()) <= 1 and int(used.sum()) == int(counts[b])


def test_raster_rank_is_row_major_per_slide():
    generator = torch.Generator().manual_seed(0)
    # Two slides; the second has rows offset by a fraction of a patch (CLAM-style origins).
    pos = torch.tensor([[0., 0.], [256., 0.], [0., 256.], [512., 256.], [256., 512.],
                        [40., 0.], [296., 0.], [40., 300.], [552., 300.]])
    perm = torch.randperm(pos.size(0), generator=generator)
    index = torch.tensor([0] * 5 + [1] * 4)
    rank, counts = raster_rank(pos[perm], torch.full((9,), 256.), index[perm], 2)
    expected = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    assert torch.equal(rank, expected[perm]) and counts.tolist() == [5, 4]


# ----------------------------------------------------------------------------------------------
# Region prototypes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("embedding", [None, 8])
def test_region_prototypes_match_dense_reference(embedding):
    torch.manual_seed(0)
    layer = RegionPrototypes(6, 5, attention_channels=7, embedding_channels=embedding)
    inputs = torch.randn(40, 6)
    x = inputs if embedding is None else torch.relu(layer.embedding[0](inputs))
    group = torch.randint(0, 9, (40,))
    group[group == 4] = 3  # group 4 is empty
    prototypes, attention = layer(inputs, group, 9)
    pool = layer.pool
    for g in range(9):
        members = group == g
        if not members.any():
            torch.testing.assert_close(prototypes[g], layer.lin.bias)
            continue
        h = x[members]
        gated = torch.tanh(pool.lin_tanh(h)) * torch.sigmoid(pool.lin_gate(h))
        a = torch.softmax(pool.lin_score(gated).squeeze(-1), dim=0)
        torch.testing.assert_close(attention[members], a)
        torch.testing.assert_close(prototypes[g], layer.lin((a[:, None] * h).sum(0)))


# ----------------------------------------------------------------------------------------------
# OT alignment
# ----------------------------------------------------------------------------------------------
def masked_problem(seed=0, dtype=torch.float32, rows=(6, 3, 1), cols=(4, 6, 2), dim=3):
    generator = torch.Generator().manual_seed(seed)
    size_r, size_c = max(rows), max(cols)
    reference = torch.randn(len(rows), size_r, dim, generator=generator, dtype=dtype)
    other = torch.randn(len(rows), size_c, dim, generator=generator, dtype=dtype) + 0.5
    reference_mask = torch.arange(size_r)[None] < torch.tensor(rows)[:, None]
    other_mask = torch.arange(size_c)[None] < torch.tensor(cols)[:, None]
    # Garbage on padding must not matter.
    reference = reference.masked_fill(~reference_mask[..., None], 1e6)
    other = other.masked_fill(~other_mask[..., None], -1e6)
    return reference, other, reference_mask, other_mask


def test_ot_plan_has_uniform_marginals_and_matches_pot():
    reference, other, reference_mask, other_mask = masked_problem()
    layer = PrototypeOTAlignment(epsilon=0.1, num_iterations=20)
    out = layer(reference, other, reference_mask, other_mask)
    rows, cols = reference_mask.sum(-1), other_mask.sum(-1)
    for b in range(3):
        m, n = int(rows[b]), int(cols[b])
        plan = out.plan[b]
        assert (plan[m:] == 0).all() and (plan[:, n:] == 0).all()
        # Columns hold exactly after the last projection, rows up to 20 iterations' convergence.
        torch.testing.assert_close(plan[:m, :n].sum(0), torch.full((n,), 1.0 / n), atol=1e-6, rtol=0)
        torch.testing.assert_close(plan[:m, :n].sum(1), torch.full((m,), 1.0 / m), atol=2e-3, rtol=0)
        # Transported rows: convex combinations of the real other-level prototypes, = m * Pi Q
        # up to the row marginals' convergence.
        real = other[b, :n]
        expected = (plan[:m, :n] / plan[:m, :n].sum(1, keepdim=True)) @ real
        torch.testing.assert_close(out.transported[b, :m], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.transported[b, :m], m * plan[:m, :n] @ real, atol=0.1, rtol=0.05)
        assert (out.transported[b, m:] == 0).all()

    # Converged, in float64, the plan is POT's entropic OT plan for the normalised cost.
    reference, other = reference.double(), other.double()
    converged = PrototypeOTAlignment(epsilon=0.1, num_iterations=3000)(reference, other, reference_mask, other_mask)
    for b in range(3):
        m, n = int(rows[b]), int(cols[b])
        cost = torch.cdist(reference[b, :m], other[b, :n])
        cost = cost / cost.max()
        expected = ot.sinkhorn(np.full(m, 1.0 / m), np.full(n, 1.0 / n), cost.numpy(), 0.1,
                               method="sinkhorn_log", numItermax=100000, stopThr=1e-13)
        np.testing.assert_allclose(converged.plan[b, :m, :n].numpy(), expected, atol=1e-9)


def test_ot_batched_equals_per_slide_and_degenerate_slides():
    reference, other, reference_mask, other_mask = masked_problem(seed=1)
    other_mask[2] = False  # no prototype at the other level: zero plan, zero rows, no NaN
    layer = PrototypeOTAlignment()
    out = layer(reference, other, reference_mask, other_mask)
    assert torch.isfinite(out.plan).all() and torch.isfinite(out.transported).all()
    assert (out.plan[2] == 0).all() and (out.transported[2] == 0).all()
    for b in range(2):
        m, n = int(reference_mask[b].sum()), int(other_mask[b].sum())
        alone = layer(reference[b:b + 1, :m], other[b:b + 1, :n])
        torch.testing.assert_close(out.plan[b:b + 1, :m, :n], alone.plan)
        torch.testing.assert_close(out.transported[b:b + 1, :m], alone.transported)


def test_ot_gradients_are_finite_with_coinciding_prototypes():
    reference = torch.randn(2, 4, 3)
    other = reference.clone()  # zero distances on the diagonal
    other[1] = other[1, :1]  # and a slide whose prototypes all coincide
    reference.requires_grad_(True)
    other.requires_grad_(True)
    out = PrototypeOTAlignment()(reference, other)
    (out.transported.pow(2).sum() + out.plan.pow(2).sum()).backward()
    assert torch.isfinite(reference.grad).all() and torch.isfinite(other.grad).all()
    assert reference.grad.abs().sum() > 0 and other.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Grad-CAM weights
# ----------------------------------------------------------------------------------------------
class Head(torch.nn.Module):
    r"""A small per-slide attention head on dense prototypes, slides independent."""

    def __init__(self, dim=5, classes=3):
        super().__init__()
        self.score = torch.nn.Linear(dim, 1)
        self.lin = torch.nn.Linear(dim, classes)

    def forward(self, prototypes, mask):
        score = self.score(torch.tanh(prototypes)).squeeze(-1).masked_fill(~mask, float("-inf"))
        attention = torch.softmax(score, dim=-1)
        return self.lin((attention.unsqueeze(-1) * prototypes).sum(1))


def direct_gradcam(head, prototypes, mask, target=None):
    weights = []
    for b in range(prototypes.size(0)):
        p = prototypes[b:b + 1].detach().clone().requires_grad_(True)
        logits = head(p, mask[b:b + 1])
        c = int(logits.argmax()) if target is None else int(target[b])
        logits[0, c].backward()
        w = p.grad[0].mean(-1).clamp_min(0) * mask[b]
        weights.append(w / w.max() if w.max() > 0 else mask[b].float())
    return torch.stack(weights)


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_gradcam_weights_equal_direct_autograd(mode):
    torch.manual_seed(0)
    head = Head()
    encoder = torch.nn.Linear(5, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(3, 6, 5)
    layer = GradCAMWeights()
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    with context():
        prototypes = encoder(x)  # part of a graph reaching parameters when gradients are on
        out = layer(prototypes, lambda p: head(p, mask), mask=mask)
        label = torch.tensor([2, 0, 1])
        labelled = layer(prototypes, lambda p: head(p, mask), mask=mask, target=label)
    # A forward never leaves anything in a parameter's .grad.
    assert all(p.grad is None for p in [*head.parameters(), *encoder.parameters()])
    expected = direct_gradcam(head, encoder(x), mask)
    torch.testing.assert_close(out.weights, expected)
    torch.testing.assert_close(labelled.weights, direct_gradcam(head, encoder(x), mask, label))
    assert torch.equal(out.target, head(encoder(x), mask).argmax(-1)) and torch.equal(labelled.target, label)
    assert not out.weights.requires_grad
    assert (out.weights[~mask] == 0).all() and torch.allclose(out.weights.amax(-1), torch.ones(3))
    if mode == "grad":
        # The head's logits are the real graph: they backpropagate to the encoder afterwards.
        assert out.logits.requires_grad
        out.logits.sum().backward()
        assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    else:
        assert not out.logits.requires_grad


def test_gradcam_falls_back_to_uniform_when_no_weight_is_positive():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    prototypes = torch.randn(2, 4, 3)

    def head(p):  # every class score decreases in every channel: all weights negative
        score = -(p.sum(-1).masked_fill(~mask, 0).sum(-1, keepdim=True))
        return score.expand(-1, 2) + torch.tensor([0.0, 1.0])

    out = GradCAMWeights()(prototypes, head, mask=mask)
    assert out.uniform.all() and (out.gradient[mask] < 0).all()
    torch.testing.assert_close(out.weights, mask.float())

    def flat(p):  # a constant head: zero gradients, the all-zero ReLU case
        return p.sum(-1).sum(-1, keepdim=True).expand(-1, 2) * 0.0

    out = GradCAMWeights()(prototypes, flat, mask=mask)
    assert out.uniform.all() and torch.isfinite(out.weights).all()
    torch.testing.assert_close(out.weights, mask.float())
