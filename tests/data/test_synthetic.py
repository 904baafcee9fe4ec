import csv
import json
from collections import Counter

import h5py
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from wsigraph.data.synthetic import SyntheticCohort, make_synthetic_cohort

SMALL = dict(num_slides=8, patches_per_slide=(80, 160), feature_dim=16)
DATASETS = ("features", "coords", "lesion", "lesion_grade", "tissue")


def read_cohort(root, cohort):
    arrays = {}
    for mag in cohort.magnifications:
        for path in sorted((root / "features" / f"{mag:g}x").glob("*.h5")):
            with h5py.File(path, "r") as handle:
                arrays[(mag, path.stem)] = {name: handle[name][()] for name in DATASETS}
    return arrays


def read_labels(root):
    with open(root / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_file_layout_and_attributes(tmp_path):
    cohort = SyntheticCohort(**SMALL)
    root = make_synthetic_cohort(tmp_path / "cohort", **SMALL)
    rows = read_labels(root)
    assert list(rows[0]) == ["slide_id", "case_id", "label"]
    assert len(rows) == 8 and len({r["slide_id"] for r in rows}) == 8
    assert sorted({d.name for d in (root / "features").iterdir()}) == ["10x", "20x", "5x"]
    manifest = json.loads((root / "cohort.json").read_text())
    assert manifest["parameters"] == cohort.parameters()
    assert manifest["feature_dirs"] == {"5": "features/5x", "10": "features/10x", "20": "features/20x"}
    assert not list(root.rglob("*.tmp"))

    scans = set()
    for row in rows:
        for mag in (5, 10, 20):
            with h5py.File(root / "features" / f"{mag}x" / f"{row['slide_id']}.h5", "r") as handle:
                features, coords = handle["features"], handle["coords"]
                num = features.shape[0]
                assert features.dtype == np.float32 and features.shape == (num, 16) and num > 0
                assert coords.dtype == np.int64 and coords.shape == (num, 2)
                assert handle["lesion"].dtype == np.uint8 and handle["lesion"].shape == (num,)
                assert handle["tissue"].dtype == np.int64 and handle["tissue"].shape == (num,)
                attrs = coords.attrs
                scan = attrs["level0_magnification"]
                scans.add(int(scan))
                assert attrs["target_magnification"] == mag and attrs["patch_size"] == 256
                assert attrs["patch_size_level0"] == 256 * scan // mag
                assert attrs["name"] == row["slide_id"]
                xy = coords[()]
                assert xy.min() >= 0 and len(np.unique(xy, axis=0)) == num
                assert (xy[:, 0] + attrs["patch_size_level0"] <= attrs["level0_width"]).all()
                # Lattice of the level, offset from the origin by a sub-patch amount.
                step = attrs["patch_size_level0"]
                assert len(np.unique(xy % step, axis=0)) == 1
    assert scans == {20, 40}   # some slides scanned at 40x (512-px 20x patches), some at 20x (256 px)


def test_cases_and_labels():
    cohort = SyntheticCohort()
    rows = cohort.cases()
    assert len(rows) == 60
    per_case = Counter(case for _, case, _ in rows)
    assert set(per_case.values()) == {1, 2}
    labels_of_case = {}
    for _, case, label in rows:
        labels_of_case.setdefault(case, set()).add(label)
    assert all(len(v) == 1 for v in labels_of_case.values())   # a patient's slides share the label
    counts = np.bincount([label for *_, label in rows], minlength=2)
    assert cohort.num_classes == 2 and counts.min() >= 25


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_labels_follow_lesions(task):
    cohort = SyntheticCohort(task=task, num_slides=12, patches_per_slide=(150, 300), feature_dim=16)
    labels = []
    for slide in cohort.slides():
        top = slide.levels[20]
        labels.append(slide.label)
        assert slide.label == int(top.lesion_grade.max())
        assert np.array_equal(top.lesion, (top.lesion_grade > 0).astype(np.uint8))
        if slide.label:
            assert 0.03 <= top.lesion.mean() <= 0.25
    assert set(labels) == set(range(cohort.num_classes))
    if task == "multiclass":
        directions = cohort.lesion_directions()
        assert directions.shape == (3, 16)
        assert np.allclose(np.linalg.norm(directions[1:], axis=1), 1) and np.isclose(directions[1] @ directions[2], 0.5)


def test_hierarchy_and_ground_truth_across_levels():
    cohort = SyntheticCohort(magnifications=(2.5, 5, 10, 20), num_slides=6, patches_per_slide=(100, 400),
                             feature_dim=8)
    missing_children = 0
    for slide in cohort.slides():
        mags = sorted(slide.levels)
        assert mags == [2.5, 5, 10, 20]
        for low, high in zip(mags[:-1], mags[1:]):
            parent, child = slide.levels[low], slide.levels[high]
            assert parent.patch_size_level0 == 2 * child.patch_size_level0
            centre = child.coords + child.patch_size_level0 / 2.0
            corner = parent.coords[None, :, :]
            inside = ((centre[:, None, :] >= corner) & (centre[:, None, :] < corner + parent.patch_size_level0)).all(-1)
            assert (inside.sum(1) == 1).all()          # every child has exactly one parent
            owner = inside.argmax(1)
            count = np.bincount(owner, minlength=parent.num_patches)
            assert (count >= 1).all() and count.max() <= 4   # no parent without children
            missing_children += int((count < 4).sum())
            has_lesion = np.zeros(parent.num_patches, bool)
            np.logical_or.at(has_lesion, owner, child.lesion > 0)
            assert np.array_equal(parent.lesion > 0, has_lesion)
            worst = np.zeros(parent.num_patches, np.int64)
            np.maximum.at(worst, owner, child.lesion_grade)
            assert np.array_equal(parent.lesion_grade, worst)
            votes = np.zeros((parent.num_patches, cohort.num_tissue_types), np.int64)
            np.add.at(votes, (owner, child.tissue), 1)
            assert np.array_equal(parent.tissue, votes.argmax(1))
    assert missing_children > 0


def test_ratio_four_chain_and_invalid_settings():
    slide = SyntheticCohort(magnifications=(20, 5), num_slides=1, feature_dim=4).generate_slide(0)
    assert sorted(slide.levels) == [5, 20]
    assert slide.levels[5].patch_size_level0 == 4 * slide.levels[20].patch_size_level0
    with pytest.raises(ValueError):
        SyntheticCohort(magnifications=(10, 15))
    with pytest.raises(ValueError):
        SyntheticCohort(magnifications=(10, 20, 40), level0_magnifications=(20,))
    with pytest.raises(ValueError):
        SyntheticCohort(task="regression")


def test_deterministic(tmp_path):
    first = read_cohort(make_synthetic_cohort(tmp_path / "a", seed=3, **SMALL), SyntheticCohort(**SMALL))
    again = read_cohort(make_synthetic_cohort(tmp_path / "b", seed=3, **SMALL), SyntheticCohort(**SMALL))
    other = read_cohort(make_synthetic_cohort(tmp_path / "c", seed=4, **SMALL), SyntheticCohort(**SMALL))
    assert first.keys() == again.keys() and len(first) == 24
    for key in first:
        for name in DATASETS:
            assert np.array_equal(first[key][name], again[key][name])
    assert read_labels(tmp_path / "a") == read_labels(tmp_path / "b")
    assert any(not np.array_equal(first[k]["coords"], other[k]["coords"]) for k in first if k in other)
    assert any(first[k]["features"].shape != other[k]["features"].shape
               or not np.allclose(first[k]["features"], other[k]["features"]) for k in first if k in other)


def test_idempotent_write_and_regeneration(tmp_path):
    root = make_synthetic_cohort(tmp_path, **SMALL)
    files = sorted(root.rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert make_synthetic_cohort(tmp_path, **SMALL) == root
    assert sorted(root.rglob("*")) == files
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files)   # nothing rewritten
    assert SyntheticCohort.from_root(root) == SyntheticCohort(**SMALL)

    # Other parameters: rewritten, and the previous cohort's extra slides are gone.
    smaller = dict(SMALL, num_slides=5)
    make_synthetic_cohort(tmp_path, **smaller)
    assert len(read_labels(root)) == 5
    assert sorted(p.stem for p in (root / "features" / "20x").glob("*.h5")) == [f"slide_{i:03d}" for i in range(5)]
    assert json.loads((root / "cohort.json").read_text())["parameters"]["num_slides"] == 5


def _auc_cv(features, labels):
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    scores = cross_val_predict(LogisticRegression(max_iter=2000), features, labels, cv=folds,
                               method="decision_function")
    return roc_auc_score(labels, scores)


def test_default_cohort_is_a_fair_test_bed():
    """The default cohort rewards finding lesion patches: single 20x patches carry the lesion, 5x
    patches much less, and the slide mean hides it."""
    cohort = SyntheticCohort()
    slides = list(cohort.slides())
    train = np.random.default_rng(0).permutation(len(slides)) < len(slides) // 2

    def patch_auc(mag):
        stack = lambda keep, name: np.concatenate(  # noqa: E731
            [getattr(s.levels[mag], name) for s, k in zip(slides, train) if k == keep])
        probe = LogisticRegression(max_iter=2000).fit(stack(True, "features"), stack(True, "lesion"))
        return roc_auc_score(stack(False, "lesion"), probe.decision_function(stack(False, "features")))

    auc_20, auc_5 = patch_auc(20), patch_auc(5)
    assert auc_20 >= 0.9
    assert auc_5 <= auc_20 - 0.1

    # Slide level: the mean of all patches against the mean of the lesion patches. Lesion slides
    # use their true lesion patches; lesion-free slides have none, so they use their patches that
    # look most like lesions (top-k along the true lesion direction, k = the median lesion size):
    # what an ideal lesion finder would return. Taking all their patches instead would let
    # the slide offset alone separate the classes.
    labels = np.array([s.label for s in slides])
    direction = cohort.lesion_directions()[1]
    k = int(np.median([s.levels[20].lesion.sum() for s in slides if s.label]))
    mean_pooled, lesion_pooled = [], []
    for slide in slides:
        level = slide.levels[20]
        mean_pooled.append(level.features.mean(0))
        chosen = level.lesion > 0 if level.lesion.any() else np.argsort(-(level.features @ direction))[:k]
        lesion_pooled.append(level.features[chosen].mean(0))
    auc_mean, auc_lesion = _auc_cv(np.stack(mean_pooled), labels), _auc_cv(np.stack(lesion_pooled), labels)
    assert auc_lesion >= 0.9
    assert auc_mean <= auc_lesion - 0.15
