r"""Region prototypes and the cross-magnification layers of M2OTCA.

* :class:`RegionPrototypes` — one prototype per region: gated attention pooling of the region's
  patches, then a linear map;
* :class:`PrototypeOTAlignment` — entropic OT between the prototypes of a reference level and
  those of another level, and the other level's prototypes transported onto the reference ones;
* :class:`GradCAMWeights` — Grad-CAM weights of the reference prototypes for a class score.

Prototype sets are dense ``[B, M, d]`` tensors with a ``[B, M]`` mask (slides with fewer
regions are padded), the layout of :func:`torch_geometric.utils.to_dense_batch`.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from wsigraph.nn.aggregation import GatedAttentionAggregation
from wsigraph.nn.sinkhorn import Sinkhorn

__all__ = ["RegionPrototypes", "PrototypeOTAlignment", "OTAlignmentOutput", "GradCAMWeights",
           "GradCAMOutput"]


class RegionPrototypes(torch.nn.Module):
    r"""Region prototypes by gated attention pooling inside each region, then a linear map
    (M2OTCA's prototype encoder :math:`E_1`).

    For the patches :math:`i` of region :math:`j`, with :math:`h_i = x_i` or, with a patch
    embedding, :math:`h_i = \mathrm{Dropout}(\mathrm{ReLU}(W_e x_i + b_e))`,

    .. math::
        s_i = w^\top\!\left(\tanh(V h_i) \odot \sigma(U h_i)\right), \qquad
        a_i = \frac{\exp s_i}{\sum_{i' \in j} \exp s_{i'}}, \qquad
        p_j = W \sum_{i \in j} a_i h_i + c ,

    i.e. the softmax runs over each region separately (regions are the groups of
    :class:`~wsigraph.nn.GatedAttentionAggregation`). A region without patches pools to the zero
    vector and gets :math:`p_j = c`; callers mask it out. Without the embedding a prototype is
    linear in the patch features given the attention (the article's code); the embedding adds
    the nonlinearity of CLAM-style ABMIL.

    Args:
        in_channels (int): patch feature size :math:`D`.
        out_channels (int, optional): prototype size :math:`d`. (default: ``256``)
        attention_channels (int, optional): hidden size of the gated attention.
            (default: ``256``)
        dropout (float, optional): dropout inside the gated attention (and after the
            embedding). (default: ``0.0``)
        embedding_channels (int, optional): width of a patch embedding
            :math:`\mathrm{ReLU}(W_e x + b_e)` before the pooling; :obj:`None` for none.
            (default: :obj:`None`)

    Shapes:
        - **input:** features :math:`(N, D)`, region of every patch :math:`(N)` with values in
          :math:`[0, G)`, number of regions :math:`G`
        - **output:** prototypes :math:`(G, d)`, within-region attention :math:`(N)` (sums to
          one over each non-empty region)
    """

    def __init__(self, in_channels: int, out_channels: int = 256, attention_channels: int = 256,
                 dropout: float = 0.0, embedding_channels: Optional[int] = None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.attention_channels = attention_channels
        self.embedding_channels = embedding_channels
        self.embedding = None
        pooled_channels = in_channels
        if embedding_channels is not None:
            self.embedding = torch.nn.Sequential(torch.nn.Linear(in_channels, embedding_channels), torch.nn.ReLU(),
                                                 torch.nn.Dropout(dropout))
            pooled_channels = embedding_channels
        self.pool = GatedAttentionAggregation(pooled_channels, attention_channels, heads=1, dropout=dropout)
        self.lin = torch.nn.Linear(pooled_channels, out_channels)
        self.reset_parameters()

    def reset_parameters(self):
        if self.embedding is not None:
            self.embedding[0].reset_parameters()
        self.pool.reset_parameters()
        self.lin.reset_parameters()

    def forward(self, x: Tensor, group: Tensor, num_groups: int) -> Tuple[Tensor, Tensor]:
        r"""
        Args:
            x (torch.Tensor): :math:`(N, D)` patch features.
            group (torch.Tensor): :math:`(N)` region of every patch (need not be sorted).
            num_groups (int): number of regions :math:`G` (empty ones included).
        """
        if self.embedding is not None:
            x = self.embedding(x)
        pooled, attention, _ = self.pool(x, group, dim_size=num_groups, return_attention=True)
        return self.lin(pooled), attention.squeeze(-1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels})"


class OTAlignmentOutput(NamedTuple):
    r"""Result of :class:`PrototypeOTAlignment`.

    Attributes:
        transported: ``[B, M, d]`` other-level content matched to every reference prototype
            (zero on padded reference rows).
        plan: ``[B, M, M']`` transport plan :math:`\Pi` (float32), zero on padding.
    """
    transported: Tensor
    plan: Tensor


class PrototypeOTAlignment(torch.nn.Module):
    r"""Optimal-transport alignment of the prototypes :math:`Q \in \mathbb{R}^{m' \times d}` of
    one magnification to the reference prototypes :math:`P \in \mathbb{R}^{m \times d}` of the
    same slide (M2OTCA's OT cross-attention).

    .. math::
        C_{uv} = \frac{\lVert p_u - q_v \rVert_2}{\max_{u', v'} \lVert p_{u'} - q_{v'} \rVert_2},
        \qquad
        \Pi = \operatorname*{arg\,min}_{\Pi \mathbf{1} = \frac{1}{m}\mathbf{1},\
        \Pi^\top \mathbf{1} = \frac{1}{m'}\mathbf{1}} \langle \Pi, C \rangle
        - \varepsilon H(\Pi),
        \qquad
        \bar{q}_u = \frac{\sum_v \Pi_{uv}\, q_v}{\sum_v \Pi_{uv}} ,

    with uniform marginals over each slide's real prototypes, solved by the shared log-domain
    Sinkhorn core (:class:`~wsigraph.nn.Sinkhorn`, all slides in one ``[B, M, M']`` call, in
    float32). Row :math:`u` of :math:`\bar{Q}` is the other level's content transported onto
    reference prototype :math:`u`; as the row marginals are :math:`1/m`, this is
    :math:`m\,\Pi Q` at convergence (normalising by the realised row mass keeps every row a
    convex combination after finitely many iterations). Rows index the **reference**
    prototypes, so weights defined on the reference prototypes (Grad-CAM) apply to
    :math:`\bar{Q}` row by row. Gradients flow through the unrolled iterations into both
    prototype sets. A slide without any real prototype on either side gets a zero plan.

    Args:
        epsilon (float, optional): entropic regularisation :math:`\varepsilon` (the cost is in
            :math:`[0, 1]` after normalisation). (default: ``0.1``)
        num_iterations (int, optional): Sinkhorn projection pairs. (default: ``20``)
        normalize_cost (bool, optional): divide each slide's cost by its maximum.
            (default: :obj:`True`)

    Shapes:
        - **input:** reference :math:`(B, M, d)`, other :math:`(B, M', d)`, masks
          :math:`(B, M)` and :math:`(B, M')` (optional, :obj:`True` on real prototypes)
        - **output:** :class:`OTAlignmentOutput` with transported :math:`(B, M, d)` and plan
          :math:`(B, M, M')`
    """

    def __init__(self, epsilon: float = 0.1, num_iterations: int = 20, normalize_cost: bool = True):
        super().__init__()
        self.sinkhorn = Sinkhorn(epsilon=epsilon, num_iterations=num_iterations)
        self.normalize_cost = normalize_cost

    @property
    def epsilon(self) -> float:
        return self.sinkhorn.epsilon

    @property
    def num_iterations(self) -> int:
        return self.sinkhorn.num_iterations

    def reset_parameters(self):
        r"""No learnable parameters."""

    @staticmethod
    def cost(reference: Tensor, other: Tensor) -> Tensor:
        r"""Pairwise Euclidean distances ``[B, M, M']``, with a zero (not NaN) gradient at
        coinciding points."""
        squared = (reference.unsqueeze(2) - other.unsqueeze(1)).pow(2).sum(-1)
        # The clamp blocks the gradient where the distance is (numerically) zero, where the
        # derivative of the square root does not exist.
        return squared.clamp_min(1e-30).sqrt()

    def forward(self, reference: Tensor, other: Tensor, reference_mask: Optional[Tensor] = None,
                other_mask: Optional[Tensor] = None) -> OTAlignmentOutput:
        batch_size, num_rows, _ = reference.shape
        num_cols = other.size(1)
        if reference_mask is None:
            reference_mask = torch.ones(batch_size, num_rows, dtype=torch.bool, device=reference.device)
        if other_mask is None:
            other_mask = torch.ones(batch_size, num_cols, dtype=torch.bool, device=other.device)
        # A slide with no prototype on one side has no transport problem; it is solved with all
        # entries real (any finite answer) and its plan zeroed, so that no marginal is all-zero.
        valid = reference_mask.any(-1) & other_mask.any(-1)
        rows = reference_mask | ~valid.unsqueeze(-1)
        cols = other_mask | ~valid.unsqueeze(-1)
        with torch.autocast(device_type=reference.device.type, enabled=False):
            dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
            ref = reference.to(dtype).masked_fill(~rows.unsqueeze(-1), 0.0)
            oth = other.to(dtype).masked_fill(~cols.unsqueeze(-1), 0.0)
            pair = rows.unsqueeze(-1) & cols.unsqueeze(-2)
            cost = self.cost(ref, oth).masked_fill(~pair, 0.0)
            if self.normalize_cost:
                scale = cost.amax(dim=(1, 2), keepdim=True)
                cost = cost / scale.clamp_min(torch.finfo(dtype).tiny)
            col_marginals = cols.to(dtype) / cols.sum(-1, keepdim=True).clamp_min(1).to(dtype)
            plan = self.sinkhorn(cost, col_marginals=col_marginals, mask=rows)
            plan = plan * valid.to(plan.dtype).view(-1, 1, 1)
            row_mass = plan.sum(-1, keepdim=True)
            transported = torch.bmm(plan / row_mass.clamp_min(torch.finfo(dtype).tiny), oth)
        return OTAlignmentOutput(transported, plan)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(epsilon={self.epsilon}, "
                f"num_iterations={self.num_iterations})")


class GradCAMOutput(NamedTuple):
    r"""Result of :class:`GradCAMWeights`.

    Attributes:
        weights: ``[B, M]`` normalised weights :math:`\tilde{w}` in :math:`[0, 1]` (detached),
            zero on padding.
        logits: ``[B, C]`` the head's logits on the prototypes (part of the autograd graph when
            gradients are enabled outside, so the same forward serves the loss).
        target: ``[B]`` class whose score was differentiated.
        gradient: ``[B, M]`` raw channel-averaged gradients :math:`w` (detached).
        uniform: ``[B]`` bool, slides whose ReLU'd weights were all zero and fell back to
            uniform weights.
    """
    weights: Tensor
    logits: Tensor
    target: Tensor
    gradient: Tensor
    uniform: Tensor


class GradCAMWeights(torch.nn.Module):
    r"""Grad-CAM weights of a set of prototypes for a class score (M2OTCA's gradient
    cross-attention).

    With :math:`\hat{y} = f(P)` the logits of a head :math:`f` on the prototypes
    :math:`P \in \mathbb{R}^{m \times d}` of a slide and target class :math:`c`,

    .. math::
        w_u = \frac{1}{d} \sum_{k=1}^{d} \frac{\partial \hat{y}_c}{\partial P_{uk}}, \qquad
        \tilde{w}_u = \begin{cases}
            \operatorname{ReLU}(w_u) / \max_{u'} \operatorname{ReLU}(w_{u'})
                & \text{if } \max_{u'} w_{u'} > 0, \\
            1 & \text{otherwise (uniform).}
        \end{cases}

    The gradient is taken with :func:`torch.autograd.grad` (``inputs`` = the prototype tensor
    only, ``retain_graph=True``, ``create_graph=False``) under :func:`torch.enable_grad`, so it
    also works inside :func:`torch.no_grad` and :func:`torch.inference_mode` (on a detached copy
    of the prototypes; in inference mode the head must not capture tensors created in inference
    mode, which autograd cannot record), and it never writes any parameter's ``.grad``. The weights are
    **constants**: no gradient flows through them (second-order terms through the Grad-CAM map
    are not trained). The target is the head's own predicted class unless given (e.g. the
    label); the per-slide scores are summed, which gives each slide its own gradient because
    the head treats slides independently. Without the fallback, all-non-positive weights (common
    at initialisation) would silently zero everything they multiply.

    Shapes:
        - **input:** prototypes :math:`(B, M, d)`, head :math:`(B, M, d) \to (B, C)`, mask
          :math:`(B, M)` (optional), target :math:`(B)` (optional)
        - **output:** :class:`GradCAMOutput`
    """

    def reset_parameters(self):
        r"""No learnable parameters."""

    def forward(self, prototypes: Tensor, head: Callable[[Tensor], Tensor], mask: Optional[Tensor] = None,
                target: Optional[Tensor] = None) -> GradCAMOutput:
        r"""
        Args:
            prototypes (torch.Tensor): :math:`(B, M, d)` prototypes.
            head (callable): maps prototypes to logits :math:`(B, C)`, slides independently.
            mask (torch.Tensor, optional): :math:`(B, M)` bool, :obj:`True` on real prototypes.
            target (torch.Tensor, optional): :math:`(B)` classes; the predicted ones if
                :obj:`None`.
        """
        grad_enabled = torch.is_grad_enabled()
        inference = torch.is_inference_mode_enabled()
        with torch.inference_mode(False) if inference else nullcontext(), torch.enable_grad():
            if grad_enabled and not inference and prototypes.requires_grad:
                # The real graph: the head's logits double as the branch's prediction, and the
                # retained graph is the one the loss backpropagates through.
                source = prototypes
            else:
                # No graph to reuse (evaluation): differentiate the head on a copy.
                source = prototypes.detach().clone().requires_grad_(True)
            logits = head(source)
            if target is None:
                target = logits.detach().argmax(dim=-1)
            elif inference:
                target = target.clone()  # an inference tensor cannot index a recorded gather
            score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
            (gradient,) = torch.autograd.grad(score, inputs=(source,), retain_graph=True,
                                              create_graph=False, allow_unused=True)
            if gradient is None:  # the head ignores the prototypes
                gradient = torch.zeros_like(source)
        gradient = gradient.detach().float().mean(dim=-1)
        if mask is None:
            mask = torch.ones_like(gradient, dtype=torch.bool)
        positive = gradient.clamp_min(0.0).masked_fill(~mask, 0.0)
        largest = positive.amax(dim=-1, keepdim=True)
        uniform = largest.squeeze(-1) <= 0
        weights = torch.where(uniform.unsqueeze(-1), mask.to(positive.dtype),
                              positive / largest.clamp_min(torch.finfo(positive.dtype).tiny))
        if not grad_enabled or inference:
            logits = logits.detach()
        return GradCAMOutput(weights, logits, target, gradient, uniform)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"
