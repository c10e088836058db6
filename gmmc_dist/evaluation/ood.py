"""Out-of-distribution detection: three scores, AUROC and score histograms.

Scores (higher means "more in-distribution"), as compared in JEM (Grathwohl et al., ICLR 2020)
and GMMC (Yang et al., ECML-PKDD 2021):
    log_px     log p(x) up to a constant, logsumexp_y of the logits
    max_prob   max_y p(y|x)
    grad_norm  -||d log p(x) / dx||_2, the L2 norm taken over the [-1, 1] input scale
AUROC treats the in-distribution test set as the positive class (scikit-learn's
`roc_auc_score`), so 1 is perfect separation and 0.5 is chance. Histograms are drawn with
matplotlib on the Agg backend.

Out-of-distribution sets are tensors `[N, 3, 32, 32]` in [-1, 1]: SVHN and CIFAR-100 test
splits, CelebA resized to 32x32, and CIFAR-10 interpolations (averages of random pairs of distinct
test images, `interpolation_set`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .inputs import check_image_batch, map_batches

logger = logging.getLogger(__name__)

SCORE_NAMES = ("log_px", "max_prob", "grad_norm")


def score_batch(model: nn.Module, x: torch.Tensor, score: str) -> torch.Tensor:
    """Compute one OOD score per image of the batch x [B, 3, 32, 32]; returns [B]."""
    if score == "log_px":
        with torch.no_grad():
            return model.log_px(x)
    if score == "max_prob":
        with torch.no_grad():
            return model.logits(x).softmax(dim=1).max(dim=1).values
    if score == "grad_norm":
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            # Each image's log p(x) depends on that image only (eval mode), so the gradient of the
            # sum contains the per-image gradients.
            (grad,) = torch.autograd.grad(model.log_px(x).sum(), inputs=x)
        return -grad.flatten(1).norm(dim=1)
    raise ValueError(f"unknown OOD score {score!r}: choose one of {', '.join(SCORE_NAMES)}")


def compute_scores(
    model: nn.Module,
    images: torch.Tensor,
    scores: Sequence[str] = SCORE_NAMES,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Score every image of `images` [N, 3, 32, 32] with each named score; returns arrays [N]."""
    unknown = [name for name in scores if name not in SCORE_NAMES]
    if unknown:
        raise ValueError(f"unknown OOD scores {unknown}: choose from {', '.join(SCORE_NAMES)}")
    model.eval()
    return {
        name: map_batches(lambda x, name=name: score_batch(model, x, name), images, batch_size, device).double().numpy()
        for name in scores
    }


def auroc(in_distribution_scores: np.ndarray, out_of_distribution_scores: np.ndarray) -> float:
    """Area under the ROC curve with in-distribution images as positives (sklearn `roc_auc_score`)."""
    from sklearn.metrics import roc_auc_score

    positives = np.asarray(in_distribution_scores, dtype=np.float64).ravel()
    negatives = np.asarray(out_of_distribution_scores, dtype=np.float64).ravel()
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError(
            f"AUROC needs both sets non-empty, got {len(positives)} in-distribution and "
            f"{len(negatives)} out-of-distribution scores"
        )
    if not (np.isfinite(positives).all() and np.isfinite(negatives).all()):
        raise ValueError("AUROC got non-finite scores: the model produces NaN or infinite log p(x)")
    targets = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    return float(roc_auc_score(targets, np.concatenate([positives, negatives])))


def interpolation_set(images: torch.Tensor, count: int | None = None, seed: int = 0) -> torch.Tensor:
    """Averages (x_i + x_j) / 2 of `count` random pairs of distinct images (default: len(images)).

    Pairs are drawn with a `torch.Generator` seeded by `seed`, so the set is reproducible.
    """
    check_image_batch("interpolation source", images)
    if len(images) < 2:
        raise ValueError(f"interpolations need at least 2 images, got {len(images)}")
    count = len(images) if count is None else count
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(len(images), (count,), generator=generator)
    # An offset in [1, N - 1] guarantees the second index differs from the first.
    second = (first + torch.randint(1, len(images), (count,), generator=generator)) % len(images)
    return (images[first] + images[second]) / 2


def evaluate_ood(
    model: nn.Module,
    in_distribution: torch.Tensor,
    ood_sets: Mapping[str, torch.Tensor],
    scores: Sequence[str] = SCORE_NAMES,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """AUROC of every score on every OOD set against the in-distribution test images.

    Returns (results, raw scores). results[set][score] is the AUROC; raw scores are keyed by set
    name, with the in-distribution scores under "in_distribution", for histograms.
    """
    check_image_batch("in_distribution", in_distribution)
    if not ood_sets:
        raise ValueError("no out-of-distribution sets given: pass at least one (for example interpolations)")
    for name, images in ood_sets.items():
        check_image_batch(name, images)

    logger.info("OOD: scoring %d in-distribution images", len(in_distribution))
    raw = {"in_distribution": compute_scores(model, in_distribution, scores, batch_size, device)}
    results: dict[str, dict[str, float]] = {}
    for name, images in ood_sets.items():
        logger.info("OOD: scoring %d images of %s", len(images), name)
        raw[name] = compute_scores(model, images, scores, batch_size, device)
        results[name] = {score: auroc(raw["in_distribution"][score], raw[name][score]) for score in scores}
        logger.info("OOD AUROC on %s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()))
    return results, raw


def plot_score_histogram(
    in_scores: np.ndarray, out_scores: np.ndarray, score: str, ood_name: str, area: float
) -> bytes:
    """PNG bytes of the two score histograms on shared bins (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    values = np.concatenate([in_scores, out_scores])
    bins = np.linspace(values.min(), values.max(), 51) if values.max() > values.min() else 10
    figure, axes = plt.subplots(figsize=(5, 3.5))
    axes.hist(in_scores, bins=bins, alpha=0.6, density=True, label=f"in-distribution (n={len(in_scores)})")
    axes.hist(out_scores, bins=bins, alpha=0.6, density=True, label=f"{ood_name} (n={len(out_scores)})")
    axes.set_xlabel({"log_px": "log p(x)", "max_prob": "max_y p(y|x)", "grad_norm": "-||d log p(x)/dx||"}[score])
    axes.set_ylabel("density")
    axes.set_title(f"{score} vs {ood_name}: AUROC {area:.3f}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
