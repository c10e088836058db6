"""Ray Tune sweeps over the generative-training settings (beta, sampler step size, rho).

Each trial is a driver function. It builds the trial's config from the base config plus the
sampled values (dotted keys such as "train.beta", the same keys as `--set`) and runs its own
TorchTrainer, whose per-epoch reports reach Tune through `TuneReportCallback`. This is the pattern
Ray 2.60 supports for Tune with Train (`Tuner(TorchTrainer(...))` is rejected there).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from . import storage
from .config import Config, apply_overrides
from .train.driver import absolute_locations, build_trainer, connect_ray, prepare_shards, shared_buffer_actors

logger = logging.getLogger("gmmc_dist.tune")

DEFAULT_SEARCH_SPACE = {
    "train.beta": ("uniform", 0.1, 1.0),
    "sampler.step_size": ("loguniform", 0.1, 10.0),
    "buffer.reinit_prob": ("uniform", 0.01, 0.1),
}
"""Dotted config key -> (distribution, low, high). beta and rho must stay inside [0, 1]."""


def to_param_space(search_space: dict[str, tuple[str, float, float]]) -> dict[str, Any]:
    """Turn {"train.beta": ("uniform", 0.1, 1.0)} into Tune distributions, checking every key."""
    distributions = {"uniform": tune.uniform, "loguniform": tune.loguniform}
    probe = Config()
    space = {}
    for key, (kind, low, high) in search_space.items():
        if kind not in distributions:
            raise ValueError(f"unknown distribution {kind!r} for {key}: choose uniform or loguniform")
        section, _, name = key.partition(".")
        apply_overrides(probe, {section: {name: low}})  # rejects unknown keys and wrong types
        space[key] = distributions[kind](low, high)
    return space


def trial_config(base: dict[str, Any], sampled: dict[str, Any], output: str) -> Config:
    overrides: dict[str, dict[str, Any]] = {"run": {"output": output}}
    for key, value in sampled.items():
        section, _, name = key.partition(".")
        overrides.setdefault(section, {})[name] = value
    config = Config.from_dict(copy.deepcopy(base))
    apply_overrides(config, overrides)
    config.validate()
    return config


def _run_trial(trial_space: dict[str, Any]) -> None:
    """Tune trainable: one TorchTrainer run per trial, its output under the sweep's folder."""
    base, sweep_output = trial_space.pop("_base"), trial_space.pop("_sweep_output")
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(base, trial_space, storage.join(sweep_output, trial_id))
    with shared_buffer_actors(config) as loop_config:
        trainer = build_trainer(config, loop_config, run_name=f"train-{trial_id}", callbacks=[TuneReportCallback()])
        result = trainer.fit()
    if result.error is not None:
        raise result.error


def run_sweep(
    base: Config,
    search_space: dict[str, tuple[str, float, float]] | None = None,
    num_samples: int = 8,
    metric: str = "train_accuracy",
    mode: str = "max",
    max_concurrent_trials: int = 1,
    asha: bool = True,
) -> list[dict[str, Any]]:
    """Run a sweep and return one row per trial: the sampled values and the last reported metric.

    With `asha`, trials that fall behind at an epoch boundary stop early. Use a metric that every
    epoch reports (`train_accuracy`, `loss`, or `test_accuracy` with `train.eval_every_epochs=1`,
    best on a held-out split named by `data.test_split`).
    """
    base = absolute_locations(base)
    storage.ensure_writable(base.run.output)
    prepare_shards(base)
    connect_ray(base.run.ray_address)
    param_space = to_param_space(search_space or DEFAULT_SEARCH_SPACE)
    param_space.update({"_base": base.to_dict(), "_sweep_output": base.run.output})
    scheduler = None
    if asha:
        scheduler = ASHAScheduler(max_t=base.optim.epochs + 2, grace_period=1, reduction_factor=2)
    tuner = tune.Tuner(
        _run_trial,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=num_samples, scheduler=scheduler,
            max_concurrent_trials=max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name="sweep", storage_path=storage.join(base.run.output, "tune")),
    )
    results = tuner.fit()
    rows = []
    for result in results:
        sampled = {key: result.config[key] for key in param_space if not key.startswith("_")}
        metrics = result.metrics or {}
        rows.append({**sampled, metric: metrics.get(metric), "epochs": metrics.get("epochs", metrics.get("epoch")),
                     "error": repr(result.error) if result.error else None})
    return rows
