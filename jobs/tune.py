"""Sweep beta, the sampling step size and the reinitialisation probability with Ray Tune.

    python jobs/tune.py --preset cifar10-cpu --data-source ../shared/data/cifar10 --samples 8
    python jobs/tune.py --preset cifar10 --gpu --workers 4 --samples 16 --concurrent 2 \\
        --space train.beta=uniform:0.1:1.0 --space sampler.step_size=loguniform:0.1:10

Every trial is a full Ray Train run with its own output folder under --output; ASHA stops trials
that fall behind. The table of trials is printed and written to <output>/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from gmmc_dist import storage
from gmmc_dist.config import PRESETS, build_config, merge_overrides, parse_assignments
from gmmc_dist.tune import DEFAULT_SEARCH_SPACE, run_sweep


def parse_space(entries: list[str]) -> dict[str, tuple[str, float, float]]:
    space = {}
    for entry in entries:
        key, _, spec = entry.partition("=")
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValueError(f"invalid --space {entry!r}: write KEY=DISTRIBUTION:LOW:HIGH, e.g. train.beta=uniform:0.1:1")
        space[key] = (parts[0], float(parts[1]), float(parts[2]))
    return space


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10-cpu", help=f"base settings: {', '.join(PRESETS)}")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--space", action="append", default=[], metavar="KEY=DIST:LOW:HIGH",
                        help=f"search dimension (repeatable); default: {DEFAULT_SEARCH_SPACE}")
    parser.add_argument("--samples", type=int, default=8, help="number of trials")
    parser.add_argument("--concurrent", type=int, default=1, help="trials at a time (each takes --workers workers)")
    parser.add_argument("--metric", default="train_accuracy", help="metric to optimise, as reported per epoch")
    parser.add_argument("--mode", default="max", choices=["max", "min"])
    parser.add_argument("--no-asha", action="store_true", help="run every trial to the end")
    parser.add_argument("--output", default="runs/sweep", help="folder or fsspec URL for all trials")
    parser.add_argument("--workers", type=int, help="Ray Train workers per trial")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--data-source", help="raw data converted into shards when they are missing")
    parser.add_argument("--shards", help="folder or fsspec URL of the shards")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    flags = {"run": {"output": args.output, "num_workers": args.workers, "use_gpu": True if args.gpu else None},
             "data": {"source": args.data_source, "shards_url": args.shards}}
    flags = {section: {k: v for k, v in values.items() if v is not None} for section, values in flags.items()}
    config = build_config(args.preset, merge_overrides(flags, parse_assignments(args.assignments)))
    rows = run_sweep(config, parse_space(args.space) or None, num_samples=args.samples, metric=args.metric,
                     mode=args.mode, max_concurrent_trials=args.concurrent, asha=not args.no_asha)
    storage.write_bytes_atomic(storage.join(config.run.output, "sweep.json"), json.dumps(rows, indent=2).encode())
    print(json.dumps(rows, indent=2))
    return 0 if all(row["error"] is None for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
