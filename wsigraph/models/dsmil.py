r"""DSMIL: dual-stream MIL with critical-instance attention."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import HeteroData
from torch_geometric.utils import scatter, softmax, to_dense_batch

from wsigraph.models.base import MILOutput, register_model
from wsigraph.models.common import PatchLevelMILModel, column_of_prediction, segment_argmax

__all__ = ["DSMIL"]


@register_model("dsmil")
class DSMIL(PatchLevelMILModel):
    r"""Dual-stream MIL (Li, Li & Eliceiri, *Dual-stream Multiple Instance Learning Network for
    Whole Slide Image Classification with Self-supervised Contrastive Learning*, CVPR 2021).

    Instance stream: a linear instance classifier :math:`c_i = W_0 x_i + b_0 \in \mathbb{R}^C`;
    per class :math:`k` the critical instance :math:`m_k = \arg\max_{i \in b} c_{ik}`
    (ties: the first). Bag stream, with queries :math:`q_i = \tanh(W_2\,\mathrm{ReLU}(W_1 x_i))`
    of width :math:`Q` and values :math:`v_i` (:math:`x_i`, or
    :math:`\mathrm{ReLU}(W_v x_i)` with ``passing_values``):

    .. math::
        A_{ik} = \operatorname{softmax}_{i \in b}\!\left(\frac{\langle q_i, q_{m_k}\rangle}
        {\sqrt{Q}}\right), \qquad
        \mathbf{B}_{k} = \sum_{i \in b} A_{ik}\, v_i, \qquad
        \hat{y}_{b,o} = \sum_{k, d} W^{\mathrm{bag}}_{o,k,d}\, \mathbf{B}_{kd} + b_o

    (the paper's 1-D convolution with kernel :math:`D` over the :math:`C \times D` bag
    embedding, written as a linear map). The max stream :math:`\max_{i \in b} c_{ik}` is
    trained with its own cross-entropy: ``aux_loss`` =
    ``max_loss_weight`` :math:`\cdot\,\mathrm{CE}(\max_i c_i, y)` in training (the paper
    weighs bag and max losses 0.5/0.5, i.e. weight 1 relative to the bag loss; it used BCE on
    one-hot labels, we use the cross-entropy of the rest of the library). ``logits`` are the
    bag-stream logits.

    Paper defaults: query width 128 with the non-linear query network, values passed through
    unchanged (``passing_v=False``), no dropout.
    Interpretation: ``attention`` = :math:`A_{ik}` for the slide's predicted class :math:`k`,
    ``attention_per_class`` :math:`(N, C)`, ``instance_score`` = :math:`c_{ik}` of the predicted
    class; ``extras["max_logits"]`` :math:`(B, C)` the max stream.

    Args:
        in_channels (int): patch feature size :math:`D`.
        num_classes (int): number of classes :math:`C`.
        hidden_channels (int, optional): query width :math:`Q`. (default: ``128``)
        dropout (float, optional): dropout on the values. (default: ``0.0``)
        nonlinear_query (bool, optional): two-layer query network (else one linear layer).
            (default: :obj:`True`)
        passing_values (bool, optional): transform the values by
            :math:`\mathrm{ReLU}(W_v x)`. (default: :obj:`False`)
        max_loss_weight (float, optional): weight of the max-stream cross-entropy.
            (default: ``1.0``)
        level (str, optional): patch node type to read; ``None`` for the highest magnification
            present. (default: ``None``)

    Shapes:
        - **input:** slide graph(s) with ``x`` :math:`(N, D)` at ``level``, ``y`` :math:`(B)` in training
        - **output:** ``logits`` :math:`(B, C)`, ``interpretation[level]["attention"]`` :math:`(N)`
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 128, dropout: float = 0.0,
                 nonlinear_query: bool = True, passing_values: bool = False, max_loss_weight: float = 1.0,
                 level: Optional[str] = None):
        super().__init__(in_channels, num_classes, level)
        self.hidden_channels = hidden_channels
        self.max_loss_weight = float(max_loss_weight)
        self.instance_classifier = nn.Linear(in_channels, num_classes)
        if nonlinear_query:
            self.query = nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.ReLU(),
                                       nn.Linear(hidden_channels, hidden_channels), nn.Tanh())
        else:
            self.query = nn.Linear(in_channels, hidden_channels)
        if passing_values:
            self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_channels, in_channels), nn.ReLU())
        else:
            self.value = nn.Dropout(dropout)
        self.bag_classifier = nn.Linear(num_classes * in_channels, num_classes)
        self.reset_parameters()

    def forward(self, batch: HeteroData) -> MILOutput:
        inp = self.level_input(batch)
        x, index, num_slides = inp.x, inp.index, inp.num_slides
        instance_logits = self.instance_classifier(x)                       # [N, C]
        critical = segment_argmax(instance_logits, index, num_slides)        # [B, C]
        query = self.query(x)                                                # [N, Q]
        critical_query = query[critical]                                     # [B, C, Q]
        score = torch.einsum("nq,ncq->nc", query, critical_query.index_select(0, index))
        attention = softmax(score.float() / math.sqrt(query.size(-1)), index, inp.ptr,
                            num_nodes=num_slides, dim=0)                     # [N, C]
        value = self.value(x)                                                # [N, D]
        # B_b = A_b^T V_b as one batched matmul over zero-padded slides: measured 2-3x faster
        # than scattering the [N, D] products per class, forward and backward.
        dense_value, _ = to_dense_batch(value, index, batch_size=num_slides)             # [B, L, D]
        dense_attention, _ = to_dense_batch(attention.to(value.dtype), index, batch_size=num_slides)
        bag = torch.bmm(dense_attention.transpose(1, 2), dense_value)                   # [B, C, D]
        logits = self.bag_classifier(bag.flatten(1))
        max_logits = scatter(instance_logits, index, dim=0, dim_size=num_slides, reduce="max")
        output = MILOutput(logits, extras={"max_logits": max_logits})
        y = self.labels(batch)
        if y is not None and self.max_loss_weight > 0:
            output.aux_loss = self.max_loss_weight * F.cross_entropy(max_logits, y)
        output.add_interpretation(inp.level, "attention", column_of_prediction(attention, logits, index))
        output.add_interpretation(inp.level, "attention_per_class", attention)
        output.add_interpretation(inp.level, "instance_score", column_of_prediction(instance_logits, logits, index))
        return output
