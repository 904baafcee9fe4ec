r"""Two CPU processes (gloo, ddp_spawn): validation metrics cover every validation slide once."""
import csv

import numpy as np
import pytest
import torch

from wsigraph.train.experiment import cross_validate
from wsigraph.train.metrics import classification_metrics, cross_entropy
from wsigraph.train.results import read_predictions
from wsigraph.train.splits import read_splits, write_splits


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_spawn_gathers_every_validation_slide_once(cohort, tmp_path, tiny_config):
    # Odd validation sets: the distributed sampler pads them with a repeated slide.
    by_patient = {}
    for slide, case in zip(cohort.slide_ids, cohort.case_ids):
        by_patient.setdefault(case, []).append(slide)
    single = [slides[0] for slides in by_patient.values() if len(slides) == 1]
    assert len(single) >= 6
    chosen = [{"val": single[0:3], "test": single[3:6]}, {"val": single[3:6], "test": single[0:3]}]
    for split in chosen:
        split["train"] = [s for s in cohort.slide_ids if s not in split["val"] + split["test"]]
    write_splits(tmp_path / "given", chosen)

    config = tiny_config(tmp_path / "ddp", epochs=2, batch_size=2, bootstrap=0, monitor="val_auc")
    config["run"].update(folds=2, splits=str(tmp_path / "given"))
    config["trainer"].update(devices=2, strategy="ddp_spawn")
    summary = cross_validate(config, dataset=cohort, verbose=False)
    splits = read_splits(tmp_path / "ddp")
    assert all(len(split["val"]) == 3 for split in splits)
    for fold, split in enumerate(splits):
        with open(tmp_path / "ddp" / f"fold_{fold}" / "history.csv", newline="") as handle:
            history = list(csv.DictReader(handle))
        assert len(history) == 2
        assert all(float(row["val_slides"]) == len(split["val"]) for row in history)
        # The logged validation numbers of the best epoch equal those of the best checkpoint
        # re-scored in one process over the whole validation set.
        result = summary["folds"][fold]
        logged = history[result["best_epoch"]]
        val = read_predictions(tmp_path / "ddp" / f"fold_{fold}" / "val_predictions.csv")
        assert val["slide_id"] == split["val"]
        assert float(logged["val_loss"]) == pytest.approx(cross_entropy(val["Y"], val["probs"]), abs=1e-4)
        expected = classification_metrics(val["Y"], val["probs"])
        for name in ("auc", "acc", "balanced_acc"):
            np.testing.assert_allclose(float(logged[f"val_{name}"]), expected[name], atol=1e-4)
        assert [r for r in read_predictions(tmp_path / "ddp" / f"fold_{fold}.csv")["slide_id"]] == split["test"]
