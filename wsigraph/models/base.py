r"""The one model interface: ``model(batch) -> MILOutput``, and the model registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Type

import torch
from torch import Tensor, nn


@dataclass
class MILOutput:
    r"""What every MIL model returns for a batch of :math:`B` slides.

    Attributes:
        logits: ``[B, n_classes]`` slide logits.
        aux_loss: scalar auxiliary loss, already weighted (zero when the model has none);
            the trainer adds it to the cross-entropy of ``logits``.
        interpretation: node type → name → tensor with one row per node of that type
            (e.g. ``{"patch_20x": {"attention": [N]}, "region": {"expert": [R]}}``), so heatmap
            tools work for every model without special cases.
        extras: anything else worth keeping (routing plans, realised loads, level logits).
    """
    logits: Tensor
    aux_loss: Tensor = None
    interpretation: Dict[str, Dict[str, Tensor]] = field(default_factory=dict)
    extras: Dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.aux_loss is None:
            self.aux_loss = self.logits.new_zeros(())

    def add_interpretation(self, node_type: str, name: str, value: Tensor) -> None:
        self.interpretation.setdefault(node_type, {})[name] = value


class MILModel(nn.Module):
    r"""Base class of slide-level MIL models.

    Subclasses implement :meth:`forward` taking a (batched) :class:`SlideGraph` and returning a
    :class:`MILOutput`. :meth:`loss` gives the training objective; models with label-dependent
    auxiliary terms (CLAM's instance loss, AINet's region loss) read ``batch.y`` in ``forward``
    while training.
    """
    num_classes: int

    def loss(self, output: MILOutput, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        return nn.functional.cross_entropy(output.logits, target, weight=weight) + output.aux_loss

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()


MODEL_REGISTRY: Dict[str, Type[MILModel]] = {}


def register_model(name: str) -> Callable[[Type[MILModel]], Type[MILModel]]:
    r"""Class decorator adding a model to the registry under ``name``."""
    def wrap(cls: Type[MILModel]) -> Type[MILModel]:
        if name in MODEL_REGISTRY and MODEL_REGISTRY[name] is not cls:
            raise KeyError(f"Model name '{name}' is already registered")
        MODEL_REGISTRY[name] = cls
        cls.registry_name = name
        return cls
    return wrap


def build_model(name: str, **kwargs) -> MILModel:
    r"""Instantiate a registered model by name with keyword arguments from a config."""
    if name not in MODEL_REGISTRY:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise KeyError(f"Unknown model '{name}'. Registered models: {known}")
    return MODEL_REGISTRY[name](**kwargs)


def list_models():
    return sorted(MODEL_REGISTRY)
