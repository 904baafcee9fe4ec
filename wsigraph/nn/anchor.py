r"""AINet's layers: dual-level anchor mining (DAM) and anchor-guided region correction (ARC)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from wsigraph.nn.functional.anchor import (adjacent_region_by_graph, adjacent_region_by_order,
                                           dual_level_similarity, hashed_uniform, region_local_attention)
from wsigraph.nn.functional.topk import topk_per_group

__all__ = ["AnchorMining", "AnchorMiningOutput", "AnchorRegionCorrection"]

ANCHOR_MODES = ("dam", "random", "attention", "max")
ANCHOR_SCOPES = ("region", "slide")
ADJACENCY = ("order", "knn", "none")


class AnchorMiningOutput(NamedTuple):
    r"""Result of :class:`AnchorMining`.

    Attributes:
        index: ``[M]`` flat indices of the anchors, grouped by region (or slide).
        mask: ``[N]`` bool, ``True`` on anchors.
        score: ``[N]`` the score the anchors were chosen by.
        region_embedding: ``[R, F]`` mean feature of every region (zero if empty), detached.
        bag_embedding: ``[B, F]`` mean feature of every slide, detached.
    """
    index: Tensor
    mask: Tensor
    score: Tensor
    region_embedding: Tensor
    bag_embedding: Tensor


class AnchorMining(nn.Module):
    r"""Dual-level anchor mining (AINet, eq. 2–4): the anchors of a slide are the instances most
    similar to both their region and their bag,

    .. math::
        l_r = \operatorname{mean}_{i \in r} h_i, \qquad g_b = \operatorname{mean}_{i \in b} h_i,
        \qquad
        s_i = \alpha \cos(h_i, l_{r(i)}) + (1 - \alpha) \cos(h_i, g_{b(i)}),

    .. math::
        \mathcal{A} = \bigcup_r \operatorname{top-}\!k_{i \in r}\, s_i
        \quad\text{(scope ``"region"``)} \qquad\text{or}\qquad
        \mathcal{A}_b = \operatorname{top-}\!K_{i \in b}\, s_i \quad\text{(scope ``"slide"``)}.

    The selection is hard (no gradient through :math:`s`); ties go to the lower flat index, so
    a slide gets the same anchors alone and in a batch. Ablations (the paper's Table 5) replace
    :math:`s` by: ``"random"`` — uniform noise while training, a fixed hash of the instance's
    position in its slide at evaluation (deterministic, batch-independent); ``"attention"`` —
    an externally supplied attention score (``score=``); ``"max"`` — :math:`\max_c h_{ic}`,
    i.e. the instance holding the largest entry of the max-pooled embedding. :math:`\alpha = 1`
    is the region-only similarity, :math:`\alpha = 0` the bag-only one. The layer has no
    parameters.

    Args:
        alpha (float, optional): weight :math:`\alpha` of the regional similarity.
            (default: ``0.7``)
        num_anchors (int, optional): anchors per region (scope ``"region"``) or per slide
            (scope ``"slide"``), clipped to the group size. (default: ``1``)
        scope (str, optional): ``"region"`` or ``"slide"`` (global top-:math:`K`).
            (default: ``"region"``)
        mode (str, optional): ``"dam"``, ``"random"``, ``"attention"`` or ``"max"``.
            (default: ``"dam"``)

    Shapes:
        - **input:** features :math:`(N, F)`, region :math:`(N)`, batch :math:`(N)`,
          score :math:`(N)` (mode ``"attention"``)
        - **output:** :class:`AnchorMiningOutput` (index :math:`(M)`, mask and score :math:`(N)`,
          region embedding :math:`(R, F)`, bag embedding :math:`(B, F)`)
    """

    def __init__(self, alpha: float = 0.7, num_anchors: int = 1, scope: str = "region", mode: str = "dam"):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (got {alpha})")
        if num_anchors < 1:
            raise ValueError(f"num_anchors must be >= 1 (got {num_anchors})")
        if scope not in ANCHOR_SCOPES:
            raise ValueError(f"scope must be one of {ANCHOR_SCOPES} (got '{scope}')")
        if mode not in ANCHOR_MODES:
            raise ValueError(f"mode must be one of {ANCHOR_MODES} (got '{mode}')")
        self.alpha, self.num_anchors, self.scope, self.mode = float(alpha), int(num_anchors), scope, mode

    def reset_parameters(self):
        pass

    def forward(self, x: Tensor, region: Tensor, batch: Tensor, num_regions: int, num_slides: int,
                score: Optional[Tensor] = None) -> AnchorMiningOutput:
        r"""
        Args:
            x (torch.Tensor): ``[N, F]`` instance features.
            region (torch.Tensor): ``[N]`` region of every instance.
            batch (torch.Tensor): ``[N]`` slide of every instance (sorted, as in a PyG batch).
            num_regions (int): :math:`R`.
            num_slides (int): :math:`B`.
            score (torch.Tensor, optional): ``[N]`` scores for mode ``"attention"``.
        """
        with torch.no_grad():
            dam, region_embedding, bag_embedding = dual_level_similarity(
                x.detach(), region, batch, num_regions, num_slides, self.alpha)
            if self.mode == "dam":
                chosen_by = dam
            elif self.mode == "attention":
                if score is None:
                    raise ValueError("mode 'attention' needs the attention scores (score=...)")
                chosen_by = score.detach().reshape(-1).float()
            elif self.mode == "max":
                chosen_by = x.detach().max(dim=-1).values.float()
            elif self.training:
                chosen_by = torch.rand(x.size(0), device=x.device)
            else:
                chosen_by = hashed_uniform(_position_in_slide(batch, num_slides))
            group = region if self.scope == "region" else batch
            index = topk_per_group(chosen_by, group, self.num_anchors)
            mask = torch.zeros(x.size(0), dtype=torch.bool, device=x.device)
            mask[index] = True
        return AnchorMiningOutput(index, mask, chosen_by, region_embedding, bag_embedding)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(alpha={self.alpha}, num_anchors={self.num_anchors}, "
                f"scope='{self.scope}', mode='{self.mode}')")


def _position_in_slide(batch: Tensor, num_slides: int) -> Tensor:
    position = torch.arange(batch.numel(), device=batch.device)
    start = scatter(position, batch, dim=0, dim_size=num_slides, reduce="min")
    return position - start.index_select(0, batch)


class AnchorRegionCorrection(nn.Module):
    r"""Anchor-guided region correction (AINet, eq. 5–7): the instances of every region attend to
    their own region, its adjacent region and the anchors of the slide, with a residual
    connection,

    .. math::
        Z = \mathrm{LN}(H), \quad Q = Z W_Q,\ K = Z W_K,\ V = Z W_V, \qquad
        \hat{H}_r = H_r + W_O\, \operatorname{softmax}\!\Big(
        \frac{Q_r\, [K_r;\, K_{\mathrm{adj}(r)};\, K_{\mathcal{A}}]^\top}{\sqrt{d_h}}\Big)
        [V_r;\, V_{\mathrm{adj}(r)};\, V_{\mathcal{A}}],

    per head of width :math:`d_h`. The anchors are projected with the same weights (the paper's
    :math:`Z_r = [H_r; \mathcal{A}]`); their keys and values join every region of their slide.
    Only the rows of the region's own instances are outputs — an anchor's corrected feature is
    its row in its own region. The adjacent region is :math:`r + 1` (the last region of a slide:
    :math:`r - 1`) with ``adjacent="order"`` (regions numbered along a spatial order, as the
    ``fixed_size`` partition does), the nearest neighbour on the ``("region", "knn", "region")``
    graph with ``"knn"``, or none (the paper's ACF ablation) with ``"none"``.

    Attention stays region-local: instances are packed into padded region blocks and the fused
    attention kernel never stores scores, so memory grows as
    :math:`O(R\,(2 n_\text{max} + A_\text{max})\,F)` — linear in :math:`N` for a fixed region
    size and a fixed number of anchors per slide; with one anchor per region,
    :math:`A = R = N / n` and the anchor block adds :math:`O(N^2 / n^2 \cdot F)` memory and
    :math:`O(N^2 / n \cdot F)` time (small next to the local term up to :math:`N \approx 2 n^2`).
    An instance whose value changes outside regions :math:`r` and :math:`\mathrm{adj}(r)`
    affects :math:`\hat{H}_r` only through the anchors.

    Args:
        channels (int): feature width :math:`F`.
        heads (int, optional): attention heads (:math:`F` divisible by it). (default: ``1``)
        adjacent (str, optional): ``"order"``, ``"knn"`` or ``"none"``. (default: ``"order"``)
        dropout (float, optional): dropout on the attention branch. (default: ``0.0``)
        norm (bool, optional): layer-normalise before the projections. (default: :obj:`True`)

    Shapes:
        - **input:** features :math:`(N, F)`, region :math:`(N)`, region batch :math:`(R)`,
          anchor index :math:`(M)`, batch :math:`(N)`, region graph :math:`(2, E)` (``"knn"``)
        - **output:** :math:`(N, F)`
    """

    def __init__(self, channels: int, heads: int = 1, adjacent: str = "order", dropout: float = 0.0,
                 norm: bool = True):
        super().__init__()
        if adjacent is None or adjacent is False:
            adjacent = "none"
        if adjacent not in ADJACENCY:
            raise ValueError(f"adjacent must be one of {ADJACENCY} (got '{adjacent}')")
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.channels, self.heads, self.adjacent, self.dropout = channels, heads, adjacent, dropout
        self.norm = nn.LayerNorm(channels) if norm else nn.Identity()
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.reset_parameters()

    def reset_parameters(self):
        if isinstance(self.norm, nn.LayerNorm):
            self.norm.reset_parameters()
        self.qkv.reset_parameters()
        self.out.reset_parameters()

    def adjacent_regions(self, region_batch: Tensor, region_edge_index: Optional[Tensor] = None,
                         region_edge_weight: Optional[Tensor] = None) -> Optional[Tensor]:
        r"""``[R]`` adjacent region of every region (``-1``: none), or ``None`` for ``"none"``."""
        if self.adjacent == "none":
            return None
        if self.adjacent == "order":
            return adjacent_region_by_order(region_batch)
        if region_edge_index is None:
            raise ValueError("adjacent='knn' needs the region graph: build the graphs with a region_knn "
                             "setting (RegionKNNGraph)")
        return adjacent_region_by_graph(region_edge_index, region_edge_weight, region_batch.numel())

    def forward(self, x: Tensor, region: Tensor, region_batch: Tensor, anchor_index: Optional[Tensor] = None,
                batch: Optional[Tensor] = None, num_slides: Optional[int] = None,
                region_edge_index: Optional[Tensor] = None,
                region_edge_weight: Optional[Tensor] = None) -> Tensor:
        r"""
        Args:
            x (torch.Tensor): ``[N, F]`` instance features.
            region (torch.Tensor): ``[N]`` region of every instance.
            region_batch (torch.Tensor): ``[R]`` slide of every region (regions grouped by slide).
            anchor_index (torch.Tensor, optional): ``[M]`` flat indices of the anchors; ``None``
                for no anchors.
            batch (torch.Tensor, optional): ``[N]`` slide of every instance (with anchors).
            num_slides (int, optional): :math:`B` (with anchors).
            region_edge_index (torch.Tensor, optional): region graph (``adjacent="knn"``).
            region_edge_weight (torch.Tensor, optional): its weights.
        """
        num_regions = region_batch.numel()
        query, key, value = self.qkv(self.norm(x)).chunk(3, dim=-1)
        adjacent = self.adjacent_regions(region_batch, region_edge_index, region_edge_weight)
        anchor_key = anchor_value = anchor_batch = None
        if anchor_index is not None:
            if batch is None or num_slides is None:
                raise ValueError("anchors need the instances' batch vector and num_slides")
            anchor_key, anchor_value = key.index_select(0, anchor_index), value.index_select(0, anchor_index)
            anchor_batch = batch.index_select(0, anchor_index)
        attended = region_local_attention(query, key, value, region, num_regions, self.heads, adjacent,
                                          anchor_key, anchor_value, anchor_batch, region_batch, num_slides)
        return x + nn.functional.dropout(self.out(attended), self.dropout, self.training)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.channels}, heads={self.heads}, "
                f"adjacent='{self.adjacent}')")
