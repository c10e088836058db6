"""Wide-ResNet feature extractor phi(x) (Zagoruyko and Komodakis, "Wide Residual Networks", 2016).

GMMC's variant: pre-activation blocks, normalisation optional (the GMMC paper removes batch norm
and dropout), LeakyReLU(0.2), convolutions with bias, global average pooling and no linear head,
so the output is the feature vector phi(x) of dimension d = 64 * widen_factor.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


class _Block(nn.Module):
    """Pre-activation residual block: norm, act, conv3x3, norm, act, conv3x3, plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, slope: float):
        super().__init__()
        bias = norm == "none"
        self.norm1 = _norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.norm2 = _norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=bias)
        self.act = nn.LeakyReLU(slope)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act(self.norm1(x)))
        out = self.conv2(self.act(self.norm2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-k feature extractor: [B, 3, 32, 32] in [-1, 1] -> [B, 64 k]."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, norm: str = "none", leaky_slope: float = 0.2):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"invalid Wide-ResNet depth {depth}: use 6n + 4 with n >= 1 (10, 16, 22, 28, ...)")
        if norm not in ("none", "batch"):
            raise ValueError(f"invalid norm {norm!r}: use 'none' or 'batch'")
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.feature_dim = widths[-1]

        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=norm == "none")
        layers: list[nn.Module] = []
        in_channels = widths[0]
        for group, out_channels in enumerate(widths[1:]):
            for index in range(blocks_per_group):
                stride = 2 if group > 0 and index == 0 else 1
                layers.append(_Block(in_channels, out_channels, stride, norm, leaky_slope))
                in_channels = out_channels
        self.blocks = nn.Sequential(*layers)
        self.final_norm = _norm(norm, in_channels)
        self.act = nn.LeakyReLU(leaky_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        out = self.act(self.final_norm(out))
        return out.mean(dim=(2, 3))
