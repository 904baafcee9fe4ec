#!/usr/bin/env python
r"""Heatmaps (PNG) and QuPath GeoJSON of a trained model's interpretation maps, per slide.

    python tools/visualize.py --run runs/abmil --num-slides 4 --fold 0
    python tools/visualize.py --run runs/demo --model abmil --slides slide_003 slide_017 --out figs
    python tools/visualize.py --checkpoint runs/roam/fold_0/checkpoints/best.ckpt \
        --config configs/roam.yaml --slides slide_003 --scale rank

Builds the cohort from ``--config`` (default: the run's own ``config.yaml``; ``key.sub=value``
overrides apply to it), loads the best checkpoint of ``--fold`` from ``--run`` (or the file given
by ``--checkpoint``), runs the model in evaluation mode on the chosen slides (``--slides``, or the
first ``--num-slides`` test slides of the fold, or of the cohort without a run) and writes
``{slide_id}.png`` and ``{slide_id}.geojson`` into ``--out`` (default ``<run>/viz/fold_<k>``).
See :mod:`wsigraph.viz`.
"""
import argparse
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="run directory written by tools/train.py")
    parser.add_argument("--config", default=None, help="config whose data/graph sections give the slides "
                                                       "(default: <run>/config.yaml)")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint file to use instead of the run's fold")
    parser.add_argument("--model", default=None, help="model name inside a comparison run directory")
    parser.add_argument("--fold", type=int, default=0, help="fold whose best checkpoint is used (default 0)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--slides", nargs="+", default=None, help="slide ids to draw")
    choice.add_argument("--num-slides", type=int, default=4, help="draw this many slides of the fold's test "
                                                                  "split (default 4)")
    parser.add_argument("--part", default="test", choices=("train", "val", "test"),
                        help="split part that --num-slides draws from (default test)")
    parser.add_argument("--out", default=None, help="output directory (default <run>/viz/fold_<k>)")
    parser.add_argument("--names", nargs="+", default=None, help="only these maps (interpretation names)")
    parser.add_argument("--attributes", nargs="+", default=(),
                        help="node attributes to draw beside the model's maps, e.g. lesion (synthetic ground truth)")
    parser.add_argument("--scale", default="linear", choices=("linear", "rank"),
                        help="colour scale of continuous maps: raw values or per-slide percentiles")
    parser.add_argument("--cmap", default="coolwarm", help="matplotlib colour map of continuous maps")
    parser.add_argument("--no-merge", action="store_true", help="no merged panel of multi-level maps")
    parser.add_argument("--resolution", type=int, default=None,
                        help="longer side of a panel's raster grid in pixels (default: the panel's width in pixels)")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--no-geojson", action="store_true", help="write the PNG heatmaps only")
    parser.add_argument("--object-type", default="detection", choices=("detection", "tile", "annotation"),
                        help="QuPath object type of the GeoJSON features (default detection)")
    parser.add_argument("--batch-size", type=int, default=1, help="slides per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    args = parser.parse_args(argv)

    from wsigraph.config import load_config
    from wsigraph.data.builder import dataset_from_config
    from wsigraph.viz import find_fold_checkpoint, fold_slide_ids, load_checkpoint_model, visualize_slides

    if args.run is None and args.checkpoint is None:
        parser.error("give --run (a trained run directory) or --checkpoint")
    run_dir = Path(args.run) if args.run else None
    try:
        checkpoint = Path(args.checkpoint) if args.checkpoint else find_fold_checkpoint(run_dir, args.fold, args.model)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.config is not None:
        config_path = Path(args.config)
    elif run_dir is not None:
        config_path = run_dir / args.model / "config.yaml" if args.model else run_dir / "config.yaml"
        if not config_path.is_file():  # the run's only model inside a comparison directory
            config_path = checkpoint.parents[2] / "config.yaml"
    else:
        parser.error("--config is needed with --checkpoint and no --run")
    config = load_config(config_path, args.overrides)
    dataset = dataset_from_config(config, progress=False)

    if args.slides:
        position = {slide_id: i for i, slide_id in enumerate(dataset.slide_ids)}
        missing = [s for s in args.slides if s not in position]
        if missing:
            print(f"error: slide(s) not in the cohort of {config_path}: {missing}", file=sys.stderr)
            return 2
        indices = [position[s] for s in args.slides]
    else:
        chosen = None
        if run_dir is not None:
            try:
                chosen = fold_slide_ids(run_dir, args.fold, args.part, args.model)
            except FileNotFoundError:
                chosen = None
        position = {slide_id: i for i, slide_id in enumerate(dataset.slide_ids)}
        pool = [position[s] for s in chosen if s in position] if chosen is not None else list(range(len(dataset)))
        indices = pool[:max(0, args.num_slides)]
    if not indices:
        print("error: no slide to draw", file=sys.stderr)
        return 2

    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint_model(checkpoint, device)
    out_dir = Path(args.out) if args.out else (run_dir or checkpoint.parent) / "viz" / f"fold_{args.fold}"
    graphs = [dataset[i] for i in indices]
    records = visualize_slides(model, graphs, out_dir, class_names=list(dataset.classes), names=args.names,
                               batch_size=args.batch_size, device=device, geojson=not args.no_geojson,
                               geojson_kwargs={"object_type": args.object_type, "attributes": args.attributes},
                               scale=args.scale, cmap=args.cmap, merge_levels=not args.no_merge,
                               resolution=args.resolution, dpi=args.dpi, attributes=args.attributes)
    print(f"{type(model).__name__} from {checkpoint}")
    for record in records:
        label = dataset.classes[record["prediction"]]
        files = ", ".join(Path(p).name for p in (record["png"], record["geojson"]) if p)
        print(f"  {record['slide_id']}: predicted {label} (p = {max(record['probabilities']):.2f}), "
              f"{len(record['panels'])} panels, {record['features']} features -> {files}")
    print(f"written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
