r"""Zooming along parent → child edges: from (soft or hard) selected parents to their children."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from wsigraph.nn.functional.perturbed_topk import TopKSelection
from wsigraph.nn.functional.zoom import gather_rows

__all__ = ["ZoomGather", "ZoomStack", "ZoomBag", "MISSING_CHILDREN"]

#: Treatments of missing children in :class:`ZoomGather`.
MISSING_CHILDREN = ("mask", "zero")


class ZoomStack(NamedTuple):
    r"""The descendants (at one deeper level) of every entry of a bag of :math:`V` entries.

    Attributes:
        index: ``[B, V, R]`` long node indices of the descendants, ``-1`` where missing. On the
            soft path, the descendants of each entry's most probable parent (for interpretation).
        valid: ``[B, V]`` bool, the entry is a real (selected) slot.
        mass: ``[B, V, R]`` float probability that the descendant exists (soft path; constant,
            exactly zero when no sampled parent has it), else ``None``.
        feature_sum: ``[B, V, R, D]`` existence-weighted descendant features (soft path), else
            ``None``.
        absent: ``[B, V, R]`` float probability that the descendant is missing, differentiable
            (soft path), else ``None``; the expected presence is ``valid - absent``.
    """
    index: Tensor
    valid: Tensor
    mass: Optional[Tensor] = None
    feature_sum: Optional[Tensor] = None
    absent: Optional[Tensor] = None


class ZoomBag(NamedTuple):
    r"""One level's bag of :math:`V` entries per slide, ready for that level's layers.

    Attributes:
        index: ``[B, V]`` node index of each entry (``-1``: missing child or unused slot).
        present: ``[B, V]`` bool, the entry takes part in attention and selection.
        log_prior: ``[B, V]`` additive attention log-prior (``-inf`` where not present).
        features: ``[B, V, D]`` features (soft path), or ``None`` when the caller reads the rows
            of ``index`` itself (hard path).
    """
    index: Tensor
    present: Tensor
    log_prior: Tensor
    features: Optional[Tensor] = None


class ZoomGather(torch.nn.Module):
    r"""Follows zoom edges from the selected parents to their children (ZoomMIL's
    :math:`(T \otimes I_r)\,X`).

    A bag holds :math:`V` entries per slide; entry :math:`n` has the descendants
    :math:`c(n, j)`, :math:`j = 0 .. R-1`, at a deeper level (its child table; ``-1`` where
    missing). Given a selection of :math:`K` slots over the entries:

    * soft (training, ``weights`` :math:`T \in [0,1]^{K \times V}`): slot :math:`k`'s descendant
      :math:`j` has features and expected presence

      .. math::
          \tilde{x}_{kj} = \frac{\sum_n T_{kn}\, m_{nj}\, x_{c(n,j)}}{\tilde{m}_{kj}}, \qquad
          \tilde{m}_{kj} = \sum_n T_{kn}\, m_{nj},

      with :math:`m_{nj} = 1` if the child exists, else 0 (``missing="mask"``); it enters the
      next level's softmaxes with the log-prior :math:`\log \tilde{m}_{kj}` (:math:`-\infty` when
      no sampled parent has that child). With ``missing="zero"`` (the public ports' behaviour)
      missing children are zero vectors with :math:`m_{nj} = 1`;
    * hard (evaluation): a gather of the selected parents' children.

    On a complete grid (every parent has all :math:`R` children) both reduce to the official
    ``kron(T, I_R) @ X`` with the descendants in depth-first order. Descendants further down are
    carried along (:class:`ZoomStack` with :math:`R = R_1 R_2 \cdots`) and regrouped per child
    with ``fanout``.

    Args:
        missing (str, optional): ``"mask"`` (missing children never receive attention or
            selection) or ``"zero"`` (zero-filled). (default: ``"mask"``)

    Shapes:
        - **input:** selection over :math:`V` entries (``index`` :math:`(B, K)`, ``weights``
          :math:`(B, K, V)` when soft); :class:`ZoomStack` with ``index`` :math:`(B, V, R)`
        - **output:** :class:`ZoomStack` with ``index`` :math:`(B, K f, R / f)`
    """

    def __init__(self, missing: str = "mask"):
        super().__init__()
        if missing not in MISSING_CHILDREN:
            raise ValueError(f"missing must be one of {MISSING_CHILDREN} (got '{missing}')")
        self.missing = missing

    def reset_parameters(self):
        pass

    def root(self, index: Tensor, valid: Tensor, x: Optional[Tensor] = None) -> ZoomStack:
        r"""The stack of a bag of real nodes: ``index`` ``[B, V, R]`` descendants (``-1``
        missing), ``valid`` ``[B, V]`` real entries, ``x`` ``[N, D]`` the descendants' level
        features (for the soft path; ``None`` for an index-only stack)."""
        if x is None:
            return ZoomStack(index, valid)
        valid_desc = valid.unsqueeze(-1).expand(index.shape)
        if self.missing == "mask":
            mass = (index >= 0).to(x.dtype)
            absent = ((index < 0) & valid_desc).to(x.dtype)
        else:
            mass = valid_desc.to(x.dtype)
            absent = torch.zeros_like(mass)
        return ZoomStack(index, valid, mass, gather_rows(x, index), absent)

    def forward(self, selection: TopKSelection, stack: ZoomStack, fanout: Optional[int] = None) -> ZoomStack:
        r"""Descendants of the selected slots, regrouped as ``fanout`` children per slot.

        Args:
            selection (TopKSelection): over the :math:`V` entries of the stack.
            stack (ZoomStack): descendants of every entry, :math:`R` per entry.
            fanout (int, optional): children per parent at the next level, a divisor of
                :math:`R` (default: :math:`R`, the next level itself).
        """
        batch_size, _, num_desc = stack.index.shape
        fanout = num_desc if fanout is None else int(fanout)
        if fanout < 1 or num_desc % fanout:
            raise ValueError(f"fanout {fanout} does not divide the {num_desc} descendants per entry")
        slots = selection.index.size(1)
        chosen = selection.index.clamp(min=0)
        valid = selection.valid
        index = stack.index.gather(1, chosen.unsqueeze(-1).expand(-1, -1, num_desc))
        index = torch.where(valid.unsqueeze(-1), index, index.new_full((), -1))
        mass = feature_sum = absent = None
        if stack.feature_sum is not None:
            if selection.weights is not None:
                weights = selection.weights.to(stack.feature_sum.dtype)
                # Existence (exact zeros) without gradient; its differentiable complement is
                # `absent`, identically zero on complete grids, so there the gradient is the
                # official kron form's.
                with torch.no_grad():
                    mass = torch.einsum("bkv,bvr->bkr", weights, stack.mass)
                absent = torch.einsum("bkv,bvr->bkr", weights, stack.absent)
                feature_sum = torch.einsum("bkv,bvrd->bkrd", weights, stack.feature_sum)
            else:
                keep = valid.to(stack.mass.dtype).unsqueeze(-1)
                rows = chosen.unsqueeze(-1).expand(-1, -1, num_desc)
                mass = stack.mass.gather(1, rows) * keep
                absent = stack.absent.gather(1, rows) * keep
                dim = stack.feature_sum.size(-1)
                feature_sum = stack.feature_sum.gather(
                    1, chosen.view(batch_size, slots, 1, 1).expand(-1, -1, num_desc, dim))
                feature_sum = feature_sum * keep.unsqueeze(-1)
        grouped = slots * fanout
        rest = num_desc // fanout
        index = index.reshape(batch_size, grouped, rest)
        valid = valid.repeat_interleave(fanout, dim=1)
        if mass is not None:
            mass = mass.reshape(batch_size, grouped, rest)
            absent = absent.reshape(batch_size, grouped, rest)
            feature_sum = feature_sum.reshape(batch_size, grouped, rest, -1)
        return ZoomStack(index, valid, mass, feature_sum, absent)

    def select_children(self, selection: TopKSelection, bag_index: Tensor,
                        children_of: Callable[[Tensor], Tensor]) -> ZoomStack:
        r"""Evaluation path: the children of the selected entries only.

        Args:
            selection (TopKSelection): hard selection over the bag's :math:`V` entries.
            bag_index (torch.Tensor): ``[B, V]`` node index of each entry (``-1``: none).
            children_of (callable): maps ``[B, K]`` parent node indices (``-1``: none) to their
                ``[B, K, R]`` children (``-1``: missing), e.g. a child-table lookup, or a feature
                source that links only these parents.

        Returns:
            ZoomStack: ``index`` :math:`(B, K R, 1)`, index-only.
        """
        parents = bag_index.gather(1, selection.index.clamp(min=0))
        parents = torch.where(selection.valid, parents, parents.new_full((), -1))
        children = children_of(parents)
        batch_size, slots, fanout = children.shape
        children = torch.where(selection.valid.unsqueeze(-1), children, children.new_full((), -1))
        return ZoomStack(children.reshape(batch_size, slots * fanout, 1),
                         selection.valid.repeat_interleave(fanout, dim=1))

    def bag(self, stack: ZoomStack) -> ZoomBag:
        r"""The next level's bag from a stack with one descendant per entry (:math:`R = 1`)."""
        if stack.index.size(-1) != 1:
            raise ValueError("bag() needs a stack with one descendant per entry; pass fanout to forward()")
        index = stack.index[..., 0]
        if stack.feature_sum is not None:
            present = stack.mass[..., 0] > 0
            features = stack.feature_sum[:, :, 0]
            tiny = torch.finfo(torch.float32).tiny
            if self.missing == "mask":
                expected = (stack.valid.float() - stack.absent[..., 0].float()).clamp_min(tiny)
                features = features / expected.unsqueeze(-1).to(features.dtype)
                log_prior = torch.where(present, expected.log(), expected.new_full((), float("-inf")))
            else:
                log_prior = torch.zeros(present.shape, device=index.device).masked_fill(~present, float("-inf"))
            return ZoomBag(index, present, log_prior, features)
        present = index >= 0 if self.missing == "mask" else stack.valid
        log_prior = torch.zeros(present.shape, device=index.device).masked_fill(~present, float("-inf"))
        return ZoomBag(index, present, log_prior, None)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(missing='{self.missing}')"
