r"""Layers of ROAM, region-graph optimal-transport routing of region tokens to a mixture of
attention-pooling experts, batched over slides.

The pipeline for the patches of a batch of slides is

.. code-block:: text

    patches --RegionPooling--> region tokens u --RoutingContext--> routing embeddings z
    z --OTRouter--> plan Pi, dispatch D --ExpertAttentionPooling(u, D)--> expert vectors m_e
    m_e --ExpertFusion--> slide vector m

Regions are the ``region`` nodes of a slide graph, patches reach them along the membership
edges and the region graph is the ``("region", "knn", "region")`` kNN graph, so every layer
works on flat node tensors with a ``batch`` vector (slides never interact).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import SAGEConv
from torch_geometric.nn.aggr import Aggregation
from torch_geometric.utils import scatter, softmax

from wsigraph.nn.functional.sinkhorn import LOG_ZERO
from wsigraph.nn.functional.topk import dense_topk_mask
from wsigraph.nn.sinkhorn import GraphSinkhorn

__all__ = [
    "RegionPooling",
    "RoutingContext",
    "OTRouter",
    "RoutingOutput",
    "ExpertAttentionPooling",
    "ExpertPoolingOutput",
    "ExpertFusion",
    "topk_dispatch",
    "routing_coherence",
    "load_entropy",
]

ROUTERS = ("ot", "softmax")


def _masked_log(value: Tensor, keep: Tensor) -> Tensor:
    # log(value) on `keep`, LOG_ZERO elsewhere; the inner `where` keeps gradients finite at the
    # entries that are dropped (log'(1) instead of log'(0)).
    safe = torch.where(keep, value, torch.ones_like(value))
    return torch.where(keep, torch.log(safe), torch.full_like(value, LOG_ZERO))


def _per_slide_sum(value: Tensor, batch: Optional[Tensor], num_graphs: int) -> Tensor:
    if batch is None:
        return value.sum(0, keepdim=True)
    return scatter(value, batch, dim=0, dim_size=num_graphs, reduce="sum")


def topk_dispatch(plan: Tensor, row_marginals: Tensor, k: int) -> Tensor:
    r"""Top-:math:`k` sparsification of a routing plan that keeps every row's mass.

    .. math::
        D_{re} = \begin{cases} \Pi_{re}\, \dfrac{a_r}{\sum_{e' \in \mathrm{top}\text{-}k(r)}
        \Pi_{re'}} & e \in \mathrm{top}\text{-}k(r) \\ 0 & \text{otherwise,} \end{cases}

    so :math:`\sum_e D_{re} = a_r` exactly. :math:`k` is clipped to the number of columns;
    ties go to the lower column. A row with :math:`a_r = 0` (or a plan row of zero mass) gives a
    zero dispatch row.

    Args:
        plan (torch.Tensor): :math:`(N, E)` plan :math:`\Pi`.
        row_marginals (torch.Tensor): :math:`(N)` row masses :math:`a`.
        k (int): experts kept per row.

    Returns:
        torch.Tensor: :math:`(N, E)` dispatch :math:`D`.
    """
    if k < 1:
        raise ValueError(f"'k' must be >= 1 (got {k})")
    keep = dense_topk_mask(plan.detach(), k, dim=-1)
    kept = plan * keep
    total = kept.sum(-1, keepdim=True)
    positive = total > 0
    scale = row_marginals.to(plan.dtype).unsqueeze(-1) / torch.where(positive, total,
                                                                   torch.ones_like(total))
    return torch.where(positive, kept * scale, torch.zeros_like(kept))


def routing_coherence(expert: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None,
                      num_graphs: Optional[int] = None,
                      valid: Optional[Tensor] = None) -> Tensor:
    r"""Spatial coherence of a routing: per slide, the share of region-graph edges whose two
    endpoints have the same top expert,

    .. math::
        \kappa_b = \frac{|\{(j, r) \in \mathcal{E}_b : e^\star_j = e^\star_r\}|}
        {|\mathcal{E}_b|}, \qquad e^\star_r = \arg\max_e D_{re}.

    Args:
        expert (torch.Tensor): :math:`(R)` top expert of every region.
        edge_index (torch.Tensor): :math:`(2, M)` region graph.
        batch (torch.Tensor, optional): :math:`(R)` slide of every region.
        num_graphs (int, optional): :math:`B`.
        valid (torch.Tensor, optional): :math:`(R)` bool, regions to count (e.g. those with
            mass); edges touching another region are ignored.

    Returns:
        torch.Tensor: :math:`(B)` shares (NaN for a slide without edges).
    """
    source, target = edge_index
    same = (expert.index_select(0, source) == expert.index_select(0, target)).float()
    counted = torch.ones_like(same)
    if valid is not None:
        counted = (valid.index_select(0, source) & valid.index_select(0, target)).float()
    if batch is None:
        batch = torch.zeros(expert.numel(), dtype=torch.long, device=expert.device)
        num_graphs = 1
    if num_graphs is None:
        num_graphs = int(batch.max()) + 1 if batch.numel() else 0
    edge_batch = batch.index_select(0, target)
    agree = scatter(same * counted, edge_batch, dim=0, dim_size=num_graphs, reduce="sum")
    total = scatter(counted, edge_batch, dim=0, dim_size=num_graphs, reduce="sum")
    return agree / total


def load_entropy(loads: Tensor) -> Tensor:
    r"""Normalised entropy of expert loads, :math:`-\sum_e q_e \log q_e / \log E` with
    :math:`q = \ell / \sum_e \ell_e`: 1 for perfectly balanced loads, 0 when one expert takes
    everything.

    Args:
        loads (torch.Tensor): :math:`(B, E)` loads :math:`\ell` (e.g. ``RoutingOutput.loads``).

    Returns:
        torch.Tensor: :math:`(B)`.
    """
    share = loads / loads.sum(-1, keepdim=True).clamp_min(1e-30)
    terms = torch.where(share > 0, share * torch.log(share.clamp_min(1e-30)),
                        torch.zeros_like(share))
    return -terms.sum(-1) / math.log(max(loads.size(-1), 2))


class RegionPooling(Aggregation):
    r"""Region tokens: the mean of the member patches of every region (ROAM eq. 1),

    .. math::
        u_r = \frac{1}{|r|} \sum_{i \in r} h_i, \qquad m_r = |r|,

    a scatter along the membership edges ``(patch level, "belongs_to", "region")``, whose
    ``edge_index[1]`` is the region of every patch (:func:`~wsigraph.data.schema.region_of_patch`).
    Regions without member patches get :math:`u_r = 0` and :math:`m_r = 0`.

    Shapes:
        - **input:** patch features :math:`(N, F)`, region of every patch :math:`(N)`, number of
          regions :math:`R` (``dim_size``)
        - **output:** :math:`(R, F)`; with ``return_mass=True`` also masses :math:`(R)`
    """
    def reset_parameters(self):
        r"""No learnable parameters."""

    def forward(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                dim_size: Optional[int] = None, dim: int = -2,
                return_mass: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        r"""
        Args:
            x (torch.Tensor): :math:`(N, F)` patch features.
            index (torch.Tensor): :math:`(N)` region of every patch (need not be sorted).
            ptr (torch.Tensor, optional): CSR offsets when patches are sorted by region.
            dim_size (int, optional): number of regions :math:`R` (pass it: inferring it is a
                host sync, and trailing empty regions would be lost).
            return_mass (bool, optional): also return the member counts :math:`m_r`.
        """
        total = self.reduce(x, index, ptr, dim_size, dim, reduce="sum")
        ones = x.new_ones(x.size(dim), 1)
        mass = self.reduce(ones, index, ptr, dim_size, dim=0, reduce="sum").view(-1)
        content = total / mass.clamp_min(1).unsqueeze(-1)
        return (content, mass) if return_mass else content

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


class RoutingContext(torch.nn.Module):
    r"""Routing context of ROAM (eq. 2): a GraphSAGE stack over the region graph,

    .. math::
        z = \mathrm{SAGE}_L\big(\mathrm{ReLU}(\cdots \mathrm{ReLU}(\mathrm{SAGE}_1(u))
        \cdots)\big), \qquad
        \mathrm{SAGE}(u)_r = W_1 u_r + W_2 \frac{1}{|\mathcal{N}(r)|}
        \sum_{j \in \mathcal{N}(r)} u_j,

    two layers by default. :math:`z` only parameterises the routing cost; the experts pool the
    region content :math:`u` itself.

    Args:
        in_channels (int): region token size :math:`F`.
        hidden_channels (int, optional): width of the hidden and output layers
            (default: ``in_channels``).
        num_layers (int, optional): SAGE layers :math:`L`. (default: ``2``)
        dropout (float, optional): dropout between layers. (default: ``0.0``)

    Shapes:
        - **input:** region tokens :math:`(R, F)`, region graph :math:`(2, M)`
          (``source -> target``)
        - **output:** :math:`(R, F_{hidden})`
    """
    def __init__(self, in_channels: int, hidden_channels: Optional[int] = None,
                 num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"'num_layers' must be >= 1 (got {num_layers})")
        hidden_channels = hidden_channels or in_channels
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        self.dropout = dropout
        widths = [in_channels] + [hidden_channels] * num_layers
        self.convs = torch.nn.ModuleList(
            SAGEConv(widths[i], widths[i + 1], aggr="mean") for i in range(num_layers))
        self.reset_parameters()

    def reset_parameters(self):
        for conv in self.convs:
            conv.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        for position, conv in enumerate(self.convs):
            x = conv(x, edge_index)
            if position + 1 < self.num_layers:
                x = F.dropout(F.relu(x), self.dropout, self.training)
        return x

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"num_layers={self.num_layers})")


class RoutingOutput(NamedTuple):
    r"""Result of :class:`OTRouter`.

    Attributes:
        plan: :math:`(R, E)` routing plan :math:`\Pi` (float32).
        dispatch: :math:`(R, E)` top-:math:`k` dispatch :math:`D`, rows summing to :math:`a_r`.
        cost: :math:`(R, E)` cost :math:`C_{re} = 1 - \cos(z_r, p_e)`.
        row_marginals: :math:`(R)` supplies :math:`a_r = m_r / \sum_{r'} m_{r'}` per slide.
        plan_loads: :math:`(B, E)` expert loads of the plan, :math:`\sum_r \Pi_{re}`
            (:math:`1/E` for OT routing).
        loads: :math:`(B, E)` realised loads after dispatch, :math:`\sum_r D_{re}`.
    """
    plan: Tensor
    dispatch: Tensor
    cost: Tensor
    row_marginals: Tensor
    plan_loads: Tensor
    loads: Tensor


class OTRouter(torch.nn.Module):
    r"""Capacity-constrained, graph-regularised optimal-transport routing of region tokens to
    :math:`E` experts (ROAM eq. 3–6).

    With learnable prototypes :math:`p_e` and routing embeddings :math:`z_r`,

    .. math::
        C_{re} = 1 - \frac{z_r^\top p_e}{\|z_r\| \|p_e\|}, \qquad
        a_r = \frac{m_r}{\sum_{r'} m_{r'}}, \qquad b_e = \frac{1}{E},

    and per slide the entropic plan

    .. math::
        \Pi = \operatorname*{arg\,min}_{\Pi \mathbf{1} = a,\ \Pi^\top \mathbf{1} = b}
        \langle \Pi, C \rangle - \varepsilon H(\Pi)

    from :math:`T` log-domain Sinkhorn projection pairs, the log-plan smoothed over the region
    graph after each of the first :math:`S` pairs,
    :math:`\log \Pi_{r\cdot} \leftarrow (1 - \lambda) \log \Pi_{r\cdot} + \lambda \sum_{j}
    w_{rj} \log \Pi_{j\cdot}` (:class:`~wsigraph.nn.GraphSinkhorn`). Every expert therefore
    receives mass :math:`1/E` on every slide. With ``router="softmax"`` (no capacity
    constraint) :math:`\Pi_{re} = a_r \operatorname{softmax}_e(-C_{re}/\varepsilon)`. Finally
    the top-:math:`k` dispatch (:func:`topk_dispatch`) keeps the :math:`k` largest entries of each
    row, rescaled to the row mass :math:`a_r`.

    Regions of zero mass get zero rows and are left out of the smoothing (their log-plan is
    :math:`-\infty`): edges from them are dropped and the remaining in-weights renormalised.

    Args:
        in_channels (int): routing embedding size.
        num_experts (int, optional): :math:`E`. (default: ``8``)
        top_k (int, optional): experts per region in the dispatch (clipped to :math:`E`).
            (default: ``2``)
        router (str, optional): ``"ot"`` or ``"softmax"``. (default: ``"ot"``)
        epsilon (float, optional): entropic regularisation / softmax temperature
            :math:`\varepsilon`. (default: ``0.05``)
        num_iterations (int, optional): Sinkhorn projection pairs :math:`T`. (default: ``10``)
        smoothing (float, optional): graph smoothing :math:`\lambda` (``0``: plain Sinkhorn).
            (default: ``0.5``)
        smoothing_steps (int, optional): smoothed leading pairs :math:`S`. (default: ``3``)

    Shapes:
        - **input:** routing embeddings :math:`(R, F)`, masses :math:`(R)`, batch :math:`(R)`,
          region graph :math:`(2, M)` with weights :math:`(M)`
        - **output:** :class:`RoutingOutput` (plan, dispatch and cost :math:`(R, E)`, row
          marginals :math:`(R)`, loads :math:`(B, E)`)
    """
    def __init__(self, in_channels: int, num_experts: int = 8, top_k: int = 2,
                 router: str = "ot", epsilon: float = 0.05, num_iterations: int = 10,
                 smoothing: float = 0.5, smoothing_steps: int = 3):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"'num_experts' must be >= 1 (got {num_experts})")
        if top_k < 1:
            raise ValueError(f"'top_k' must be >= 1 (got {top_k})")
        if router not in ROUTERS:
            raise ValueError(f"'router' must be one of {ROUTERS} (got '{router}')")
        self.in_channels = in_channels
        self.num_experts = num_experts
        self.top_k = min(top_k, num_experts)
        self.router = router
        self.epsilon = epsilon
        self.sinkhorn = GraphSinkhorn(epsilon, num_iterations, smoothing, smoothing_steps)
        self.prototypes = torch.nn.Parameter(torch.empty(num_experts, in_channels))
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.normal_(self.prototypes)

    def cost(self, z: Tensor) -> Tensor:
        r"""Cosine cost :math:`C_{re} = 1 - \cos(z_r, p_e)`, :math:`(R, E)` in float32."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1, eps=1e-8)
            prototypes = F.normalize(self.prototypes.float(), dim=-1, eps=1e-8)
            return 1.0 - z @ prototypes.t()

    def forward(self, z: Tensor, mass: Tensor, batch: Optional[Tensor] = None,
                edge_index: Optional[Tensor] = None, edge_weight: Optional[Tensor] = None,
                num_graphs: Optional[int] = None,
                max_num_rows: Optional[int] = None) -> RoutingOutput:
        r"""
        Args:
            z (torch.Tensor): :math:`(R, F)` routing embeddings.
            mass (torch.Tensor): :math:`(R)` region masses :math:`m_r` (member patch counts).
            batch (torch.Tensor, optional): :math:`(R)` sorted slide of every region.
            edge_index (torch.Tensor, optional): region graph (``source -> target``) for the
                smoothing.
            edge_weight (torch.Tensor, optional): its weights :math:`w_{rj}` (in-weights of a
                region summing to one); :math:`1/\deg` if :obj:`None`.
            num_graphs (int, optional): :math:`B`.
            max_num_rows (int, optional): largest slide's region count.
        """
        if batch is None:
            batch = torch.zeros(z.size(0), dtype=torch.long, device=z.device)
            num_graphs = 1
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1 if batch.numel() else 0
        cost = self.cost(z)
        mass = mass.to(cost.dtype)
        slide_mass = _per_slide_sum(mass, batch, num_graphs)
        row_marginals = mass / slide_mass.clamp_min(1e-30).index_select(0, batch)

        if self.router == "softmax":
            plan = row_marginals.unsqueeze(-1) * torch.softmax(cost / (-self.epsilon), dim=-1)
        else:
            if edge_index is not None and edge_index.numel() > 0:
                edge_weight = self._smoothing_weight(edge_index, edge_weight, mass)
            plan = self.sinkhorn(cost, row_marginals, None, batch=batch, edge_index=edge_index,
                                 edge_weight=edge_weight, num_graphs=num_graphs,
                                 max_num_rows=max_num_rows)
        dispatch = topk_dispatch(plan, row_marginals, self.top_k)
        return RoutingOutput(plan, dispatch, cost, row_marginals,
                             _per_slide_sum(plan, batch, num_graphs),
                             _per_slide_sum(dispatch, batch, num_graphs))

    @staticmethod
    def _smoothing_weight(edge_index: Tensor, edge_weight: Optional[Tensor],
                          mass: Tensor) -> Tensor:
        # A zero-mass region has a log-plan of LOG_ZERO, which must not be averaged into its
        # neighbours: its out-edges get weight 0 and the other in-weights are renormalised.
        source, target = edge_index
        if edge_weight is None:
            edge_weight = mass.new_ones(source.numel())
        weight = edge_weight.to(mass.dtype) * (mass.index_select(0, source) > 0)
        total = torch.zeros_like(mass).index_add_(0, target, weight)
        return weight / total.clamp_min(1e-30).index_select(0, target)

    def __repr__(self) -> str:
        smoothing = "" if self.router == "softmax" else f", smoothing={self.sinkhorn.smoothing}"
        return (f"{self.__class__.__name__}({self.in_channels}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, router='{self.router}', epsilon={self.epsilon}{smoothing})")


class ExpertPoolingOutput(NamedTuple):
    r"""Result of :class:`ExpertAttentionPooling`.

    Attributes:
        out: :math:`(B, E, F)` expert vectors :math:`m_e` (zero for an empty expert).
        attention: :math:`(R, E)` attention :math:`\alpha_{re}`, summing to one over the support
            of each non-empty expert of each slide, zero outside it.
        mask: :math:`(B, E)` bool, experts with non-empty support :math:`S_e`.
        scores: :math:`(R, E)` raw gated scores :math:`s_e(u_r)`.
    """
    out: Tensor
    attention: Tensor
    mask: Tensor
    scores: Tensor


class ExpertAttentionPooling(Aggregation):
    r"""Per-expert gated attention pooling over each expert's dispatched regions, OT-guided
    (ROAM eq. 7–8).

    Every expert :math:`e` has its own gated attention scorer (Ilse et al., 2018),

    .. math::
        s_e(u_r) = w_e^\top \big( \tanh(V_e u_r) \odot \sigma(U_e u_r) \big),

    computed for all experts at once as one batched linear map. With the dispatch :math:`D` and
    the support :math:`S_e = \{r : D_{re} > 0\}` of expert :math:`e` in each slide,

    .. math::
        \alpha_{re} = \operatorname{softmax}_{r \in S_e}\big( s_e(u_r) + \log D_{re} \big),
        \qquad m_e = \sum_{r \in S_e} \alpha_{re} u_r .

    Without OT guidance (``ot_guided=False``) the :math:`\log D_{re}` term is dropped but the
    support still restricts the softmax. An expert with empty support gets :math:`m_e = 0`,
    zero attention and ``mask = False`` (never NaN).

    Args:
        in_channels (int): region token size :math:`F`.
        hidden_channels (int): hidden size of each gated scorer.
        num_experts (int): :math:`E`.
        dropout (float, optional): dropout on the gated hidden features. (default: ``0.0``)

    Shapes:
        - **input:** region tokens :math:`(R, F)`, dispatch :math:`(R, E)`, region batch
          :math:`(R)`, :math:`B` (``dim_size``)
        - **output:** :class:`ExpertPoolingOutput` (out :math:`(B, E, F)`, attention and scores
          :math:`(R, E)`, mask :math:`(B, E)`)
    """
    def __init__(self, in_channels: int, hidden_channels: int, num_experts: int,
                 dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.num_experts = num_experts
        self.dropout = dropout
        self.lin_tanh = torch.nn.Linear(in_channels, num_experts * hidden_channels)
        self.lin_gate = torch.nn.Linear(in_channels, num_experts * hidden_channels)
        self.score_weight = torch.nn.Parameter(torch.empty(num_experts, hidden_channels))
        self.score_bias = torch.nn.Parameter(torch.empty(num_experts))
        self.reset_parameters()

    def reset_parameters(self):
        self.lin_tanh.reset_parameters()
        self.lin_gate.reset_parameters()
        # The default initialisation of E independent Linear(hidden, 1) scorers.
        bound = 1.0 / math.sqrt(self.hidden_channels)
        torch.nn.init.uniform_(self.score_weight, -bound, bound)
        torch.nn.init.uniform_(self.score_bias, -bound, bound)

    def score(self, x: Tensor) -> Tensor:
        r"""Raw scores :math:`s_e(u_r)` of every region for every expert, :math:`(R, E)`."""
        shape = (x.size(0), self.num_experts, self.hidden_channels)
        hidden = torch.tanh(self.lin_tanh(x)).view(shape) * torch.sigmoid(
            self.lin_gate(x)).view(shape)
        hidden = F.dropout(hidden, p=self.dropout, training=self.training)
        return (hidden * self.score_weight).sum(-1) + self.score_bias

    def forward(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                dim_size: Optional[int] = None, dim: int = -2,
                dispatch: Optional[Tensor] = None,
                ot_guided: bool = True) -> ExpertPoolingOutput:
        r"""
        Args:
            x (torch.Tensor): :math:`(R, F)` region tokens :math:`u`.
            index (torch.Tensor, optional): :math:`(R)` slide of every region.
            ptr (torch.Tensor, optional): :math:`(B + 1)` CSR offsets of the sorted regions.
            dim_size (int, optional): :math:`B` (pass it: inferring it is a host sync).
            dispatch (torch.Tensor): :math:`(R, E)` dispatch :math:`D`.
            ot_guided (bool, optional): add :math:`\log D_{re}` to the scores.
        """
        if dispatch is None:
            raise ValueError("ExpertAttentionPooling needs the dispatch matrix 'dispatch'")
        num_regions = x.size(0)
        scores = self.score(x)
        support = dispatch > 0
        if ot_guided:
            prior = _masked_log(dispatch.float(), support)
        else:
            prior = torch.where(support, torch.zeros_like(dispatch, dtype=torch.float32),
                                torch.full_like(dispatch, LOG_ZERO, dtype=torch.float32))
        logits = (scores.float() + prior).clamp_min(LOG_ZERO)
        # An expert whose support is empty in a slide has a uniform softmax over LOG_ZERO
        # logits; multiplying by the support zeroes it.
        attention = softmax(logits, index, ptr, num_nodes=dim_size, dim=0) * support
        weighted = attention.unsqueeze(-1) * x.unsqueeze(1)  # [R, E, F]
        out = self.reduce(weighted.reshape(num_regions, -1), index, ptr, dim_size, dim=0,
                          reduce="sum").view(-1, self.num_experts, x.size(-1))
        count = self.reduce(support.to(x.dtype), index, ptr, dim_size, dim=0, reduce="sum")
        return ExpertPoolingOutput(out, attention, count > 0, scores)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
                f"num_experts={self.num_experts})")


class ExpertFusion(torch.nn.Module):
    r"""Fusion of the expert vectors of each slide by gated attention over the non-empty
    experts (ROAM eq. 9),

    .. math::
        g(m_e) = w^\top \big( \tanh(V m_e) \odot \sigma(U m_e) \big), \qquad
        \beta = \operatorname{softmax}_{e : S_e \neq \emptyset} g(m_e), \qquad
        m = \sum_e \beta_e m_e,

    with one gating network :math:`g` shared by the experts. Masked experts get
    :math:`\beta_e = 0`; a slide without any expert fuses to zero.

    Args:
        in_channels (int): expert vector size :math:`F`.
        hidden_channels (int): hidden size of :math:`g`.
        dropout (float, optional): dropout on the gated hidden features. (default: ``0.0``)

    Shapes:
        - **input:** expert vectors :math:`(B, E, F)`, mask :math:`(B, E)` (optional)
        - **output:** fused :math:`(B, F)` and weights :math:`\beta` :math:`(B, E)`
    """
    def __init__(self, in_channels: int, hidden_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.dropout = dropout
        self.lin_tanh = torch.nn.Linear(in_channels, hidden_channels)
        self.lin_gate = torch.nn.Linear(in_channels, hidden_channels)
        self.lin_score = torch.nn.Linear(hidden_channels, 1)
        self.reset_parameters()

    def reset_parameters(self):
        self.lin_tanh.reset_parameters()
        self.lin_gate.reset_parameters()
        self.lin_score.reset_parameters()

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        hidden = torch.tanh(self.lin_tanh(x)) * torch.sigmoid(self.lin_gate(x))
        hidden = F.dropout(hidden, p=self.dropout, training=self.training)
        logits = self.lin_score(hidden).squeeze(-1).float()
        if mask is not None:
            logits = logits.masked_fill(~mask, LOG_ZERO)
        weights = torch.softmax(logits, dim=-1)
        if mask is not None:
            weights = weights * mask
        out = (weights.to(x.dtype).unsqueeze(-1) * x).sum(-2)
        return out, weights

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels})"
