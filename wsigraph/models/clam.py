r"""CLAM: clustering-constrained attention MIL, single-branch (SB) and multi-branch (MB)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import HeteroData
from torch_geometric.utils import scatter

from wsigraph.models.base import MILOutput, register_model
from wsigraph.models.common import PatchLevelMILModel, column_of_prediction
from wsigraph.nn.aggregation import GatedAttentionAggregation
from wsigraph.nn.functional.topk import rank_within_group

__all__ = ["CLAMSB", "CLAMMB", "smooth_top1_svm_loss"]

# CLAM trains on 0.7 * bag CE + 0.3 * instance loss; we keep the bag CE at weight 1, so the same
# balance is an instance weight of 0.3 / 0.7 (the total is CLAM's divided by 0.7).
_CLAM_INSTANCE_WEIGHT = 0.3 / 0.7


def smooth_top1_svm_loss(logits: Tensor, target: Tensor, alpha: float = 1.0, tau: float = 1.0) -> Tensor:
    r"""Smooth top-1 multi-class SVM loss (Berrada et al., *Smooth Loss Functions for Deep
    Top-k Classification*, ICLR 2018), per sample:

    .. math::
        \ell(s, y) = \tau \log \sum_j \exp\!\left(\frac{s_j + \alpha\,[j \neq y]}{\tau}\right) - s_y ,

    a smoothed hinge :math:`\max_j (s_j + \alpha [j \ne y]) - s_y` (reached as
    :math:`\tau \to 0`); :math:`\alpha = 0, \tau = 1` gives the cross-entropy. CLAM's default
    instance loss (``alpha = tau = 1``).

    Args:
        logits: ``[M, K]`` scores.
        target: ``[M]`` class indices.
        alpha: margin. (default: ``1.0``)
        tau: temperature. (default: ``1.0``)

    Returns:
        ``[M]`` losses (no reduction).
    """
    logits = logits.float()
    margin = alpha * (1.0 - F.one_hot(target, logits.size(-1)).to(logits.dtype))
    true_score = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    return tau * torch.logsumexp((logits + margin) / tau, dim=-1) - true_score


class _CLAM(PatchLevelMILModel):
    r"""Shared body of CLAM-SB and CLAM-MB (``branches`` attention heads)."""

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int, attention_channels: int,
                 dropout: float, k_sample: int, instance_loss: str, instance_loss_weight: float,
                 subtyping: bool, level: Optional[str], branches: int):
        super().__init__(in_channels, num_classes, level)
        if instance_loss not in ("svm", "ce"):
            raise ValueError(f"instance_loss must be 'svm' or 'ce' (got '{instance_loss}')")
        if k_sample < 1:
            raise ValueError(f"k_sample must be >= 1 (got {k_sample})")
        self.hidden_channels = hidden_channels
        self.attention_channels = attention_channels
        self.k_sample = int(k_sample)
        self.instance_loss_type = instance_loss
        self.instance_loss_weight = float(instance_loss_weight)
        self.subtyping = bool(subtyping)
        self.encoder = nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.ReLU(), nn.Dropout(dropout))
        self.pool = GatedAttentionAggregation(hidden_channels, attention_channels, heads=branches, dropout=dropout)
        # One binary (in-class / out-of-class) instance classifier per class, stored as one
        # linear map: rows 2c and 2c + 1 are classifier c.
        self.instance_classifiers = nn.Linear(hidden_channels, 2 * num_classes)

    def bag_logits(self, pooled: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: HeteroData) -> MILOutput:
        inp = self.level_input(batch)
        h = self.encoder(inp.x)
        pooled, attention, scores = self.pool(h, inp.index, ptr=inp.ptr, dim_size=inp.num_slides,
                                              return_attention=True)
        logits = self.bag_logits(pooled)
        output = MILOutput(logits)
        y = self.labels(batch)
        if y is not None and self.instance_loss_weight > 0:
            loss = self.instance_loss(h, scores, inp.index, y, inp.num_slides)
            output.aux_loss = self.instance_loss_weight * loss
            output.extras["instance_loss"] = loss.detach()
        if attention.size(1) == 1:
            output.add_interpretation(inp.level, "attention", attention.squeeze(1))
        else:
            output.add_interpretation(inp.level, "attention", column_of_prediction(attention, logits, inp.index))
            output.add_interpretation(inp.level, "attention_per_class", attention)
        return output

    def instance_loss(self, h: Tensor, scores: Tensor, index: Tensor, y: Tensor, num_slides: int) -> Tensor:
        r"""CLAM's instance-clustering loss, averaged over the :math:`B` slides.

        For slide :math:`b` with label :math:`y_b`, the attention branch of :math:`y_b` (the
        single branch for SB) ranks the slide's :math:`N_b` patches; the
        :math:`k = \min(k_\text{sample}, \lfloor N_b / 2 \rfloor)` highest are pseudo-labelled
        in-class (1) and the :math:`k` lowest out-of-class (0) for instance classifier
        :math:`y_b`. With ``subtyping``, for every other class :math:`c` the
        :math:`\min(k_\text{sample}, N_b)` highest patches of branch :math:`c` are out-of-class
        (0) for classifier :math:`c`, and the per-class sum is divided by :math:`C` (as CLAM).
        Each classifier's loss is the mean over its pseudo-labelled patches.
        """
        num_nodes, num_classes = h.size(0), self.num_classes
        classes = torch.arange(num_classes, device=h.device)
        branch_scores = scores.detach().float().expand(num_nodes, num_classes)
        # Rank every patch inside each (slide, class) group, 0 = highest attention.
        group = index.unsqueeze(1) * num_classes + classes
        rank = rank_within_group(branch_scores.reshape(-1), group.reshape(-1)).view(num_nodes, num_classes)
        size = scatter(torch.ones_like(index), index, dim=0, dim_size=num_slides, reduce="sum")
        size_node = size.index_select(0, index).unsqueeze(1)
        # k is clipped so that the positive and negative sets never overlap: a bag smaller than
        # 2 k_sample (CLAM's top-k crashes there) gives fewer pseudo-labels, a single patch none.
        k_pair = torch.clamp(size_node // 2, max=self.k_sample)
        in_class = classes == y.index_select(0, index).unsqueeze(1)
        positive = in_class & (rank < k_pair)
        negative = in_class & (rank >= size_node - k_pair)
        if self.subtyping:
            negative = negative | (~in_class & (rank < torch.clamp(size_node, max=self.k_sample)))
        node, cls = (positive | negative).nonzero(as_tuple=True)
        weight = self.instance_classifiers.weight.view(num_classes, 2, -1)
        bias = self.instance_classifiers.bias.view(num_classes, 2)
        instance_logits = torch.einsum("mf,mof->mo", h.index_select(0, node), weight[cls]) + bias[cls]
        target = positive[node, cls].long()
        if self.instance_loss_type == "svm":
            per_instance = smooth_top1_svm_loss(instance_logits, target)
        else:
            per_instance = F.cross_entropy(instance_logits.float(), target, reduction="none")
        pair = index.index_select(0, node) * num_classes + cls
        total = scatter(per_instance, pair, dim=0, dim_size=num_slides * num_classes, reduce="sum")
        count = scatter(torch.ones_like(per_instance), pair, dim=0, dim_size=num_slides * num_classes,
                        reduce="sum")
        per_slide = (total / count.clamp(min=1)).view(num_slides, num_classes).sum(dim=1)
        if self.subtyping:
            per_slide = per_slide / num_classes
        return per_slide.mean()


_CLAM_DOC = r"""

    Shared definitions (Lu et al., *Data-efficient and weakly supervised computational
    pathology on whole-slide images*, Nature Biomedical Engineering 2021):

    .. math::
        h_i = \mathrm{Dropout}(\mathrm{ReLU}(W_1 x_i + b_1)), \qquad
        a_{ik} = \operatorname{softmax}_{i \in b}\!\left( w_k^\top \big(\tanh(V h_i) \odot
        \sigma(U h_i)\big) \right), \qquad \mathbf{m}_{bk} = \sum_{i \in b} a_{ik} h_i .

    Training adds the instance-clustering loss (:meth:`instance_loss`): binary instance
    classifiers :math:`g_c` learn to separate the most and least attended patches of slides of
    class :math:`c`. Its weight: CLAM minimises :math:`0.7\,\mathrm{CE} + 0.3\,L_\text{inst}`;
    here the bag cross-entropy keeps weight 1 and ``aux_loss`` is
    ``instance_loss_weight`` :math:`\cdot L_\text{inst}`, default :math:`0.3/0.7` (the same
    balance, the total divided by 0.7). The instance loss needs ``batch.y`` and is computed in
    training mode only (zero in evaluation). Paper defaults ("small" size): embedding 512,
    attention hidden 256, dropout 0.25, :math:`k_\text{sample} = 8`, smooth top-1 SVM instance
    loss; ``subtyping=True`` for subtyping tasks (out-of-class pseudo-labels for the other
    classes).

    Args:
        in_channels (int): patch feature size :math:`D`.
        num_classes (int): number of classes :math:`C`.
        hidden_channels (int, optional): embedding width :math:`F`. (default: ``512``)
        attention_channels (int, optional): hidden size of the gated attention. (default: ``256``)
        dropout (float, optional): dropout after the embedding and inside the attention.
            (default: ``0.25``)
        k_sample (int, optional): patches pseudo-labelled per side and slide, clipped to the bag
            (see :meth:`instance_loss`). (default: ``8``)
        instance_loss (str, optional): ``"svm"`` (smooth top-1 SVM) or ``"ce"``. (default: ``"svm"``)
        instance_loss_weight (float, optional): weight of the instance loss relative to the bag
            cross-entropy; 0 disables it. (default: ``0.3 / 0.7``)
        subtyping (bool, optional): add the out-of-class pseudo-labels. (default: ``False``)
        level (str, optional): patch node type to read; ``None`` for the highest magnification
            present. (default: ``None``)
"""


@register_model("clam_sb")
class CLAMSB(_CLAM):
    r"""CLAM single-branch: one attention branch shared by all classes,
    :math:`\hat{y}_b = W_2 \mathbf{m}_{b} + b_2`.

    Interpretation: ``attention`` :math:`a_i` (one per patch, summing to one per slide);
    ``extras["instance_loss"]`` the unweighted instance loss in training.
    """ + _CLAM_DOC + r"""
    Shapes:
        - **input:** slide graph(s) with ``x`` :math:`(N, D)` at ``level``, ``y`` :math:`(B)` in training
        - **output:** ``logits`` :math:`(B, C)`, ``interpretation[level]["attention"]`` :math:`(N)`
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 512,
                 attention_channels: int = 256, dropout: float = 0.25, k_sample: int = 8,
                 instance_loss: str = "svm", instance_loss_weight: float = _CLAM_INSTANCE_WEIGHT,
                 subtyping: bool = False, level: Optional[str] = None):
        super().__init__(in_channels, num_classes, hidden_channels, attention_channels, dropout, k_sample,
                         instance_loss, instance_loss_weight, subtyping, level, branches=1)
        self.classifier = nn.Linear(hidden_channels, num_classes)
        self.reset_parameters()

    def bag_logits(self, pooled: Tensor) -> Tensor:
        return self.classifier(pooled)


@register_model("clam_mb")
class CLAMMB(_CLAM):
    r"""CLAM multi-branch: one attention branch per class and one scalar classifier per
    branch, :math:`\hat{y}_{bc} = w_c^\top \mathbf{m}_{bc} + b_c`.

    Interpretation: ``attention`` = the branch of the slide's predicted class (one value per
    patch), ``attention_per_class`` :math:`(N, C)`.
    """ + _CLAM_DOC + r"""
    Shapes:
        - **input:** slide graph(s) with ``x`` :math:`(N, D)` at ``level``, ``y`` :math:`(B)` in training
        - **output:** ``logits`` :math:`(B, C)`, ``interpretation[level]["attention"]`` :math:`(N)`,
          ``["attention_per_class"]`` :math:`(N, C)`
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 512,
                 attention_channels: int = 256, dropout: float = 0.25, k_sample: int = 8,
                 instance_loss: str = "svm", instance_loss_weight: float = _CLAM_INSTANCE_WEIGHT,
                 subtyping: bool = False, level: Optional[str] = None):
        super().__init__(in_channels, num_classes, hidden_channels, attention_channels, dropout, k_sample,
                         instance_loss, instance_loss_weight, subtyping, level, branches=num_classes)
        # Row c is the scalar classifier of branch c (CLAM's C separate Linear(F, 1) layers).
        self.classifiers = nn.Linear(hidden_channels, num_classes)
        self.reset_parameters()

    def bag_logits(self, pooled: Tensor) -> Tensor:
        if pooled.dim() == 2:  # one class: the aggregation squeezes its single head
            pooled = pooled.unsqueeze(1)
        return torch.einsum("bcf,cf->bc", pooled, self.classifiers.weight) + self.classifiers.bias
