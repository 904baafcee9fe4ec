r"""Training and evaluation: Lightning module and data, splits, metrics, cross-validated runs."""
from wsigraph.train.callbacks import EpochHistory
from wsigraph.train.data import EpochSampler, SlideGraphDataModule, SlideSubset
from wsigraph.train.experiment import (ConfigMismatchError, compare_models, cross_validate, evaluate_run,
                                       load_experiment_config, resolve_config, run_experiment)
from wsigraph.train.metrics import (bootstrap_ci, classification_metrics, predict_labels,
                                    resampled_metrics, youden_threshold)
from wsigraph.train.module import MILModule, model_from_config, predict
from wsigraph.train.splits import (LeakageError, check_patient_disjoint, make_splits, read_splits,
                                   write_splits)

__all__ = [
    "MILModule", "model_from_config", "predict", "SlideGraphDataModule", "SlideSubset", "EpochSampler",
    "EpochHistory", "make_splits", "read_splits", "write_splits", "check_patient_disjoint", "LeakageError",
    "classification_metrics", "bootstrap_ci", "resampled_metrics", "youden_threshold", "predict_labels",
    "run_experiment", "cross_validate", "compare_models", "evaluate_run", "load_experiment_config",
    "resolve_config", "ConfigMismatchError",
]
