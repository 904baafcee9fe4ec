r"""Patch-GCN style graph baseline: message passing over the patch lattice, then gated
attention pooling."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import HeteroData
from torch_geometric.nn import GCNConv, SAGEConv

from wsigraph.data.schema import adjacency_edge
from wsigraph.models.base import MILOutput, register_model
from wsigraph.models.common import PatchLevelMILModel
from wsigraph.nn.aggregation import GatedAttentionAggregation

__all__ = ["PatchGNN"]

_CONVS = {"sage": lambda channels: SAGEConv(channels, channels, aggr="mean"),
          "gcn": lambda channels: GCNConv(channels, channels)}


@register_model("patch_gnn")
class PatchGNN(PatchLevelMILModel):
    r"""Graph MIL over the 8-neighbour patch grid (after Chen et al., *Whole Slide Images are
    2D Point Clouds: Context-Aware Survival Prediction using Patch-based Graph Convolutional
    Networks*, MICCAI 2021).

    .. math::
        h^{0}_i &= \mathrm{Dropout}(\mathrm{ReLU}(W_0 x_i + b_0)), \\
        h^{\ell}_i &= h^{\ell-1}_i + \mathrm{Dropout}_{p_\ell}\Big(\mathrm{ReLU}\big(\mathrm{LN}
        (\mathrm{Conv}_\ell(h^{\ell-1}, \mathcal{E})_i)\big)\Big), \quad \ell = 1..L, \\
        z_i &= \mathrm{Dropout}(\mathrm{ReLU}(W_\phi [h^0_i \,\|\, \dots \,\|\, h^L_i])), \qquad
        \mathbf{m}_b = \sum_{i \in b} a_i z_i \ \text{(gated attention)}, \\
        \hat{y}_b &= W_c\, \mathrm{Dropout}(\mathrm{ReLU}(W_\rho \mathbf{m}_b)),

    with :math:`\mathcal{E}` the ``(level, "adjacent", level)`` patch-grid edges (added by
    :class:`~wsigraph.transforms.PatchGrid`) and :math:`\mathrm{Conv}` a mean GraphSAGE
    (default) or GCN layer. Patch-GCN's layout: width 128, three residual graph layers after the
    input layer, the four outputs concatenated (512), gated attention of hidden size 512,
    dropout 0.25 in the MLPs and 0.1 in the residual blocks. Patch-GCN used GENConv
    (softmax aggregation) over a spatial kNN graph; we use SAGE/GCN over the patch lattice.
    Interpretation: ``attention`` :math:`a_i`.

    Args:
        in_channels (int): patch feature size :math:`D`.
        num_classes (int): number of classes :math:`C`.
        hidden_channels (int, optional): node width per layer. (default: ``128``)
        num_layers (int, optional): graph layers :math:`L`. (default: ``3``)
        conv (str, optional): ``"sage"`` or ``"gcn"``. (default: ``"sage"``)
        dropout (float, optional): dropout of the MLPs and the attention. (default: ``0.25``)
        layer_dropout (float, optional): dropout :math:`p_\ell` inside the residual blocks.
            (default: ``0.1``)
        level (str, optional): patch node type to read; ``None`` for the highest magnification
            present. (default: ``None``)

    Shapes:
        - **input:** slide graph(s) with ``x`` :math:`(N, D)` and the ``adjacent`` edges at ``level``
        - **output:** ``logits`` :math:`(B, C)`, ``interpretation[level]["attention"]`` :math:`(N)`
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 128, num_layers: int = 3,
                 conv: str = "sage", dropout: float = 0.25, layer_dropout: float = 0.1,
                 level: Optional[str] = None):
        super().__init__(in_channels, num_classes, level)
        if conv not in _CONVS:
            raise ValueError(f"conv must be one of {sorted(_CONVS)} (got '{conv}')")
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        self.conv_type = conv
        self.layer_dropout = layer_dropout
        self.encoder = nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.ReLU(), nn.Dropout(dropout))
        self.convs = nn.ModuleList(_CONVS[conv](hidden_channels) for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_channels) for _ in range(num_layers))
        width = hidden_channels * (num_layers + 1)
        self.phi = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout))
        self.pool = GatedAttentionAggregation(width, width, heads=1, dropout=dropout)
        self.rho = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(width, num_classes)
        self.reset_parameters()

    def forward(self, batch: HeteroData) -> MILOutput:
        inp = self.level_input(batch)
        edge_type = adjacency_edge(inp.level)
        if edge_type not in batch.edge_types:
            raise KeyError(f"PatchGNN needs the patch-grid edges {edge_type}: build the graphs with the "
                           "PatchGrid transform (graph config 'patch_grid')")
        edge_index = batch[edge_type].edge_index
        h = self.encoder(inp.x)
        layers = [h]
        for conv, norm in zip(self.convs, self.norms):
            update = F.relu(norm(conv(h, edge_index)))
            h = h + F.dropout(update, self.layer_dropout, self.training)
            layers.append(h)
        z = self.phi(torch.cat(layers, dim=-1))
        pooled, attention, _ = self.pool(z, inp.index, ptr=inp.ptr, dim_size=inp.num_slides,
                                         return_attention=True)
        output = MILOutput(self.classifier(self.rho(pooled)))
        output.add_interpretation(inp.level, "attention", attention.squeeze(-1))
        return output

    def __repr__(self) -> str:
        level = f", level='{self.level}'" if self.level is not None else ""
        return (f"{self.__class__.__name__}({self.in_channels}, num_classes={self.num_classes}, "
                f"conv='{self.conv_type}'{level})")
