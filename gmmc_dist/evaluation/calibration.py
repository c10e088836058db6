"""Expected calibration error (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

ECE = sum_b (|B_b| / n) |acc(B_b) - conf(B_b)| over equal-width bins of the confidence
max_y p(y|x) (GMMC paper, Eq. 12, with 20 bins). The statistics are kept as per-bin sums so that
ranks can add theirs with one all-reduce before the final figure is formed.
"""

from __future__ import annotations

import torch

DEFAULT_BINS = 20


def calibration_bin_sums(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = DEFAULT_BINS) -> torch.Tensor:
    """Per-bin sums for ECE from class probabilities [N, C] and labels [N].

    Returns [3, num_bins]: counts, summed confidences and summed correct predictions. Bin b contains
    confidences in (b / n, (b + 1) / n]; a confidence of exactly 0 falls in bin 0.
    """
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == labels).to(probs.dtype)
    index = (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)
    sums = torch.zeros(3, num_bins, dtype=torch.float64, device=probs.device)
    sums[0].index_add_(0, index, torch.ones_like(confidence, dtype=torch.float64))
    sums[1].index_add_(0, index, confidence.double())
    sums[2].index_add_(0, index, correct.double())
    return sums


def ece_from_bin_sums(sums: torch.Tensor) -> float:
    """ECE in [0, 1] from the [3, num_bins] sums of `calibration_bin_sums`."""
    counts, confidence, correct = sums.double()
    total = counts.sum()
    if total == 0:
        raise ValueError("ECE of an empty set is undefined: no predictions were given")
    return float((confidence - correct).abs().sum() / total)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = DEFAULT_BINS) -> float:
    return ece_from_bin_sums(calibration_bin_sums(probs, labels, num_bins))
