r"""Attention-based MIL with gated attention (ABMIL)."""
from __future__ import annotations

from typing import Optional

from torch import nn
from torch_geometric.data import HeteroData

from wsigraph.models.base import MILOutput, register_model
from wsigraph.models.common import PatchLevelMILModel
from wsigraph.nn.aggregation import GatedAttentionAggregation

__all__ = ["ABMIL"]


@register_model("abmil")
class ABMIL(PatchLevelMILModel):
    r"""Gated attention MIL (Ilse et al., *Attention-based Deep Multiple Instance Learning*,
    ICML 2018).

    For the patches :math:`i` of slide :math:`b`,

    .. math::
        h_i = \mathrm{Dropout}(\mathrm{ReLU}(W_1 x_i + b_1)), \qquad
        a_i = \operatorname{softmax}_{i \in b}\!\left( w^\top \big(\tanh(V h_i) \odot
        \sigma(U h_i)\big) \right), \qquad
        \hat{y}_b = W_2 \sum_{i \in b} a_i h_i + b_2 .

    Defaults follow the widely used CLAM configuration of gated ABMIL on 1024-d features:
    embedding 512, attention hidden 256, dropout 0.25 (Ilse et al. used 500/128 on their own
    CNN features). Interpretation: ``attention`` :math:`a_i`, summing to one per slide.

    Args:
        in_channels (int): patch feature size :math:`D`.
        num_classes (int): number of classes :math:`C`.
        hidden_channels (int, optional): embedding width :math:`F`. (default: ``512``)
        attention_channels (int, optional): hidden size of the gated attention. (default: ``256``)
        dropout (float, optional): dropout after the embedding and inside the attention.
            (default: ``0.25``)
        level (str, optional): patch node type to read; ``None`` for the highest magnification
            present. (default: ``None``)

    Shapes:
        - **input:** slide graph(s) with ``x`` :math:`(N, D)` at ``level``
        - **output:** ``logits`` :math:`(B, C)`, ``interpretation[level]["attention"]`` :math:`(N)`,
          ``extras["embedding"]`` :math:`(B, F)`
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 512,
                 attention_channels: int = 256, dropout: float = 0.25, level: Optional[str] = None):
        super().__init__(in_channels, num_classes, level)
        self.hidden_channels = hidden_channels
        self.attention_channels = attention_channels
        self.encoder = nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.ReLU(), nn.Dropout(dropout))
        self.pool = GatedAttentionAggregation(hidden_channels, attention_channels, heads=1, dropout=dropout)
        self.classifier = nn.Linear(hidden_channels, num_classes)
        self.reset_parameters()

    def forward(self, batch: HeteroData) -> MILOutput:
        inp = self.level_input(batch)
        h = self.encoder(inp.x)
        pooled, attention, _ = self.pool(h, inp.index, ptr=inp.ptr, dim_size=inp.num_slides,
                                         return_attention=True)
        output = MILOutput(self.classifier(pooled), extras={"embedding": pooled})
        output.add_interpretation(inp.level, "attention", attention.squeeze(-1))
        return output
