#!/usr/bin/env python
r"""Score a trained run on another cohort.

    python tools/evaluate.py --run runs/abmil --config configs/external.yaml [--ensemble]

``--config`` names a config whose ``data`` section (and ``graph`` section, when the external
slides need other graph settings) describes the external cohort. Every fold's best checkpoint
scores every slide; ``--ensemble`` also scores the mean of their probabilities. Writes
``fold_{k}.csv`` (and ``ensemble.csv``), ``summary.csv`` and ``summary.json`` into ``--out``
(default ``<run>/eval/<config name>``) and prints the table. See
:func:`wsigraph.train.evaluate_run`.
"""
import argparse
import sys

from wsigraph.train import evaluate_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory written by tools/train.py")
    parser.add_argument("--config", required=True, help="config with the external cohort's data section")
    parser.add_argument("--ensemble", action="store_true", help="also score the folds' mean probabilities")
    parser.add_argument("--out", default=None, help="output directory (default <run>/eval/<config name>)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the external config")
    args = parser.parse_args(argv)
    evaluate_run(args.run, args.config, ensemble=args.ensemble, out_dir=args.out, overrides=args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
