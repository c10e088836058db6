"""Measure training-loader throughput from local shards and from S3 on loopback (moto's server).

The script writes the same real CIFAR-10 images into shards in a local temporary directory and on
a moto S3 server it starts on 127.0.0.1, then times full epochs of `make_train_loader` (with the
training augmentation) for each loader worker count. Prints a table and writes JSON.

    python benchmarks/loader_throughput.py --data-root ../shared/data --images 8000
"""

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import s3fs
import torch
from moto.server import ThreadedMotoServer

from gmmc_dist.data.loader import make_train_loader
from gmmc_dist.data.readers import ImageFolderSource
from gmmc_dist.data.shards import write_shards

DUMMY_S3_ENV = {"AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark", "AWS_DEFAULT_REGION": "us-east-1"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data", help="folder that contains cifar10/train")
    parser.add_argument("--images", type=int, default=8000, help="number of real training images to shard")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    parser.add_argument("--batch-size", type=int, default=100, help="batch size of the loader")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts to time")
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per setting; the fastest is kept")
    parser.add_argument("--output", default="outputs/loader_throughput.json", help="JSON result file")
    return parser.parse_args()


def subset_folder(data_root: Path, images: int, target: Path) -> Path:
    """Symlink the first `images` training images (equal share per class) into an ImageFolder tree."""
    classes = sorted(p.name for p in (data_root / "cifar10" / "train").iterdir())
    for name in classes:
        folder = target / "train" / name
        folder.mkdir(parents=True)
        for file in sorted((data_root / "cifar10" / "train" / name).iterdir())[: images // len(classes)]:
            (folder / file.name).symlink_to(file.resolve())
    return target


def time_epoch(url, workers, batch_size, storage_options):
    loader = make_train_loader(url, "train", batch_size, rank=0, world_size=1, num_workers=workers, seed=0,
                               epoch=0, storage_options=storage_options)
    started = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count, time.perf_counter() - started


def main():
    args = parse_args()
    os.environ.update(DUMMY_S3_ENV)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request otherwise
    torch.set_num_threads(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}"}
    workdir = Path(tempfile.mkdtemp(prefix="loader_benchmark_"))
    try:
        source = ImageFolderSource(subset_folder(Path(args.data_root), args.images, workdir / "images"))
        s3fs.S3FileSystem(**options).mkdir("bench")
        locations = {"local": (str(workdir / "shards"), None), "s3 (moto, loopback)": ("s3://bench/shards", options)}
        for url, storage_options in locations.values():
            write_shards(source, url, "cifar10", shard_size=args.shard_size, storage_options=storage_options)
        rows = []
        for name, (url, storage_options) in locations.items():
            for workers in args.workers:
                timings = [time_epoch(url, workers, args.batch_size, storage_options) for _ in range(args.repeats)]
                count, seconds = min(timings, key=lambda timing: timing[1])
                rows.append({"storage": name, "workers": workers, "images": count, "seconds": round(seconds, 3),
                             "images_per_s": round(count / seconds, 1),
                             "images_per_s_per_worker": round(count / seconds / workers, 1)})
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{'storage':<22}{'workers':>8}{'images':>8}{'seconds':>9}{'img/s':>9}{'img/s/worker':>14}")
    for row in rows:
        print(f"{row['storage']:<22}{row['workers']:>8}{row['images']:>8}{row['seconds']:>9.2f}"
              f"{row['images_per_s']:>9.0f}{row['images_per_s_per_worker']:>14.0f}")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "settings": vars(args), "results": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
