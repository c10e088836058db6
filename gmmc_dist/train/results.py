"""End-of-training figures computed by all ranks together: gamma^2, test accuracy and ECE, samples."""

from __future__ import annotations

import io
import logging

import torch
import torch.distributed as dist
from torch import nn

from ..data.loader import make_eval_loader
from ..evaluation.calibration import calibration_bin_sums, ece_from_bin_sums

logger = logging.getLogger(__name__)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def estimate_gamma2(
    model: nn.Module, shards_url: str, split: str, batch_size: int, rank: int, world_size: int,
    device: torch.device, limit: int = 0,
) -> float:
    """gamma^2 = mean over training images of ||phi(x_i) - mu_{y_i}||^2 / d (unaugmented inputs).

    `limit` > 0 uses only the first `limit` images of the split (manifest order, spread over ranks).
    """
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    budget = limit // world_size if limit else None
    for images, labels in make_eval_loader(shards_url, split, batch_size, rank, world_size):
        if budget is not None:
            if budget <= 0:
                break
            images, labels = images[:budget], labels[:budget]
            budget -= len(labels)
        images, labels = images.to(device), labels.to(device)
        features = model.features(images)
        totals[0] += (features - model.means[labels]).square().sum().double()
        totals[1] += len(labels)
    all_reduce_sum(totals)
    feature_dim = model.means.shape[1]
    return float(totals[0] / (totals[1] * feature_dim))


@torch.no_grad()
def evaluate_test_split(
    model: nn.Module, shards_url: str, split: str, batch_size: int, rank: int, world_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Accuracy, ECE (20 bins) and mean negative log-likelihood of p(y|x) over the whole split."""
    model.eval()
    bins = torch.zeros(3, 20, dtype=torch.float64, device=device)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in make_eval_loader(shards_url, split, batch_size, rank, world_size):
        images, labels = images.to(device), labels.to(device)
        log_probs = torch.log_softmax(model.logits(images), dim=1)
        bins += calibration_bin_sums(log_probs.exp(), labels)
        nll -= log_probs.gather(1, labels[:, None]).sum().double()
    all_reduce_sum(bins)
    all_reduce_sum(nll)
    count = bins[0].sum()
    return {
        "test_accuracy": float(bins[2].sum() / count),
        "test_ece": ece_from_bin_sums(bins),
        "test_nll": float(nll / count),
        "test_count": int(count),
    }


def sample_grid_png(states: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int) -> bytes:
    """Render chain states [N, 3, H, W] in [-1, 1] as a PNG with one row per class.

    Classes with fewer than `per_class` states leave the rest of their row blank.
    """
    from torchvision.utils import save_image

    height, width = states.shape[-2:]
    grid = torch.ones(num_classes * per_class, 3, height, width)
    for label in range(num_classes):
        rows = states[labels == label][:per_class]
        grid[label * per_class: label * per_class + len(rows)] = (rows.float().clamp(-1, 1) + 1) / 2
    buffer = io.BytesIO()
    save_image(grid, buffer, nrow=per_class, padding=2, pad_value=1.0, format="png")
    return buffer.getvalue()
