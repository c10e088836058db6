"""Figures as PNG bytes: reliability diagram, t-SNE of features, sample grids.

Libraries: matplotlib (Agg backend) draws the plots, scikit-learn's `TSNE` embeds the features and
`torchvision.utils.make_grid` tiles images. Every function returns PNG bytes, so callers can write
them to any fsspec location.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from .calibration import DEFAULT_BINS, calibration_bin_sums, ece_from_bin_sums


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def reliability_diagram_png(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = DEFAULT_BINS, title: str = "") -> bytes:
    """Accuracy against mean confidence per equal-width confidence bin, with the ECE in the title.

    Bins follow `calibration_bin_sums`; empty bins are left out. Bar heights are the bin accuracy,
    the diagonal is perfect calibration, and red outlines show each bin's mean confidence.
    """
    plt = _pyplot()
    sums = calibration_bin_sums(probs, labels, num_bins)
    ece = ece_from_bin_sums(sums)
    counts, confidence, correct = sums.numpy()
    filled = counts > 0
    centers = (np.arange(num_bins) + 0.5) / num_bins
    width = 1.0 / num_bins
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.bar(centers[filled], correct[filled] / counts[filled], width=width, edgecolor="black", label="accuracy")
    axes.bar(centers[filled], confidence[filled] / counts[filled], width=width, fill=False,
             edgecolor="red", linewidth=1.2, label="mean confidence")
    axes.plot([0, 1], [0, 1], "k--", linewidth=1)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence max_y p(y|x)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{title} ECE {100 * ece:.2f} % ({num_bins} bins, n={int(counts.sum())})".strip())
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return _png(figure)


def tsne_embedding(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE embedding [N, 2] of features [N, d] (scikit-learn's TSNE, PCA initialisation).

    The perplexity is lowered to (N - 1) / 3 for small sets, because scikit-learn requires
    perplexity < N.
    """
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) < 4:
        raise ValueError(f"t-SNE needs features [N, d] with N >= 4, got shape {features.shape}: raise --limit")
    perplexity = min(perplexity, (len(features) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def tsne_png(embedding: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None, title: str = "") -> bytes:
    """Scatter plot of a 2-D embedding coloured by class (10-colour palette, repeated beyond 10)."""
    plt = _pyplot()
    labels = np.asarray(labels)
    figure, axes = plt.subplots(figsize=(6, 5))
    colours = plt.get_cmap("tab10")
    for label in np.unique(labels):
        points = embedding[labels == label]
        name = class_names[label] if class_names and label < len(class_names) else str(label)
        axes.scatter(points[:, 0], points[:, 1], s=4, color=colours(int(label) % 10), label=name)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title or f"t-SNE of test features (n={len(labels)})")
    axes.legend(markerscale=3, fontsize=7, loc="best")
    figure.tight_layout()
    return _png(figure)


def class_rows_png(images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int) -> bytes:
    """Grid of images [N, 3, H, W] in [-1, 1] with one row per class and `per_class` columns.

    Row c contains the first `per_class` images with label c, in the given order; missing cells are white.
    """
    from torchvision.utils import make_grid

    height, width = images.shape[-2:]
    cells = torch.ones(num_classes * per_class, 3, height, width)
    for label in range(num_classes):
        rows = images[labels == label][:per_class]
        cells[label * per_class: label * per_class + len(rows)] = (rows.float().clamp(-1, 1) + 1) / 2
    grid = make_grid(cells, nrow=per_class, padding=2, pad_value=1.0)
    return _image_png(grid)


def _image_png(grid: torch.Tensor) -> bytes:
    from PIL import Image

    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def order_by_mean_distance(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances ||phi(x) - mu_y||^2 [N] of a GMMC model and the index order [N] that sorts
    images by class, then by that distance (closest to the class mean first)."""
    if not hasattr(model, "means"):
        raise ValueError(f"distances to class means need a GMMC model, got family {getattr(model, 'family', '?')!r}")
    model.eval()
    distances = torch.cat([
        (model.features(images[i:i + batch_size].to(device)) - model.means[labels[i:i + batch_size].to(device)])
        .square().sum(1).cpu()
        for i in range(0, len(images), batch_size)
    ])
    # Sort by distance, then stably by label, so each class block is ordered by distance.
    by_distance = distances.argsort()
    order = by_distance[labels[by_distance].argsort(stable=True)]
    return distances, order


def closest_farthest_png(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, per_class: int, device: torch.device | str = "cpu"
) -> tuple[bytes, bytes]:
    """Two grids (one row per class): the images closest to and farthest from their class mean."""
    _, order = order_by_mean_distance(model, images, labels, device=device)
    sorted_images, sorted_labels = images[order], labels[order]
    num_classes = int(model.num_classes)
    closest = class_rows_png(sorted_images, sorted_labels, num_classes, per_class)
    farthest_order = torch.cat([(sorted_labels == c).nonzero().flatten().flip(0) for c in range(num_classes)])
    farthest = class_rows_png(sorted_images[farthest_order], sorted_labels[farthest_order], num_classes, per_class)
    return closest, farthest
