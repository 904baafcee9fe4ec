#!/usr/bin/env python
r"""Cross-validated training from a config.

    python tools/train.py --config configs/demo.yaml
    python tools/train.py --config configs/abmil.yaml train.lr=5e-4 run.dir=runs/abmil_lr5e-4

Trains with patient-level stratified k-fold cross-validation into ``run.dir`` (default
``runs/<config name>``), resuming an interrupted run; a config with a ``models`` list trains each
model on the same splits and prints them side by side. See :mod:`wsigraph.train.experiment`.
"""
import argparse
import sys

from wsigraph.train import load_experiment_config, run_experiment
from wsigraph.train.experiment import ConfigMismatchError, result_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/<model>.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    parser.add_argument("--quiet", action="store_true", help="print only the final table")
    args = parser.parse_args(argv)
    config = load_experiment_config(args.config, args.overrides)
    if args.quiet:
        config.setdefault("trainer", {})["enable_progress_bar"] = False
    try:
        result = run_experiment(config, verbose=not args.quiet)
    except ConfigMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.quiet and result:
        print(result_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
