import numpy as np
import pytest

from wsigraph.train.splits import (LeakageError, check_patient_disjoint, find_split_files, make_splits,
                                   read_splits, splits_equal, write_splits)


def _cohort(seed=0, patients=30):
    rng = np.random.default_rng(seed)
    slides, cases, targets = [], [], []
    for p in range(patients):
        label = int(rng.integers(0, 3))
        for _ in range(int(rng.integers(1, 4))):  # 1-3 slides per patient, same label
            slides.append(f"s{len(slides):03d}")
            cases.append(f"p{p:02d}")
            targets.append(label)
    return slides, cases, targets


def test_splits_are_patient_disjoint_and_test_every_slide_once(capsys):
    slides, cases, targets = _cohort()
    splits = make_splits(slides, cases, targets, folds=5, val_fraction=0.25, seed=3)
    assert len(splits) == 5
    tested = [s for split in splits for s in split["test"]]
    assert sorted(tested) == sorted(slides)  # test folds partition the cohort
    to_case = dict(zip(slides, cases))
    for fold, split in enumerate(splits):
        parts = [set(to_case[s] for s in split[p]) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert sorted(split["train"] + split["val"] + split["test"]) == sorted(slides)
        assert split["val"]
        # stratified: every class in every test fold
        assert {targets[slides.index(s)] for s in split["test"]} == {0, 1, 2}
        check_patient_disjoint(split, to_case, fold=fold)
    printed = capsys.readouterr().out
    assert printed.count("no patient in two of train/val/test") == 5
    assert splits == make_splits(slides, cases, targets, folds=5, val_fraction=0.25, seed=3)
    assert splits != make_splits(slides, cases, targets, folds=5, val_fraction=0.25, seed=4)


def test_leakage_is_detected():
    to_case = {"a": "p1", "b": "p1", "c": "p2", "d": "p3"}
    with pytest.raises(LeakageError, match="p1"):
        check_patient_disjoint({"train": ["a", "c"], "val": ["d"], "test": ["b"]}, to_case, verbose=False)
    with pytest.raises(LeakageError):
        check_patient_disjoint({"train": ["a", "a"], "val": [], "test": ["c"]}, to_case, verbose=False)
    with pytest.raises(KeyError):
        check_patient_disjoint({"train": ["zz"], "val": [], "test": []}, to_case, verbose=False)


def test_write_read_round_trip_in_clam_layout(tmp_path):
    slides, cases, targets = _cohort(1)
    splits = make_splits(slides, cases, targets, folds=3, seed=0)
    labels = dict(zip(slides, targets))
    write_splits(tmp_path, splits, labels=labels, classes=["a", "b", "c"])
    header = (tmp_path / "splits_0.csv").read_text().splitlines()[0]
    assert header == ",train,val,test"  # CLAM: unnamed index column first
    assert splits_equal(read_splits(tmp_path), splits)
    descriptor = (tmp_path / "splits_1_descriptor.csv").read_text().splitlines()
    assert descriptor[0] == ",train,val,test" and [r.split(",")[0] for r in descriptor[1:]] == ["a", "b", "c"]
    counts = np.array([[int(v) for v in r.split(",")[1:]] for r in descriptor[1:]])
    assert counts.sum() == len(slides)


def test_read_clam_split_files(tmp_path):
    # As CLAM's pandas writer leaves them: index column, ragged columns padded with empty cells.
    (tmp_path / "splits_0.csv").write_text(",train,val,test\n0,s1,s3,s5\n1,s2,,s6\n2,s4,,\n")
    (tmp_path / "splits_1.csv").write_text("train,val,test\ns5,s1,s2\ns6,,\n")  # no index column
    splits = read_splits(tmp_path)
    assert splits[0] == {"train": ["s1", "s2", "s4"], "val": ["s3"], "test": ["s5", "s6"]}
    assert splits[1] == {"train": ["s5", "s6"], "val": ["s1"], "test": ["s2"]}
    assert len(read_splits(tmp_path, folds=1)) == 1
    with pytest.raises(ValueError):
        read_splits(tmp_path, folds=3)


def test_split_files_sort_numerically(tmp_path):
    for k in range(12):
        (tmp_path / f"splits_{k}.csv").write_text("train,val,test\n")
    (tmp_path / "splits_3_bool.csv").write_text("")
    assert [p.name for p in find_split_files(tmp_path)] == [f"splits_{k}.csv" for k in range(12)]
    (tmp_path / "splits_5.csv").unlink()
    with pytest.raises(ValueError):
        find_split_files(tmp_path)


def test_too_small_cohort_is_refused():
    with pytest.raises(ValueError):
        make_splits(["a", "b", "c"], ["p", "p", "q"], [0, 1, 0], folds=3)
