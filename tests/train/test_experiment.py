import csv
import json

import lightning as L
import numpy as np
import pytest
import yaml

from wsigraph.train.experiment import (ConfigMismatchError, cross_validate, evaluate_run,
                                       load_experiment_config, run_experiment)
from wsigraph.train.results import read_predictions
from wsigraph.train.splits import LeakageError, read_splits


class Recorder(L.Callback):
    r"""Remembers which folds trained and from which epoch they started."""

    def __init__(self):
        self.fold = None
        self.started = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.started.setdefault(self.fold, trainer.current_epoch)


class Interrupt(L.Callback):
    r"""Fails at the start of epoch ``epoch`` of fold ``fold`` (after the previous epoch's checkpoint)."""

    def __init__(self, fold, epoch):
        self.fold, self.at_fold, self.at_epoch = None, fold, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if self.fold == self.at_fold and trainer.current_epoch == self.at_epoch:
            raise RuntimeError("simulated crash")


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _metrics(summary):
    r"""The numbers of a summary as text (NaN compares equal to NaN)."""
    return json.dumps({"mean": summary["mean"], "pooled": summary["pooled"]["test"],
                       "folds": [(f["fold"], f["test"], f["val"], f["best_epoch"], f["threshold"])
                                 for f in summary["folds"]]}, sort_keys=True)


def test_cross_validation_writes_clam_outputs_and_reuses_finished_folds(cohort, tmp_path, capsys, tiny_config):
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, threshold="youden")
    summary = cross_validate(config, dataset=cohort)
    printed = capsys.readouterr().out
    assert printed.count("no patient in two of train/val/test") == 3
    assert "mean ± std" in printed
    splits = read_splits(run_dir)
    tested = []
    for fold, split in enumerate(splits):
        rows = _rows(run_dir / f"fold_{fold}.csv")
        assert list(rows[0]) == ["slide_id", "Y", "Y_hat", "p_0", "p_1", "case_id", "fold"]
        assert [r["slide_id"] for r in rows] == split["test"]
        for r in rows:
            assert float(r["p_0"]) + float(r["p_1"]) == pytest.approx(1.0, abs=1e-5)
            assert int(r["Y"]) == cohort.targets[cohort.slide_ids.index(r["slide_id"])]
        tested += split["test"]
        assert (run_dir / f"fold_{fold}" / "checkpoints" / "best.ckpt").is_file()
        assert not (run_dir / f"fold_{fold}" / "checkpoints" / "last.ckpt").exists()
        assert len(_rows(run_dir / f"fold_{fold}" / "history.csv")) >= 1
    assert sorted(tested) == sorted(cohort.slide_ids)  # every slide scored exactly once
    table = _rows(run_dir / "summary.csv")
    assert [r["folds"] for r in table] == ["0", "1", "2", "mean", "std", "pooled"]
    assert float(table[3]["test_auc"]) == pytest.approx(np.nanmean([f["test"]["auc"] for f in summary["folds"]]))
    assert json.loads((run_dir / "summary.json").read_text())["num_slides"] == len(cohort)
    assert summary["pooled"]["num_test"] == len(cohort)
    for fold in summary["folds"]:  # thresholds come from validation slides
        assert 0.0 <= fold["threshold"] <= 1.0

    split_text = (run_dir / "splits_0.csv").read_text()
    recorder = Recorder()
    again = cross_validate(config, dataset=cohort, callbacks=[recorder])
    assert recorder.started == {}  # nothing retrained
    assert (run_dir / "splits_0.csv").read_text() == split_text
    assert _metrics(again) == _metrics(summary)

    changed = tiny_config(run_dir, threshold="youden", lr=1e-2)
    with pytest.raises(ConfigMismatchError, match="train.lr"):
        cross_validate(changed, dataset=cohort)

    # external evaluation (here on the same cohort) of every fold and of their ensemble
    external = {"data": {"root": str(tmp_path / "unused")}}
    result = evaluate_run(run_dir, external, ensemble=True, out_dir=tmp_path / "eval", dataset=cohort,
                          verbose=False)
    folds = [read_predictions(tmp_path / "eval" / f"fold_{k}.csv") for k in range(3)]
    ensemble = read_predictions(tmp_path / "eval" / "ensemble.csv")
    assert all(f["slide_id"] == list(cohort.slide_ids) for f in folds)
    np.testing.assert_allclose(ensemble["probs"], np.mean([f["probs"] for f in folds], axis=0), atol=1e-5)
    assert result["ensemble"]["num_test"] == len(cohort)
    # a fold model scores its own test slides as during training
    own = read_predictions(run_dir / "fold_0.csv")
    position = [cohort.slide_ids.index(s) for s in own["slide_id"]]
    np.testing.assert_allclose(folds[0]["probs"][position], own["probs"], atol=1e-5)


def test_interrupted_run_resumes_to_the_same_result(cohort, tmp_path, tiny_config):
    reference = cross_validate(tiny_config(tmp_path / "a", epochs=3), dataset=cohort, verbose=False)

    run_dir = tmp_path / "b"
    config = tiny_config(run_dir, epochs=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cross_validate(config, dataset=cohort, callbacks=[Interrupt(fold=1, epoch=2)], verbose=False)
    assert (run_dir / "fold_0.csv").is_file()
    assert not (run_dir / "fold_1.csv").exists()
    assert (run_dir / "fold_1" / "checkpoints" / "last.ckpt").is_file()

    recorder = Recorder()
    resumed = cross_validate(config, dataset=cohort, callbacks=[recorder], verbose=False)
    assert recorder.started == {1: 2, 2: 0}  # fold 0 not retrained, fold 1 resumed at epoch 2
    assert _metrics(resumed) == _metrics(reference)
    for fold in range(3):
        assert (run_dir / f"fold_{fold}.csv").read_text() == (tmp_path / "a" / f"fold_{fold}.csv").read_text()
    history = _rows(run_dir / "fold_1" / "history.csv")
    assert [r["epoch"] for r in history] == ["0", "1", "2"]
    assert history == _rows(tmp_path / "a" / "fold_1" / "history.csv")


def test_clam_splits_are_imported(cohort, tmp_path, tiny_config):
    clam_dir = tmp_path / "clam_splits"
    clam_dir.mkdir()
    ids, cases = cohort.slide_ids, cohort.case_ids
    patients = sorted(set(cases))
    groups = [patients[0::3], patients[1::3], patients[2::3]]
    for fold in range(2):
        part = {name: [s for s, c in zip(ids, cases) if c in groups[(fold + k) % 3]]
                for k, name in enumerate(("train", "val", "test"))}
        length = max(len(v) for v in part.values())
        lines = [",train,val,test"]
        for i in range(length):
            lines.append(",".join([str(i)] + [part[n][i] if i < len(part[n]) else "" for n in ("train", "val", "test")]))
        (clam_dir / f"splits_{fold}.csv").write_text("\n".join(lines) + "\n")
    config = tiny_config(tmp_path / "run", epochs=1, bootstrap=0)
    config["run"].update(folds=2, splits=str(clam_dir))
    summary = cross_validate(config, dataset=cohort, verbose=False)
    imported = read_splits(clam_dir)
    assert read_splits(tmp_path / "run") == imported
    for fold in range(2):
        assert [r["slide_id"] for r in _rows(tmp_path / "run" / f"fold_{fold}.csv")] == imported[fold]["test"]
    assert len(summary["folds"]) == 2

    # a split with a patient on both sides is refused
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    first = [s for s, c in zip(ids, cases) if c == "case_001"]
    assert len(first) == 2
    (leaky / "splits_0.csv").write_text(f"train,val,test\n{first[0]},{ids[0]},{first[1]}\n")
    (leaky / "splits_1.csv").write_text(f"train,val,test\n{ids[0]},{ids[3]},{ids[5]}\n")
    config = tiny_config(tmp_path / "run2", epochs=1)
    config["run"].update(folds=2, splits=str(leaky))
    with pytest.raises(LeakageError):
        cross_validate(config, dataset=cohort, verbose=False)


def test_models_list_trains_each_model_on_the_same_splits(cohort, tmp_path, capsys, tiny_config):
    config = tiny_config(tmp_path / "cmp", epochs=1, bootstrap=0)
    config["run"]["folds"] = 2
    config["models"] = ["abmil", {"name": "mean_mil", "hidden_channels": 8}]
    summaries = run_experiment(config, dataset=cohort)
    assert list(summaries) == ["abmil", "mean_mil"]
    printed = capsys.readouterr().out
    assert "abmil" in printed.splitlines()[-2] and "mean_mil" in printed.splitlines()[-1]
    assert read_splits(tmp_path / "cmp" / "abmil") == read_splits(tmp_path / "cmp" / "mean_mil") \
        == read_splits(tmp_path / "cmp")
    assert [r["model"] for r in _rows(tmp_path / "cmp" / "comparison.csv")] == ["abmil", "mean_mil"]
    sub = yaml.safe_load((tmp_path / "cmp" / "abmil" / "config.yaml").read_text())
    assert sub["model"]["hidden_channels"] == 8 and "models" not in sub


def test_models_and_run_dir_are_not_inherited(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "model": {"name": "abmil"}, "models": ["abmil", "mean_mil"], "run": {"dir": "runs/base", "seed": 3},
        "train": {"epochs": 5}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "model": {"name": "mean_mil"}}))
    child = load_experiment_config(tmp_path / "child.yaml", ["train.lr=0.01"])
    assert "models" not in child and child["run"] == {"dir": "runs/child", "seed": 3}
    assert child["train"] == {"epochs": 5, "lr": 0.01} and child["model"] == {"name": "mean_mil"}
    base = load_experiment_config(tmp_path / "base.yaml")
    assert base["models"] == ["abmil", "mean_mil"] and base["run"]["dir"] == "runs/base"
    chosen = load_experiment_config(tmp_path / "child.yaml", ["run.dir=elsewhere", "models=[abmil]"])
    assert chosen["run"]["dir"] == "elsewhere" and chosen["models"] == ["abmil"]


def test_multiclass_ordinal_run_with_other_options(tmp_path, tiny_config, make_cohort):
    cohort = make_cohort(tmp_path / "multi", num_slides=16, seed=2, task="multiclass")
    assert cohort.num_classes == 3
    config = tiny_config(tmp_path / "run", epochs=2, bootstrap=20, ordinal=True, optimizer="sgd",
                         scheduler="plateau", class_weighted_sampling=True, class_weighted_loss=True,
                         early_stopping_patience=1, grad_clip=1.0)
    config["run"].update(folds=2, deterministic=True)
    summary = cross_validate(config, dataset=cohort, verbose=False)
    rows = _rows(tmp_path / "run" / "fold_0.csv")
    assert list(rows[0])[:6] == ["slide_id", "Y", "Y_hat", "p_0", "p_1", "p_2"]
    assert "test_qwk" in _rows(tmp_path / "run" / "summary.csv")[0]
    for fold in summary["folds"]:
        assert fold["threshold"] is None and "qwk" in fold["test"]
        assert set(fold["test_ci"]) == {"auc", "balanced_acc", "f1", "acc", "qwk"}
