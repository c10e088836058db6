"""Training objectives: the three GMMC approaches and the softmax and JEM baselines.

Each objective maps a data batch and, when it samples, a batch of model samples to a scalar loss
plus detached per-batch terms for logging. The model passed here is the DDP-wrapped one: data and
samples go through it in a single forward call, so DDP runs one forward per backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig


@dataclass
class LossTerms:
    loss: torch.Tensor
    """Scalar loss to back-propagate."""
    data_energy: torch.Tensor
    """Mean energy of the data batch (detached)."""
    sample_energy: torch.Tensor
    """Mean energy of the model samples (detached; 0 when the step draws none)."""
    correct: torch.Tensor
    """Number of correctly classified data points in the batch (detached)."""


def beta_at(config: TrainConfig, epoch_progress: float) -> float:
    """Weight of the sample term at fractional epoch `epoch_progress` (0 at the start of training).

    generative: beta throughout. joint: 0 for `joint_switch_epoch` epochs, then a linear ramp to
    beta over `joint_ramp_epochs` (a ramp of 0 is the reference code's hard switch).
    discriminative, softmax: 0. jem: 1 (its contrastive term has no weight).
    """
    if config.objective == "generative":
        return config.beta
    if config.objective == "jem":
        return 1.0
    if config.objective != "joint":
        return 0.0
    elapsed = epoch_progress - config.joint_switch_epoch
    if elapsed < 0:
        return 0.0
    if config.joint_ramp_epochs == 0:
        return config.beta
    return config.beta * min(1.0, elapsed / config.joint_ramp_epochs)


def gmmc_loss(
    model: nn.Module, means: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
    samples: torch.Tensor | None, sample_labels: torch.Tensor | None, beta: float,
) -> LossTerms:
    """GMMC loss with gamma = 1 during training (as the reference code):
        discriminative, Eq. 5:  mean_data 0.5 ||phi(x) - mu_y||^2
        generative, Eq. 7:      mean_data E(x+, y+) - beta * mean_samples E(x-, y-)
    where E(x, y) = 0.5 ||phi(x) - mu_y||^2; beta = 0 reduces Eq. 7 to Eq. 5.
    x: [B, 3, H, W], y: [B]; samples: [B', 3, H, W] or None; means: [C, d].
    """
    inputs = x if samples is None else torch.cat([x, samples])
    features = model(inputs)
    data_features = features[: len(x)]
    data_energy = 0.5 * (data_features - means[y]).square().sum(dim=1)
    loss = data_energy.mean()
    sample_energy = torch.zeros((), device=x.device)
    if samples is not None:
        sample_energy = (0.5 * (features[len(x):] - means[sample_labels]).square().sum(dim=1)).mean()
        loss = loss - beta * sample_energy
    with torch.no_grad():
        distances = torch.cdist(data_features, means)
        correct = (distances.argmin(dim=1) == y).sum()
    return LossTerms(loss, data_energy.mean().detach(), sample_energy.detach(), correct)


def softmax_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LossTerms:
    """Cross-entropy of a linear head; the reported energy is JEM's -logsumexp f(x)."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    with torch.no_grad():
        data_energy = -torch.logsumexp(logits, dim=1).mean()
        correct = (logits.argmax(dim=1) == y).sum()
    return LossTerms(loss, data_energy, torch.zeros((), device=x.device), correct)


def jem_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: torch.Tensor) -> LossTerms:
    """JEM (Grathwohl et al., ICLR 2020): cross-entropy + mean E(x+) - mean E(x-), E(x) = -logsumexp f(x)."""
    logits = model(torch.cat([x, samples]))
    data_logits, sample_logits = logits[: len(x)], logits[len(x):]
    data_energy = -torch.logsumexp(data_logits, dim=1).mean()
    sample_energy = -torch.logsumexp(sample_logits, dim=1).mean()
    loss = F.cross_entropy(data_logits, y) + data_energy - sample_energy
    with torch.no_grad():
        correct = (data_logits.argmax(dim=1) == y).sum()
    return LossTerms(loss, data_energy.detach(), sample_energy.detach(), correct)
