r"""The dataset described by a config's ``data`` and ``graph`` sections."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Optional

from wsigraph.data.dataset import SlideGraphDataset


def _magnification_map(mapping: Optional[Mapping], what: str):
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping):
        raise ValueError(f"data.{what} must map magnification → value, e.g. {{20: feats/20x}}")
    return {float(str(m).rstrip("xX")): v for m, v in mapping.items()}


def dataset_from_config(config: Mapping[str, Any], progress: bool = True) -> SlideGraphDataset:
    r"""Build (or load from the cache) the dataset of a config.

    ``data.synthetic`` (a mapping of :class:`~wsigraph.data.synthetic.SyntheticCohort` arguments)
    writes a synthetic cohort into ``{data.root}/cohort`` on first use and reads it from there;
    otherwise ``data.labels`` and ``data.features`` name the real files. Graphs are cached in
    ``{data.root}/graphs/<hash of the graph settings>``.
    """
    from wsigraph.transforms import graph_transform  # transforms import wsigraph.data: import late

    data_config = dict(config.get("data", {}))
    root = Path(data_config.get("root", "data"))
    transform = graph_transform(config.get("graph"))
    synthetic = data_config.get("synthetic")
    real = "labels" in data_config or "features" in data_config
    if synthetic is not None and not real:
        from wsigraph.data.synthetic import SyntheticCohort
        generator = SyntheticCohort(**dict(synthetic))
        cohort = Path(generator.write(root / "cohort"))
        labels = cohort / "labels.csv"
        features = {float(m): cohort / d for m, d in generator.feature_dirs.items()}
    else:
        if "labels" not in data_config or "features" not in data_config:
            raise ValueError("the config needs data.labels and data.features (or data.synthetic)")
        labels = data_config["labels"]
        features = _magnification_map(data_config["features"], "features")
    cache = root / "graphs" / hashlib.sha256(repr(transform).encode()).hexdigest()[:12]
    return SlideGraphDataset(
        cache, labels, features, classes=data_config.get("classes"), pre_transform=transform,
        patch_sizes=_magnification_map(data_config.get("patch_sizes"), "patch_sizes"),
        coords_dirs=_magnification_map(data_config.get("coords_dirs"), "coords_dirs"),
        on_error=data_config.get("on_error", "raise"), num_workers=int(data_config.get("num_workers", 0)),
        progress=progress)
