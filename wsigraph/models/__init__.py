r"""Complete MIL models and the registry that builds them by name.

Importing this package registers every model; add a model family by importing its module
below.
"""
from wsigraph.models.base import MILModel, MILOutput, MODEL_REGISTRY, build_model, list_models, register_model

# Baselines
from wsigraph.models import pooling  # noqa: F401  mean_mil, max_mil
from wsigraph.models import abmil  # noqa: F401  abmil
from wsigraph.models import clam  # noqa: F401  clam_sb, clam_mb
from wsigraph.models import dsmil  # noqa: F401  dsmil
from wsigraph.models import transmil  # noqa: F401  transmil
from wsigraph.models import gnn  # noqa: F401  patch_gnn
from wsigraph.models import ainet  # noqa: F401  ainet
from wsigraph.models import roam  # noqa: F401  roam
from wsigraph.models import m2otca  # noqa: F401  m2otca
from wsigraph.models import zoommil  # noqa: F401  zoommil

from wsigraph.models.abmil import ABMIL
from wsigraph.models.clam import CLAMMB, CLAMSB
from wsigraph.models.dsmil import DSMIL
from wsigraph.models.gnn import PatchGNN
from wsigraph.models.pooling import MaxMIL, MeanMIL
from wsigraph.models.transmil import TransMIL

__all__ = [
    "MILModel", "MILOutput", "MODEL_REGISTRY", "build_model", "list_models", "register_model",
    "MeanMIL", "MaxMIL", "ABMIL", "CLAMSB", "CLAMMB", "DSMIL", "TransMIL", "PatchGNN",
]
from wsigraph.models.zoommil import ZoomMIL  # noqa: E402
__all__ += ["ZoomMIL"]
