import pytest

from wsigraph.data.dataset import SlideGraphDataset
from wsigraph.data.synthetic import make_synthetic_cohort
from wsigraph.transforms import graph_transform

GRAPH = {"regions": {"strategy": "grid", "grid_size": 4}, "region_knn": 4, "patch_grid": {"tolerance": 0.5}}


def small_cohort(root, num_slides=14, seed=0, task="binary"):
    r"""A few small synthetic slides (3 levels, 8-d features) and their cached graphs."""
    cohort = make_synthetic_cohort(root / "cohort", num_slides=num_slides, seed=seed, task=task,
                                   patches_per_slide=(40, 80), feature_dim=8, lesion_fraction=(0.2, 0.4))
    features = {m: cohort / "features" / f"{m}x" for m in (5, 10, 20)}
    return SlideGraphDataset(root / "graphs", cohort / "labels.csv", features,
                             pre_transform=graph_transform(dict(GRAPH)), progress=False)


@pytest.fixture
def make_cohort():
    r"""``make_cohort(root, num_slides=14, seed=0, task="binary")``: another small cohort."""
    return small_cohort


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    return small_cohort(tmp_path_factory.mktemp("cohort"))


def _tiny_config(run_dir, **train):
    settings = {"epochs": 2, "lr": 5e-3, "batch_size": 2, "max_patches_train": 40, "bootstrap": 50}
    settings.update(train)
    return {
        "model": {"name": "abmil", "hidden_channels": 8, "attention_channels": 4, "dropout": 0.1},
        "train": settings,
        "run": {"dir": str(run_dir), "folds": 3, "seed": 0},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }


@pytest.fixture
def tiny_config():
    r"""``tiny_config(run_dir, **train_settings)``: a config of a very small ABMIL run."""
    return _tiny_config
