r"""Readers for per-slide patch-feature files (CLAM / TRIDENT layouts) with validation.

Every problem found in a file is raised as :class:`SlideError`, which names the slide, the
file and the reason, so that a dataset build can either stop or skip the slide with a report.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]

#: Per-patch datasets picked up beside ``features`` when present (e.g. the synthetic cohort's
#: ground truth), stored on the patch nodes under the same name.
PATCH_ANNOTATIONS = ("lesion", "tissue")

#: File extensions searched for a slide, in order of preference.
FEATURE_EXTENSIONS = (".h5", ".hdf5", ".pt")


class SlideError(Exception):
    r"""A slide that cannot be used, with the slide id, the file and the reason."""

    def __init__(self, slide_id: str, path: Optional[PathLike], reason: str):
        self.slide_id = str(slide_id)
        self.path = str(path) if path is not None else ""
        self.reason = reason
        where = f" ({self.path})" if self.path else ""
        super().__init__(f"slide '{self.slide_id}'{where}: {reason}")

    def __reduce__(self):  # keep the fields when raised in a worker process
        return (SlideError, (self.slide_id, self.path, self.reason))


@dataclass
class SlideLevel:
    r"""The patches of one slide at one magnification, as read from disk.

    Attributes:
        magnification: objective magnification of the patches (e.g. 20.0).
        features: ``[N, D]`` float32 patch features.
        coords: ``[N, 2]`` int64 top-left corners in level-0 pixels.
        patch_size: patch side in level-0 pixels.
        path: the file read.
        annotations: optional per-patch arrays (``lesion``, ``tissue``) of length N.
    """
    magnification: float
    features: np.ndarray
    coords: np.ndarray
    patch_size: float
    path: str
    annotations: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_patches(self) -> int:
        return int(self.coords.shape[0])


def find_feature_file(directory: PathLike, slide_id: str) -> Optional[Path]:
    r"""The feature file of ``slide_id`` in ``directory`` (``.h5``/``.hdf5``/``.pt``), or ``None``.

    CLAM keeps ``h5_files/`` and ``pt_files/`` below its feature directory: both are searched.
    """
    directory = Path(directory)
    for folder in (directory, directory / "h5_files", directory / "pt_files"):
        for ext in FEATURE_EXTENSIONS:
            candidate = folder / f"{slide_id}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _attr(attrs: Mapping, name: str):
    value = attrs.get(name)
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value in ("None", ""):
        return None
    return value


def _patch_size_from_attrs(*attribute_sets: Mapping) -> Optional[float]:
    r"""Level-0 patch side: TRIDENT's ``patch_size_level0``, else CLAM's ``patch_size × downsample``."""
    for attrs in attribute_sets:
        value = _attr(attrs, "patch_size_level0")
        if value is not None:
            return float(value)
    for attrs in attribute_sets:
        size = _attr(attrs, "patch_size")
        downsample = _attr(attrs, "downsample")
        if size is not None and downsample is not None:
            factor = float(np.atleast_1d(np.asarray(downsample, dtype=np.float64))[0])
            custom = _attr(attrs, "custom_downsample") or 1
            return float(size) * factor * float(custom)
    return None


def _infer_patch_size(coords: np.ndarray) -> Optional[float]:
    # Last resort for files without geometry attributes: the lattice step, i.e. the most common
    # positive gap between neighbouring x coordinates on a row.
    if len(coords) < 2:
        return None
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    sorted_coords = coords[order]
    same_row = sorted_coords[1:, 1] == sorted_coords[:-1, 1]
    gaps = np.diff(sorted_coords[:, 0])[same_row]
    gaps = gaps[gaps > 0]
    if gaps.size == 0:
        return None
    values, counts = np.unique(gaps, return_counts=True)
    return float(values[np.argmax(counts)])


def _read_h5(path: Path, slide_id: str):
    import h5py
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise SlideError(slide_id, path, f"cannot open the HDF5 file (truncated or corrupt?): {error}") from None
    with handle:
        if "features" not in handle:
            raise SlideError(slide_id, path, "no 'features' dataset in the file")
        try:
            features = np.asarray(handle["features"][()])
            coords = np.asarray(handle["coords"][()]) if "coords" in handle else None
        except (OSError, KeyError, RuntimeError) as error:
            raise SlideError(slide_id, path, f"cannot read the datasets (truncated file?): {error}") from None
        attribute_sets = [dict(handle["coords"].attrs)] if coords is not None else []
        attribute_sets += [dict(handle["features"].attrs), dict(handle.attrs)]
        annotations = {}
        for name in PATCH_ANNOTATIONS:
            if name in handle:
                annotations[name] = np.asarray(handle[name][()])
    return features, coords, attribute_sets, annotations


def _read_pt(path: Path, slide_id: str):
    import torch
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle / zip errors of a truncated file
        raise SlideError(slide_id, path, f"cannot load the .pt file (truncated or corrupt?): {error}") from None
    if isinstance(loaded, dict):
        loaded = loaded.get("features", loaded.get("feature"))
    if not isinstance(loaded, torch.Tensor):
        raise SlideError(slide_id, path, "the .pt file holds no feature tensor")
    return loaded.float().numpy(), None, [], {}


def _read_coords_file(path: Path, slide_id: str):
    import h5py
    try:
        with h5py.File(path, "r") as handle:
            if "coords" not in handle:
                raise SlideError(slide_id, path, "no 'coords' dataset in the coordinates file")
            return np.asarray(handle["coords"][()]), [dict(handle["coords"].attrs), dict(handle.attrs)]
    except OSError as error:
        raise SlideError(slide_id, path, f"cannot open the coordinates file (truncated or corrupt?): {error}") from None


def read_slide_level(path: PathLike, slide_id: str, magnification: float,
                     patch_size: Optional[float] = None,
                     coords_dir: Optional[PathLike] = None) -> SlideLevel:
    r"""Read and validate one slide's patches at one magnification.

    Args:
        path: a CLAM/TRIDENT feature ``.h5`` or a CLAM ``.pt`` feature tensor.
        slide_id: used in error messages.
        magnification: the magnification of this file (from the config).
        patch_size: level-0 patch side overriding the files' attributes.
        coords_dir: directory of CLAM patch files (``{slide_id}.h5`` with ``coords`` and their
            ``patch_size``/``downsample`` attributes), needed for ``.pt`` features and for CLAM
            feature ``.h5`` files, which carry no attributes.

    Raises:
        SlideError: on any problem with the files, naming the slide, file and reason.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideError(slide_id, path, f"the {magnification:g}x feature file is missing")
    if path.suffix == ".pt":
        features, coords, attribute_sets, annotations = _read_pt(path, slide_id)
    else:
        features, coords, attribute_sets, annotations = _read_h5(path, slide_id)

    if coords_dir is not None:
        coords_path = Path(coords_dir) / f"{slide_id}.h5"
        if coords_path.is_file():
            patch_coords, patch_attrs = _read_coords_file(coords_path, slide_id)
            if coords is None:
                coords = patch_coords
            attribute_sets = attribute_sets + patch_attrs
    if coords is None:
        raise SlideError(slide_id, path, "no 'coords' for the features (give the CLAM patch directory as coords_dir)")

    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise SlideError(slide_id, path, f"'features' must be [N, D] or [1, N, D], got shape {tuple(features.shape)}")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise SlideError(slide_id, path, f"'coords' must be [N, 2], got shape {tuple(coords.shape)}")
    if features.shape[0] != coords.shape[0]:
        raise SlideError(slide_id, path, f"N mismatch: {features.shape[0]} feature rows but {coords.shape[0]} coordinates "
                                         "(an interrupted extraction?)")
    if features.shape[0] == 0:
        raise SlideError(slide_id, path, "empty bag: the file has 0 patches")
    if not np.issubdtype(features.dtype, np.number) or not np.issubdtype(coords.dtype, np.number):
        raise SlideError(slide_id, path, f"non-numeric data (features {features.dtype}, coords {coords.dtype})")
    # fp16/bf16 features (TRIDENT) are cast; statistics in half precision overflow easily.
    features = np.ascontiguousarray(features, dtype=np.float32)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise SlideError(slide_id, path, f"{int(bad.sum())} patch(es) with NaN/Inf features (first row {int(np.argmax(bad))})")
    if not np.isfinite(coords).all():
        raise SlideError(slide_id, path, "NaN/Inf coordinates")
    coords = np.ascontiguousarray(np.rint(coords), dtype=np.int64)
    unique = np.unique(coords, axis=0)
    if unique.shape[0] != coords.shape[0]:
        raise SlideError(slide_id, path, f"{coords.shape[0] - unique.shape[0]} duplicate coordinate(s)")
    for name, values in list(annotations.items()):
        if values.shape[0] != coords.shape[0]:
            raise SlideError(slide_id, path, f"'{name}' has {values.shape[0]} rows for {coords.shape[0]} patches")
        annotations[name] = np.asarray(values).astype(np.int64)

    size = patch_size if patch_size is not None else _patch_size_from_attrs(*attribute_sets)
    if size is None:
        size = _infer_patch_size(coords)
    if size is None or not np.isfinite(size) or size <= 0:
        raise SlideError(slide_id, path, "unknown patch size in level-0 pixels: the file has no 'patch_size_level0' "
                                         "(or 'patch_size' and 'downsample') attribute; set it in the config")
    return SlideLevel(float(magnification), features, coords, float(size), str(path), annotations)


def read_slide(slide_id: str, feature_dirs: Mapping[float, PathLike],
               patch_sizes: Optional[Mapping[float, float]] = None,
               coords_dirs: Optional[Mapping[float, PathLike]] = None) -> Sequence[SlideLevel]:
    r"""Read every magnification of a slide, ordered low → high.

    Raises:
        SlideError: when a magnification's file is missing or invalid, or the levels disagree.
    """
    levels = []
    for magnification in sorted(feature_dirs, key=float):
        directory = feature_dirs[magnification]
        path = find_feature_file(directory, slide_id)
        if path is None:
            raise SlideError(slide_id, Path(directory) / f"{slide_id}.h5",
                             f"missing magnification {float(magnification):g}x: no feature file in {directory}")
        size = (patch_sizes or {}).get(magnification)
        coords_dir = (coords_dirs or {}).get(magnification)
        levels.append(read_slide_level(path, slide_id, float(magnification), size, coords_dir))
    for low, high in zip(levels[:-1], levels[1:]):
        if high.patch_size > low.patch_size:
            raise SlideError(slide_id, high.path,
                             f"the {high.magnification:g}x patches ({high.patch_size:g} px at level 0) are larger than "
                             f"the {low.magnification:g}x patches ({low.patch_size:g} px): magnification metadata disagrees")
    return levels
