"""Max-Mahalanobis means, the GMMC heads and the Wide-ResNet."""


import pytest
import torch

from gmmc_dist.config import ModelConfig
from gmmc_dist.means import max_mahalanobis_means
from gmmc_dist.models import GMMC, build_model


@pytest.mark.parametrize("num_classes, dim", [(10, 640), (100, 640), (11, 10)])
def test_means_norms_and_inner_products(num_classes, dim):
    scale = 10.0
    means = max_mahalanobis_means(num_classes, dim, scale).double()
    assert means.shape == (num_classes, dim)
    assert not torch.isnan(means).any()
    norms = means.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, scale), rtol=0, atol=1e-5)
    gram = means @ means.T
    off_diagonal = gram[~torch.eye(num_classes, dtype=torch.bool)]
    expected = -(scale**2) / (num_classes - 1)
    torch.testing.assert_close(off_diagonal, torch.full_like(off_diagonal, expected), rtol=0, atol=1e-4)


def test_means_full_dimension_last_coordinate_zero():
    # C = d + 1: the last mean lies in the span of the others, so its own coordinate would be sqrt(~0).
    means = max_mahalanobis_means(11, 10, 1.0).double()
    assert torch.isfinite(means).all()
    assert means.sum(dim=0).abs().max() < 1e-6  # equiangular simplex means sum to zero


def test_means_reject_too_many_classes():
    with pytest.raises(ValueError, match=r"num_classes=12 exceeds dim \+ 1 = 11"):
        max_mahalanobis_means(12, 10)


def _tiny_gmmc() -> GMMC:
    torch.manual_seed(0)
    return build_model(ModelConfig(depth=10, widen_factor=1, num_classes=10), "gmmc").double()


def test_posterior_and_log_px_match_direct_formula():
    model = _tiny_gmmc()
    model.set_gamma2(0.37)
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64) * 2 - 1
    features = model.features(x)

    # Direct computation of Eq. 11 and log p(x) = log sum_y exp(-E(x, y)), with explicit loops.
    energies = torch.empty(8, 10, dtype=torch.float64)
    for i in range(8):
        for c in range(10):
            energies[i, c] = ((features[i] - model.means[c]) ** 2).sum() / (2 * 0.37)
    unnormalised = torch.exp(-energies)
    expected_posterior = unnormalised / unnormalised.sum(dim=1, keepdim=True)
    expected_log_px = torch.log(unnormalised.sum(dim=1))

    torch.testing.assert_close(torch.softmax(model.logits(x), dim=1), expected_posterior, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model.log_px(x), expected_log_px, rtol=1e-9, atol=1e-9)
    labels = torch.arange(8) % 10
    torch.testing.assert_close(model.energy(x, labels), energies[torch.arange(8), labels], rtol=1e-9, atol=1e-9)


def test_log_px_stays_finite_for_large_energies():
    model = _tiny_gmmc()
    model.set_gamma2(1e-4)  # exp(-E) underflows to 0 in float64 here; logsumexp must not
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64) * 2 - 1
    assert torch.isfinite(model.log_px(x)).all()
    assert (torch.exp(model.logits(x)).sum(dim=1) == 0).all()


def test_gamma2_rejects_non_positive():
    model = _tiny_gmmc()
    with pytest.raises(ValueError, match="gamma"):
        model.set_gamma2(0.0)
    assert model.gamma2.item() == 1.0


@pytest.mark.parametrize("depth, widen, norm", [(10, 1, "none"), (16, 2, "batch")])
def test_wide_resnet_shapes(depth, widen, norm):
    model = build_model(ModelConfig(depth=depth, widen_factor=widen, norm=norm), "gmmc")
    features = model.features(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, 64 * widen)
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert (len(batch_norms) > 0) == (norm == "batch")
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.2}


def test_baseline_heads_have_logits():
    for family in ("softmax", "jem"):
        model = build_model(ModelConfig(depth=10, widen_factor=1), family)
        logits = model.logits(torch.zeros(3, 3, 32, 32))
        assert logits.shape == (3, 10)
        torch.testing.assert_close(model.log_px(torch.zeros(3, 3, 32, 32)), torch.logsumexp(logits, dim=1))
