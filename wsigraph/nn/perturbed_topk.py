r"""Per-slide differentiable top-:math:`k` (perturbed optimiser) with a hard evaluation path."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from wsigraph.nn.functional.perturbed_topk import ESTIMATORS, TopKSelection, hard_topk, perturbed_topk

__all__ = ["PerturbedTopK", "TopKSelection"]


class PerturbedTopK(torch.nn.Module):
    r"""Differentiable top-:math:`k` by perturbation (Berthet et al., *Learning with
    Differentiable Perturbed Optimizers*, NeurIPS 2020; Cordonnier et al., *Differentiable Patch
    Selection for Image Recognition*, CVPR 2021), per slide.

    For the scores :math:`\theta \in \mathbb{R}^{N}` of one slide and
    :math:`k_b = \min(k, N)`, training returns the soft selection

    .. math::
        T = \mathbb{E}_{Z \sim \mathcal{N}(0, I)}\bigl[\,Y(\theta + \sigma Z)\,\bigr]
        \approx \frac{1}{S}\sum_{s=1}^{S} Y(\theta + \sigma Z_s) \in [0, 1]^{k_b \times N},

    where :math:`Y(\cdot)` is the one-hot matrix of the top-:math:`k_b` positions **sorted by
    position**, so row :math:`j` is a distribution over the entries that rank :math:`j`-th from
    the left among the selected. Its Jacobian is estimated by
    :math:`J_\theta T = \mathbb{E}[\,Y Z^\top\,]/\sigma` (``estimator="full"``), or by the diagonal
    of it, :math:`\partial T_{jd}/\partial\theta_d \approx \mathbb{E}[Y_{jd} Z_d]/\sigma`
    (``estimator="diagonal"``, the JAX reference code's and ZoomMIL's; the default, for parity).
    Evaluation returns the hard top-:math:`k_b` (no noise). The ``[S, k, N]`` one-hot tensor is
    never formed (memory :math:`O(B S (k + N))`).

    Set :attr:`generator` to a :class:`torch.Generator` to make the draws reproducible.

    Args:
        k (int): entries selected per slide (clipped to each slide's number of entries).
        num_samples (int, optional): Monte-Carlo samples :math:`S`. (default: ``100``)
        sigma (float, optional): noise scale :math:`\sigma`, in the units of the scores.
            (default: ``0.002``, ZoomMIL's, on attention probabilities)
        estimator (str, optional): ``"diagonal"`` or ``"full"``. (default: ``"diagonal"``)
        scale_by_k (bool, optional): multiply the full estimator by :math:`k` (the ``dps``
            implementation's convention). (default: ``False``)

    Shapes:
        - **input:** scores :math:`(B, N)`, mask :math:`(B, N)` (optional, real entries)
        - **output:** :class:`TopKSelection` with ``index`` / ``valid`` :math:`(B, K)` and, in
          training, ``weights`` :math:`(B, K, N)`, :math:`K = \min(k, N)`
    """

    def __init__(self, k: int, num_samples: int = 100, sigma: float = 0.002, estimator: str = "diagonal",
                 scale_by_k: bool = False):
        super().__init__()
        if k < 1 or num_samples < 1 or sigma <= 0:
            raise ValueError(f"need k >= 1, num_samples >= 1 and sigma > 0 (got {k}, {num_samples}, {sigma})")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS} (got '{estimator}')")
        self.k = int(k)
        self.num_samples = int(num_samples)
        self.sigma = float(sigma)
        self.estimator = estimator
        self.scale_by_k = bool(scale_by_k)
        self.generator: Optional[torch.Generator] = None

    def reset_parameters(self):
        pass

    def forward(self, scores: Tensor, mask: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> TopKSelection:
        r"""
        Args:
            scores (torch.Tensor): :math:`(B, N)` scores, padded.
            mask (torch.Tensor, optional): :math:`(B, N)` bool, real entries.
            noise (torch.Tensor, optional): :math:`(B, S, N)` standard normal draws (training).
        """
        if not self.training:
            return hard_topk(scores, self.k, mask)
        return perturbed_topk(scores, self.k, self.num_samples, self.sigma, mask, self.estimator,
                              noise=noise, generator=self.generator, scale_by_k=self.scale_by_k)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(k={self.k}, num_samples={self.num_samples}, sigma={self.sigma:g}, "
                f"estimator='{self.estimator}')")
