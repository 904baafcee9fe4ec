import os

import h5py
import numpy as np
import pytest
import torch

from conftest import lattice, write_h5
from wsigraph.data.readers import SlideError, read_slide, read_slide_level


def slide_file(tmp_path, name="s1", n=12, dim=5, **kwargs):
    coords = lattice((10, 20), 256, 4, 3)[:n]
    features = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    path = str(tmp_path / f"{name}.h5")
    write_h5(path, kwargs.pop("features", features), kwargs.pop("coords", coords),
             kwargs.pop("attrs", {"patch_size_level0": 256}), kwargs.pop("extra", None))
    return path


def test_trident_layout_half_precision_and_3d(tmp_path):
    features = np.random.default_rng(0).normal(size=(1, 12, 5)).astype(np.float16)
    path = slide_file(tmp_path, features=features, extra={"lesion": np.zeros(12, np.uint8)})
    level = read_slide_level(path, "s1", 20)
    assert level.features.dtype == np.float32 and level.features.shape == (12, 5)
    assert np.allclose(level.features, features[0].astype(np.float32))
    assert level.coords.dtype == np.int64 and level.patch_size == 256
    assert level.annotations["lesion"].shape == (12,)


def test_clam_feature_h5_takes_geometry_from_patch_file(tmp_path):
    # CLAM's feature h5 carries no attributes; its patch h5 has patch_size and downsample.
    coords = lattice((0, 0), 512, 4, 3)
    path = slide_file(tmp_path, coords=coords, attrs={})
    patches = tmp_path / "patches"
    write_h5(str(patches / "s1.h5"), np.zeros((12, 1)), coords, {"patch_size": 256, "downsample": (2.0, 2.0)})
    level = read_slide_level(path, "s1", 20, coords_dir=patches)
    assert level.patch_size == 512


def test_clam_pt_features_with_coords_from_patch_file(tmp_path):
    coords = lattice((0, 0), 256, 4, 3)
    features = torch.randn(12, 7)
    torch.save(features, tmp_path / "s1.pt")
    patches = tmp_path / "patches"
    write_h5(str(patches / "s1.h5"), np.zeros((12, 1)), coords, {"patch_size": 256, "downsample": (1.0, 1.0)})
    level = read_slide_level(tmp_path / "s1.pt", "s1", 20, coords_dir=patches)
    assert torch.allclose(torch.from_numpy(level.features), features)
    assert (level.coords == coords).all() and level.patch_size == 256


def test_config_patch_size_overrides_and_lattice_inference(tmp_path):
    path = slide_file(tmp_path, attrs={})
    assert read_slide_level(path, "s1", 20, patch_size=300).patch_size == 300
    assert read_slide_level(path, "s1", 20).patch_size == 256  # inferred from the lattice step


def expect_error(match, *args, **kwargs):
    with pytest.raises(SlideError, match=match) as info:
        read_slide_level(*args, **kwargs)
    assert info.value.slide_id == "s1" and "s1" in str(info.value)
    return info.value


def test_truncated_file(tmp_path):
    path = slide_file(tmp_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 3)
    error = expect_error("truncated or corrupt", path, "s1", 20)
    assert error.path == path


def test_garbage_file(tmp_path):
    path = tmp_path / "s1.h5"
    path.write_bytes(b"not an hdf5 file at all")
    expect_error("cannot open", path, "s1", 20)


def test_missing_datasets(tmp_path):
    path = str(tmp_path / "s1.h5")
    with h5py.File(path, "w") as handle:
        handle["coords"] = lattice((0, 0), 256, 2, 2)
    expect_error("no 'features'", path, "s1", 20)
    with h5py.File(path, "w") as handle:
        handle["features"] = np.zeros((4, 3), np.float32)
    expect_error("no 'coords'", path, "s1", 20)


def test_length_mismatch(tmp_path):
    path = slide_file(tmp_path, features=np.zeros((10, 5), np.float32))
    expect_error("N mismatch: 10 feature rows but 12 coordinates", path, "s1", 20)


def test_non_finite_features(tmp_path):
    features = np.zeros((12, 5), np.float32)
    features[3, 1] = np.nan
    features[7, 0] = np.inf
    expect_error(r"2 patch\(es\) with NaN/Inf features \(first row 3\)", slide_file(tmp_path, features=features), "s1", 20)


def test_empty_bag(tmp_path):
    path = slide_file(tmp_path, features=np.zeros((0, 5), np.float32), coords=np.zeros((0, 2), np.int64))
    expect_error("empty bag", path, "s1", 20)


def test_duplicate_coordinates(tmp_path):
    coords = lattice((10, 20), 256, 4, 3)
    coords[5] = coords[2]
    expect_error("1 duplicate coordinate", slide_file(tmp_path, coords=coords), "s1", 20)


def test_missing_magnification(write_slide, tmp_path):
    dirs = write_slide("s1")
    os.remove(dirs[10] / "s1.h5")
    with pytest.raises(SlideError, match="missing magnification 10x") as info:
        read_slide("s1", dirs)
    assert info.value.slide_id == "s1" and "10x" in info.value.path


def test_levels_with_inconsistent_patch_sizes(write_slide):
    dirs = write_slide("s1")
    with pytest.raises(SlideError, match="magnification metadata disagrees"):
        read_slide("s1", dirs, patch_sizes={20: 4096})
