"""Train GMMC (or a softmax / JEM baseline) with Ray Train.

    python jobs/train.py --preset cifar10-cpu --data-source ../shared/data/cifar10
    ray job submit -- python jobs/train.py --preset cifar10 --workers 8 --gpu --output s3://bucket/runs/c10
    python jobs/train.py --preset cifar10-cpu --shards s3://bucket/cifar10-shards --output s3://bucket/runs/c10-cpu \
        --s3-endpoint-url http://127.0.0.1:9000

Any default can be changed with --set section.key=value (see gmmc_dist/config.py for every key).
A rerun with the same --output resumes from the latest checkpoint there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from gmmc_dist.config import PRESETS, build_config, merge_overrides, parse_assignments
from gmmc_dist.train.driver import run_training


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10", help=f"settings to start from: {', '.join(PRESETS)} (default: cifar10, the paper's)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--output", help="folder or fsspec URL for checkpoints and results (run.output)")
    parser.add_argument("--workers", type=int, help="number of Ray Train workers (run.num_workers)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (run.use_gpu)")
    parser.add_argument("--data-source", help="raw data converted into shards when the shards are missing, e.g. "
                        "../shared/data/cifar10, or 'download' for the official files (data.source)")
    parser.add_argument("--shards", help="folder or fsspec URL of the webdataset shards (data.shards_url)")
    parser.add_argument("--s3-endpoint-url", help="endpoint of an S3-compatible store for every s3:// location, used by "
                        "the driver and all workers, e.g. http://127.0.0.1:9000 (run.s3_endpoint_url; default: "
                        "GMMC_S3_ENDPOINT_URL, AWS_ENDPOINT_URL or AWS's own). Credentials come from AWS_* or ~/.aws")
    parser.add_argument("--address", help="Ray cluster address (run.ray_address); default: RAY_ADDRESS or a local Ray")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    flags = {
        "run": {"output": args.output, "num_workers": args.workers, "use_gpu": True if args.gpu else None,
                "ray_address": args.address, "s3_endpoint_url": args.s3_endpoint_url},
        "data": {"source": args.data_source, "shards_url": args.shards},
    }
    flags = {section: {k: v for k, v in values.items() if v is not None} for section, values in flags.items()}
    config = build_config(args.preset, merge_overrides(flags, parse_assignments(args.assignments)))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    metrics = run_training(config)
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
