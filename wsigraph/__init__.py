"""wsigraph: multi-level spatial slide graphs and batched graph MIL layers for whole-slide images."""
__version__ = "0.1.0"

from wsigraph.typing import WITH_TORCH_CLUSTER, WITH_TORCH_SCATTER  # noqa: E402

__all__ = ["__version__", "WITH_TORCH_CLUSTER", "WITH_TORCH_SCATTER"]
