"""Ray Tune sweep over generative-training settings, two tiny trials through real Ray Train runs."""

import json

import pytest

from conftest import copy_cifar_subset

from gmmc_dist.config import build_config
from gmmc_dist.tune import run_sweep, to_param_space, trial_config


def test_search_space_rejects_unknown_key():
    with pytest.raises(ValueError, match="unknown config key train.betta"):
        to_param_space({"train.betta": ("uniform", 0.1, 1.0)})
    with pytest.raises(ValueError, match="unknown distribution 'normal'"):
        to_param_space({"train.beta": ("normal", 0.1, 1.0)})


def test_trial_config_applies_sampled_values(tmp_path):
    base = build_config("tiny").to_dict()
    config = trial_config(base, {"train.beta": 0.25, "sampler.step_size": 2.0}, str(tmp_path / "t1"))
    assert config.train.beta == 0.25
    assert config.sampler.step_size == 2.0
    assert config.run.output == str(tmp_path / "t1")
    with pytest.raises(ValueError, match="buffer.reinit_prob"):
        trial_config(base, {"buffer.reinit_prob": 1.5}, str(tmp_path / "t2"))


@pytest.mark.slow
def test_sweep_runs_two_trials(ray_session, data_root, tmp_path):
    source = copy_cifar_subset(data_root, tmp_path / "source", {"train": 16, "test": 5})
    config = build_config("tiny", {
        "data": {"source": str(source), "shards_url": str(tmp_path / "shards")},
        "run": {"output": str(tmp_path / "sweep"), "num_workers": 1},
        "train": {"objective": "generative"},
        "optim": {"epochs": 2},
    })
    rows = run_sweep(config, {"train.beta": ("uniform", 0.1, 0.9)}, num_samples=2, asha=False)
    assert len(rows) == 2
    for row in rows:
        assert row["error"] is None
        assert 0.1 <= row["train.beta"] <= 0.9
        assert row["epochs"] == 2
    assert rows[0]["train.beta"] != rows[1]["train.beta"]
    trial_histories = sorted((tmp_path / "sweep").glob("*/history.json"))
    assert len(trial_histories) == 2
    betas = sorted(json.loads(path.read_text())[-1]["beta"] for path in trial_histories)
    assert betas == pytest.approx(sorted(row["train.beta"] for row in rows))
