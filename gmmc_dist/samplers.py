"""Sampling chains: the update rules that turn chain states x_0 into model samples x_tau.

All samplers share one interface, `sampler.run(model, x, y) -> x_tau`, and the same hot-path rules:
gradients are taken with respect to the inputs only (`torch.autograd.grad(..., inputs=x)`, so no
weight gradients are formed), no graph is retained between steps, nothing is copied to the host,
and the returned states are detached. Pass the unwrapped model, not its DDP wrapper: sampling must
not trigger gradient all-reduces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from .config import SamplerConfig


class Sampler(ABC):
    """Runs `steps` updates on a batch of chains x: [B, 3, H, W] in [-1, 1] with labels y: [B]."""

    def __init__(self, steps: int, step_size: float):
        self.steps = steps
        self.step_size = step_size

    @abstractmethod
    def _step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: dict) -> torch.Tensor:
        """Return the next state of the chains (no graph attached)."""

    def _start(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
        return {}

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()  # the reference code samples in eval mode; it matters only with batch norm
        try:
            with torch.enable_grad():
                x = x.detach().clone()
                state = self._start(model, x, y)
                for _ in range(self.steps):
                    x = self._step(model, x, y, state)
        finally:
            model.train(was_training)
        return x.detach()


class StagedSampler(Sampler):
    """Staged sampling (GMMC, Eq. 8): draw z ~ N(mu_y, gamma_s^2 I) once per chain, then run
    gradient descent on E_z(x) = 0.5 ||phi(x) - z||^2 in pixel space, without pixel noise:
        x <- clamp(x - alpha * d/dx mean_batch E_z(x), -1, 1)
    The energy is averaged over the batch as in the reference code, so alpha acts as alpha / B per
    chain.
    """

    redraw_latent = False

    def __init__(self, steps: int, step_size: float, latent_std: float):
        super().__init__(steps, step_size)
        self.latent_std = latent_std

    def _draw_latent(self, model: nn.Module, y: torch.Tensor) -> torch.Tensor:
        means = model.means[y]
        return means + self.latent_std * torch.randn_like(means)

    def _start(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
        if not hasattr(model, "means"):
            raise TypeError("staged and noise-injected sampling need a GMMC model with class means")
        return {"z": self._draw_latent(model, y)}

    def _step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: dict) -> torch.Tensor:
        if self.redraw_latent:
            state["z"] = self._draw_latent(model, y)
        x.requires_grad_(True)
        energy = 0.5 * (model.features(x) - state["z"]).square().sum(dim=1).mean()
        (grad,) = torch.autograd.grad(energy, inputs=x)
        return (x.detach() - self.step_size * grad).clamp_(-1.0, 1.0)


class NoiseInjectedSampler(StagedSampler):
    """Noise-injected sampling (GMMC, Eq. 9-10): as staged sampling, but z = mu_y + gamma_s * eps is
    redrawn at every step, which injects noise in feature space instead of pixel space."""

    redraw_latent = True


class SGLDSampler(Sampler):
    """Stochastic gradient Langevin dynamics of JEM (Grathwohl et al., ICLR 2020):
        x <- x + alpha * d/dx sum_batch logsumexp f(x) + sigma * N(0, I)
    with alpha = 1 and sigma = 0.01 by default. Labels are ignored (JEM samples p(x))."""

    def __init__(self, steps: int, step_size: float, noise_std: float):
        super().__init__(steps, step_size)
        self.noise_std = noise_std

    def _step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: dict) -> torch.Tensor:
        x.requires_grad_(True)
        log_px = model.log_px(x).sum()
        (grad,) = torch.autograd.grad(log_px, inputs=x)
        return x.detach() + self.step_size * grad + self.noise_std * torch.randn_like(x)


def build_sampler(config: SamplerConfig) -> Sampler:
    """Return the sampler named by `config.name` ("staged", "noise_injected" or "sgld")."""
    if config.name == "staged":
        return StagedSampler(config.steps, config.step_size, config.latent_std)
    if config.name == "noise_injected":
        return NoiseInjectedSampler(config.steps, config.step_size, config.latent_std)
    if config.name == "sgld":
        return SGLDSampler(config.steps, config.step_size, config.noise_std)
    raise ValueError(f"unknown sampler {config.name!r}: choose staged, noise_injected or sgld")
