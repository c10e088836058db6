"""Convert an image dataset on local disk into webdataset shards plus manifest.json.

Example:
    python jobs/prepare_data.py --source ../shared/data/cifar10 --dataset cifar10
    python jobs/prepare_data.py --source cifar-100-python.tar.gz --dataset cifar100 \\
        --output s3://bucket/cifar100-shards --s3-endpoint-url http://127.0.0.1:9000
"""

import argparse
import logging
import time

from gmmc_dist.data.readers import FORMATS, open_source
from gmmc_dist.data.shards import DATASET_NAMES, DEFAULT_SHARD_SIZE, format_summary, write_shards


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="dataset folder or archive on local disk")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="source format (default: detect from file names)")
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="dataset name stored in the manifest")
    parser.add_argument("--output", help="shard directory: local path or URL such as s3://bucket/prefix "
                        "(default: data/<dataset>-shards under the current directory)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"samples per shard (default {DEFAULT_SHARD_SIZE}, about 30 MB of PNG tar per shard)")
    parser.add_argument("--splits", nargs="+", help="splits to write, for example train test (default: all)")
    parser.add_argument("--label-kind", default="fine", choices=("fine", "coarse"),
                        help="CIFAR-100 labels: fine (100 classes) or coarse (20 superclasses)")
    parser.add_argument("--folder-split", default="test", help="split name for a flat folder of unlabeled images")
    parser.add_argument("--s3-endpoint-url", help="S3 endpoint for --output, for example http://127.0.0.1:9000 "
                        "(default: GMMC_S3_ENDPOINT_URL, AWS_ENDPOINT_URL or AWS's own)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output = args.output or f"data/{args.dataset}-shards"
    storage_options = {"endpoint_url": args.s3_endpoint_url} if args.s3_endpoint_url else None
    started = time.perf_counter()
    source = open_source(args.source, args.format, label_kind=args.label_kind, folder_split=args.folder_split)
    manifest = write_shards(source, output, args.dataset, splits=args.splits, shard_size=args.shard_size,
                            storage_options=storage_options)
    print(f"shards under {output}")
    print(format_summary(manifest, time.perf_counter() - started))


if __name__ == "__main__":
    main()
