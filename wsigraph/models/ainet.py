r"""AINet: dual-level anchor mining and anchor-guided region correction, with its own gated
attention predictor or any registered model as the predictor."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import HeteroData
from torch_geometric.utils import scatter, softmax

from wsigraph.data.schema import REGION, REGION_GRAPH, adjacency_edge, member_edge, node_batch
from wsigraph.models.base import MILModel, MILOutput, build_model, register_model
from wsigraph.models.common import LevelInput, PatchLevelMILModel, column_of_prediction
from wsigraph.nn.aggregation import GatedAttentionAggregation
from wsigraph.nn.anchor import AnchorMining, AnchorRegionCorrection
from wsigraph.nn.functional.anchor import keep_mask_per_group

__all__ = ["AINet", "predictor_graph", "reconstruction_error"]

# Finite stand-in for log(0) in the masked softmax (no NaN for an all-masked group).
_LOG_ZERO = -1e30


def predictor_graph(batch: HeteroData, level: str, x: Tensor, keep: Tensor, index: Tensor,
                    num_slides: int, region: Optional[Tensor] = None) -> HeteroData:
    r"""A slide graph holding only the kept patches of ``level``, with features ``x``: the input
    of a predictor placed behind AINet's DAM + ARC.

    The graph has the one patch level (``x``, ``pos``, ``patch_size``, ``batch``, ``ptr``), the
    patch-grid edges between kept patches (renumbered), the kept patches' region membership, the
    region nodes and region graph as they were, and ``y``. Other levels and zoom edges are left
    out: the predictor sees the corrected level only.

    Args:
        batch (HeteroData): the input slide graph (or batch).
        level (str): the patch level.
        x (torch.Tensor): ``[N, F]`` new features of every patch of ``level``.
        keep (torch.Tensor): ``[N]`` bool, the patches to keep.
        index (torch.Tensor): ``[N]`` slide of every patch.
        num_slides (int): :math:`B`.
        region (torch.Tensor, optional): ``[N]`` region of every patch.
    """
    kept = keep.nonzero().view(-1)
    renumber = torch.full((keep.numel(),), -1, dtype=torch.long, device=keep.device)
    renumber[kept] = torch.arange(kept.numel(), device=keep.device)
    source = batch[level]
    graph = HeteroData()
    store = graph[level]
    store.x = x.index_select(0, kept)
    store.batch = index.index_select(0, kept)
    store.ptr = torch.cat([index.new_zeros(1),
                           torch.bincount(store.batch, minlength=num_slides).cumsum(0)])
    for key in ("pos", "lesion", "tissue"):
        value = getattr(source, key, None)
        if isinstance(value, Tensor) and value.size(0) == keep.numel():
            setattr(store, key, value.index_select(0, kept))
    for key in ("patch_size", "magnification"):
        if key in source:
            store[key] = source[key]
    edge_type = adjacency_edge(level)
    if edge_type in batch.edge_types:
        edge_index = batch[edge_type].edge_index
        both = keep[edge_index[0]] & keep[edge_index[1]]
        graph[edge_type].edge_index = renumber[edge_index[:, both]]
    if region is not None and REGION in batch.node_types:
        for key, value in batch[REGION].items():
            graph[REGION][key] = value
        graph[REGION].num_nodes = batch[REGION].num_nodes
        graph[member_edge(level)].edge_index = torch.stack(
            [torch.arange(kept.numel(), device=keep.device), region.index_select(0, kept)])
        if REGION_GRAPH in batch.edge_types:
            for key, value in batch[REGION_GRAPH].items():
                graph[REGION_GRAPH][key] = value
    y = getattr(batch, "y", None)
    if y is not None:
        graph.y = y
    graph.num_graphs = num_slides
    return graph


def reconstruction_error(h: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    r"""Per-row mean squared error of a linear reconstruction, :math:`\tfrac{1}{D}\lVert W h_i + b -
    x_i\rVert^2`, without forming the ``[N, D]`` reconstruction:

    .. math::
        \lVert W h + b - x \rVert^2 = h^\top (W^\top W) h + 2\, h^\top W^\top b + b^\top b
        - 2\, h^\top (W^\top x) - 2\, b^\top x + x^\top x,

    so that memory stays :math:`O(N d)` for :math:`h \in \mathbb{R}^{N \times d}`, :math:`x \in
    \mathbb{R}^{N \times D}` (the direct form keeps several :math:`N \times D` tensors for the
    backward pass, which dominated AINet's training memory at :math:`D = 1024`). The terms are
    float32 and combined in float64, clamped at zero against rounding: the error is accurate to
    about :math:`10^{-6}` per feature (absolute), ample for a loss whose per-feature error stays far
    above that on real features. Gradients equal those of the direct form to the same precision.

    Args:
        h (torch.Tensor): ``[N, d]`` codes.
        x (torch.Tensor): ``[N, D]`` targets (treated as constants).
        weight (torch.Tensor): ``[D, d]`` decoder weight :math:`W`.
        bias (torch.Tensor, optional): ``[D]`` decoder bias :math:`b`.

    Returns:
        torch.Tensor: ``[N]`` errors.
    """
    x = x.detach()
    quadratic = ((h @ (weight.t() @ weight)) * h).sum(-1)
    cross = ((x @ weight) * h).sum(-1)
    error = quadratic.double() - 2 * cross.double() + torch.linalg.vector_norm(x, dim=-1).double().pow(2)
    if bias is not None:
        error = error + 2 * (h @ (weight.t() @ bias)).double() + bias.pow(2).sum().double() \
            - 2 * (x @ bias).double()
    return (error.clamp(min=0) / x.size(-1)).to(h.dtype)


@register_model("ainet")
class AINet(PatchLevelMILModel):
    r"""AINet (*Anchor Instances Learning for Regional Heterogeneity in Whole Slide Image*):
    dual-level anchor mining (DAM), anchor-guided region correction (ARC), attention-based
    masking and a gated attention predictor at bag and region level.

    For the patches :math:`i` of slide :math:`b`, grouped into regions :math:`r` (the graph's
    ``belongs_to`` edges; the ``fixed_size`` partition numbers regions along a spatial order),

    .. math::
        h_i &= W_2\, \mathrm{ReLU}(W_1 x_i + b_1) + b_2
        \quad\text{(projection MLP, width } d), \\
        s_i &= \alpha \cos(h_i, l_{r(i)}) + (1 - \alpha) \cos(h_i, g_b), \qquad
        \mathcal{A} = \{\arg\max_{i \in r} s_i\}_r \quad\text{(DAM,}
        \ :class:`~wsigraph.nn.AnchorMining`), \\
        \hat{h}_i &= \mathrm{ARC}(h)_i \quad\text{(own region + adjacent region + anchors,}
        \ :class:`~wsigraph.nn.AnchorRegionCorrection`), \\
        c_i &= w^\top(\tanh(V \hat{h}_i) \odot \sigma(U \hat{h}_i)), \qquad
        \mathcal{K}_r = \text{the } \max(1, n_r - \lfloor \rho\, n_r \rfloor)
        \text{ highest } c_i \text{ of region } r \quad\text{(masking)}, \\
        \hat{y}_b &= W_c \sum_{i \in \mathcal{K}_b} \operatorname{softmax}_{\mathcal{K}_b}(c)_i\,
        \hat{h}_i, \qquad
        \hat{y}_r = W_c \sum_{i \in \mathcal{K}_r} \operatorname{softmax}_{\mathcal{K}_r}(c)_i\,
        \hat{h}_i ,

    with :math:`l_r`, :math:`g_b` the region and bag means of :math:`h`. The masking score
    :math:`c` is the predictor's own gated attention score, so the scorer learns through the
    pooling. Training loss (:meth:`loss` adds the cross-entropy of :math:`\hat{y}_b`):

    .. math::
        \mathcal{L} = \mathrm{CE}(\hat{y}_b, Y) + \lambda_r \operatorname{mean}_r
        \mathrm{CE}(\hat{y}_r, Y) + \lambda_m \operatorname{mean}_i
        \tfrac{1}{D}\lVert W_\text{dec} h_i + b_\text{dec} - x_i \rVert^2 .

    The paper's "MSE consistency loss between the original instance features and their projected
    counterparts" compares vectors of different sizes; we read it as reconstruction of
    :math:`x_i` from :math:`h_i` by a linear decoder :math:`d \to D` (training only, not part of
    the inference model). Both auxiliary terms are averaged per slide, then over the slides; the
    region term reads ``batch.y`` and is computed in training only, over the regions holding
    patches of the level. Empty regions are skipped everywhere. The reconstruction error is
    computed without forming the :math:`N \times D` reconstruction
    (:func:`reconstruction_error`), so training memory grows with :math:`N d`, not :math:`N D`.

    **Another predictor.** ``predictor="transmil"`` (or any registered model name, with
    ``predictor_args``) feeds the corrected, kept patches to that model as the patch level of a
    new slide graph (:func:`predictor_graph`: positions, patch-grid edges and region membership
    restricted to the kept patches), and its logits are the slide logits; its auxiliary loss is
    added. The region predictor stays (it trains the masking scorer and ARC through
    :math:`\lambda_r`); the built-in bag head is then unused.

    Ablations (the paper's Tables 4–5, SPEC §6.2 item 10): ``anchor_mode`` ``"random"`` /
    ``"attention"`` (the gated attention score of :math:`h`) / ``"max"`` / ``"dam"``, or
    ``"none"`` (no anchors in ARC); ``alpha`` (1: region-only, 0: bag-only similarity);
    ``adjacent="none"`` (no adjacent region, ACF); ``mask_ratio=0`` (no masking);
    ``correction=False`` (no ARC: the baseline). Cost: see
    :class:`~wsigraph.nn.AnchorRegionCorrection`; one host sync each for the largest region, the
    largest anchor set and the anchor selection.

    Interpretation (patch level): ``anchor`` (1 on anchors), ``anchor_score`` (the score anchors
    were chosen by), ``mask_score`` (:math:`c_i`), ``kept`` (1 if kept), ``attention`` (bag
    attention, 0 on masked patches; the predictor's own maps with a plug-in predictor) and
    ``region_attention``; region level: ``probability`` (the region predictor's probability of
    the slide's predicted class). Extras: ``region_logits`` ``[R, C]``, and in training
    ``region_loss`` and ``consistency_loss`` (unweighted).

    Args:
        in_channels (int): patch feature size :math:`D`.
        num_classes (int): number of classes :math:`C`.
        hidden_channels (int, optional): projection width :math:`d`. (default: ``128``)
        attention_channels (int, optional): hidden size of the gated attention.
            (default: ``128``)
        heads (int, optional): ARC attention heads. (default: ``1``)
        alpha (float, optional): DAM's weight of the regional similarity. (default: ``0.7``)
        anchor_mode (str, optional): ``"dam"``, ``"random"``, ``"attention"``, ``"max"`` or
            ``"none"``. (default: ``"dam"``)
        anchor_scope (str, optional): ``"region"`` (top ``num_anchors`` of every region) or
            ``"slide"`` (global top ``num_anchors`` of every slide). (default: ``"region"``)
        num_anchors (int, optional): anchors per region or per slide. (default: ``1``)
        adjacent (str, optional): ARC's adjacent region: ``"order"``, ``"knn"`` or ``"none"``.
            (default: ``"order"``)
        correction (bool, optional): apply ARC. (default: :obj:`True`)
        mask_ratio (float, optional): masked fraction :math:`\rho` of every region.
            (default: ``0.5``)
        dropout (float, optional): dropout on ARC's attention branch and in the gated attention.
            (default: ``0.1``)
        region_loss_weight (float, optional): :math:`\lambda_r`. (default: ``0.5``)
        consistency_weight (float, optional): :math:`\lambda_m`. (default: ``1.0``)
        predictor (str, optional): ``"attention"`` (built-in) or a registered model name.
            (default: ``"attention"``)
        predictor_args (dict, optional): keyword arguments of the plug-in predictor (its
            ``in_channels`` is :math:`d`). (default: :obj:`None`)
        level (str, optional): patch node type to read; ``None`` for the highest magnification
            present. (default: ``None``)

    Shapes:
        - **input:** slide graph(s) with ``x`` :math:`(N, D)` at ``level`` and its
          ``belongs_to`` region edges (without regions, each slide is one region)
        - **output:** ``logits`` :math:`(B, C)`, patch interpretation :math:`(N)`, region
          interpretation :math:`(R)`
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 128,
                 attention_channels: int = 128, heads: int = 1, alpha: float = 0.7, anchor_mode: str = "dam",
                 anchor_scope: str = "region", num_anchors: int = 1, adjacent: str = "order",
                 correction: bool = True, mask_ratio: float = 0.5, dropout: float = 0.1,
                 region_loss_weight: float = 0.5, consistency_weight: float = 1.0,
                 predictor: str = "attention", predictor_args: Optional[Mapping[str, Any]] = None,
                 level: Optional[str] = None):
        super().__init__(in_channels, num_classes, level)
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1] (got {mask_ratio})")
        self.hidden_channels = hidden_channels
        self.anchor_mode = anchor_mode
        self.use_correction = bool(correction)
        self.mask_ratio = float(mask_ratio)
        self.region_loss_weight = float(region_loss_weight)
        self.consistency_weight = float(consistency_weight)
        self.predictor_name = predictor
        self.projection = nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.ReLU(),
                                        nn.Linear(hidden_channels, hidden_channels))
        self.decoder = nn.Linear(hidden_channels, in_channels)
        self.mining = AnchorMining(alpha, num_anchors, anchor_scope,
                                   "dam" if anchor_mode == "none" else anchor_mode)
        self.correction = (AnchorRegionCorrection(hidden_channels, heads, adjacent, dropout)
                           if self.use_correction else None)
        self.pool = GatedAttentionAggregation(hidden_channels, attention_channels, heads=1, dropout=dropout)
        self.classifier = nn.Linear(hidden_channels, num_classes)
        self.predictor: Optional[MILModel] = None
        if predictor != "attention":
            if predictor == "ainet":
                raise ValueError("AINet cannot be its own predictor")
            self.predictor = build_model(predictor, in_channels=hidden_channels, num_classes=num_classes,
                                         **dict(predictor_args or {}))
        elif predictor_args:
            raise ValueError("predictor_args is only for a plug-in predictor (predictor=<model name>)")
        self.reset_parameters()

    # ------------------------------------------------------------------------------------
    def regions(self, batch: HeteroData, inp: LevelInput) -> Tuple[Tensor, int, Tensor]:
        r"""Region of every patch, the number of regions and the slide of every region; one
        region per slide when the graph has no region partition."""
        edge_type = member_edge(inp.level)
        if REGION in batch.node_types and edge_type in batch.edge_types:
            region = batch[edge_type].edge_index[1]
            num_regions = batch[REGION].num_nodes
            return region, num_regions, node_batch(batch, REGION)
        return inp.index, inp.num_slides, torch.arange(inp.num_slides, device=inp.x.device)

    def forward(self, batch: HeteroData) -> MILOutput:
        inp = self.level_input(batch)
        index, num_slides = inp.index, inp.num_slides
        region, num_regions, region_batch = self.regions(batch, inp)
        h = self.projection(inp.x)

        attention_of_h = self.pool.score(h).squeeze(-1) if self.anchor_mode == "attention" else None
        mined = self.mining(h, region, index, num_regions, num_slides, score=attention_of_h)
        corrected = h
        if self.correction is not None:
            edge_index = edge_weight = None
            if self.correction.adjacent == "knn" and REGION_GRAPH in batch.edge_types:
                edge_index = batch[REGION_GRAPH].edge_index
                edge_weight = getattr(batch[REGION_GRAPH], "edge_weight", None)
            anchors = None if self.anchor_mode == "none" else mined.index
            corrected = self.correction(h, region, region_batch, anchors, index, num_slides, edge_index, edge_weight)

        score = self.pool.score(corrected).squeeze(-1)
        keep = keep_mask_per_group(score.detach(), region, self.mask_ratio, num_regions)
        logit = torch.where(keep, score.float(), score.new_full((), _LOG_ZERO, dtype=torch.float32))
        region_attention = softmax(logit, region, num_nodes=num_regions) * keep
        region_embedding = scatter(region_attention.unsqueeze(-1) * corrected, region, dim=0,
                                   dim_size=num_regions, reduce="sum")
        region_logits = self.classifier(region_embedding)

        interpretation: Dict[str, Tensor] = {}
        aux = h.new_zeros(())
        if self.predictor is None:
            attention = softmax(logit, index, inp.ptr, num_nodes=num_slides) * keep
            bag = scatter(attention.unsqueeze(-1) * corrected, index, dim=0, dim_size=num_slides, reduce="sum")
            logits = self.classifier(bag)
            interpretation["attention"] = attention
        else:
            graph = predictor_graph(batch, inp.level, corrected, keep, index, num_slides, region)
            inner = self.predictor(graph)
            logits = inner.logits
            kept = keep.nonzero().view(-1)
            for name, value in inner.interpretation.get(inp.level, {}).items():
                full = value.new_zeros((keep.numel(),) + tuple(value.shape[1:]))
                interpretation[name] = full.index_copy(0, kept, value)
            if self.training:
                aux = aux + inner.aux_loss

        output = MILOutput(logits, extras={"region_logits": region_logits})
        for name, value in interpretation.items():
            output.add_interpretation(inp.level, name, value)
        output.add_interpretation(inp.level, "anchor", mined.mask.float())
        output.add_interpretation(inp.level, "anchor_score", mined.score)
        output.add_interpretation(inp.level, "mask_score", score.detach())
        output.add_interpretation(inp.level, "kept", keep.float())
        output.add_interpretation(inp.level, "region_attention", region_attention)
        if self.predictor is not None and REGION in inner.interpretation:
            for name, value in inner.interpretation[REGION].items():
                if value.size(0) == region_batch.numel():
                    output.add_interpretation(REGION, f"predictor_{name}", value)
        if REGION in batch.node_types and region_batch.numel() == batch[REGION].num_nodes:
            probability = column_of_prediction(region_logits.softmax(dim=-1), logits, region_batch)
            output.add_interpretation(REGION, "probability", probability)

        if self.training:
            consistency = self.consistency_loss(h, inp.x, index, num_slides)
            output.extras["consistency_loss"] = consistency
            aux = aux + self.consistency_weight * consistency
            y = self.labels(batch)
            if y is not None:
                region_loss = self.region_loss(region_logits, y, region, region_batch, num_regions, num_slides)
                output.extras["region_loss"] = region_loss
                aux = aux + self.region_loss_weight * region_loss
        output.aux_loss = aux
        return output

    def consistency_loss(self, h: Tensor, x: Tensor, index: Tensor, num_slides: int) -> Tensor:
        r"""Per-slide mean squared reconstruction error of :math:`x` from :math:`h`, averaged
        over the slides that have patches."""
        error = reconstruction_error(h, x, self.decoder.weight, self.decoder.bias)
        per_slide = scatter(error, index, dim=0, dim_size=num_slides, reduce="mean")
        present = torch.bincount(index, minlength=num_slides) > 0
        return (per_slide * present).sum() / present.sum().clamp(min=1)

    def region_loss(self, region_logits: Tensor, y: Tensor, region: Tensor, region_batch: Tensor,
                    num_regions: int, num_slides: int) -> Tensor:
        r"""Mean over slides of the mean cross-entropy of the slide's non-empty regions against
        the slide label."""
        target = y.index_select(0, region_batch)
        loss = F.cross_entropy(region_logits.float(), target, reduction="none")
        present = (torch.bincount(region, minlength=num_regions) > 0).float()
        total = scatter(loss * present, region_batch, dim=0, dim_size=num_slides, reduce="sum")
        count = scatter(present, region_batch, dim=0, dim_size=num_slides, reduce="sum")
        has = count > 0
        per_slide = total / count.clamp(min=1)
        return (per_slide * has).sum() / has.sum().clamp(min=1)

    def __repr__(self) -> str:
        level = f", level='{self.level}'" if self.level is not None else ""
        predictor = f", predictor='{self.predictor_name}'" if self.predictor is not None else ""
        return (f"{self.__class__.__name__}({self.in_channels}, num_classes={self.num_classes}, "
                f"anchor_mode='{self.anchor_mode}'{predictor}{level})")
