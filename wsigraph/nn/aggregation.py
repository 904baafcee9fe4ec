r"""Set → vector reductions over the nodes of each slide."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch_geometric.nn.aggr import Aggregation
from torch_geometric.utils import softmax

__all__ = ["GatedAttentionAggregation", "GatedAttentionOutput"]

# Finite replacement for a log-prior of -inf (see GatedAttentionAggregation.forward).
_LOG_ZERO = -1e30


class GatedAttentionOutput(NamedTuple):
    r"""Result of :class:`GatedAttentionAggregation` with ``return_attention=True``.

    Attributes:
        out: ``[B, heads, F]`` pooled vectors (``[B, F]`` when ``heads == 1``).
        attention: ``[N, heads]`` attention, summing to one over each slide's nodes (zero on a
            slide whose nodes all have a log-prior of :math:`-\infty`).
        scores: ``[N, heads]`` raw gated scores :math:`w^\top(\tanh(V h) \odot \sigma(U h))`,
            without the log-prior.
    """
    out: Tensor
    attention: Tensor
    scores: Tensor


class GatedAttentionAggregation(Aggregation):
    r"""Gated attention pooling (Ilse et al., *Attention-based Deep Multiple Instance
    Learning*, ICML 2018), with several heads and an optional additive log-prior.

    For the nodes :math:`i` of one slide and head :math:`k`,

    .. math::
        s_{ik} = w_k^\top \left( \tanh(V h_i) \odot \sigma(U h_i) \right), \qquad
        a_{ik} = \frac{\exp(s_{ik} + \log p_{ik})}{\sum_{j} \exp(s_{jk} + \log p_{jk})},
        \qquad
        \mathbf{m}_k = \sum_i a_{ik} h_i,

    where :math:`V, U` are shared by all heads and each head has its own :math:`w_k` (the
    multi-branch form, e.g. one head per class in CLAM-MB). The optional log-prior
    :math:`\log p_i` biases the attention (e.g. :math:`\log D_{re}` for OT-guided pooling);
    :math:`\log p_i = -\infty` gives node :math:`i` exactly zero attention, and a slide whose
    nodes are all at :math:`-\infty` pools to the zero vector with zero attention (never NaN).
    The softmax is computed per slide, in float32.

    The attention is returned, not stored on the module, when ``return_attention=True``
    (a :class:`GatedAttentionOutput`); :meth:`score` gives the raw scores alone.

    Args:
        in_channels (int): node feature size :math:`F`.
        hidden_channels (int): size of the gated hidden layer.
        heads (int, optional): number of attention heads (branches). (default: ``1``)
        dropout (float, optional): dropout on the gated hidden features. (default: ``0.0``)

    Shapes:
        - **input:** node features :math:`(N, F)`, index :math:`(N)` (or ptr :math:`(B + 1)`),
          log-prior :math:`(N)` or :math:`(N, heads)` (optional)
        - **output:** :math:`(B, F)` if ``heads == 1`` else :math:`(B, heads, F)`; with
          ``return_attention=True`` also attention and scores :math:`(N, heads)`
    """
    def __init__(self, in_channels: int, hidden_channels: int, heads: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if heads < 1:
            raise ValueError(f"'heads' must be >= 1 (got {heads})")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.heads = heads
        self.dropout = dropout
        self.lin_tanh = torch.nn.Linear(in_channels, hidden_channels)
        self.lin_gate = torch.nn.Linear(in_channels, hidden_channels)
        self.lin_score = torch.nn.Linear(hidden_channels, heads)
        self.reset_parameters()

    def reset_parameters(self):
        self.lin_tanh.reset_parameters()
        self.lin_gate.reset_parameters()
        self.lin_score.reset_parameters()

    def score(self, x: Tensor) -> Tensor:
        r"""Raw gated attention scores :math:`s_{ik}`, shape :math:`(N, heads)`."""
        hidden = torch.tanh(self.lin_tanh(x)) * torch.sigmoid(self.lin_gate(x))
        hidden = torch.nn.functional.dropout(hidden, p=self.dropout, training=self.training)
        return self.lin_score(hidden)

    def forward(
        self,
        x: Tensor,
        index: Optional[Tensor] = None,
        ptr: Optional[Tensor] = None,
        dim_size: Optional[int] = None,
        dim: int = -2,
        log_prior: Optional[Tensor] = None,
        return_attention: bool = False,
    ) -> Union[Tensor, GatedAttentionOutput]:
        r"""
        Args:
            x (torch.Tensor): :math:`(N, F)` node features.
            index (torch.Tensor, optional): :math:`(N)` slide index of every node.
            ptr (torch.Tensor, optional): :math:`(B + 1)` CSR offsets (sorted nodes); used for
                faster segment reductions when given.
            dim_size (int, optional): number of slides :math:`B` (pass it: inferring it is a
                host sync).
            dim (int, optional): node dimension, must address the first of two. (default: ``-2``)
            log_prior (torch.Tensor, optional): :math:`(N)` or :math:`(N, heads)` additive
                log-prior; :math:`-\infty` removes a node.
            return_attention (bool, optional): also return the attention and raw scores.
        """
        self.assert_two_dimensional_input(x, dim)
        num_nodes = x.size(0)
        scores = self.score(x)
        logits = scores.float()
        support = None
        if log_prior is not None:
            log_prior = log_prior.float()
            if log_prior.dim() == 1:
                log_prior = log_prior.unsqueeze(-1)
            # -inf is replaced by a finite value so that a slide whose nodes are all removed
            # gives 0/0-free arithmetic; its (uniform) softmax is then zeroed by `support`.
            support = log_prior > float("-inf")
            logits = (logits + log_prior).clamp_min(_LOG_ZERO)

        attention = softmax(logits, index, ptr, num_nodes=dim_size, dim=0)
        if support is not None:
            attention = attention * support

        weighted = attention.unsqueeze(-1) * x.unsqueeze(1)  # [N, heads, F]
        out = self.reduce(weighted.reshape(num_nodes, self.heads * x.size(-1)), index, ptr,
                          dim_size, dim=0, reduce="sum")
        out = out.view(-1, self.heads, x.size(-1))
        if self.heads == 1:
            out = out.squeeze(1)
        if return_attention:
            return GatedAttentionOutput(out, attention, scores)
        return out

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"heads={self.heads})")
