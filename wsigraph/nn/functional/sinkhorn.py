r"""Batched log-domain entropic optimal transport (Sinkhorn) with optional graph smoothing.

Two layouts are supported:

* **dense padded** (:func:`sinkhorn_log`): ``cost`` ``[B, R, E]`` with row marginals ``[B, R]``
  and column marginals ``[B, E]``; rows (or columns) with zero marginal mass are padding and
  receive exactly zero mass in the plan. This is the layout of region-to-expert routing after
  :func:`torch_geometric.utils.to_dense_batch` and of the small ``m x m`` prototype matching.
* **flat** (:func:`sinkhorn_log_flat`): rows are the nodes of a PyG disjoint union, ``cost``
  ``[N, E]`` with a ``batch`` vector; converted to the padded layout and back.

All arithmetic runs in float32 (float64 inputs stay float64, for gradient checks) with autocast
disabled: the potentials are sums of terms of size :math:`C/\varepsilon` where half precision
loses the plan entirely.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# Stand-in for log(0). Finite, so that padded rows never produce ``-inf - (-inf) = nan`` in the
# forward pass or ``0 * inf`` in the backward pass, and so negative that ``exp`` of anything
# near it is exactly zero in float32 and float64: padded rows drop out of every logsumexp.
LOG_ZERO = -1e30

__all__ = [
    "LOG_ZERO",
    "sinkhorn_log",
    "sinkhorn_log_flat",
    "padded_row_index",
    "plan_marginals",
    "smooth_log_plan",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe_log(mass: Tensor) -> Tensor:
    # log(mass) with zero mass mapped to LOG_ZERO; the inner where keeps the gradient at
    # zero-mass entries finite (log'(1) instead of log'(0)).
    positive = mass > 0
    log_mass = torch.log(torch.where(positive, mass, torch.ones_like(mass)))
    return torch.where(positive, log_mass, torch.full_like(log_mass, LOG_ZERO))


def smooth_log_plan(log_plan: Tensor, edge_index: Tensor, edge_weight: Tensor,
                    smoothing: float) -> Tensor:
    r"""One graph-smoothing step of a log-plan over its rows.

    .. math::
        \log \Pi_{r\cdot} \leftarrow (1 - \lambda) \log \Pi_{r\cdot}
        + \lambda \sum_{j \in \mathcal{N}(r)} w_{rj} \log \Pi_{j\cdot}

    Messages flow from ``edge_index[0]`` (source :math:`j`) to ``edge_index[1]`` (target
    :math:`r`), PyG's ``source_to_target`` convention. A row without incoming edges is scaled by
    :math:`1 - \lambda`. Computed with a gather and an ``index_add`` (no matmul, so TF32 settings
    never reach it).

    Args:
        log_plan (torch.Tensor): ``[num_rows, E]`` log-plan (any leading layout flattened).
        edge_index (torch.Tensor): ``[2, num_edges]`` row indices into ``log_plan``.
        edge_weight (torch.Tensor): ``[num_edges]`` weights :math:`w_{rj}`.
        smoothing (float): :math:`\lambda`.
    """
    source, target = edge_index[0], edge_index[1]
    messages = log_plan.index_select(0, source) * edge_weight.unsqueeze(-1)
    neighbour_sum = torch.zeros_like(log_plan).index_add_(0, target, messages)
    return torch.lerp(log_plan, neighbour_sum, smoothing)


def _row_normalised_weight(edge_index: Tensor, num_rows: int, dtype: torch.dtype) -> Tensor:
    target = edge_index[1]
    ones = torch.ones(target.numel(), dtype=dtype, device=target.device)
    degree = torch.zeros(num_rows, dtype=dtype, device=target.device).index_add_(0, target, ones)
    return ones / degree.clamp_min(1).index_select(0, target)


def sinkhorn_log(
    cost: Tensor,
    row_marginals: Optional[Tensor] = None,
    col_marginals: Optional[Tensor] = None,
    epsilon: float = 0.05,
    num_iterations: int = 10,
    mask: Optional[Tensor] = None,
    edge_index: Optional[Tensor] = None,
    edge_weight: Optional[Tensor] = None,
    smoothing: float = 0.0,
    smoothing_steps: int = 0,
    return_log: bool = False,
) -> Tensor:
    r"""Batched entropic OT in the log domain, optionally graph-smoothed, on a padded layout.

    Solves, for every batch element independently,

    .. math::
        \Pi^\star = \operatorname*{arg\,min}_{\Pi \geq 0,\ \Pi \mathbf{1} = a,\
        \Pi^\top \mathbf{1} = b} \langle \Pi, C \rangle - \varepsilon H(\Pi)

    by ``num_iterations`` projection pairs on the log-plan
    :math:`L = -C/\varepsilon + f\mathbf{1}^\top + \mathbf{1}g^\top`,

    .. math::
        f_r \leftarrow \log a_r - \operatorname{LSE}_e (L_{re} - f_r), \qquad
        g_e \leftarrow \log b_e - \operatorname{LSE}_r (L_{re} - g_e),

    rows first, then columns, so after the last pair the column marginals hold exactly and the
    row marginals up to Sinkhorn's convergence. If ``smoothing`` :math:`\lambda > 0` and a graph
    over the rows is given, the log-plan is smoothed after each of the first ``smoothing_steps``
    pairs (see :func:`smooth_log_plan`) and the smoothed log-plan becomes the new kernel of the
    following projections. Smoothing is never applied after the last pair (the last operation is
    always a projection pair), so ``smoothing_steps`` is effectively
    :math:`\min(S, T - 1)`. With :math:`\lambda = 0` (or no graph) the computation is exactly
    plain Sinkhorn. Gradients flow through the unrolled iterations.

    Rows with zero row marginal (padding) and columns with zero column marginal get exactly
    zero mass; they do not influence the other rows and columns.

    Args:
        cost (torch.Tensor): ``[B, R, E]`` cost matrices.
        row_marginals (torch.Tensor, optional): ``[B, R]`` row masses :math:`a` (zero on padded
            rows). Uniform over the rows in ``mask`` if :obj:`None`.
        col_marginals (torch.Tensor, optional): ``[B, E]`` (or ``[E]``, shared) column masses
            :math:`b` with the same total as :math:`a`. Uniform if :obj:`None`.
        epsilon (float): entropic regularisation :math:`\varepsilon`. (default: ``0.05``)
        num_iterations (int): number :math:`T \geq 1` of projection pairs. (default: ``10``)
        mask (torch.Tensor, optional): ``[B, R]`` bool, :obj:`True` on real rows. Padded rows get
            zero row mass and their cost entries are ignored (they may hold anything, even
            ``inf``).
        edge_index (torch.Tensor, optional): ``[2, M]`` smoothing graph over the rows, indices
            into the **padded** flattened layout, i.e. row ``r`` of batch element ``b`` is
            ``b * R + r`` (see :func:`padded_row_index`; :func:`sinkhorn_log_flat` takes flat
            node indices instead).
        edge_weight (torch.Tensor, optional): ``[M]`` weights :math:`w_{rj}`; if :obj:`None`,
            :math:`1/\deg(r)` (mean over the neighbours).
        smoothing (float): :math:`\lambda \in [0, 1]`. (default: ``0.0``)
        smoothing_steps (int): :math:`S`, number of leading pairs followed by a smoothing step.
            (default: ``0``)
        return_log (bool): return the log-plan (``LOG_ZERO``-scale values on padding) instead
            of the plan. (default: :obj:`False`)

    Returns:
        torch.Tensor: ``[B, R, E]`` plan (or log-plan) in float32 (float64 for float64 input).
    """
    if cost.dim() != 3:
        raise ValueError(f"'cost' must have shape [B, R, E] (got {tuple(cost.shape)})")
    if num_iterations < 1:
        raise ValueError(f"'num_iterations' must be >= 1 (got {num_iterations})")
    if epsilon <= 0:
        raise ValueError(f"'epsilon' must be positive (got {epsilon})")
    batch_size, num_rows, num_cols = cost.shape
    dtype = _compute_dtype(cost.dtype)

    with torch.autocast(device_type=cost.device.type, enabled=False):
        cost = cost.to(dtype)
        if mask is not None:
            cost = cost.masked_fill(~mask.unsqueeze(-1), 0.0)

        if row_marginals is None:
            if mask is None:
                row_marginals = cost.new_full((batch_size, num_rows), 1.0 / max(num_rows, 1))
            else:
                counts = mask.sum(-1, keepdim=True).clamp_min(1).to(dtype)
                row_marginals = mask.to(dtype) / counts
        else:
            row_marginals = row_marginals.to(dtype)
            if mask is not None:
                row_marginals = row_marginals * mask.to(dtype)
        if col_marginals is None:
            col_marginals = cost.new_full((batch_size, num_cols), 1.0 / max(num_cols, 1))
        else:
            col_marginals = col_marginals.to(dtype).expand(batch_size, num_cols)

        log_a = _safe_log(row_marginals).unsqueeze(-1)  # [B, R, 1]
        log_b = _safe_log(col_marginals).unsqueeze(-2)  # [B, 1, E]

        use_smoothing = (edge_index is not None and edge_index.numel() > 0
                         and smoothing != 0 and smoothing_steps > 0)
        if use_smoothing:
            if edge_weight is None:
                edge_weight = _row_normalised_weight(edge_index, batch_size * num_rows, dtype)
            else:
                edge_weight = edge_weight.to(dtype)
            num_smoothed = min(int(smoothing_steps), num_iterations - 1)
        else:
            num_smoothed = 0

        # The kernel is -C/eps until a smoothing step replaces it by the smoothed log-plan;
        # the potentials f, g are then relative to the new kernel.
        log_kernel = cost / (-epsilon)
        g = None
        f = None
        for step in range(num_iterations):
            row_logits = log_kernel if g is None else log_kernel + g
            f = log_a - torch.logsumexp(row_logits, dim=-1, keepdim=True)
            g = log_b - torch.logsumexp(log_kernel + f, dim=-2, keepdim=True)
            if step < num_smoothed:
                log_plan = (log_kernel + f + g).reshape(batch_size * num_rows, num_cols)
                log_plan = smooth_log_plan(log_plan, edge_index, edge_weight, smoothing)
                log_kernel = log_plan.view(batch_size, num_rows, num_cols)
                g = None

        log_plan = log_kernel + f + g
    return log_plan if return_log else log_plan.exp()


def padded_row_index(batch: Tensor, num_graphs: int, max_num_rows: Optional[int] = None,
                     ptr: Optional[Tensor] = None) -> Tuple[Tensor, int]:
    r"""Position of every flat node in the padded ``[num_graphs * max_num_rows]`` layout.

    Node :math:`i` of slide :math:`b` (its :math:`k`-th node) goes to ``b * max_num_rows + k``,
    the layout of :func:`torch_geometric.utils.to_dense_batch`. ``batch`` must be sorted.

    Args:
        batch (torch.Tensor): ``[N]`` sorted slide index of every node.
        num_graphs (int): number of slides :math:`B`.
        max_num_rows (int, optional): padded size :math:`R`; computed (one host sync) if
            :obj:`None`. Must be at least the largest slide.
        ptr (torch.Tensor, optional): ``[B + 1]`` CSR offsets of ``batch``, if at hand.

    Returns:
        (torch.Tensor, int): ``[N]`` padded positions and :math:`R`.
    """
    if ptr is None:
        counts = torch.zeros(num_graphs, dtype=torch.long, device=batch.device)
        counts.index_add_(0, batch, torch.ones_like(batch))
        ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    else:
        counts = ptr[1:] - ptr[:-1]
    if max_num_rows is None:
        max_num_rows = int(counts.max()) if num_graphs > 0 and batch.numel() > 0 else 0
    position = torch.arange(batch.numel(), device=batch.device) - ptr.index_select(0, batch)
    return batch * max_num_rows + position, max_num_rows


def sinkhorn_log_flat(
    cost: Tensor,
    row_marginals: Optional[Tensor],
    col_marginals: Optional[Tensor],
    batch: Optional[Tensor] = None,
    epsilon: float = 0.05,
    num_iterations: int = 10,
    edge_index: Optional[Tensor] = None,
    edge_weight: Optional[Tensor] = None,
    smoothing: float = 0.0,
    smoothing_steps: int = 0,
    num_graphs: Optional[int] = None,
    max_num_rows: Optional[int] = None,
    ptr: Optional[Tensor] = None,
    return_log: bool = False,
) -> Tensor:
    r""":func:`sinkhorn_log` for rows given as the flat nodes of a batch of slides.

    The rows of slide :math:`b` are the nodes with ``batch == b``; they are scattered into a
    padded ``[B, R, E]`` tensor, solved jointly, and gathered back.

    Args:
        cost (torch.Tensor): ``[N, E]`` cost of every row node to every column.
        row_marginals (torch.Tensor, optional): ``[N]`` row masses (each slide's total equal to
            its column total); uniform within each slide if :obj:`None`.
        col_marginals (torch.Tensor, optional): ``[B, E]`` or ``[E]`` column masses; uniform if
            :obj:`None`.
        batch (torch.Tensor, optional): ``[N]`` sorted slide index; one slide if :obj:`None`.
        edge_index (torch.Tensor, optional): ``[2, M]`` smoothing graph over the flat nodes
            (global node indices, ``source -> target``).
        edge_weight (torch.Tensor, optional): ``[M]`` smoothing weights.
        num_graphs (int, optional): :math:`B`; ``batch.max() + 1`` (a host sync) if :obj:`None`.
        max_num_rows (int, optional): largest slide size; computed if :obj:`None`.
        ptr (torch.Tensor, optional): ``[B + 1]`` CSR offsets of ``batch``.

        Other arguments as in :func:`sinkhorn_log`.

    Returns:
        torch.Tensor: ``[N, E]`` plan (or log-plan) rows of the flat nodes.
    """
    num_nodes, num_cols = cost.shape
    if batch is None:
        batch = torch.zeros(num_nodes, dtype=torch.long, device=cost.device)
        num_graphs = 1
    if num_graphs is None:
        num_graphs = int(batch.max()) + 1 if num_nodes > 0 else 0
    index, max_num_rows = padded_row_index(batch, num_graphs, max_num_rows, ptr)
    size = num_graphs * max_num_rows

    dtype = _compute_dtype(cost.dtype)
    dense_cost = cost.new_zeros(size, num_cols, dtype=dtype).index_copy(0, index, cost.to(dtype))
    mask = torch.zeros(size, dtype=torch.bool, device=cost.device).index_fill_(0, index, True)
    mask = mask.view(num_graphs, max_num_rows)
    dense_rows = None
    if row_marginals is not None:
        dense_rows = cost.new_zeros(size, dtype=dtype).index_copy(0, index,
                                                                  row_marginals.to(dtype))
        dense_rows = dense_rows.view(num_graphs, max_num_rows)
    padded_edge_index = None if edge_index is None else index[edge_index]

    plan = sinkhorn_log(
        dense_cost.view(num_graphs, max_num_rows, num_cols), dense_rows, col_marginals,
        epsilon=epsilon, num_iterations=num_iterations, mask=mask,
        edge_index=padded_edge_index, edge_weight=edge_weight, smoothing=smoothing,
        smoothing_steps=smoothing_steps, return_log=return_log)
    return plan.reshape(size, num_cols).index_select(0, index)


def plan_marginals(plan: Tensor, batch: Optional[Tensor] = None,
                   num_graphs: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    r"""Realised row and column marginals of a plan.

    Args:
        plan (torch.Tensor): ``[B, R, E]`` dense plan, or ``[N, E]`` flat plan with ``batch``.
        batch (torch.Tensor, optional): ``[N]`` slide index for a flat plan.
        num_graphs (int, optional): :math:`B` for a flat plan (computed if :obj:`None`).

    Returns:
        (torch.Tensor, torch.Tensor): row sums (``[B, R]`` or ``[N]``) and column sums
        ``[B, E]``.
    """
    if plan.dim() == 3:
        return plan.sum(-1), plan.sum(-2)
    if batch is None:
        return plan.sum(-1), plan.sum(0, keepdim=True)
    if num_graphs is None:
        num_graphs = int(batch.max()) + 1 if batch.numel() > 0 else 0
    columns = plan.new_zeros(num_graphs, plan.size(-1)).index_add_(0, batch, plan)
    return plan.sum(-1), columns
