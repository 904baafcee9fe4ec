r"""Entropic optimal transport layers (log-domain Sinkhorn), batched over slides."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from wsigraph.nn.functional.sinkhorn import sinkhorn_log, sinkhorn_log_flat

__all__ = ["GraphSinkhorn", "Sinkhorn"]


class GraphSinkhorn(torch.nn.Module):
    r"""Graph-smoothed entropic optimal transport between the nodes of each slide (rows) and
    :math:`E` columns (e.g. experts), in the log domain.

    For every slide, with cost :math:`C \in \mathbb{R}^{R \times E}`, row masses :math:`a`
    and column masses :math:`b` of equal total,

    .. math::
        \Pi = \operatorname*{arg\,min}_{\Pi \mathbf{1} = a,\ \Pi^\top \mathbf{1} = b}
        \langle \Pi, C \rangle - \varepsilon H(\Pi),

    computed by :math:`T` pairs of log-domain projections (rows, then columns) starting from
    :math:`\log \Pi = -C/\varepsilon`:

    .. math::
        \log \Pi_{re} \leftarrow \log \Pi_{re} + \log a_r
            - \operatorname{LSE}_{e'} \log \Pi_{re'}, \qquad
        \log \Pi_{re} \leftarrow \log \Pi_{re} + \log b_e
            - \operatorname{LSE}_{r'} \log \Pi_{r'e}.

    After each of the first :math:`S` pairs (never after the last) the log-plan is smoothed over
    the row graph with weights :math:`w_{rj}`,

    .. math::
        \log \Pi_{r\cdot} \leftarrow (1 - \lambda) \log \Pi_{r\cdot}
            + \lambda \sum_{j \in \mathcal{N}(r)} w_{rj} \log \Pi_{j\cdot},

    and the following projections restore the marginals: the column marginals hold exactly,
    the row marginals up to Sinkhorn's convergence after :math:`T` pairs. :math:`\lambda = 0`
    is exactly plain Sinkhorn. All slides are solved in one padded batched call, in float32
    with autocast disabled; gradients flow through the unrolled iterations.

    Args:
        epsilon (float, optional): entropic regularisation :math:`\varepsilon`.
            (default: ``0.05``)
        num_iterations (int, optional): projection pairs :math:`T`. (default: ``10``)
        smoothing (float, optional): smoothing strength :math:`\lambda`. (default: ``0.5``)
        smoothing_steps (int, optional): smoothed leading pairs :math:`S`. (default: ``3``)

    Shapes:
        - **input:** cost :math:`(N, E)`, row marginals :math:`(N)`, column marginals
          :math:`(B, E)` or :math:`(E)`, batch :math:`(N)`, edge index :math:`(2, M)` over the
          flat nodes (``source -> target``), edge weight :math:`(M)` (default :math:`1/\deg`)
        - **output:** plan :math:`(N, E)` (float32); rows of each slide sum to its :math:`a`,
          columns of each slide to its :math:`b`
    """
    def __init__(self, epsilon: float = 0.05, num_iterations: int = 10,
                 smoothing: float = 0.5, smoothing_steps: int = 3):
        super().__init__()
        if epsilon <= 0:
            raise ValueError(f"'epsilon' must be positive (got {epsilon})")
        if num_iterations < 1:
            raise ValueError(f"'num_iterations' must be >= 1 (got {num_iterations})")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"'smoothing' must lie in [0, 1] (got {smoothing})")
        self.epsilon = epsilon
        self.num_iterations = num_iterations
        self.smoothing = smoothing
        self.smoothing_steps = smoothing_steps

    def reset_parameters(self):
        r"""No learnable parameters."""

    def forward(
        self,
        cost: Tensor,
        row_marginals: Optional[Tensor],
        col_marginals: Optional[Tensor],
        batch: Optional[Tensor] = None,
        edge_index: Optional[Tensor] = None,
        edge_weight: Optional[Tensor] = None,
        num_graphs: Optional[int] = None,
        max_num_rows: Optional[int] = None,
        return_log: bool = False,
    ) -> Tensor:
        r"""
        Args:
            cost (torch.Tensor): :math:`(N, E)` cost of every row node to every column.
            row_marginals (torch.Tensor, optional): :math:`(N)` masses; uniform per slide if
                :obj:`None`.
            col_marginals (torch.Tensor, optional): :math:`(B, E)` or :math:`(E)`; uniform if
                :obj:`None`.
            batch (torch.Tensor, optional): :math:`(N)` sorted slide index.
            edge_index (torch.Tensor, optional): smoothing graph over the flat nodes.
            edge_weight (torch.Tensor, optional): its weights :math:`w_{rj}`.
            num_graphs (int, optional): :math:`B`, to avoid a host sync.
            max_num_rows (int, optional): largest slide's row count, to avoid a host sync.
            return_log (bool, optional): return :math:`\log \Pi` instead of :math:`\Pi`.
        """
        return sinkhorn_log_flat(
            cost, row_marginals, col_marginals, batch=batch, epsilon=self.epsilon,
            num_iterations=self.num_iterations, edge_index=edge_index,
            edge_weight=edge_weight, smoothing=self.smoothing,
            smoothing_steps=self.smoothing_steps, num_graphs=num_graphs,
            max_num_rows=max_num_rows, return_log=return_log)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(epsilon={self.epsilon}, "
                f"num_iterations={self.num_iterations}, smoothing={self.smoothing}, "
                f"smoothing_steps={self.smoothing_steps})")


class Sinkhorn(torch.nn.Module):
    r"""Batched log-domain entropic optimal transport on dense padded cost matrices.

    .. math::
        \Pi_b = \operatorname*{arg\,min}_{\Pi \mathbf{1} = a_b,\ \Pi^\top \mathbf{1} = b_b}
        \langle \Pi, C_b \rangle - \varepsilon H(\Pi), \qquad b = 1, \dots, B,

    by :math:`T` log-domain projection pairs (rows, then columns; see :class:`GraphSinkhorn`
    without smoothing). Suited to many small problems, e.g. matching :math:`m` reference
    prototypes to :math:`m` prototypes of another magnification with uniform marginals.

    Args:
        epsilon (float, optional): entropic regularisation :math:`\varepsilon`.
            (default: ``0.1``)
        num_iterations (int, optional): projection pairs :math:`T`. (default: ``20``)

    Shapes:
        - **input:** cost :math:`(B, R, E)`, row marginals :math:`(B, R)` (zero on padding),
          column marginals :math:`(B, E)` or :math:`(E)`, mask :math:`(B, R)` (optional; both
          marginals default to uniform)
        - **output:** plan :math:`(B, R, E)` (float32), zero on padded rows
    """
    def __init__(self, epsilon: float = 0.1, num_iterations: int = 20):
        super().__init__()
        if epsilon <= 0:
            raise ValueError(f"'epsilon' must be positive (got {epsilon})")
        if num_iterations < 1:
            raise ValueError(f"'num_iterations' must be >= 1 (got {num_iterations})")
        self.epsilon = epsilon
        self.num_iterations = num_iterations

    def reset_parameters(self):
        r"""No learnable parameters."""

    def forward(self, cost: Tensor, row_marginals: Optional[Tensor] = None,
                col_marginals: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                return_log: bool = False) -> Tensor:
        return sinkhorn_log(cost, row_marginals, col_marginals, epsilon=self.epsilon,
                            num_iterations=self.num_iterations, mask=mask,
                            return_log=return_log)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(epsilon={self.epsilon}, "
                f"num_iterations={self.num_iterations})")
