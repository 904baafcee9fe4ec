import csv
import os

import numpy as np
import pytest
import torch

from wsigraph.data.dataset import SlideGraphDataset
from wsigraph.data.readers import SlideError
from wsigraph.transforms import graph_transform


def write_labels(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "case_id", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture
def cohort(tmp_path, write_slide):
    dirs = None
    for i in range(4):
        dirs = write_slide(f"s{i}", cols=6 + i, rows=5, seed=i)
    labels = write_labels(tmp_path / "labels.csv", [(f"s{i}", f"p{i // 2}", i % 2) for i in range(4)])
    return tmp_path, labels, dirs


def make(root, labels, dirs, **kwargs):
    kwargs.setdefault("pre_transform", graph_transform({"regions": {"strategy": "grid", "grid_size": 3}}))
    return SlideGraphDataset(root / "cache", labels, dirs, progress=False, **kwargs)


def test_builds_once_and_reuses_cache(cohort):
    root, labels, dirs = cohort
    dataset = make(root, labels, dirs)
    assert len(dataset) == 4 and dataset.built_now == 4
    assert dataset.classes == ["0", "1"] and dataset.targets == [0, 1, 0, 1]
    graph = dataset[2]
    assert graph.slide_id == "s2" and graph.case_id == "p1" and graph.y.tolist() == [0]
    again = make(root, labels, dirs)
    assert again.built_now == 0
    assert torch.equal(again[2]["patch_20x"].x, graph["patch_20x"].x)


def test_rebuilds_when_source_or_transform_changes(cohort, write_slide):
    root, labels, dirs = cohort
    make(root, labels, dirs)
    # Rewriting a source file (new content, new mtime) rebuilds that slide only.
    write_slide("s1", cols=9, rows=5, seed=11)
    os.utime(dirs[20] / "s1.h5", ns=(10**18, 10**18))
    dataset = make(root, labels, dirs)
    assert dataset.built_now == 1
    assert dataset[1]["patch_20x"].num_nodes == 45
    # A different transform parameter rebuilds everything.
    other = make(root, labels, dirs, pre_transform=graph_transform({"regions": {"strategy": "grid", "grid_size": 2}}))
    assert other.built_now == 4 and other[0]["region"].num_nodes <= 4


def test_half_written_cache_file_is_rebuilt(cohort):
    root, labels, dirs = cohort
    dataset = make(root, labels, dirs)
    path = os.path.join(dataset.processed_dir, "s3.pt")
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    again = make(root, labels, dirs)
    assert again.built_now == 1 and again[3].slide_id == "s3"
    assert not [f for f in os.listdir(dataset.processed_dir) if f.endswith(".tmp")]


def test_parallel_build_equals_serial(cohort):
    root, labels, dirs = cohort
    serial = make(root, labels, dirs)
    parallel = SlideGraphDataset(root / "cache2", labels, dirs, pre_transform=serial.pre_transform,
                                 num_workers=2, progress=False)
    for a, b in zip(serial, parallel):
        assert torch.equal(a["patch_10x"].x, b["patch_10x"].x)
        assert torch.equal(a["patch_10x", "belongs_to", "region"].edge_index,
                           b["patch_10x", "belongs_to", "region"].edge_index)


def test_bad_slide_raise_and_skip(cohort):
    root, labels, dirs = cohort
    with open(dirs[20] / "s2.h5", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(SlideError, match="s2") as info:
        make(root, labels, dirs)
    assert "truncated or corrupt" in info.value.reason and info.value.path.endswith("s2.h5")
    dataset = make(root, labels, dirs, on_error="skip")
    assert dataset.slide_ids == ["s0", "s1", "s3"]
    rows = list(csv.DictReader(open(root / "cache" / "skipped.csv")))
    assert [r["slide_id"] for r in rows] == ["s2"] and "truncated" in rows[0]["reason"]
    assert rows[0]["file"].endswith("s2.h5")


def test_unknown_label(cohort):
    root, labels, dirs = cohort
    write_labels(labels, [("s0", "p0", 0), ("s1", "p0", 1), ("s2", "p1", 7), ("s3", "p1", 1)])
    with pytest.raises(SlideError, match=r"slide 's2'.*label '7' is not in the label set"):
        make(root, labels, dirs, classes=[0, 1])
    dataset = make(root, labels, dirs, classes=[0, 1], on_error="skip")
    assert dataset.slide_ids == ["s0", "s1", "s3"]


def test_missing_magnification_skip(cohort):
    root, labels, dirs = cohort
    os.remove(dirs[5] / "s0.h5")
    dataset = make(root, labels, dirs, on_error="skip")
    assert dataset.slide_ids == ["s1", "s2", "s3"]
    assert "missing magnification 5x" in dataset.skipped[0]["reason"]
