#!/usr/bin/env python
"""Build (or refresh) the cached slide graphs of a config and print a summary."""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsigraph.config import load_config  # noqa: E402
from wsigraph.data.builder import dataset_from_config  # noqa: E402
from wsigraph.data.readers import SlideError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config with data: and graph: sections")
    parser.add_argument("--workers", type=int, default=None, help="parallel build processes (overrides data.num_workers)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if args.workers is not None:
        config.setdefault("data", {})["num_workers"] = args.workers
    start = time.perf_counter()
    try:
        dataset = dataset_from_config(config)
    except SlideError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = dataset.summary()
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["cache"] = dataset.processed_dir
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"\nslides: {summary.pop('slides')}   skipped: {summary.pop('skipped')}   "
              f"time: {summary.pop('seconds')} s   cache: {summary.pop('cache')}")
        summary.pop("build_seconds")
        print(f"{'':28s} {'total':>10s} {'mean':>9s} {'min':>7s} {'max':>7s}")
        for key, stats in summary.items():
            print(f"{key:28s} {stats['total']:10d} {stats['mean']:9.1f} {stats['min']:7d} {stats['max']:7d}")
        if dataset.skipped:
            print(f"skipped slides are listed in {Path(dataset.root) / 'skipped.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
