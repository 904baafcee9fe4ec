r"""Hard and perturbed (differentiable) top-:math:`k` selection on padded, masked scores.

Scores come as a dense ``[B, N]`` tensor, one row per slide (padded with a ``mask`` of the real
entries, e.g. from :func:`torch_geometric.utils.to_dense_batch`). :math:`k` is clipped per row to
its number of real entries, :math:`k_b = \min(k, n_b)`; outputs have :math:`K = \min(k, N)`
slots and a ``valid`` flag marking the first :math:`k_b` of each row. The selected positions are
sorted by position (not by score), so slot :math:`j` holds the :math:`j`-th selected entry from
the left, as in Cordonnier et al. (2021) and ZoomMIL.

The perturbed top-:math:`k` (Berthet et al., 2020) never forms the ``[S, K, N]`` one-hot tensor of
the samples: the forward pass scatters the sampled positions into ``[B, K, N]`` and the backward
pass gathers the upstream gradient at the sampled positions, :math:`O(B \cdot S \cdot (K + N))`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "TopKSelection",
    "ESTIMATORS",
    "clipped_k",
    "hard_topk",
    "perturbed_topk_positions",
    "perturbed_topk",
    "PerturbedTopKFunction",
    "masked_softmax",
]

#: Backward estimators of :func:`perturbed_topk`.
ESTIMATORS = ("diagonal", "full")


class TopKSelection(NamedTuple):
    r"""A per-row top-:math:`k` selection over the :math:`N` entries of ``[B, N]`` scores.

    Attributes:
        index: ``[B, K]`` long positions of the selected entries, ascending within a row; for a
            soft selection, the most probable entry of each slot (``argmax`` of ``weights``);
            ``-1`` in unused slots.
        valid: ``[B, K]`` bool, ``True`` for the first :math:`k_b` slots of row :math:`b`.
        weights: ``[B, K, N]`` soft selection (each valid row a distribution over entries, the
            average of the sampled one-hots), or ``None`` for a hard selection.
    """
    index: Tensor
    valid: Tensor
    weights: Optional[Tensor] = None


def _full_mask(scores: Tensor, mask: Optional[Tensor]) -> Tensor:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N] (got shape {tuple(scores.shape)})")
    if mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if mask.shape != scores.shape:
        raise ValueError(f"mask must have the shape of scores {tuple(scores.shape)} (got {tuple(mask.shape)})")
    return mask.bool()


def clipped_k(mask: Tensor, k: int) -> Tensor:
    r""":math:`k_b = \min(k, n_b)` per row of a ``[B, N]`` mask, ``[B]`` long."""
    return mask.sum(dim=-1).clamp(max=int(k))


def _positions_to_selection(position: Tensor, num_entries: int) -> TopKSelection:
    valid = position < num_entries
    return TopKSelection(torch.where(valid, position, position.new_full((), -1)), valid, None)


def hard_topk(scores: Tensor, k: int, mask: Optional[Tensor] = None) -> TopKSelection:
    r"""Top-:math:`k` entries of every row, sorted by position (evaluation path, no noise).

    Ties in score go to the lower position (stable sort), so a slide gives the same selection
    alone and padded inside a batch.

    Args:
        scores (torch.Tensor): ``[B, N]`` scores.
        k (int): entries per row (clipped to each row's number of real entries).
        mask (torch.Tensor, optional): ``[B, N]`` bool, real entries.

    Returns:
        TopKSelection: with ``weights=None``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    mask = _full_mask(scores, mask)
    num_entries = scores.size(1)
    slots = min(int(k), num_entries)
    masked = scores.detach().float().masked_fill(~mask, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :slots]
    real = mask.gather(1, order)
    position = torch.where(real, order, order.new_full((), num_entries))
    return _positions_to_selection(torch.sort(position, dim=-1).values, num_entries)


def perturbed_topk_positions(scores: Tensor, k: int, noise: Tensor, sigma: float,
                             mask: Optional[Tensor] = None) -> Tensor:
    r"""Positions selected by the top-:math:`k` of every perturbed sample, sorted by position.

    For sample :math:`s` of row :math:`b`, the top-:math:`k_b` entries of
    :math:`\theta_b + \sigma Z_{bs}` (masked entries excluded), ascending; slots beyond
    :math:`k_b` hold the sentinel :math:`N`.

    Args:
        scores (torch.Tensor): ``[B, N]``.
        k (int): entries per row.
        noise (torch.Tensor): ``[B, S, N]`` standard normal draws :math:`Z`.
        sigma (float): noise scale :math:`\sigma`.
        mask (torch.Tensor, optional): ``[B, N]`` bool.

    Returns:
        torch.Tensor: ``[B, S, K]`` long positions, :math:`K = \min(k, N)`.
    """
    mask = _full_mask(scores, mask)
    batch_size, num_entries = scores.shape
    if noise.dim() != 3 or noise.size(0) != batch_size or noise.size(2) != num_entries:
        raise ValueError(f"noise must be [B, S, N] = [{batch_size}, S, {num_entries}] (got {tuple(noise.shape)})")
    slots = min(int(k), num_entries)
    masked = scores.detach().float().masked_fill(~mask, float("-inf"))
    perturbed = masked.unsqueeze(1) + float(sigma) * noise.float()
    chosen = torch.topk(perturbed, slots, dim=-1, sorted=False).indices  # [B, S, K]
    real = mask.unsqueeze(1).expand_as(perturbed).gather(2, chosen)
    position = torch.where(real, chosen, chosen.new_full((), num_entries))
    return torch.sort(position, dim=-1).values


class PerturbedTopKFunction(torch.autograd.Function):
    r"""Perturbed top-:math:`k` with a Monte-Carlo Jacobian (Berthet et al., 2020).

    Forward: :math:`T = \frac{1}{S}\sum_s Y_s` with :math:`Y_s \in \{0,1\}^{K \times N}` the one-hot
    of the :math:`k` positions of sample :math:`s` (sorted by position). Backward, for the upstream
    gradient :math:`G = \partial L / \partial T`:

    * ``"diagonal"`` (the estimator of the JAX reference code and of ZoomMIL):
      :math:`\nabla_{\theta_d} = \sum_k G_{kd}\, \frac{1}{S\sigma}\sum_s Y_{skd} Z_{sd}`;
    * ``"full"`` (the Jacobian :math:`\mathbb{E}[Y Z^\top]/\sigma` of the smoothed top-:math:`k`):
      :math:`\nabla_{\theta_e} = \frac{1}{S\sigma}\sum_s Z_{se} \sum_k G_{k, i_{sk}}`, with
      :math:`i_{sk}` the position in slot :math:`k` of sample :math:`s` (times :math:`K` with
      ``scale_by_k``, the convention of the ``dps`` implementation).

    Masked entries get zero gradient. Inputs: ``scores [B, N]``, ``mask [B, N]``,
    ``noise [B, S, N]``, ``k``, ``sigma``, ``estimator``, ``scale_by_k``.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, mask: Tensor, noise: Tensor, k: int, sigma: float,
                estimator: str = "diagonal", scale_by_k: bool = False) -> Tensor:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS} (got '{estimator}')")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive (got {sigma})")
        position = perturbed_topk_positions(scores, k, noise, sigma, mask)  # [B, S, K]
        batch_size, num_samples, slots = position.shape
        num_entries = scores.size(1)
        # Scatter the samples' positions into [B, K, N + 1]; the extra column takes the sentinels.
        weights = scores.new_zeros(batch_size, slots, num_entries + 1, dtype=torch.float32)
        weights.scatter_add_(2, position.transpose(1, 2),
                             weights.new_full((), 1.0 / num_samples).expand(batch_size, slots, num_samples))
        ctx.save_for_backward(mask, noise, position)
        ctx.sigma, ctx.estimator, ctx.scale_by_k = float(sigma), estimator, bool(scale_by_k)
        ctx.scores_dtype = scores.dtype
        return weights[..., :num_entries].to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_weights: Tensor):
        mask, noise, position = ctx.saved_tensors
        batch_size, num_samples, slots = position.shape
        num_entries = noise.size(2)
        grad = torch.nn.functional.pad(grad_weights.float(), (0, 1))  # sentinel column: zero
        # G[k, i_sk]: the upstream gradient at each sample's selected position, [B, S, K].
        grad_at_choice = grad.gather(2, position.transpose(1, 2)).transpose(1, 2)
        noise = noise.float()
        if ctx.estimator == "diagonal":
            noise_at_choice = torch.nn.functional.pad(noise, (0, 1)).gather(2, position)
            grad_scores = noise.new_zeros(batch_size, num_entries + 1)
            grad_scores.scatter_add_(1, position.reshape(batch_size, -1),
                                     (grad_at_choice * noise_at_choice).reshape(batch_size, -1))
            grad_scores = grad_scores[:, :num_entries]
        else:
            grad_scores = torch.einsum("bs,bsn->bn", grad_at_choice.sum(dim=2), noise)
            if ctx.scale_by_k:
                grad_scores = grad_scores * slots
        grad_scores = grad_scores / (num_samples * ctx.sigma)
        grad_scores = grad_scores.masked_fill(~mask, 0.0).to(ctx.scores_dtype)
        return grad_scores, None, None, None, None, None, None


def perturbed_topk(scores: Tensor, k: int, num_samples: int = 100, sigma: float = 0.002,
                   mask: Optional[Tensor] = None, estimator: str = "diagonal",
                   noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                   scale_by_k: bool = False) -> TopKSelection:
    r"""Differentiable top-:math:`k` of every row by perturbation (training path).

    :math:`T_b = \mathbb{E}_Z[\,Y(\theta_b + \sigma Z)\,]` estimated with :math:`S` samples, where
    :math:`Y` is the one-hot ``[K, N]`` matrix of the top-:math:`k_b` positions sorted by position.
    See :class:`PerturbedTopKFunction` for the gradient estimators.

    Args:
        scores (torch.Tensor): ``[B, N]`` scores :math:`\theta` (ZoomMIL: attention
            probabilities, so :math:`\sigma` is on the probability scale).
        k (int): entries per row (clipped per row).
        num_samples (int): Monte-Carlo samples :math:`S`. (default: ``100``)
        sigma (float): noise scale. (default: ``0.002``)
        mask (torch.Tensor, optional): ``[B, N]`` bool, real entries.
        estimator (str): ``"diagonal"`` or ``"full"``. (default: ``"diagonal"``)
        noise (torch.Tensor, optional): ``[B, S, N]`` standard normal draws to use instead of
            drawing them.
        generator (torch.Generator, optional): generator of the draws; drawn on its device and
            moved to the scores' device.
        scale_by_k (bool): multiply the ``"full"`` gradient by :math:`K`. (default: ``False``)

    Returns:
        TopKSelection: soft ``weights`` ``[B, K, N]``, the most probable position of every slot
        as ``index``, and ``valid``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    mask = _full_mask(scores, mask)
    batch_size, num_entries = scores.shape
    if noise is None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
        device = generator.device if generator is not None else scores.device
        noise = torch.randn(batch_size, num_samples, num_entries, generator=generator, device=device,
                            dtype=torch.float32).to(scores.device)
    weights = PerturbedTopKFunction.apply(scores, mask, noise, int(k), float(sigma), estimator, bool(scale_by_k))
    slots = weights.size(1)
    valid = torch.arange(slots, device=scores.device).unsqueeze(0) < clipped_k(mask, k).unsqueeze(1)
    # Lowest position among equally probable ones (argmax returns the first maximum).
    index = torch.where(valid, weights.detach().argmax(dim=-1), valid.new_full((), -1, dtype=torch.long))
    return TopKSelection(index, valid, weights)


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    r"""Softmax over the ``mask``-ed entries along ``dim`` in float32; masked entries get 0 and
    a fully masked row gives zeros (never NaN)."""
    logits = logits.float().masked_fill(~mask, float("-inf"))
    # The shift cancels in the ratio, so it is kept out of the graph.
    top = logits.detach().amax(dim=dim, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    weights = torch.exp(logits - top) * mask
    total = weights.sum(dim=dim, keepdim=True)
    return weights / total.clamp_min(torch.finfo(torch.float32).tiny)
