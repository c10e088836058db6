"""Energy-based classifiers on a Wide-ResNet: GMMC and the softmax and JEM baselines.

Every model exposes the same interface, used by training, sampling and evaluation:
    features(x)  phi(x), [B, 3, 32, 32] -> [B, d]
    logits(x)    [B, C]; p(y|x) = softmax(logits)
    log_px(x)    log p(x) up to a constant, logsumexp of the logits, [B]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .means import max_mahalanobis_means
from .wrn import WideResNet


class GMMC(nn.Module):
    """Generative Max-Mahalanobis Classifier (Yang et al., ECML-PKDD 2021).

    The joint density is an energy-based model with fixed Max-Mahalanobis class means mu_y:
        E(x, y) = ||phi(x) - mu_y||^2 / (2 gamma^2)                       (Eq. 4, 6)
        p(y|x)  = softmax_y(-||phi(x) - mu_y||^2 / (2 gamma^2))           (Eq. 11)
        log p(x) = logsumexp_y(-E(x, y)) + const                          (Z taken as constant)
    gamma^2 is 1 during training and replaced by its estimate from the training set afterwards
    (`set_gamma2`); it is a buffer, so checkpoints carry it.
    """

    family = "gmmc"

    def __init__(self, backbone: WideResNet, num_classes: int, mean_scale: float = 10.0):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.register_buffer("means", max_mahalanobis_means(num_classes, backbone.feature_dim, mean_scale))
        self.register_buffer("gamma2", torch.tensor(1.0))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def squared_distances(self, features: torch.Tensor) -> torch.Tensor:
        """||phi(x) - mu_c||^2 for every class: [B, d] -> [B, C]."""
        return torch.cdist(features, self.means).square()

    def energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """E(x, y) = ||phi(x) - mu_y||^2 / (2 gamma^2), [B]."""
        distances = (self.features(x) - self.means[y]).square().sum(dim=1)
        return distances / (2 * self.gamma2)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        # Expanded form ||f||^2 - 2 f.mu + ||mu||^2 keeps gradients finite at f = mu (cdist's are not).
        distances = (
            features.square().sum(dim=1, keepdim=True)
            - 2 * features @ self.means.T
            + self.means.square().sum(dim=1)
        )
        return -distances / (2 * self.gamma2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.logits(x), dim=1)

    @torch.no_grad()
    def set_gamma2(self, value: float | torch.Tensor) -> None:
        value = torch.as_tensor(value, dtype=self.gamma2.dtype, device=self.gamma2.device)
        if not torch.isfinite(value) or value <= 0:
            raise ValueError(f"gamma^2 estimate {value.item()} is invalid: it must be positive and finite")
        self.gamma2.copy_(value)


class LinearHeadClassifier(nn.Module):
    """The same backbone with a linear head: the softmax baseline, and JEM with E(x) = -logsumexp f(x)."""

    def __init__(self, backbone: WideResNet, num_classes: int, family: str):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.family = family
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.logits(x), dim=1)


def build_model(config: ModelConfig, family: str = "gmmc") -> nn.Module:
    """Build GMMC ("gmmc") or a baseline ("softmax", "jem") from the model config."""
    backbone = WideResNet(config.depth, config.widen_factor, config.norm, config.leaky_slope)
    if family == "gmmc":
        return GMMC(backbone, config.num_classes, config.mean_scale)
    if family in ("softmax", "jem"):
        return LinearHeadClassifier(backbone, config.num_classes, family)
    raise ValueError(f"unknown model family {family!r}: choose gmmc, softmax or jem")


def model_summary(model: nn.Module) -> dict[str, Any]:
    return {
        "family": model.family,
        "parameters": sum(p.numel() for p in model.parameters()),
        "feature_dim": model.backbone.feature_dim,
    }
