"""Detection of optional compiled packages, done once at import (PyG's ``WITH_*`` pattern).

A wheel of ``torch-scatter`` / ``torch-cluster`` built against another torch fails to load
with an ``OSError`` rather than an ``ImportError``, so every failure disables the package.
"""
import warnings

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_scatter  # noqa: F401
    WITH_TORCH_SCATTER = True
except Exception:  # ImportError, or OSError for an ABI mismatch
    torch_scatter = None
    WITH_TORCH_SCATTER = False

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_cluster  # noqa: F401
    WITH_TORCH_CLUSTER = True
except Exception:
    torch_cluster = None
    WITH_TORCH_CLUSTER = False

__all__ = ["WITH_TORCH_SCATTER", "WITH_TORCH_CLUSTER", "torch_scatter", "torch_cluster"]
