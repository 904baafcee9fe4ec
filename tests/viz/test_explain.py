import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from matplotlib.image import imread

from wsigraph.models import MILModel
from wsigraph.viz import (explain_slides, find_fold_checkpoint, fold_slide_ids, load_checkpoint_model,
                          load_fold_model, visualize_slides)

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    r"""A two-fold, one-epoch ABMIL run on a tiny synthetic cohort, trained through the library."""
    from wsigraph.data.builder import dataset_from_config
    from wsigraph.train import load_experiment_config, run_experiment

    root = tmp_path_factory.mktemp("run")
    config = {
        "data": {"root": str(root / "data"),
                 "synthetic": {"num_slides": 8, "seed": 0, "task": "binary", "patches_per_slide": [30, 60],
                               "feature_dim": 8}},
        "graph": {"regions": {"strategy": "grid", "grid_size": 3}, "region_knn": 3},
        "model": {"name": "abmil", "hidden_channels": 8, "attention_channels": 4},
        "train": {"epochs": 1, "batch_size": 4, "bootstrap": 0},
        "run": {"dir": str(root / "run"), "folds": 2, "seed": 0},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    config = load_experiment_config(path)
    run_experiment(config, verbose=False)
    return Path(config["run"]["dir"]), path, dataset_from_config(config, progress=False)


def test_fold_model_is_the_trained_checkpoint(trained_run):
    run_dir, _, dataset = trained_run
    path = find_fold_checkpoint(run_dir, 1)
    with open(run_dir / "fold_1" / "fit_done.json") as handle:
        assert path == run_dir / json.load(handle)["best_checkpoint"]
    model = load_fold_model(run_dir, 1)
    assert isinstance(model, MILModel) and not model.training
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[f"model.{name}"])
    with pytest.raises(FileNotFoundError):
        find_fold_checkpoint(run_dir, 7)

    test_ids = fold_slide_ids(run_dir, 1)
    assert test_ids and set(test_ids) <= set(dataset.slide_ids)

    # Batched explanations equal one-slide runs.
    graphs = [dataset[i] for i in range(4)]
    batched = explain_slides(model, graphs, batch_size=3)
    for graph, output in zip(graphs, batched):
        with torch.no_grad():
            alone = model(graph)
        torch.testing.assert_close(output.logits, alone.logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(output.interpretation["patch_20x"]["attention"],
                                   alone.interpretation["patch_20x"]["attention"], atol=1e-5, rtol=1e-4)


def test_visualize_slides_writes_png_and_geojson(trained_run, tmp_path):
    run_dir, _, dataset = trained_run
    model = load_checkpoint_model(find_fold_checkpoint(run_dir, 0))
    graphs = [dataset[0], dataset[1]]
    records = visualize_slides(model, graphs, tmp_path, class_names=list(dataset.classes), attributes=["lesion"],
                               panel_size=1.5, dpi=40, geojson_kwargs={"attributes": ["lesion"]})
    for graph, record in zip(graphs, records):
        assert record["slide_id"] == graph.slide_id
        assert imread(record["png"]).ndim == 3
        with open(record["geojson"]) as handle:
            collection = json.load(handle)
        lesion_levels = [lvl for lvl in ("patch_5x", "patch_10x", "patch_20x") if "lesion" in graph[lvl]]
        assert record["features"] == len(collection["features"]) == sum(graph[lvl].num_nodes for lvl in lesion_levels)
        assert [p.name for p in record["panels"]][0] == "attention"


def test_command_line(trained_run, tmp_path, monkeypatch, capsys):
    run_dir, config_path, dataset = trained_run
    monkeypatch.syspath_prepend(str(TOOLS))
    import visualize

    out = tmp_path / "viz"
    assert visualize.main(["--run", str(run_dir), "--fold", "1", "--num-slides", "2", "--out", str(out),
                           "--dpi", "40"]) == 0
    expected = fold_slide_ids(run_dir, 1)[:2]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{s}.png" for s in expected] +
                                                           [f"{s}.geojson" for s in expected])

    out = tmp_path / "one"
    slide = dataset.slide_ids[3]
    checkpoint = find_fold_checkpoint(run_dir, 0)
    assert visualize.main(["--checkpoint", str(checkpoint), "--config", str(config_path), "--slides", slide,
                           "--out", str(out), "--no-geojson", "--dpi", "40"]) == 0
    assert [p.name for p in out.iterdir()] == [f"{slide}.png"]
    assert visualize.main(["--run", str(run_dir), "--slides", "nope", "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    sys.modules.pop("visualize", None)
