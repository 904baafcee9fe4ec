r"""ROAM: region-graph optimal-transport routing of region tokens to a mixture of experts."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch_geometric.data import HeteroData

from wsigraph.data.schema import REGION, REGION_GRAPH, member_edge, node_batch
from wsigraph.models.base import MILOutput, register_model
from wsigraph.models.common import PatchLevelMILModel
from wsigraph.nn.roam import (ROUTERS, ExpertAttentionPooling, ExpertFusion, OTRouter,
                              RegionPooling, RoutingContext)

__all__ = ["ROAM"]


@register_model("roam")
class ROAM(PatchLevelMILModel):
    r"""ROAM, region-graph optimal-transport routing mixture of experts (*Region-Graph
    Optimal Transport Routing for Mixture-of-Experts Whole-Slide Image Classification*).

    For the patches :math:`i` of a slide, grouped into the regions :math:`r` of the slide
    graph (the ``grid`` partition in the paper),

    .. math::
        h_i &= \mathrm{Dropout}(\mathrm{ReLU}(W_p x_i)), \qquad
        u_r = \frac{1}{m_r} \sum_{i \in r} h_i, \quad m_r = |r|, \\
        z &= \mathrm{SAGE}_2(\mathrm{ReLU}(\mathrm{SAGE}_1(u))) \ \text{on the region graph},
        \qquad C_{re} = 1 - \cos(z_r, p_e), \\
        \Pi &= \text{graph-smoothed Sinkhorn}(C;\ a = m / \textstyle\sum m,\ b = \mathbf{1}/E),
        \qquad D = \text{top-}k(\Pi) \text{ rescaled to } a, \\
        \alpha_{re} &= \operatorname{softmax}_{r \in S_e}(s_e(u_r) + \log D_{re}), \quad
        m_e = \sum_{r \in S_e} \alpha_{re} u_r, \quad S_e = \{r : D_{re} > 0\}, \\
        \beta &= \operatorname{softmax}_{e : S_e \neq \emptyset} g(m_e), \qquad
        \hat{y} = W_{cls} \sum_e \beta_e m_e,

    trained with cross-entropy only (no load-balancing loss): the capacities :math:`b_e = 1/E`
    give every expert the same mass on every slide by construction. Layers:
    :class:`~wsigraph.nn.RegionPooling`, :class:`~wsigraph.nn.RoutingContext`,
    :class:`~wsigraph.nn.OTRouter`, :class:`~wsigraph.nn.ExpertAttentionPooling`,
    :class:`~wsigraph.nn.ExpertFusion`. Defaults are the paper's (d = 256, E = 8, k = 2,
    :math:`\varepsilon` = 0.05, T = 10, :math:`\lambda` = 0.5 for S = 3 steps, dropout 0.25);
    the attention hidden size 128 is our choice.

    The ablation switches of the paper: ``routing_gnn=False`` (:math:`z = u`),
    ``smoothing=0`` (plain Sinkhorn), ``router="softmax"``
    (:math:`\Pi_{re} = a_r \operatorname{softmax}_e(-C_{re}/\varepsilon)`, no capacity
    constraint), ``ot_guided_pooling=False`` (no :math:`\log D_{re}` term) and
    ``detach_routing=True`` (:math:`D` detached: the router gets no gradient).

    Regions, their membership edges and the region graph come from the slide graph (any
    partition works; a region without patches at ``level`` carries no mass).
    Interpretation: ``region``: ``expert`` (:math:`\arg\max_e D_{re}`, :math:`-1` for a
    region without mass), ``plan`` :math:`\Pi` and ``dispatch`` :math:`D` (:math:`(R, E)`),
    ``attention`` (:math:`\sum_e \beta_e \alpha_{re}`, summing to one per slide); ``level``:
    ``expert`` (the expert of each patch's region, for territory maps). Extras: ``loads``
    (realised :math:`\sum_r D_{re}`, :math:`(B, E)`), ``plan_loads`` (:math:`\sum_r \Pi_{re}`,
    :math:`1/E` for OT), ``expert_weights`` :math:`\beta`, ``expert_mask``, ``embedding``.

    Args:
        in_channels (int): patch feature size :math:`D`.
        num_classes (int): number of classes :math:`C`.
        hidden_channels (int, optional): working width :math:`d`. (default: ``256``)
        num_experts (int, optional): :math:`E`. (default: ``8``)
        top_k (int, optional): experts per region in the dispatch. (default: ``2``)
        attention_channels (int, optional): hidden size of the expert scorers and of the
            fusion gate. (default: ``128``)
        router (str, optional): ``"ot"`` or ``"softmax"``. (default: ``"ot"``)
        epsilon (float, optional): :math:`\varepsilon`. (default: ``0.05``)
        num_iterations (int, optional): Sinkhorn projection pairs :math:`T`. (default: ``10``)
        smoothing (float, optional): :math:`\lambda`. (default: ``0.5``)
        smoothing_steps (int, optional): :math:`S`. (default: ``3``)
        routing_gnn (bool, optional): route on the GraphSAGE context (else on :math:`u`).
            (default: :obj:`True`)
        ot_guided_pooling (bool, optional): add :math:`\log D_{re}` to the expert attention.
            (default: :obj:`True`)
        detach_routing (bool, optional): detach :math:`D` before pooling. (default: :obj:`False`)
        dropout (float, optional): dropout of the projection and of the attention.
            (default: ``0.25``)
        level (str, optional): patch node type to read; ``None`` for the highest magnification
            present. (default: ``None``)

    Shapes:
        - **input:** slide graph(s) with ``x`` :math:`(N, D)` at ``level``, region nodes, the
          membership edges of ``level`` and the region graph
        - **output:** ``logits`` :math:`(B, C)`
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 256,
                 num_experts: int = 8, top_k: int = 2, attention_channels: int = 128,
                 router: str = "ot", epsilon: float = 0.05, num_iterations: int = 10,
                 smoothing: float = 0.5, smoothing_steps: int = 3, routing_gnn: bool = True,
                 ot_guided_pooling: bool = True, detach_routing: bool = False,
                 dropout: float = 0.25, level: Optional[str] = None):
        super().__init__(in_channels, num_classes, level)
        if router not in ROUTERS:
            raise ValueError(f"'router' must be one of {ROUTERS} (got '{router}')")
        self.hidden_channels = hidden_channels
        self.num_experts = num_experts
        self.routing_gnn = bool(routing_gnn)
        self.ot_guided_pooling = bool(ot_guided_pooling)
        self.detach_routing = bool(detach_routing)
        self.projection = nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.ReLU(),
                                        nn.Dropout(dropout))
        self.region_pooling = RegionPooling()
        self.context = RoutingContext(hidden_channels, num_layers=2) if self.routing_gnn else None
        self.router = OTRouter(hidden_channels, num_experts, top_k, router, epsilon,
                               num_iterations, smoothing, smoothing_steps)
        self.expert_pooling = ExpertAttentionPooling(hidden_channels, attention_channels,
                                                     num_experts, dropout)
        self.fusion = ExpertFusion(hidden_channels, attention_channels, dropout)
        self.classifier = nn.Linear(hidden_channels, num_classes)
        self.reset_parameters()

    def forward(self, batch: HeteroData) -> MILOutput:
        inp = self.level_input(batch)
        membership = member_edge(inp.level)
        if REGION not in batch.node_types or membership not in batch.edge_types:
            raise KeyError(f"ROAM needs region nodes and the membership edges {membership}: build "
                           "the graphs with a region partition (graph config 'regions')")
        if REGION_GRAPH not in batch.edge_types:
            raise KeyError(f"ROAM needs the region graph {REGION_GRAPH}: build the graphs with "
                           "RegionKNNGraph (graph config 'region_knn')")
        region_store = batch[REGION]
        num_regions = region_store.num_nodes
        region_batch = node_batch(batch, REGION)
        region_ptr = getattr(region_store, "ptr", None)
        graph = batch[REGION_GRAPH]
        edge_index = graph.edge_index
        edge_weight = getattr(graph, "edge_weight", None)

        h = self.projection(inp.x)
        region_of_patch = batch[membership].edge_index[1]
        content, mass = self.region_pooling(h, region_of_patch, dim_size=num_regions,
                                            return_mass=True)
        z = self.context(content, edge_index) if self.context is not None else content
        routing = self.router(z, mass, region_batch, edge_index, edge_weight,
                              num_graphs=inp.num_slides)
        dispatch = routing.dispatch.detach() if self.detach_routing else routing.dispatch
        pooled = self.expert_pooling(content, region_batch, ptr=region_ptr,
                                     dim_size=inp.num_slides, dispatch=dispatch,
                                     ot_guided=self.ot_guided_pooling)
        fused, expert_weights = self.fusion(pooled.out, pooled.mask)
        logits = self.classifier(fused)

        with torch.no_grad():
            region_expert = routing.dispatch.argmax(dim=-1)
            region_expert = torch.where(routing.row_marginals > 0, region_expert,
                                        torch.full_like(region_expert, -1))
            region_attention = (pooled.attention * expert_weights.index_select(0, region_batch)).sum(-1)
        output = MILOutput(logits, extras={
            "loads": routing.loads, "plan_loads": routing.plan_loads,
            "expert_weights": expert_weights, "expert_mask": pooled.mask, "embedding": fused})
        output.add_interpretation(REGION, "expert", region_expert)
        output.add_interpretation(REGION, "plan", routing.plan)
        output.add_interpretation(REGION, "dispatch", routing.dispatch)
        output.add_interpretation(REGION, "attention", region_attention)
        output.add_interpretation(inp.level, "expert", region_expert.index_select(0, region_of_patch))
        return output

    def __repr__(self) -> str:
        level = f", level='{self.level}'" if self.level is not None else ""
        switches = []
        if not self.routing_gnn:
            switches.append("routing_gnn=False")
        if not self.ot_guided_pooling:
            switches.append("ot_guided_pooling=False")
        if self.detach_routing:
            switches.append("detach_routing=True")
        extra = "".join(", " + s for s in switches)
        return (f"{self.__class__.__name__}({self.in_channels}, num_classes={self.num_classes}, "
                f"num_experts={self.num_experts}, top_k={self.router.top_k}, "
                f"router='{self.router.router}', smoothing={self.router.sinkhorn.smoothing}"
                f"{extra}{level})")
