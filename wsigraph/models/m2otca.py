r"""M2OTCA: multiple-magnification optimal-transport-based cross-attention MIL."""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch_geometric.data import HeteroData

from wsigraph.data.schema import REGION, level_magnification, member_edge, node_batch, num_slides, patch_levels
from wsigraph.models.base import MILModel, MILOutput, register_model
from wsigraph.models.common import per_node_patch_size
from wsigraph.nn.aggregation import GatedAttentionAggregation
from wsigraph.nn.functional.prototype import sequential_chunk_index
from wsigraph.nn.functional.sinkhorn import padded_row_index
from wsigraph.nn.prototype import GradCAMWeights, PrototypeOTAlignment, RegionPrototypes

__all__ = ["M2OTCA", "PrototypeClassifier", "PrototypeSlots"]

CROSS_ATTENTION = ("full", "ot", "gradcam", "none")
ALIGNMENTS = ("regions", "independent")
GRADCAM_TARGETS = ("predicted", "label")


class PrototypeClassifierOutput(NamedTuple):
    logits: Tensor     # [B, C]
    attention: Tensor  # [B, M], zero on padding


class PrototypeClassifier(nn.Module):
    r"""Gated attention over a slide's prototypes, then a linear classifier (M2OTCA's
    :math:`E_2`):

    .. math::
        \alpha_u = \operatorname{softmax}_u\!\left(w^\top(\tanh(V p_u) \odot
        \sigma(U p_u))\right), \qquad \hat{y} = W \sum_u \alpha_u p_u + c .

    Works on the dense padded layout without any host synchronisation: padded prototypes get a
    log-prior of :math:`-\infty` (exactly zero attention).

    Args:
        in_channels (int): prototype size :math:`d`.
        num_classes (int): number of classes :math:`C`.
        attention_channels (int, optional): hidden size of the gated attention. (default: ``128``)
        dropout (float, optional): dropout inside the gated attention. (default: ``0.0``)

    Shapes:
        - **input:** prototypes :math:`(B, M, d)`, mask :math:`(B, M)`
        - **output:** logits :math:`(B, C)`, attention :math:`(B, M)`
    """

    def __init__(self, in_channels: int, num_classes: int, attention_channels: int = 128, dropout: float = 0.0):
        super().__init__()
        self.pool = GatedAttentionAggregation(in_channels, attention_channels, heads=1, dropout=dropout)
        self.lin = nn.Linear(in_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        self.pool.reset_parameters()
        self.lin.reset_parameters()

    def forward(self, prototypes: Tensor, mask: Tensor) -> PrototypeClassifierOutput:
        batch_size, size, channels = prototypes.shape
        index = torch.arange(batch_size, device=prototypes.device).repeat_interleave(size)
        ptr = torch.arange(0, batch_size * size + 1, max(size, 1), device=prototypes.device)[:batch_size + 1]
        log_prior = torch.zeros(mask.shape, device=prototypes.device).masked_fill(~mask, float("-inf"))
        pooled, attention, _ = self.pool(prototypes.reshape(batch_size * size, channels), index, ptr=ptr,
                                         dim_size=batch_size, log_prior=log_prior.view(-1),
                                         return_attention=True)
        return PrototypeClassifierOutput(self.lin(pooled), attention.view(batch_size, size))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.pool.in_channels}, {self.lin.out_features})"


class PrototypeSlots(NamedTuple):
    r"""Which prototype every patch of every level feeds.

    Attributes:
        size: :math:`M`, prototypes per slide in the dense layout.
        slot: level → ``[N]`` padded slot ``b * M + j`` of every patch.
        mask: level → ``[B, M]`` bool, prototypes with at least one patch at that level.
        region_slot: ``[R]`` padded slot of every ``region`` node (``None`` for the independent
            alignment, whose chunks are not graph regions).
    """
    size: int
    slot: Dict[str, Tensor]
    mask: Dict[str, Tensor]
    region_slot: Optional[Tensor]


@register_model("m2otca")
class M2OTCA(MILModel):
    r"""M2OTCA (Zhu, Meijering and Wang, *Multiple-magnification optimal transport-based
    cross-attention learning for whole slide image classification*, Medical Image Analysis 2026).

    Levels :math:`\ell = 1..L` (low → high magnification, :math:`L \geq 2`); the highest is the
    reference level :math:`R`. Per slide:

    1. **Prototypes.** The slide's regions :math:`j = 1..m` feed one prototype each per level,
       :math:`P_\ell = E_1^\ell(X_\ell) \in \mathbb{R}^{m \times d}`
       (:class:`~wsigraph.nn.RegionPrototypes`: gated attention pooling inside each region, then a
       linear map to :math:`d`). With ``alignment="regions"`` (default) the regions are the
       graph's ``region`` nodes, defined on the highest level and propagated down the zoom edges,
       so prototype :math:`j` covers the same tissue at every level (the config builds
       ``sequential`` regions, :math:`m = 30`); ``alignment="independent"`` instead splits each
       level's patches on their own, in raster order, into ``num_prototypes`` chunks (the
       paper's construction, where chunk :math:`j` of two levels need not be the same tissue).
    2. **Reference branch.** :math:`\hat{y}_R = E_2^R(P_R)`
       (:class:`PrototypeClassifier`).
    3. **OT cross-attention** (:class:`~wsigraph.nn.PrototypeOTAlignment`): for every lower level
       :math:`t`, the plan :math:`\Pi_t` between :math:`P_R` and :math:`P_t` (normalised
       Euclidean cost, uniform marginals, Sinkhorn :math:`\varepsilon`, ``num_iterations``) and
       the transported prototypes :math:`\bar{P}_t = m\,\Pi_t P_t` (row :math:`u` = level-:math:`t`
       content matched to reference prototype :math:`u`).
    4. **Grad-CAM cross-attention** (:class:`~wsigraph.nn.GradCAMWeights`): weights
       :math:`\tilde{w} = \operatorname{ReLU}(w)/\max \operatorname{ReLU}(w)` with
       :math:`w_u = \operatorname{GAP}_d(\partial \hat{y}_R[c] / \partial P_{R,u})` (uniform when
       all :math:`w_u \le 0`), :math:`\tilde{P}_t = \operatorname{diag}(\tilde{w})\,\bar{P}_t`. The
       target :math:`c` is the reference branch's predicted class in training and evaluation
       alike (``gradcam_target="label"`` uses the label while training). The weights are
       constants (detached); computing them never touches any parameter's ``.grad``.
    5. **Level branches and fusion.** :math:`\hat{y}_t = E_2^t(\tilde{P}_t)`,
       :math:`\hat{y} = \mathrm{FC}([\hat{y}_R; \hat{y}_{L-1}; \dots; \hat{y}_1])`, trained with the
       cross-entropy of :math:`\hat{y}` only. Gradients reach every level's encoder (through
       :math:`\bar{P}_t` and the plan); nothing is detached except the Grad-CAM weights.

    Notes. A region can be empty at a lower level (``sequential`` strips thinner than a
    low-magnification patch, since a parent joins the region of most of its children): its
    prototype is masked (no column mass in the OT, no row in the ``"none"``/``"gradcam"``
    branches). With a linear classifier on attention-pooled prototypes,
    :math:`w_u \approx \alpha_u\,\overline{W_c} + (\text{attention term})` (:math:`\alpha_u` the
    reference branch's attention, :math:`\overline{W_c}` the channel mean of the class-:math:`c`
    classifier row), whose first part has one sign per slide: the Grad-CAM weights are mostly
    either close to :math:`\alpha_u / \max \alpha` or all non-positive, hence the uniform fallback.

    ``cross_attention`` selects the paper's ablations: ``"full"``; ``"ot"`` (no Grad-CAM,
    :math:`\tilde{P}_t = \bar{P}_t`); ``"gradcam"`` (no OT,
    :math:`\tilde{P}_t = \operatorname{diag}(\tilde{w}) P_t`, prototype :math:`u` of level
    :math:`t` weighted by reference prototype :math:`u`); ``"none"`` (independent branches,
    plain concatenation of their logits). All ablations have the same parameters.

    Interpretation (:attr:`MILOutput.interpretation`):

    * every level: ``within_region_attention`` (the prototype encoder's attention, summing to one
      inside each region) and ``attention`` = within-region attention × the relevance of the
      patch's prototype slot, where the relevance is the Grad-CAM weight :math:`\tilde{w}_j` of
      reference prototype :math:`j` (``"full"``/``"gradcam"``) or the reference branch's
      attention :math:`\alpha_j / \max \alpha` (``"ot"``/``"none"``); with aligned regions slot
      :math:`j` is the same tissue at every level, so the maps of all levels share one relevance;
    * ``region`` (``alignment="regions"`` only): ``relevance``, ``reference_attention`` and, with
      Grad-CAM, ``gradcam``; for each lower level, ``attention_<level>``, its branch's attention
      over the rows it reads (reference-indexed rows with OT, its own regions without).

    Extras: ``logits_<level>`` per level, ``plan_<level>`` ``[B, M, M]`` per lower level (with
    OT), ``gradcam_weights`` ``[B, M]``, ``gradcam_gradient``, ``gradcam_target``,
    ``gradcam_uniform`` (with Grad-CAM), ``prototype_mask_<level>`` ``[B, M]``.

    Args:
        in_channels (int): patch feature size :math:`D` (the same at every level).
        num_classes (int): number of classes :math:`C`.
        num_levels (int, optional): number of levels :math:`L \geq 2`, the :math:`L` highest
            magnifications of the input graph, when ``levels`` is not given. (default: ``3``)
        levels (list of str, optional): explicit level node types (any order; sorted by
            magnification). (default: :obj:`None`)
        prototype_channels (int, optional): prototype size :math:`d`. (default: ``256``)
        attention_channels (int, optional): hidden size of the prototype encoders' gated
            attention. (default: ``256``, our choice)
        head_attention_channels (int, optional): hidden size of the level branches' gated
            attention. (default: ``128`` = :math:`d/2`, as the article's code)
        dropout (float, optional): dropout inside every gated attention. (default: ``0.0``)
        cross_attention (str, optional): ``"full"``, ``"ot"``, ``"gradcam"`` or ``"none"``.
            (default: ``"full"``)
        alignment (str, optional): ``"regions"`` or ``"independent"``. (default: ``"regions"``)
        num_prototypes (int, optional): chunks per level :math:`m` for
            ``alignment="independent"`` (with ``"regions"`` the graph's partition decides).
            (default: ``30``)
        epsilon (float, optional): Sinkhorn regularisation on the max-normalised cost.
            (default: ``0.1``)
        num_iterations (int, optional): Sinkhorn iterations. (default: ``20``)
        gradcam_target (str, optional): ``"predicted"`` or ``"label"`` (training only; evaluation
            always uses the prediction). (default: ``"predicted"``)
        embedding_channels (int, optional): width of a per-level patch embedding
            :math:`\mathrm{ReLU}(W_e x + b_e)` before the prototype pooling (CLAM-style ABMIL);
            :obj:`None` pools the raw features as the article's code, which makes the whole model
            linear in the features given its attention weights. (default: :obj:`None`)

    Shapes:
        - **input:** slide graph(s) with ``x``, ``pos``, ``patch_size`` on each level and, for
          ``alignment="regions"``, ``region`` nodes with ``belongs_to`` edges
        - **output:** ``logits`` :math:`(B, C)`
    """

    def __init__(self, in_channels: int, num_classes: int, num_levels: int = 3,
                 levels: Optional[Sequence[str]] = None, prototype_channels: int = 256,
                 attention_channels: int = 256, head_attention_channels: int = 128, dropout: float = 0.0,
                 cross_attention: str = "full", alignment: str = "regions", num_prototypes: int = 30,
                 epsilon: float = 0.1, num_iterations: int = 20, gradcam_target: str = "predicted",
                 embedding_channels: Optional[int] = None):
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be positive (got {in_channels}, {num_classes})")
        if levels is not None:
            levels = sorted((str(level) for level in levels), key=level_magnification)
            num_levels = len(levels)
        if num_levels < 2:
            raise ValueError(f"M2OTCA needs at least two levels (got {num_levels})")
        if cross_attention not in CROSS_ATTENTION:
            raise ValueError(f"cross_attention must be one of {CROSS_ATTENTION} (got '{cross_attention}')")
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS} (got '{alignment}')")
        if gradcam_target not in GRADCAM_TARGETS:
            raise ValueError(f"gradcam_target must be one of {GRADCAM_TARGETS} (got '{gradcam_target}')")
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1 (got {num_prototypes})")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.num_levels = int(num_levels)
        self.levels = levels
        self.prototype_channels = prototype_channels
        self.cross_attention = cross_attention
        self.alignment = alignment
        self.num_prototypes = int(num_prototypes)
        self.gradcam_target = gradcam_target
        # Index 0 is the lowest level, -1 the reference (highest) level.
        self.encoders = nn.ModuleList([
            RegionPrototypes(in_channels, prototype_channels, attention_channels, dropout, embedding_channels)
            for _ in range(self.num_levels)])
        self.heads = nn.ModuleList([
            PrototypeClassifier(prototype_channels, num_classes, head_attention_channels, dropout)
            for _ in range(self.num_levels)])
        self.transport = PrototypeOTAlignment(epsilon=epsilon, num_iterations=num_iterations)
        self.gradcam = GradCAMWeights()
        self.classifier = nn.Linear(self.num_levels * num_classes, num_classes)
        self.reset_parameters()

    @property
    def uses_ot(self) -> bool:
        return self.cross_attention in ("full", "ot")

    @property
    def uses_gradcam(self) -> bool:
        return self.cross_attention in ("full", "gradcam")

    def input_levels(self, batch: HeteroData) -> List[str]:
        r"""The level node types the model reads, low → high (the last is the reference)."""
        present = patch_levels(batch)
        if self.levels is not None:
            missing = [level for level in self.levels if level not in present]
            if missing:
                raise KeyError(f"levels {missing} are not in the slide graph (patch levels present: {present})")
            return list(self.levels)
        if len(present) < self.num_levels:
            raise ValueError(f"M2OTCA with num_levels={self.num_levels} needs as many patch levels "
                             f"(the slide graph has {present})")
        return present[-self.num_levels:]

    def prototype_slots(self, batch: HeteroData, levels: Optional[Sequence[str]] = None) -> PrototypeSlots:
        r"""The prototype slot of every patch of every level (see :class:`PrototypeSlots`)."""
        levels = self.input_levels(batch) if levels is None else list(levels)
        batch_size = num_slides(batch)
        slot: Dict[str, Tensor] = {}
        region_slot = None
        if self.alignment == "regions":
            if REGION not in batch.node_types or any(member_edge(level) not in batch.edge_types for level in levels):
                raise KeyError("alignment='regions' needs 'region' nodes with 'belongs_to' edges from every "
                               "level (build the graph with a region partition, e.g. graph.regions.strategy="
                               "sequential), or use alignment='independent'")
            region_batch = node_batch(batch, REGION)
            region_slot, size = padded_row_index(region_batch, batch_size, ptr=getattr(batch[REGION], "ptr", None))
            size = max(size, 1)
            for level in levels:
                slot[level] = region_slot.index_select(0, batch[member_edge(level)].edge_index[1])
        else:
            size = self.num_prototypes
            for level in levels:
                index = node_batch(batch, level)
                store = batch[level]
                slot[level], _ = sequential_chunk_index(store.pos, per_node_patch_size(batch, level, index),
                                                        index, batch_size, size)
        mask = {}
        for level, value in slot.items():
            count = torch.zeros(batch_size * size, dtype=torch.long, device=value.device)
            count.index_add_(0, value, torch.ones_like(value))
            mask[level] = (count > 0).view(batch_size, size)
        return PrototypeSlots(size, slot, mask, region_slot)

    def forward(self, batch: HeteroData) -> MILOutput:
        if torch.is_inference_mode_enabled():
            # Grad-CAM needs autograd, which cannot record tensors created in inference mode:
            # evaluate outside it, without gradients (the same numbers).
            with torch.inference_mode(False), torch.no_grad():
                return self._forward(batch)
        return self._forward(batch)

    def _forward(self, batch: HeteroData) -> MILOutput:
        levels = self.input_levels(batch)
        reference = levels[-1]
        batch_size = num_slides(batch)
        slots = self.prototype_slots(batch, levels)
        size = slots.size

        prototypes: Dict[str, Tensor] = {}
        within: Dict[str, Tensor] = {}
        for level, encoder in zip(levels, self.encoders):
            flat, within[level] = encoder(batch[level].x, slots.slot[level], batch_size * size)
            prototypes[level] = flat.view(batch_size, size, -1)

        reference_mask = slots.mask[reference]
        reference_head = self.heads[-1]
        extras: Dict[str, Tensor] = {}
        weights = None
        if self.uses_gradcam:
            target = self._gradcam_labels(batch)
            kept = {}

            def head(values: Tensor) -> Tensor:
                out = reference_head(values, reference_mask)
                kept["attention"] = out.attention
                return out.logits

            cam = self.gradcam(prototypes[reference], head, mask=reference_mask, target=target)
            reference_logits, weights = cam.logits, cam.weights
            reference_attention = kept["attention"]
            if not torch.is_grad_enabled():
                reference_attention = reference_attention.detach()
            extras.update(gradcam_weights=weights, gradcam_gradient=cam.gradient,
                          gradcam_target=cam.target, gradcam_uniform=cam.uniform)
        else:
            reference_logits, reference_attention = reference_head(prototypes[reference], reference_mask)

        level_logits = {reference: reference_logits}
        branch_attention: Dict[str, Tensor] = {}
        for position in range(len(levels) - 2, -1, -1):
            level = levels[position]
            rows, rows_mask = prototypes[level], slots.mask[level]
            if self.uses_ot:
                rows, plan = self.transport(prototypes[reference], rows, reference_mask, rows_mask)
                rows_mask = reference_mask
                extras[f"plan_{level}"] = plan
            if weights is not None:
                rows = rows * weights.to(rows.dtype).unsqueeze(-1)
            level_logits[level], branch_attention[level] = self.heads[position](rows, rows_mask)

        ordered = [level_logits[level] for level in reversed(levels)]  # reference first
        logits = self.classifier(torch.cat([value.to(ordered[0].dtype) for value in ordered], dim=-1))
        output = MILOutput(logits, extras=extras)
        for level in levels:
            extras[f"logits_{level}"] = level_logits[level]
            extras[f"prototype_mask_{level}"] = slots.mask[level]

        if weights is not None:
            relevance = weights
        else:
            attention = reference_attention.detach()
            relevance = attention / attention.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(attention.dtype).tiny)
        flat_relevance = relevance.reshape(-1)
        for level in levels:
            output.add_interpretation(level, "within_region_attention", within[level])
            output.add_interpretation(level, "attention",
                                      within[level] * flat_relevance.index_select(0, slots.slot[level]))
        if slots.region_slot is not None:
            region_slot = slots.region_slot
            output.add_interpretation(REGION, "relevance", flat_relevance.index_select(0, region_slot))
            output.add_interpretation(REGION, "reference_attention",
                                      reference_attention.reshape(-1).index_select(0, region_slot))
            if weights is not None:
                output.add_interpretation(REGION, "gradcam", weights.reshape(-1).index_select(0, region_slot))
            for level, attention in branch_attention.items():
                output.add_interpretation(REGION, f"attention_{level}", attention.reshape(-1).index_select(0, region_slot))
        return output

    def _gradcam_labels(self, batch: HeteroData) -> Optional[Tensor]:
        if self.gradcam_target != "label" or not self.training:
            return None
        y = getattr(batch, "y", None)
        return None if y is None else y.view(-1).long()

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, num_classes={self.num_classes}, "
                f"num_levels={self.num_levels}, cross_attention='{self.cross_attention}', "
                f"alignment='{self.alignment}')")
