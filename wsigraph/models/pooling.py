r"""Mean and max pooling baselines."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch_geometric.data import HeteroData
from torch_geometric.nn.aggr import MaxAggregation, MeanAggregation
from torch_geometric.utils import scatter

from wsigraph.models.base import MILOutput, register_model
from wsigraph.models.common import PatchLevelMILModel, column_of_prediction

__all__ = ["MeanMIL", "MaxMIL"]


def _instance_encoder(in_channels: int, hidden_channels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.ReLU(), nn.Dropout(dropout))


@register_model("mean_mil")
class MeanMIL(PatchLevelMILModel):
    r"""Mean pooling of embedded instances (the embedding-level MIL baseline).

    For the :math:`N_b` patches of slide :math:`b`,

    .. math::
        h_i = \mathrm{Dropout}(\mathrm{ReLU}(W_1 x_i + b_1)), \qquad
        \mathbf{m}_b = \frac{1}{N_b} \sum_{i \in b} h_i, \qquad
        \hat{y}_b = W_2 \mathbf{m}_b + b_2 .

    The usual baseline of the MIL benchmarks (e.g. CLAM's, TransMIL's and DSMIL's tables),
    with the common one-layer instance encoder of width 512 and dropout 0.25.
    Interpretation: ``score`` = the uniform weight :math:`1/N_b` of every patch.

    Args:
        in_channels (int): patch feature size :math:`D`.
        num_classes (int): number of classes :math:`C`.
        hidden_channels (int, optional): instance embedding width. (default: ``512``)
        dropout (float, optional): dropout after the instance encoder. (default: ``0.25``)
        level (str, optional): patch node type to read; ``None`` for the highest magnification
            present in the batch. (default: ``None``)

    Shapes:
        - **input:** a slide graph or a batch of :math:`B` of them, with ``x`` :math:`(N, D)`
          at ``level``
        - **output:** :class:`MILOutput` with ``logits`` :math:`(B, C)` and
          ``interpretation[level]["score"]`` :math:`(N)`
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 512,
                 dropout: float = 0.25, level: Optional[str] = None):
        super().__init__(in_channels, num_classes, level)
        self.hidden_channels = hidden_channels
        self.encoder = _instance_encoder(in_channels, hidden_channels, dropout)
        self.pool = MeanAggregation()
        self.classifier = nn.Linear(hidden_channels, num_classes)
        self.reset_parameters()

    def forward(self, batch: HeteroData) -> MILOutput:
        inp = self.level_input(batch)
        h = self.encoder(inp.x)
        pooled = self.pool(h, inp.index, ptr=inp.ptr, dim_size=inp.num_slides)
        logits = self.classifier(pooled)
        count = scatter(torch.ones_like(inp.index, dtype=h.dtype), inp.index, dim=0,
                        dim_size=inp.num_slides, reduce="sum")
        output = MILOutput(logits)
        output.add_interpretation(inp.level, "score", count.reciprocal().index_select(0, inp.index))
        return output


@register_model("max_mil")
class MaxMIL(PatchLevelMILModel):
    r"""Max pooling of instance predictions (the instance-level MIL baseline).

    Every patch is classified on its own and each class logit of a slide is the largest logit
    of its patches for that class:

    .. math::
        s_i = W_2\, \mathrm{Dropout}(\mathrm{ReLU}(W_1 x_i + b_1)) + b_2 \in \mathbb{R}^C,
        \qquad \hat{y}_{b,c} = \max_{i \in b} s_{i,c} .

    The gradient reaches only the maximising patch of each class (mi-Net style max pooling, as
    in the MaxMIL rows of the MIL benchmarks; width 512, dropout 0.25).
    Interpretation: ``score`` = each patch's logit for its slide's predicted class;
    ``extras["instance_logits"]`` holds all :math:`(N, C)` instance logits.

    Args:
        in_channels (int): patch feature size :math:`D`.
        num_classes (int): number of classes :math:`C`.
        hidden_channels (int, optional): width of the instance classifier's hidden layer.
            (default: ``512``)
        dropout (float, optional): dropout in the instance classifier. (default: ``0.25``)
        level (str, optional): patch node type to read; ``None`` for the highest magnification
            present. (default: ``None``)

    Shapes:
        - **input:** slide graph(s) with ``x`` :math:`(N, D)` at ``level``
        - **output:** ``logits`` :math:`(B, C)`, ``interpretation[level]["score"]`` :math:`(N)`
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 512,
                 dropout: float = 0.25, level: Optional[str] = None):
        super().__init__(in_channels, num_classes, level)
        self.hidden_channels = hidden_channels
        self.instance_classifier = nn.Sequential(_instance_encoder(in_channels, hidden_channels, dropout),
                                                 nn.Linear(hidden_channels, num_classes))
        self.pool = MaxAggregation()
        self.reset_parameters()

    def forward(self, batch: HeteroData) -> MILOutput:
        inp = self.level_input(batch)
        instance_logits = self.instance_classifier(inp.x)
        logits = self.pool(instance_logits, inp.index, ptr=inp.ptr, dim_size=inp.num_slides)
        output = MILOutput(logits, extras={"instance_logits": instance_logits})
        output.add_interpretation(inp.level, "score", column_of_prediction(instance_logits, logits, inp.index))
        return output
