"""Sampling chains: each sampler lowers the energy of a fixed small model and stays off the weights."""

import pytest
import torch

from gmmc_dist.config import ModelConfig, SamplerConfig
from gmmc_dist.models import build_model
from gmmc_dist.samplers import NoiseInjectedSampler, StagedSampler, build_sampler


def _model(family: str):
    torch.manual_seed(0)
    return build_model(ModelConfig(depth=10, widen_factor=1), family)


def _chains(batch: int = 16):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 32, 32, generator=generator) * 2 - 1
    y = torch.arange(batch) % 10
    return x, y


@pytest.mark.parametrize("name", ["staged", "noise_injected"])
def test_gmmc_samplers_lower_class_energy(name):
    model = _model("gmmc")
    x, y = _chains()
    sampler = build_sampler(SamplerConfig(name=name, steps=10, step_size=16.0))
    with torch.no_grad():
        before = model.energy(x, y)
    samples = sampler.run(model, x, y)
    with torch.no_grad():
        after = model.energy(samples, y)
    assert after.mean() < before.mean()
    assert (after < before).float().mean() >= 0.9
    assert samples.min() >= -1.0
    assert samples.max() <= 1.0
    assert not samples.requires_grad


def test_sgld_raises_log_px_of_jem():
    model = _model("jem")
    x, y = _chains()
    torch.manual_seed(2)
    sampler = build_sampler(SamplerConfig(name="sgld", steps=10, step_size=1.0, noise_std=0.001))
    with torch.no_grad():
        before = -model.log_px(x)  # JEM energy E(x) = -logsumexp f(x)
    samples = sampler.run(model, x, y)
    with torch.no_grad():
        after = -model.log_px(samples)
    assert after.mean() < before.mean()


@pytest.mark.parametrize("name", ["staged", "noise_injected", "sgld"])
def test_sampler_leaves_weight_gradients_untouched(name):
    model = _model("jem" if name == "sgld" else "gmmc")
    model.train()
    x, y = _chains(4)
    build_sampler(SamplerConfig(name=name, steps=3)).run(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # the sampler restores the mode it found


def test_staged_keeps_latent_noise_injected_redraws():
    assert StagedSampler.redraw_latent is False
    assert NoiseInjectedSampler.redraw_latent is True
    model = _model("gmmc")
    x, y = _chains(4)
    torch.manual_seed(3)
    staged = StagedSampler(steps=3, step_size=1.0, latent_std=0.5).run(model, x, y)
    torch.manual_seed(3)
    injected = NoiseInjectedSampler(steps=3, step_size=1.0, latent_std=0.5).run(model, x, y)
    assert not torch.equal(staged, injected)


def test_unknown_sampler_rejected():
    config = SamplerConfig()
    config.name = "langevin"
    with pytest.raises(ValueError, match="unknown sampler 'langevin'"):
        build_sampler(config)
