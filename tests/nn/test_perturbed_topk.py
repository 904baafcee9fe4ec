import pytest
import torch
import torch.nn.functional as F

from wsigraph.nn import PerturbedTopK
from wsigraph.nn.functional.perturbed_topk import (hard_topk, masked_softmax, perturbed_topk,
                                                   perturbed_topk_positions)


def random_problem(batch_size=3, entries=9, k=4, samples=7, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    scores = torch.randn(batch_size, entries, generator=generator)
    mask = torch.ones(batch_size, entries, dtype=torch.bool)
    mask[1, 5:] = False          # 5 real entries
    mask[2, [0, 3, 4, 6, 7, 8]] = False   # 3 real entries < k, interspersed with padding
    noise = torch.randn(batch_size, samples, entries, generator=generator)
    return scores, mask, noise


def dense_sample_onehots(scores, mask, noise, sigma, k):
    r"""Y [B, S, K, N]: one-hots of every sample's top-k_b (sorted by position), row by row."""
    batch_size, samples, entries = noise.shape
    slots = min(k, entries)
    onehots = torch.zeros(batch_size, samples, slots, entries)
    for b in range(batch_size):
        real = torch.nonzero(mask[b]).view(-1)
        kb = min(k, real.numel())
        for s in range(samples):
            perturbed = scores[b, real] + sigma * noise[b, s, real]
            chosen = real[torch.topk(perturbed, kb).indices].sort().values
            onehots[b, s, torch.arange(kb), chosen] = 1.0
    return onehots


def test_forward_is_the_mean_of_the_sample_onehots():
    scores, mask, noise = random_problem()
    sigma, k = 0.7, 4
    selection = perturbed_topk(scores, k, mask=mask, sigma=sigma, noise=noise)
    onehots = dense_sample_onehots(scores, mask, noise, sigma, k)
    torch.testing.assert_close(selection.weights, onehots.mean(dim=1))
    # k is clipped per row; unused slots have zero weight and index -1.
    assert selection.valid.sum(dim=1).tolist() == [4, 4, 3]
    assert (selection.index[~selection.valid] == -1).all()
    assert selection.weights[2, 3].abs().sum() == 0
    # Masked entries are never selected.
    assert (selection.weights.sum(dim=1)[~mask] == 0).all()
    # The most probable entry of each slot, and rows of valid slots sum to one.
    torch.testing.assert_close(selection.weights.sum(-1), selection.valid.float())
    expected = selection.weights.argmax(-1)
    assert torch.equal(selection.index[selection.valid], expected[selection.valid])


def test_each_row_alone_gives_the_same_selection():
    scores, mask, noise = random_problem()
    batched = perturbed_topk(scores, 4, mask=mask, sigma=0.3, noise=noise)
    for b in range(scores.size(0)):
        real = torch.nonzero(mask[b]).view(-1)
        alone = perturbed_topk(scores[b:b + 1, real], 4, sigma=0.3, noise=noise[b:b + 1][:, :, real])
        slots = alone.weights.size(1)
        torch.testing.assert_close(batched.weights[b, :slots][:, real], alone.weights[0])


@pytest.mark.parametrize("estimator", ["diagonal", "full"])
def test_estimators_match_their_formulas(estimator):
    scores, mask, noise = random_problem()
    sigma, k = 0.5, 4
    scores.requires_grad_(True)
    selection = perturbed_topk(scores, k, mask=mask, sigma=sigma, noise=noise, estimator=estimator)
    upstream = torch.randn_like(selection.weights)
    (selection.weights * upstream).sum().backward()
    onehots = dense_sample_onehots(scores.detach(), mask, noise, sigma, k)  # [B, S, K, N]
    samples = noise.size(1)
    if estimator == "diagonal":
        jacobian = torch.einsum("bskn,bsn->bkn", onehots, noise) / (samples * sigma)
        expected = (upstream * jacobian).sum(dim=1)
    else:
        jacobian = torch.einsum("bskd,bse->bkde", onehots, noise) / (samples * sigma)
        expected = torch.einsum("bkd,bkde->be", upstream, jacobian)
    expected = expected.masked_fill(~mask, 0.0)
    torch.testing.assert_close(scores.grad, expected, atol=1e-5, rtol=1e-5)


def test_full_estimator_scaled_by_k():
    scores, mask, noise = random_problem()
    grads = []
    for scale in (False, True):
        x = scores.clone().requires_grad_(True)
        weights = perturbed_topk(x, 4, mask=mask, sigma=0.5, noise=noise, estimator="full", scale_by_k=scale).weights
        weights.sum(dim=(1,)).pow(2).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], 4 * grads[0])


def _smoothed_objective(scores, upstream, noise, sigma, k):
    position = perturbed_topk_positions(scores[None], k, noise, sigma)[0]  # [M, K]
    return upstream.gather(1, position.T).sum(dim=0).mean()


def test_gradient_points_like_finite_differences_of_the_smoothed_objective():
    # F(θ) = E_Z <G, Y(θ + σZ)>: central differences with common random numbers vs the estimators.
    generator = torch.Generator().manual_seed(0)
    entries, k, sigma, eps = 6, 2, 0.5, 0.1
    for _ in range(2):
        scores = 0.5 * torch.randn(entries, generator=generator)
        upstream = torch.randn(k, entries, generator=generator)
        common = torch.randn(1, 120_000, entries, generator=generator)
        finite = torch.stack([
            (_smoothed_objective(scores + eps * F.one_hot(torch.tensor(i), entries), upstream, common, sigma, k)
             - _smoothed_objective(scores - eps * F.one_hot(torch.tensor(i), entries), upstream, common, sigma, k))
            / (2 * eps) for i in range(entries)])
        noise = torch.randn(1, 20_000, entries, generator=generator)
        cosine = {}
        for estimator in ("diagonal", "full"):
            x = scores[None].clone().requires_grad_(True)
            (perturbed_topk(x, k, sigma=sigma, noise=noise, estimator=estimator).weights[0] * upstream).sum().backward()
            cosine[estimator] = F.cosine_similarity(x.grad[0], finite, dim=0).item()
        # The full estimator is the gradient of the smoothed objective; the diagonal one (the
        # default, ZoomMIL's) keeps only each entry's own term but still points uphill.
        assert cosine["full"] > 0.98, cosine
        assert cosine["diagonal"] > 0.2, cosine


def test_hard_topk_sorted_by_position_with_masks():
    scores, mask, _ = random_problem()
    selection = hard_topk(scores, 4, mask)
    for b in range(scores.size(0)):
        real = torch.nonzero(mask[b]).view(-1)
        kb = min(4, real.numel())
        expected = real[torch.topk(scores[b, real], kb).indices].sort().values
        assert selection.index[b, :kb].tolist() == expected.tolist()
        assert (selection.index[b, kb:] == -1).all() and selection.valid[b].sum() == kb
    # k larger than every row: all real entries, in order.
    many = hard_topk(scores, 50, mask)
    assert many.index.shape == (3, 9)
    assert many.valid.sum(1).tolist() == mask.sum(1).tolist()


def test_module_switches_paths_and_never_materialises_samples():
    scores, mask, _ = random_problem()
    module = PerturbedTopK(3, num_samples=50, sigma=0.1)
    module.generator = torch.Generator().manual_seed(3)
    soft = module(scores, mask)
    module.generator = torch.Generator().manual_seed(3)
    again = module(scores, mask)
    torch.testing.assert_close(soft.weights, again.weights)
    assert soft.weights.shape == (3, 3, 9)
    module.eval()
    hard = module(scores, mask)
    assert hard.weights is None
    assert torch.equal(hard.index, hard_topk(scores, 3, mask).index)
    assert "k=3" in repr(module)


def test_masked_softmax_rows():
    logits = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = masked_softmax(logits, mask)
    torch.testing.assert_close(out[0], torch.softmax(logits[0], 0))
    torch.testing.assert_close(out[1, [0, 2]], torch.softmax(logits[1, [0, 2]], 0))
    assert (out[1, [1, 3, 4]] == 0).all() and (out[2] == 0).all()
