"""Time one sampling-chain step with input-only gradients against a full backward pass.

The chain runs tau forward-backward passes per training step. `gmmc_dist.samplers` takes gradients
with respect to the inputs only (`torch.autograd.grad(..., inputs=x)`), so no weight gradients
are computed or accumulated. The reference GMMC and JEM code call `backward()` on the energy,
which also computes and accumulates every weight gradient. This script times both on the same
model and batch, interleaved, and writes the medians to JSON.

    python benchmarks/sampler_bench.py --depth 10 --widen 2 --batch 64 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from gmmc_dist.config import ModelConfig
from gmmc_dist.models import build_model
from gmmc_dist.samplers import StagedSampler


def full_backward_step(model, x, z, step_size):
    """Update chains as the reference code does: backward() through the whole graph, weights included."""
    x = x.detach().requires_grad_(True)
    energy = 0.5 * (model.features(x) - z).square().sum(dim=1).mean()
    energy.backward()
    return (x.detach() - step_size * x.grad).clamp_(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--widen", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="outputs/sampler_bench.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_model(ModelConfig(depth=args.depth, widen_factor=args.widen)).eval()
    x = torch.rand(args.batch, 3, 32, 32) * 2 - 1
    y = torch.arange(args.batch) % 10
    sampler = StagedSampler(steps=1, step_size=1.0, latent_std=0.001)
    z = model.means[y]

    timings = {"input_gradients_only": [], "full_backward": []}
    for _ in range(3):  # warm-up
        sampler.run(model, x, y)
        full_backward_step(model, x, z, 1.0)
    for _ in range(args.repeats):
        start = time.perf_counter()
        sampler.run(model, x, y)
        timings["input_gradients_only"].append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        full_backward_step(model, x, z, 1.0)
        timings["full_backward"].append(time.perf_counter() - start)
    leftover = sum(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    sampler.run(model, x, y)
    after_sampler = sum(p.grad is not None for p in model.parameters())

    result = {
        "model": f"WRN-{args.depth}-{args.widen}",
        "batch": args.batch,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "median_ms_per_step": {k: 1000 * statistics.median(v) for k, v in timings.items()},
        "weight_grads_after_full_backward": leftover,
        "weight_grads_after_sampler": after_sampler,
    }
    result["speedup"] = result["median_ms_per_step"]["full_backward"] / result["median_ms_per_step"]["input_gradients_only"]
    print(json.dumps(result, indent=2))
    import os

    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
