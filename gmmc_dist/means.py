"""Max-Mahalanobis class means (Pang, Du and Zhu, "Max-Mahalanobis Linear Discriminant Analysis
Networks", ICML 2018), the fixed centres of GMMC's class-conditional Gaussians."""

from __future__ import annotations

import math

import torch


def max_mahalanobis_means(num_classes: int, dim: int, scale: float = 10.0) -> torch.Tensor:
    """Build C means in R^d with equal norm `scale` and maximal equal pairwise angles.

    Recursion (Pang et al. 2018, Algorithm 1), computed in float64:
        mu_1 = e_1
        for i = 2..C:
            for j < i:  mu_i[j] = -(1 + <mu_i, mu_j> (C - 1)) / (mu_j[j] (C - 1))
            mu_i[i] = sqrt(1 - ||mu_i||^2)
        mu_k <- scale * mu_k
    The result satisfies ||mu_k|| = S and <mu_i, mu_j> = -S^2 / (C - 1) for i != j.

    Returns a float32 tensor of shape [C, d]. For C = d + 1 the last mean's final coordinate
    is 0 up to rounding, so the square root's argument is clamped at 0 instead of turning NaN.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} is invalid: Max-Mahalanobis means need at least 2 classes")
    if dim < 1:
        raise ValueError(f"feature dimension dim={dim} is invalid: it must be at least 1")
    if num_classes > dim + 1:
        raise ValueError(
            f"num_classes={num_classes} exceeds dim + 1 = {dim + 1}: C equiangular means need a feature "
            f"dimension of at least C - 1; raise the backbone's widen_factor (d = 64 * widen_factor) "
            f"so that d >= {num_classes - 1}"
        )
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"mean scale S={scale} is invalid: it must be a positive finite number")

    c = num_classes
    means = torch.zeros(c, dim, dtype=torch.float64)
    means[0, 0] = 1.0
    for i in range(1, c):
        for j in range(i):
            means[i, j] = -(1.0 + torch.dot(means[i], means[j]) * (c - 1)) / (means[j, j] * (c - 1))
        if i < dim:
            remainder = 1.0 - means[i].square().sum()
            means[i, i] = remainder.clamp_min(0.0).sqrt()
    return (means * scale).to(torch.float32)
