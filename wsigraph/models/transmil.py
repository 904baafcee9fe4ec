r"""TransMIL with a coordinate-aware pyramid position encoding generator."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import HeteroData
from torch_geometric.utils import scatter, to_dense_batch

from wsigraph.models.base import MILOutput, register_model
from wsigraph.models.common import PatchLevelMILModel, per_node_patch_size

__all__ = ["TransMIL", "CoordinatePPEG", "MaskedSelfAttentionLayer", "lattice_cells"]


def lattice_cells(pos: Tensor, patch_size: Tensor, index: Tensor, num_slides: int) -> Tensor:
    r"""Cell of every patch on its slide's patch lattice,
    :math:`\mathrm{round}((p_i - \min_{j \in b} p_j) / s_i)`, as ``[N, 2]`` long (column, row).

    Rounding keeps lattices offset by a fraction of a patch (CLAM's per-contour origins) on
    the nearest cell.

    Args:
        pos: ``[N, 2]`` top-left corners (level-0 pixels).
        patch_size: ``[N]`` patch side (level-0 pixels) of every patch.
        index: ``[N]`` slide of every patch.
        num_slides: :math:`B`.
    """
    pos = pos.to(torch.float64)
    origin = scatter(pos, index, dim=0, dim_size=num_slides, reduce="min")
    cell = torch.round((pos - origin.index_select(0, index)) / patch_size.to(torch.float64).unsqueeze(1))
    return cell.long()


class CoordinatePPEG(nn.Module):
    r"""Pyramid position encoding generator (TransMIL's PPEG) on the real patch lattice.

    TransMIL reshapes the token sequence, in file order, into a :math:`\lceil\sqrt N\rceil^2`
    square (padding with copies of the first tokens), so its "positions" ignore where the
    patches are. Here every token is placed at its patch's lattice cell :math:`(r_i, c_i)` on
    a zero grid per slide (slides padded to the largest grid of the batch), the depthwise
    convolutions run there, and each token reads the result at its own cell:

    .. math::
        G_b[r_i, c_i] = \sum_{j \in b:\,(r_j, c_j) = (r_i, c_i)} h_j, \qquad
        h'_i = h_i + \sum_{k \in \{7, 5, 3\}} \big(\mathrm{DWConv}_{k \times k}\, G_b\big)[r_i, c_i].

    Zero padding makes a slide's result independent of the other slides and of the grid's
    padding, and the output does not depend on the order of the patches. Patches sharing a
    cell (duplicate coordinates) contribute their sum to the grid. Memory grows with the
    bounding box of each slide's tissue in patches (:math:`B \times H \times W \times F`),
    not with the number of patches.

    Args:
        channels (int): token width :math:`F`.
        kernel_sizes (sequence of int, optional): odd depthwise kernel sizes.
            (default: ``(7, 5, 3)``)

    Shapes:
        - **input:** tokens :math:`(N, F)`, cells :math:`(N, 2)` long (column, row), slide index
          :math:`(N)`
        - **output:** :math:`(N, F)`
    """

    def __init__(self, channels: int, kernel_sizes: Sequence[int] = (7, 5, 3)):
        super().__init__()
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel sizes must be odd (got {tuple(kernel_sizes)})")
        self.channels = channels
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)
                                   for k in self.kernel_sizes)
        self.reset_parameters()

    def reset_parameters(self):
        for conv in self.convs:
            conv.reset_parameters()

    def forward(self, x: Tensor, cell: Tensor, index: Tensor, num_slides: int,
                grid_size: Optional[Tuple[int, int]] = None) -> Tensor:
        r"""
        Args:
            x: ``[N, F]`` tokens.
            cell: ``[N, 2]`` lattice cells (column, row), non-negative.
            index: ``[N]`` slide of every token.
            num_slides: :math:`B`.
            grid_size: ``(rows, columns)`` of the padded grid (default: the largest cell + 1,
                one host sync).
        """
        if x.size(0) == 0:
            return x
        column, row = cell[:, 0], cell[:, 1]
        if grid_size is None:
            grid_size = (int(row.max()) + 1, int(column.max()) + 1)
        grid = x.new_zeros(num_slides, grid_size[0], grid_size[1], x.size(-1))
        grid = grid.index_put((index, row, column), x, accumulate=True)
        grid = grid.permute(0, 3, 1, 2)  # [B, F, H, W] view of a channels-last tensor
        encoded = sum(conv(grid) for conv in self.convs)
        return x + encoded.permute(0, 2, 3, 1)[index, row, column]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels}, kernel_sizes={self.kernel_sizes})"


class MaskedSelfAttentionLayer(nn.Module):
    r"""Pre-norm multi-head self-attention with a residual connection over padded slides,

    .. math::
        X' = X + \mathrm{Dropout}\big(W_o\, \mathrm{MHA}(\mathrm{LN}(X))\big),

    where padded tokens (``key_mask == False``) are never attended to. Exact softmax
    attention through :func:`torch.nn.functional.scaled_dot_product_attention` (its
    memory-efficient kernels avoid the :math:`L \times L` matrix).

    Args:
        channels (int): token width :math:`F`.
        heads (int): attention heads (:math:`F` divisible by it).
        dropout (float): dropout on the output projection.

    Shapes:
        - **input:** tokens :math:`(B, L, F)`, key mask :math:`(B, L)` bool
        - **output:** :math:`(B, L, F)`
    """

    def __init__(self, channels: int, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.channels, self.heads, self.dropout = channels, heads, dropout
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def reset_parameters(self):
        self.norm.reset_parameters()
        self.qkv.reset_parameters()
        self.out.reset_parameters()

    def _split(self, tensor: Tensor) -> Tensor:  # [B, L, F] -> [B, heads, L, F / heads]
        batch, length, _ = tensor.shape
        return tensor.view(batch, length, self.heads, -1).transpose(1, 2)

    def forward(self, tokens: Tensor, key_mask: Tensor) -> Tensor:
        batch, length, channels = tokens.shape
        query, key, value = self.qkv(self.norm(tokens)).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(self._split(query), self._split(key), self._split(value),
                                             attn_mask=key_mask[:, None, None, :])
        out = out.transpose(1, 2).reshape(batch, length, channels)
        return tokens + F.dropout(self.out(out), self.dropout, self.training)

    def forward_token(self, tokens: Tensor, key_mask: Tensor, position: int = 0) -> Tuple[Tensor, Tensor]:
        r"""The layer's output for the token at ``position`` only (e.g. the class token, when
        nothing else is used afterwards), and its attention ``[B, heads, L]`` over all tokens."""
        normed = self.norm(tokens)
        weight_q, weight_k, weight_v = self.qkv.weight.chunk(3, dim=0)
        bias_q, bias_k, bias_v = self.qkv.bias.chunk(3, dim=0)
        query = F.linear(normed[:, position], weight_q, bias_q)                 # [B, F]
        key = self._split(F.linear(normed, weight_k, bias_k))                  # [B, h, L, d]
        value = self._split(F.linear(normed, weight_v, bias_v))
        query = query.view(query.size(0), self.heads, -1)                      # [B, h, d]
        score = torch.einsum("bhd,bhld->bhl", query.float(), key.float()) / math.sqrt(query.size(-1))
        score = score.masked_fill(~key_mask[:, None, :], float("-inf"))
        attention = torch.softmax(score, dim=-1)
        out = torch.einsum("bhl,bhld->bhd", attention.to(value.dtype), value).reshape(tokens.size(0), -1)
        return tokens[:, position] + F.dropout(self.out(out), self.dropout, self.training), attention

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels}, heads={self.heads})"


@register_model("transmil")
class TransMIL(PatchLevelMILModel):
    r"""TransMIL (Shao et al., *TransMIL: Transformer based Correlated Multiple Instance
    Learning for Whole Slide Image Classification*, NeurIPS 2021), with the PPEG on the real
    patch lattice (:class:`CoordinatePPEG`).

    .. math::
        H^{0} &= [\,t_\text{cls};\ \mathrm{ReLU}(W_1 X + b_1)\,], \\
        H^{1} &= \mathrm{MSA}_1(H^{0}), \qquad
        H^{2} = [\,H^{1}_\text{cls};\ \mathrm{PPEG}(H^{1}_\text{patches})\,], \\
        \hat{y} &= W_2\, \mathrm{LN}\big(\mathrm{MSA}_2(H^{2})_\text{cls}\big) + b_2,

    with :math:`\mathrm{MSA}(H) = H + \mathrm{Dropout}(W_o\,\mathrm{MHA}(\mathrm{LN}(H)))`
    (:class:`MaskedSelfAttentionLayer`; TransMIL's layers have no feed-forward block).

    Differences from the original, all deliberate: (1) exact softmax attention instead of
    Nyström attention (256 landmarks, whose extra value convolution runs along the file order);
    (2) no square padding with copied tokens: slides are padded and masked, so a batch gives
    each slide's own result; (3) positions from the coordinates, so the output does not depend
    on the order of the patches. Only the class token's row of the second layer is computed
    (nothing else is used). Cost: the first layer's attention takes time :math:`O(N^2 F)` per
    slide (memory :math:`O(N)` with the fused attention kernels), about :math:`2 \cdot 10^{13}`
    FLOPs at :math:`N = 10^5`: cap ``max_patches_train`` or use a GPU for very large slides.
    Paper defaults: width 512, 8 heads, dropout 0.1, kernels 7/5/3.
    Interpretation: ``attention`` = the class token's attention to each patch in the second
    layer, averaged over heads (the class token's share on itself left out, so a slide's
    values sum to at most one).

    Args:
        in_channels (int): patch feature size :math:`D`.
        num_classes (int): number of classes :math:`C`.
        hidden_channels (int, optional): token width :math:`F`. (default: ``512``)
        heads (int, optional): attention heads. (default: ``8``)
        dropout (float, optional): dropout on the attention outputs. (default: ``0.1``)
        kernel_sizes (sequence of int, optional): PPEG kernels. (default: ``(7, 5, 3)``)
        level (str, optional): patch node type to read; ``None`` for the highest magnification
            present. (default: ``None``)

    Shapes:
        - **input:** slide graph(s) with ``x`` :math:`(N, D)`, ``pos`` :math:`(N, 2)` and
          ``patch_size`` at ``level``
        - **output:** ``logits`` :math:`(B, C)`, ``interpretation[level]["attention"]`` :math:`(N)`
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 512, heads: int = 8,
                 dropout: float = 0.1, kernel_sizes: Sequence[int] = (7, 5, 3), level: Optional[str] = None):
        super().__init__(in_channels, num_classes, level)
        self.hidden_channels = hidden_channels
        self.encoder = nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.ReLU())
        self.cls_token = nn.Parameter(torch.empty(1, 1, hidden_channels))
        self.layer1 = MaskedSelfAttentionLayer(hidden_channels, heads, dropout)
        self.ppeg = CoordinatePPEG(hidden_channels, kernel_sizes)
        self.layer2 = MaskedSelfAttentionLayer(hidden_channels, heads, dropout)
        self.norm = nn.LayerNorm(hidden_channels)
        self.classifier = nn.Linear(hidden_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        nn.init.normal_(self.cls_token)

    def forward(self, batch: HeteroData) -> MILOutput:
        inp = self.level_input(batch)
        index, num_slides = inp.index, inp.num_slides
        pos = getattr(batch[inp.level], "pos", None)
        if pos is None:
            raise ValueError(f"TransMIL's PPEG needs patch coordinates: '{inp.level}' has no 'pos'")
        cells = lattice_cells(pos, per_node_patch_size(batch, inp.level, index), index, num_slides)

        h = self.encoder(inp.x)
        dense, mask = to_dense_batch(h, index, batch_size=num_slides)          # [B, L, F], [B, L]
        tokens = torch.cat([self.cls_token.expand(num_slides, -1, -1).to(dense.dtype), dense], dim=1)
        key_mask = torch.cat([mask.new_ones(num_slides, 1), mask], dim=1)
        tokens = self.layer1(tokens, key_mask)
        patches = self.ppeg(tokens[:, 1:][mask], cells, index, num_slides)
        dense, _ = to_dense_batch(patches, index, batch_size=num_slides, max_num_nodes=mask.size(1))
        tokens = torch.cat([tokens[:, :1], dense], dim=1)
        cls, attention = self.layer2.forward_token(tokens, key_mask, position=0)
        logits = self.classifier(self.norm(cls))
        output = MILOutput(logits)
        output.add_interpretation(inp.level, "attention", attention.mean(dim=1)[:, 1:][mask])
        return output
