"""Configuration: presets, overrides and the errors raised before any training starts."""

import pytest

from gmmc_dist.config import PRESETS, build_config, parse_assignments


def test_presets_validate():
    for name in PRESETS:
        config = build_config(name)
        assert config.optim.batch_size_per_worker > 0


def test_paper_defaults():
    config = build_config("cifar10")
    assert (config.model.depth, config.model.widen_factor, config.model.norm) == (28, 10, "none")
    assert (config.optim.lr, config.optim.warmup_iters, config.optim.decay_epochs) == (1e-4, 1000, [30, 50, 80])
    assert (config.optim.epochs, config.optim.batch_size_per_worker, config.optim.decay_factor) == (150, 64, 0.3)
    assert (config.sampler.steps, config.sampler.step_size) == (20, 1.0)
    assert (config.buffer.capacity, config.buffer.reinit_prob) == (100_000, 0.025)
    assert (config.train.beta, config.model.mean_scale) == (0.5, 10.0)
    assert build_config("cifar100").optim.decay_epochs == [120, 140]
    assert build_config("svhn").data.flip is False


def test_assignments_parse_types():
    overrides = parse_assignments(["optim.lr=3e-4", "train.objective=joint", "optim.decay_epochs=[5, 9]"])
    config = build_config("tiny", overrides)
    assert config.optim.lr == 3e-4
    assert config.train.objective == "joint"
    assert config.optim.decay_epochs == [5, 9]


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("cifar11", {}, "unknown preset 'cifar11'"),
        ("tiny", {"optim": {"learning_rate": 0.1}}, "unknown config key optim.learning_rate"),
        ("tiny", {"optimizer": {"lr": 0.1}}, "unknown config section 'optimizer'"),
        ("tiny", {"model": {"num_classes": 100}}, r"model.num_classes=100 exceeds feature dimension \+ 1 = 65"),
        ("tiny", {"buffer": {"reinit_prob": 1.2}}, r"buffer.reinit_prob=1.2: it must lie in \[0.0, 1.0\]"),
        ("tiny", {"buffer": {"reinit_prob": -0.1}}, "buffer.reinit_prob=-0.1"),
        ("tiny", {"train": {"beta": 2.0}}, r"train.beta=2.0: it must lie in \[0.0, 1.0\]"),
        ("tiny", {"train": {"objective": "energy"}}, "invalid train.objective='energy'"),
        ("tiny", {"optim": {"lr": "fast"}}, "invalid value 'fast' for optim.lr"),
        ("tiny", {"model": {"depth": 12}}, "invalid model.depth=12"),
        ("tiny", {"train": {"objective": "jem"}}, "needs sampler.name='sgld'"),
    ],
)
def test_bad_config_rejected(preset, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(preset, overrides)


def test_bad_assignment_rejected():
    with pytest.raises(ValueError, match="write it as section.key=value"):
        parse_assignments(["lr=0.1"])
