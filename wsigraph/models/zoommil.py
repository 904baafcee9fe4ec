r"""ZoomMIL: differentiable zooming along parent → child edges, with lazy evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch_geometric.data import HeteroData
from torch_geometric.utils import softmax, to_dense_batch

from wsigraph.data.lazy import GraphZoomSource, ReadStats, ZoomSource
from wsigraph.data.schema import level_magnification
from wsigraph.models.base import MILModel, MILOutput, register_model
from wsigraph.nn.aggregation import GatedAttentionAggregation
from wsigraph.nn.functional.perturbed_topk import TopKSelection, masked_softmax
from wsigraph.nn.perturbed_topk import PerturbedTopK
from wsigraph.nn.zoom import MISSING_CHILDREN, ZoomGather

__all__ = ["ZoomMIL", "LazyZoomResult"]


class _LevelTrace(NamedTuple):
    level: str
    index: Tensor          # [B, V] node of each bag entry (-1: none); the root: [N] all nodes
    attention: Tensor      # same shape as index
    selected: Optional[Tensor]  # [B, K] selected nodes (-1: none), None at the last level


@dataclass
class LazyZoomResult:
    r"""Result of :meth:`ZoomMIL.lazy_forward` on one slide.

    Attributes:
        logits: ``[1, C]`` slide logits (equal to the full-graph evaluation).
        levels: the levels used, low → high.
        selected: level → ``[K]`` row indices of the selected parents (all levels but the last).
        attention: level → ``(rows, weights)``: the rows that entered that level's bag and
            their attention (the whole lowest level; ``K R`` children above).
        stats: rows / bytes read by the source, when it counts them.
    """
    logits: Tensor
    levels: List[str]
    selected: Dict[str, Tensor] = field(default_factory=dict)
    attention: Dict[str, Tuple[Tensor, Tensor]] = field(default_factory=dict)
    stats: Optional[ReadStats] = None


@register_model("zoommil")
class ZoomMIL(MILModel):
    r"""ZoomMIL (Thandiackal et al., *Differentiable Zooming for Multiple Instance Learning on
    Whole-Slide Images*, ECCV 2022) on the zoom edges of the slide graph.

    Levels :math:`\ell = 1 .. L` low → high magnification (ZoomMIL :math:`L = 3`, ZoomMIL-EFF
    :math:`L = 2`). At each level the bag :math:`\mathcal{B}_\ell` (all patches of the lowest
    level; the children of the selected patches above) is embedded and pooled by gated attention,
    and, below the last level, scored by a second, separate gated attention head (dual gated
    attention) whose softmax drives the selection:

    .. math::
        h_i = \mathrm{Dropout}(\mathrm{ReLU}(W_\ell x_i)), \qquad
        \mathbf{m}_\ell = \sum_{i \in \mathcal{B}_\ell} \operatorname{softmax}_i(\mathrm{GA}_\ell(h))\, h_i,
        \qquad
        s = \operatorname{softmax}(\mathrm{GA}'_\ell(h)) .

    The top-:math:`K` of :math:`s` (:math:`K` clipped to the bag size, positions sorted) is taken
    with the perturbed top-:math:`K` in training (:class:`~wsigraph.nn.PerturbedTopK`: 100 samples,
    :math:`\sigma` on the probabilities, soft :math:`T \in [0,1]^{K \times |\mathcal{B}_\ell|}`)
    and the hard top-:math:`K` in evaluation; :class:`~wsigraph.nn.ZoomGather` follows the zoom
    edges to the children of the selection (soft mixtures in training, a gather in evaluation),
    which form :math:`\mathcal{B}_{\ell+1}`. Deeper descendants are carried along, so with three
    levels the high level is the children of the mid-level selection among the children of the
    low-level selection, as in the official ``kron(T, I_r)`` formulation. Finally

    .. math::
        \hat{y} = f\Bigl(\sum_{\ell=1}^{L} \mathbf{m}_\ell\Bigr)

    with :math:`f` linear (the official code; ``classifier_hidden`` gives the paper's 2-layer
    MLP), trained with cross-entropy only.

    Missing children (background at high magnification) are masked out of the next level's
    softmaxes (``missing_children="mask"``) or zero-filled (``"zero"``, the public ports). Child
    order inside a parent is the raster slot order of the zoom edges; the official code orders
    the four children of a patch column-major, which changes only which children share a soft
    mixture in training, not the evaluation result.

    Training gathers, for every lowest-level patch, its descendants' features at every level
    (memory about that of the slide's features, as the official ``kron`` form; the ``[S, K, N]``
    one-hots of the samples are never formed). Evaluation reads only
    :math:`N_1 + \sum_{\ell > 1} K R_\ell` rows;
    :meth:`lazy_forward` runs it against a :class:`~wsigraph.data.lazy.H5FeatureSource` that reads
    exactly those rows from the feature files and returns the same logits as the full graph.

    Interpretation per level: ``attention`` (zero on nodes never reached), ``selected`` (bool, the
    patches zoomed into, all levels but the last) and ``reached`` (bool, the bag's nodes, levels
    above the first). In training the nodes are those of each slot's most probable parent.

    Args:
        in_channels (int): patch feature size :math:`D`.
        num_classes (int): number of classes :math:`C`.
        hidden_channels (int, optional): embedding width. (default: ``512``)
        attention_channels (int, optional): gated attention hidden size. (default: ``256``)
        dropout (float, optional): dropout of the embeddings and attention heads. (default: ``0.25``)
        k (int, optional): patches selected per level and slide :math:`K`. (default: ``12``)
        num_samples (int, optional): perturbed top-:math:`K` samples. (default: ``100``)
        sigma (float, optional): perturbation scale on the probabilities. (default: ``0.002``)
        estimator (str, optional): ``"diagonal"`` (official) or ``"full"``. (default: ``"diagonal"``)
        scale_by_k (bool, optional): scale the full estimator by :math:`K`. (default: ``False``)
        num_levels (int, optional): levels :math:`L \geq 2`, the highest :math:`L` patch levels of
            the input. (default: ``3``)
        levels (list of str, optional): explicit patch levels (overrides ``num_levels``).
        missing_children (str, optional): ``"mask"`` or ``"zero"``. (default: ``"mask"``)
        classifier_hidden (int, optional): hidden width of a 2-layer MLP head; ``None`` for a
            linear head. (default: ``None``)

    Shapes:
        - **input:** slide graph(s) with :math:`L` patch levels and their zoom edges
        - **output:** ``logits`` :math:`(B, C)`; ``interpretation[level]`` tensors :math:`(N_\ell)`;
          ``extras["embedding"]`` :math:`(B, F)`, ``extras["level_embeddings"]`` :math:`(B, L, F)`
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 512,
                 attention_channels: int = 256, dropout: float = 0.25, k: int = 12, num_samples: int = 100,
                 sigma: float = 0.002, estimator: str = "diagonal", scale_by_k: bool = False, num_levels: int = 3,
                 levels: Optional[Sequence[str]] = None, missing_children: str = "mask",
                 classifier_hidden: Optional[int] = None):
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be positive (got {in_channels}, {num_classes})")
        if levels is not None:
            levels = sorted((str(level) for level in levels), key=level_magnification)
            if len(set(levels)) != len(levels):
                raise ValueError(f"levels must be distinct (got {levels})")
            num_levels = len(levels)
        if num_levels < 2:
            raise ValueError(f"ZoomMIL needs at least two levels (got {num_levels})")
        if missing_children not in MISSING_CHILDREN:
            raise ValueError(f"missing_children must be one of {MISSING_CHILDREN} (got '{missing_children}')")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.hidden_channels = int(hidden_channels)
        self.num_levels = int(num_levels)
        self.levels = levels
        self.encoders = nn.ModuleList([
            nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.ReLU(), nn.Dropout(dropout))
            for _ in range(num_levels)])
        self.pools = nn.ModuleList([GatedAttentionAggregation(hidden_channels, attention_channels, dropout=dropout)
                                    for _ in range(num_levels)])
        self.selectors = nn.ModuleList([GatedAttentionAggregation(hidden_channels, attention_channels, dropout=dropout)
                                        for _ in range(num_levels - 1)])
        self.topk = PerturbedTopK(k, num_samples, sigma, estimator, scale_by_k)
        self.zoom = ZoomGather(missing_children)
        if classifier_hidden:
            self.classifier = nn.Sequential(nn.Linear(hidden_channels, classifier_hidden), nn.ReLU(),
                                            nn.Dropout(dropout), nn.Linear(classifier_hidden, num_classes))
        else:
            self.classifier = nn.Linear(hidden_channels, num_classes)
        self.reset_parameters()

    # ------------------------------------------------------------------ levels
    def resolve_levels(self, available: Sequence[str]) -> List[str]:
        r"""The levels used on an input with patch levels ``available`` (low → high)."""
        available = list(available)
        if self.levels is not None:
            missing = [level for level in self.levels if level not in available]
            if missing:
                raise KeyError(f"ZoomMIL levels {missing} are not in the input (patch levels: {available})")
            return list(self.levels)
        if len(available) < self.num_levels:
            raise ValueError(f"ZoomMIL with {self.num_levels} levels got an input with only {available}")
        return available[-self.num_levels:]

    # ------------------------------------------------------------------ the zoom
    def _level_layers(self, depth: int, h: Tensor, num_slides: int, num_entries: int, log_prior: Tensor):
        index = torch.arange(num_slides, device=h.device).repeat_interleave(num_entries)
        ptr = torch.arange(num_slides + 1, device=h.device) * num_entries
        return self.pools[depth](h, index, ptr=ptr, dim_size=num_slides, log_prior=log_prior.reshape(-1),
                                 return_attention=True)

    def _zoom(self, source: ZoomSource, levels: List[str], soft: bool) -> Tuple[Tensor, Tensor, List[_LevelTrace]]:
        num_slides = source.num_slides
        traces: List[_LevelTrace] = []

        # Lowest level: every node.
        x, batch, ptr = source.root(levels[0])
        h = self.encoders[0](x)
        pooled, attention, _ = self.pools[0](h, batch, ptr=ptr, dim_size=num_slides, return_attention=True)
        pooled_levels = [pooled]
        logits = self.selectors[0].score(h).squeeze(-1).float()
        probs = softmax(logits, batch, ptr, num_nodes=num_slides)
        probs, present = to_dense_batch(probs, batch, batch_size=num_slides)
        bag_index, _ = to_dense_batch(torch.arange(x.size(0), device=x.device), batch, fill_value=-1,
                                      batch_size=num_slides)
        selection = self.topk(probs, present)
        traces.append(_LevelTrace(levels[0], torch.arange(x.size(0), device=x.device), attention.squeeze(-1),
                                  _selected_nodes(selection, bag_index)))

        stacks = {}
        if soft:  # descendants of every root node at every deeper level, with their features
            for depth in range(1, len(levels)):
                table = source.child_table(levels[0], levels[depth])
                dense = table.index_select(0, bag_index.clamp(min=0).reshape(-1)).view(*bag_index.shape, -1)
                dense = torch.where(present.unsqueeze(-1), dense, dense.new_full((), -1))
                stacks[depth] = self.zoom.root(dense, present, source.root(levels[depth])[0])

        for depth in range(1, len(levels)):
            if soft:
                fanout = stacks[depth].index.size(-1)
                for deeper in range(depth, len(levels)):
                    stacks[deeper] = self.zoom(selection, stacks[deeper], fanout=fanout)
                bag = self.zoom.bag(stacks.pop(depth))
                features = bag.features
            else:
                children_of = partial(source.children, levels[depth - 1], levels[depth])
                bag = self.zoom.bag(self.zoom.select_children(selection, bag_index, children_of))
                features = source.rows(levels[depth], bag.index)
            batch_size, entries = bag.index.shape
            h = self.encoders[depth](features.reshape(batch_size * entries, -1))
            pooled, attention, _ = self._level_layers(depth, h, batch_size, entries, bag.log_prior)
            pooled_levels.append(pooled)
            chosen = None
            if depth < len(levels) - 1:
                logits = self.selectors[depth].score(h).view(batch_size, entries).float()
                probs = masked_softmax(logits + bag.log_prior.clamp_min(torch.finfo(torch.float32).min),
                                       bag.present)
                selection = self.topk(probs, bag.present)
                chosen = _selected_nodes(selection, bag.index)
            traces.append(_LevelTrace(levels[depth], bag.index, attention.view(batch_size, entries), chosen))
            bag_index = bag.index

        level_embeddings = torch.stack(pooled_levels, dim=1)
        embedding = level_embeddings.sum(dim=1)
        return self.classifier(embedding), level_embeddings, traces

    # ------------------------------------------------------------------ interfaces
    def forward(self, batch: HeteroData) -> MILOutput:
        source = GraphZoomSource(batch)
        levels = self.resolve_levels(source.levels())
        logits, level_embeddings, traces = self._zoom(source, levels, soft=self.training)
        output = MILOutput(logits, extras={"embedding": level_embeddings.sum(dim=1),
                                           "level_embeddings": level_embeddings})
        for depth, trace in enumerate(traces):
            count = source.num_nodes(trace.level)
            attention = _scatter_nodes(trace.index, trace.attention, count)
            output.add_interpretation(trace.level, "attention", attention)
            if depth > 0:
                output.add_interpretation(trace.level, "reached", _node_mask(trace.index, count))
            if trace.selected is not None:
                output.add_interpretation(trace.level, "selected", _node_mask(trace.selected, count))
        return output

    @torch.no_grad()
    def lazy_forward(self, source: ZoomSource) -> LazyZoomResult:
        r"""Evaluation level by level against a feature source (one slide), reading only the
        lowest level and the children of the selected parents.

        Args:
            source (ZoomSource): e.g. :class:`~wsigraph.data.lazy.H5FeatureSource`.

        Returns:
            LazyZoomResult: the logits of the full-graph evaluation, the selections, the
            attention of the rows reached, and the source's read counts.
        """
        if self.training:
            raise RuntimeError("lazy_forward is the evaluation path: call model.eval() first")
        levels = self.resolve_levels(source.levels())
        logits, _, traces = self._zoom(source, levels, soft=False)
        result = LazyZoomResult(logits, levels, stats=getattr(source, "stats", None))
        for trace in traces:
            index, attention = trace.index.reshape(-1), trace.attention.reshape(-1)
            keep = index >= 0
            result.attention[trace.level] = (index[keep], attention[keep])
            if trace.selected is not None:
                chosen = trace.selected.reshape(-1)
                result.selected[trace.level] = chosen[chosen >= 0]
        return result

    def __repr__(self) -> str:
        levels = f"levels={self.levels}" if self.levels is not None else f"num_levels={self.num_levels}"
        return (f"{self.__class__.__name__}({self.in_channels}, num_classes={self.num_classes}, {levels}, "
                f"k={self.topk.k}, estimator='{self.topk.estimator}', missing='{self.zoom.missing}')")


def _selected_nodes(selection: TopKSelection, bag_index: Tensor) -> Tensor:
    r"""``[B, K]`` node index of every selected slot (``-1`` where unused or missing)."""
    nodes = bag_index.gather(1, selection.index.clamp(min=0))
    return torch.where(selection.valid, nodes, nodes.new_full((), -1))


def _scatter_nodes(index: Tensor, values: Tensor, count: int) -> Tensor:
    r"""Per-node sums ``[count]`` of the entries' ``values`` at ``index`` (``-1`` ignored)."""
    index, values = index.reshape(-1), values.reshape(-1).float()
    keep = index >= 0
    target = torch.where(keep, index, index.new_zeros(()))
    values = torch.where(keep, values, values.new_zeros(()))
    return values.new_zeros(count).scatter_add(0, target, values)


def _node_mask(index: Tensor, count: int) -> Tensor:
    r"""``[count]`` bool, ``True`` on the nodes listed in ``index`` (``-1`` ignored)."""
    index = index.reshape(-1)
    index = index[index >= 0]
    return torch.zeros(count, dtype=torch.bool, device=index.device).index_fill_(0, index, True)
