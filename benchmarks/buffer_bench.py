"""Compare the local replay buffer with the shared one (Ray shard actors), side by side.

Measures, for batches of 64 chains of 3x32x32:
1. draw + write-back latency (median, p99) of one worker, float32 and float16 storage. For the
   shared buffer the time runs until the write-back is applied (`flush`), without prefetch;
2. throughput with 2 clients (each a Ray actor looping draw + write-back, with prefetch) for
   K = 1, 2, 4 shards, total and per shard; the default K is the one with the highest throughput,
   or the smallest K within 10 % of it;
3. the share of a training iteration spent in buffer calls: a WRN-10-2 GMMC, staged sampling with
   5 steps, the generative loss with forward and backward, an Adam step, on random data in [-1, 1],
   with the local buffer and with the shared buffer (prefetch on, write-back right after sampling).
Prints a table and writes JSON.

    python benchmarks/buffer_bench.py --capacity 100000 --output outputs/buffer_bench.json
"""

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import ray
import torch

from gmmc_dist.buffer import build_local_buffer
from gmmc_dist.buffer.shared import SharedReplayBuffer, create_shared_buffer, delete_shared_buffer
from gmmc_dist.config import BufferConfig, ModelConfig
from gmmc_dist.models import build_model
from gmmc_dist.objectives import gmmc_loss
from gmmc_dist.samplers import StagedSampler

NUM_CLASSES = 10
BATCH = 64


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacity", type=int, default=100_000, help="global buffer size in states")
    parser.add_argument("--latency-iters", type=int, default=200, help="timed draw + write-back pairs")
    parser.add_argument("--throughput-seconds", type=float, default=5.0, help="duration of each 2-client run")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4], help="shard counts K to compare")
    parser.add_argument("--train-iters", type=int, default=8, help="timed training iterations per buffer kind")
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of the training process")
    parser.add_argument("--output", default="outputs/buffer_bench.json", help="JSON result file")
    return parser.parse_args()


def summarize(seconds: list[float]) -> dict[str, float]:
    values = np.array(seconds) * 1e3
    return {"median_ms": float(np.median(values)), "p99_ms": float(np.percentile(values, 99)), "n": len(values)}


# ---- 1. latency -------------------------------------------------------------------------------


def time_round_trips(buffer, iterations: int, flush: bool) -> list[float]:
    for _ in range(5):  # warm-up
        drawn = buffer.draw(BATCH)
        buffer.write_back(drawn, drawn.states)
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        drawn = buffer.draw(BATCH)
        buffer.write_back(drawn, drawn.states)
        if flush:
            buffer.flush()
        seconds.append(time.perf_counter() - start)
    return seconds


def local_latency(capacity: int, dtype: str, iterations: int) -> dict[str, float]:
    config = BufferConfig(kind="local", capacity=capacity, dtype=dtype)
    buffer = build_local_buffer(config, NUM_CLASSES, rank=0, world_size=2, device=torch.device("cpu"), seed=0)
    return summarize(time_round_trips(buffer, iterations, flush=False))


def shared_latency(handles, iterations: int) -> dict[str, float]:
    buffer = SharedReplayBuffer(handles, rank=0, prefetch=False)
    timings = summarize(time_round_trips(buffer, iterations, flush=True))
    buffer.close()
    return timings


# ---- 2. throughput with 2 clients --------------------------------------------------------------


@ray.remote(num_cpus=0)
class LoadClient:
    """A worker that only draws and writes back, as fast as the shards serve it."""

    def __init__(self, handles, rank: int):
        self.buffer = SharedReplayBuffer(handles, rank=rank, seed=rank)

    def run(self, seconds: float) -> dict[str, float]:
        drawn = self.buffer.draw(BATCH)
        self.buffer.write_back(drawn, drawn.states)
        batches, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            drawn = self.buffer.draw(BATCH)
            self.buffer.write_back(drawn, drawn.states)
            batches += 1
        self.buffer.close()
        return {"chains": batches * BATCH, "seconds": time.perf_counter() - start}


def two_client_throughput(handles, seconds: float) -> dict[str, float]:
    clients = [LoadClient.remote(handles, rank) for rank in range(2)]
    results = ray.get([c.run.remote(seconds) for c in clients])
    for c in clients:
        ray.kill(c)
    chains_per_s = sum(r["chains"] / r["seconds"] for r in results)
    return {"chains_per_s": chains_per_s, "chains_per_s_per_shard": chains_per_s / handles.num_shards}


# ---- 3. share of a training iteration ------------------------------------------------------------


def time_training(buffer, iterations: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(depth=10, widen_factor=2, num_classes=NUM_CLASSES))
    sampler = StagedSampler(steps=5, step_size=1.0, latent_std=0.001)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.rand(BATCH, 3, 32, 32) * 2 - 1
    labels = torch.randint(NUM_CLASSES, (BATCH,))

    iteration_s, buffer_s = [], []
    for index in range(iterations + 2):  # the first two are warm-up
        start = time.perf_counter()
        in_buffer = 0.0

        mark = time.perf_counter()
        drawn = buffer.draw(BATCH)
        in_buffer += time.perf_counter() - mark

        samples = sampler.run(model, drawn.states, drawn.labels)

        mark = time.perf_counter()
        buffer.write_back(drawn, samples)
        in_buffer += time.perf_counter() - mark

        terms = gmmc_loss(model, model.means, images, labels, samples, drawn.labels, beta=0.5)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        if index >= 2:
            iteration_s.append(time.perf_counter() - start)
            buffer_s.append(in_buffer)
    return {
        "iteration_median_s": statistics.median(iteration_s),
        "buffer_median_ms": statistics.median(buffer_s) * 1e3,
        "buffer_share_percent": 100 * sum(buffer_s) / sum(iteration_s),
        "iterations": iterations,
    }


# ---- driver ----------------------------------------------------------------------------------------


def pick_default_shards(throughput: dict[int, dict[str, float]]) -> int:
    best = max(entry["chains_per_s"] for entry in throughput.values())
    return min(k for k, entry in throughput.items() if entry["chains_per_s"] >= 0.9 * best)


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.torch_threads)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    snapshot_root = tempfile.mkdtemp(prefix="buffer-bench-")
    results = {
        "hardware": {"cpus": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
                     "load_average_at_start": os.getloadavg()},
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "numpy": np.__version__},
        "settings": vars(args),
        "latency": {},
        "throughput_two_clients": {},
    }

    def shared(num_shards: int, dtype: str = "float32"):
        config = BufferConfig(kind="shared", capacity=args.capacity, num_shards=num_shards, dtype=dtype)
        return create_shared_buffer(config, NUM_CLASSES, os.path.join(snapshot_root, f"k{num_shards}-{dtype}"))

    # Local buffers hold capacity / 2, as each of 2 workers would.
    for dtype in ("float32", "float16"):
        results["latency"][f"local/{dtype}"] = local_latency(args.capacity // 2, dtype, args.latency_iters)

    for num_shards in args.shards:
        handles = shared(num_shards)
        results["latency"][f"shared/K={num_shards}/float32"] = shared_latency(handles, args.latency_iters)
        results["throughput_two_clients"][num_shards] = two_client_throughput(handles, args.throughput_seconds)
        delete_shared_buffer(handles)
    default_shards = pick_default_shards(results["throughput_two_clients"])
    results["default_num_shards"] = default_shards

    handles = shared(default_shards, "float16")
    results["latency"][f"shared/K={default_shards}/float16"] = shared_latency(handles, args.latency_iters)
    delete_shared_buffer(handles)

    local = build_local_buffer(BufferConfig(capacity=args.capacity), NUM_CLASSES, 0, 2, torch.device("cpu"), 0)
    results["training"] = {"local": time_training(local, args.train_iters)}
    handles = shared(default_shards)
    buffer = SharedReplayBuffer(handles)
    results["training"][f"shared/K={default_shards}"] = time_training(buffer, args.train_iters)
    buffer.close()
    delete_shared_buffer(handles)
    ray.shutdown()

    print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"wrote {args.output}")


def print_table(results: dict) -> None:
    print(f"hardware: {results['hardware']}")
    print("draw + write-back of 64 x 3x32x32 (one worker)")
    for name, entry in results["latency"].items():
        print(f"  {name:24s} median {entry['median_ms']:7.2f} ms   p99 {entry['p99_ms']:7.2f} ms")
    print("throughput, 2 clients, prefetch on")
    for k, entry in results["throughput_two_clients"].items():
        print(f"  K={k}: {entry['chains_per_s']:8.0f} chains/s total, {entry['chains_per_s_per_shard']:8.0f} per shard")
    print(f"default num_shards by measurement: {results['default_num_shards']}")
    print("training iteration (WRN-10-2, batch 64, 5 sampler steps)")
    for name, entry in results["training"].items():
        print(f"  {name:12s} iteration {entry['iteration_median_s']:6.3f} s, buffer {entry['buffer_median_ms']:6.2f} ms,"
              f" share {entry['buffer_share_percent']:5.2f} %")


if __name__ == "__main__":
    main()
