"""Configuration: one dataclass of defaults per concern, presets, overrides and validation.

Defaults are the GMMC paper's settings for CIFAR-10 with a WRN-28-10 (Yang, Ye, Ye, Li and Ji,
"Generative Max-Mahalanobis Classifiers for Image Classification, Generation and More",
ECML-PKDD 2021, Appendix B, Table 8). Presets override a few of them. The command line (`--set
section.key=value`) and Ray Tune's search space address the same dotted keys, so every default
lives here and nowhere else.

Distributed rule: `optim.batch_size_per_worker` stays 64 at any number of workers, so the global
batch is 64 * num_workers and the sampler's per-sample step (alpha / 64 with the batch-mean energy)
does not change. The learning rate is not scaled unless `optim.lr_scaling = "linear"`. Epochs count
passes over the whole training split, warm-up counts optimiser steps, and decay milestones count
epochs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, get_type_hints
from urllib.parse import urlsplit

OBJECTIVES = ("discriminative", "generative", "joint", "softmax", "jem")
"""Training objectives. The first three are the GMMC approaches; softmax and JEM are baselines."""


@dataclass
class ModelConfig:
    depth: int = 28
    """Wide-ResNet depth, 6n + 4 (28 in the paper)."""
    widen_factor: int = 10
    """Wide-ResNet widen factor k; the feature dimension is d = 64 k (640 in the paper)."""
    norm: str = "none"
    """Normalisation in the residual blocks: "none" (the paper removes batch norm) or "batch"."""
    leaky_slope: float = 0.2
    """Negative slope of the LeakyReLU activations."""
    num_classes: int = 10
    mean_scale: float = 10.0
    """S, the norm of every Max-Mahalanobis class mean."""


@dataclass
class SamplerConfig:
    name: str = "staged"
    """Chain update rule: "staged" (Eq. 8), "noise_injected" (Eq. 10) or "sgld" (JEM's baseline)."""
    steps: int = 20
    """tau, update steps per training iteration."""
    step_size: float = 1.0
    """alpha. With the batch-mean energy of the reference code, alpha acts as alpha / batch per sample."""
    latent_std: float = 0.001
    """gamma_s, standard deviation of the latent target z ~ N(mu_y, gamma_s^2 I) (GMMC samplers)."""
    noise_std: float = 0.01
    """Pixel noise of SGLD (JEM only); GMMC's samplers add no pixel noise."""
    labels: str = "uniform"
    """Labels y' of fresh chains: "uniform" over classes (the paper) or "data", the data batch's
    labels with one buffer partition per class (the reference code)."""


@dataclass
class BufferConfig:
    kind: str = "local"
    """"local" (one buffer per worker, capacity / num_workers each) or "shared" (Ray actors)."""
    capacity: int = 100_000
    """Global number of chain states, split across workers or shards."""
    reinit_prob: float = 0.025
    """rho, probability that a drawn chain is replaced by a fresh U(-1, 1) start."""
    num_shards: int = 1
    """Shared buffer only: number of Ray actors holding capacity / num_shards states each. One shard
    was fastest on a 2-core machine (benchmarks/buffer_bench.py); more shards spread memory and
    load over nodes."""
    dtype: str = "float32"
    """Storage dtype of chain states: "float32" or "float16"."""
    snapshot_every_steps: int = 0
    """Shared buffer only: snapshot interval in optimiser steps (0: only with checkpoints)."""


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    """Name recorded in the shard manifest: "cifar10", "cifar100" or "svhn"."""
    shards_url: str = "data/cifar10-shards"
    """Folder or fsspec URL holding `manifest.json` and the webdataset shards."""
    source: str = ""
    """Raw data (ImageFolder tree or official archive) converted into `shards_url` when that has no
    manifest yet. Empty: the shards must exist."""
    train_split: str = "train"
    test_split: str = "test"
    loader_workers: int = 2
    """DataLoader processes per training worker."""
    flip: bool = True
    """Random horizontal flips (off for SVHN, whose digits are not mirror-symmetric)."""
    pad: int = 4
    """Reflect padding before the random 32x32 crop."""
    noise_std: float = 0.03
    """Standard deviation of the Gaussian noise added to training inputs on the [-1, 1] scale."""
    max_train_samples: int = 0
    """Cap on training images used per epoch (0: the whole split). For small presets only."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Adam learning rate at the end of warm-up."""
    lr_scaling: str = "none"
    """"none" keeps `lr` at any number of workers; "linear" multiplies it by num_workers."""
    warmup_iters: int = 1000
    """Linear warm-up length in optimiser steps."""
    decay_epochs: list[int] = field(default_factory=lambda: [30, 50, 80])
    decay_factor: float = 0.3
    epochs: int = 150
    batch_size_per_worker: int = 64
    weight_decay: float = 0.0
    max_abs_loss: float = 1e8
    """Training stops with an error once |loss| exceeds this (divergence guard)."""


@dataclass
class TrainConfig:
    objective: str = "generative"
    """One of OBJECTIVES."""
    beta: float = 0.5
    """Weight of the sample energy in the generative loss (Eq. 7)."""
    joint_switch_epoch: int = 50
    """Joint objective: epochs of discriminative training before generative training starts."""
    joint_ramp_epochs: float = 0.0
    """Joint objective: epochs over which beta rises linearly from 0 to its value (0: hard switch,
    as the reference code)."""
    seed: int = 0
    log_every_steps: int = 50
    checkpoint_every_epochs: int = 1
    max_steps_per_epoch: int = 0
    """Cap on optimiser steps per epoch (0: a full pass). For tests and smoke runs."""
    gamma_samples: int = 0
    """Training images used to estimate gamma^2 after training (0: the whole split)."""
    eval_every_epochs: int = 0
    """Test accuracy every this many epochs, for accuracy curves (0: only after training)."""
    eval_batch_size: int = 256


@dataclass
class RunConfig:
    output: str = "runs/gmmc-cifar10"
    """Folder or fsspec URL for checkpoints, metrics.json and samples.png. A rerun with the same
    output resumes from its latest checkpoint."""
    num_workers: int = 1
    """Ray Train workers (DDP processes)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 0
    """Intra-op threads per worker (0: leave PyTorch's default)."""
    ray_address: str = ""
    """Ray cluster to join ("auto", "ray://host:port"); empty starts a local Ray unless RAY_ADDRESS is set."""
    s3_endpoint_url: str = ""
    """Endpoint of an S3-compatible store for every s3:// location of the run, e.g. "http://127.0.0.1:9000"
    for MinIO. The driver and every Ray worker apply it. Empty: GMMC_S3_ENDPOINT_URL, AWS_ENDPOINT_URL
    or AWS's own endpoint, as each process finds them. Credentials never go here: they come from the
    AWS_* environment variables, ~/.aws or an instance role on each node."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Build a validated config from defaults plus a nested dict of overrides."""
        config = cls()
        apply_overrides(config, values)
        config.validate()
        return config

    def validate(self) -> None:
        _validate(self)

    @property
    def model_family(self) -> str:
        """"gmmc" for the three GMMC objectives, else the baseline's name."""
        return self.train.objective if self.train.objective in ("softmax", "jem") else "gmmc"

    @property
    def uses_sampling(self) -> bool:
        return self.train.objective in ("generative", "joint", "jem")


# Presets: overrides over the paper's defaults, by section.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The paper's GMMC (Gen) on CIFAR-10: WRN-28-10, 150 epochs, tau 20, buffer 100,000.
    "cifar10": {},
    "cifar100": {
        "model": {"num_classes": 100},
        "data": {"dataset": "cifar100", "shards_url": "data/cifar100-shards"},
        "optim": {"decay_epochs": [120, 140]},
        "run": {"output": "runs/gmmc-cifar100"},
    },
    "svhn": {
        "data": {"dataset": "svhn", "shards_url": "data/svhn-shards", "flip": False},
        "run": {"output": "runs/gmmc-svhn"},
    },
    # A demo for a 2-core CPU machine: a WRN-10-2 (d = 128) trained on 20,000 images per epoch, three
    # discriminative epochs at lr 1e-3, then one epoch of generative training at lr 1e-4 with 5-step
    # chains and beta rising linearly from 0 to 0.1. In a trial from the same 40 % model, 50 steps at
    # beta = 0.5 dropped test accuracy to 22 % (5-step chains stay close to noise, whose energy the
    # model then raises for every input), while beta = 0.1 kept 41 %.
    "cifar10-cpu": {
        "model": {"depth": 10, "widen_factor": 2},
        "sampler": {"steps": 5},
        "buffer": {"capacity": 10_000, "reinit_prob": 0.05},
        "data": {"loader_workers": 1, "max_train_samples": 20_000},
        "optim": {"lr": 1e-3, "warmup_iters": 100, "epochs": 4, "decay_epochs": [3], "decay_factor": 0.1},
        "train": {"objective": "joint", "beta": 0.1, "joint_switch_epoch": 3, "joint_ramp_epochs": 1.0,
                  "gamma_samples": 10_000},
        "run": {"output": "runs/gmmc-cifar10-cpu", "num_workers": 2, "torch_threads": 1},
    },
    # The baselines with their own papers' settings. JEM (Grathwohl et al., ICLR 2020): SGLD with
    # step 1 and noise 0.01, 20 steps, a buffer of 10,000 with 5 % reinitialisation.
    "cifar10-softmax": {
        "train": {"objective": "softmax"},
        "run": {"output": "runs/softmax-cifar10"},
    },
    "cifar10-jem": {
        "sampler": {"name": "sgld", "steps": 20, "step_size": 1.0, "noise_std": 0.01},
        "buffer": {"capacity": 10_000, "reinit_prob": 0.05},
        "train": {"objective": "jem"},
        "run": {"output": "runs/jem-cifar10"},
    },
    # The discriminative GMMC on a 2-core CPU machine, for longer accuracy runs with a test
    # accuracy figure after every epoch.
    "cifar10-cpu-dis": {
        "model": {"depth": 10, "widen_factor": 2},
        "data": {"loader_workers": 1},
        "optim": {"lr": 1e-3, "warmup_iters": 200, "epochs": 12, "decay_epochs": [8, 10]},
        "train": {"objective": "discriminative", "gamma_samples": 10_000, "eval_every_epochs": 1},
        "run": {"output": "runs/gmmc-cifar10-cpu-dis", "num_workers": 2, "torch_threads": 1},
    },
    # Minimal sizes for tests: a WRN-10-1 (d = 64) and a few steps per epoch.
    "tiny": {
        "model": {"depth": 10, "widen_factor": 1},
        "sampler": {"steps": 2},
        "buffer": {"capacity": 512, "reinit_prob": 0.05},
        "data": {"loader_workers": 0},
        "optim": {"warmup_iters": 5, "epochs": 2, "decay_epochs": [1], "batch_size_per_worker": 16, "lr": 1e-3},
        "train": {"log_every_steps": 5, "gamma_samples": 256, "eval_batch_size": 128},
        "run": {"output": "runs/tiny", "num_workers": 1, "torch_threads": 1},
    },
}


def build_config(preset: str = "cifar10", overrides: dict[str, Any] | None = None) -> Config:
    """Return the validated config of `preset` with nested `overrides` applied on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    config = Config()
    apply_overrides(config, PRESETS[preset])
    apply_overrides(config, overrides or {})
    config.validate()
    return config


def apply_overrides(config: Config, values: dict[str, Any]) -> None:
    """Write nested `values` ({section: {key: value}}) into `config`, rejecting unknown keys."""
    for section_name, section_values in values.items():
        if section_name not in _sections():
            raise ValueError(
                f"unknown config section {section_name!r}: choose one of {', '.join(_sections())}"
            )
        if not isinstance(section_values, dict):
            raise ValueError(f"config section {section_name!r} must be a mapping, got {section_values!r}")
        section = getattr(config, section_name)
        hints = get_type_hints(type(section))
        for key, value in section_values.items():
            if key not in hints:
                raise ValueError(
                    f"unknown config key {section_name}.{key}: choose one of "
                    f"{', '.join(sorted(hints))}"
                )
            setattr(section, key, _coerce(f"{section_name}.{key}", value, hints[key]))


def parse_assignments(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ["optim.lr=3e-4", "train.objective=joint"] into nested overrides.

    Values are parsed as JSON where possible (numbers, booleans, lists), else kept as strings.
    """
    overrides: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"invalid override {assignment!r}: write it as section.key=value, e.g. optim.lr=3e-4")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(section, {})[name] = value
    return overrides


def merge_overrides(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(copy.deepcopy(values))
    return merged


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's type, converting only lossless cases (int -> float)."""
    kind = str(annotation)
    if annotation is bool or kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif annotation is int or kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float or kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str or kind == "str":
        if isinstance(value, str):
            return value
    elif kind.startswith("list"):
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
    raise ValueError(f"invalid value {value!r} for {key}: expected {kind}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"invalid {key}={value!r}: choose one of {', '.join(choices)}")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high) or math.isnan(value):
        raise ValueError(f"invalid {key}={value}: it must lie in [{low}, {high}]")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or math.isnan(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"invalid {key}={value}: it must be {bound}")


def _check_endpoint_url(key: str, value: str) -> None:
    """Accept "" or an http(s)://host[:port][/path] URL without user name, password, query or fragment."""
    if not value:
        return
    parts = urlsplit(value)
    try:
        parts.port
    except ValueError:
        raise ValueError(f"invalid {key}={value!r}: the port is not a number in 0-65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid {key}={value!r}: give an http:// or https:// URL such as http://127.0.0.1:9000")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"invalid {key}: the URL contains a user name or password; give the endpoint without them "
            "and set credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws or an instance role"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"invalid {key}={value!r}: remove the query string or fragment from the endpoint URL")


def _validate(config: Config) -> None:
    m, s, b, d, o, t, r = (config.model, config.sampler, config.buffer, config.data, config.optim,
                           config.train, config.run)
    if m.depth < 10 or (m.depth - 4) % 6 != 0:
        raise ValueError(f"invalid model.depth={m.depth}: a Wide-ResNet depth is 6n + 4 with n >= 1 (10, 16, 22, 28, ...)")
    _check_positive("model.widen_factor", m.widen_factor)
    _check_choice("model.norm", m.norm, ("none", "batch"))
    _check_positive("model.num_classes", m.num_classes)
    _check_positive("model.mean_scale", m.mean_scale)
    feature_dim = 64 * m.widen_factor
    if config.model_family == "gmmc" and m.num_classes > feature_dim + 1:
        raise ValueError(
            f"model.num_classes={m.num_classes} exceeds feature dimension + 1 = {feature_dim + 1}: "
            f"Max-Mahalanobis means need C <= d + 1; raise model.widen_factor to at least "
            f"{math.ceil((m.num_classes - 1) / 64)}"
        )

    _check_choice("sampler.name", s.name, ("staged", "noise_injected", "sgld"))
    _check_positive("sampler.steps", s.steps)
    _check_positive("sampler.step_size", s.step_size)
    _check_positive("sampler.latent_std", s.latent_std, allow_zero=True)
    _check_positive("sampler.noise_std", s.noise_std, allow_zero=True)
    _check_choice("sampler.labels", s.labels, ("uniform", "data"))
    if t.objective == "jem" and s.name != "sgld":
        raise ValueError(f"train.objective='jem' needs sampler.name='sgld', got {s.name!r}")
    if t.objective in ("generative", "joint") and s.name == "sgld":
        raise ValueError("GMMC objectives use sampler.name 'staged' or 'noise_injected', not 'sgld'")

    _check_choice("buffer.kind", b.kind, ("local", "shared"))
    _check_positive("buffer.capacity", b.capacity)
    _check_range("buffer.reinit_prob", b.reinit_prob, 0.0, 1.0)
    _check_positive("buffer.num_shards", b.num_shards)
    _check_choice("buffer.dtype", b.dtype, ("float32", "float16"))
    _check_positive("buffer.snapshot_every_steps", b.snapshot_every_steps, allow_zero=True)

    _check_choice("data.dataset", d.dataset, ("cifar10", "cifar100", "svhn"))
    if not d.shards_url:
        raise ValueError("data.shards_url is empty: give the folder or URL of the shards (manifest.json)")
    _check_positive("data.loader_workers", d.loader_workers, allow_zero=True)
    _check_positive("data.pad", d.pad, allow_zero=True)
    _check_positive("data.noise_std", d.noise_std, allow_zero=True)
    _check_positive("data.max_train_samples", d.max_train_samples, allow_zero=True)

    _check_positive("optim.lr", o.lr)
    _check_choice("optim.lr_scaling", o.lr_scaling, ("none", "linear"))
    _check_positive("optim.warmup_iters", o.warmup_iters, allow_zero=True)
    _check_positive("optim.epochs", o.epochs)
    _check_range("optim.decay_factor", o.decay_factor, 0.0, 1.0)
    if sorted(o.decay_epochs) != o.decay_epochs or any(e <= 0 for e in o.decay_epochs):
        raise ValueError(f"invalid optim.decay_epochs={o.decay_epochs}: give increasing positive epochs")
    _check_positive("optim.batch_size_per_worker", o.batch_size_per_worker)
    _check_positive("optim.weight_decay", o.weight_decay, allow_zero=True)

    _check_choice("train.objective", t.objective, OBJECTIVES)
    _check_range("train.beta", t.beta, 0.0, 1.0)
    _check_positive("train.joint_switch_epoch", t.joint_switch_epoch, allow_zero=True)
    _check_positive("train.joint_ramp_epochs", t.joint_ramp_epochs, allow_zero=True)
    _check_positive("train.log_every_steps", t.log_every_steps)
    _check_positive("train.checkpoint_every_epochs", t.checkpoint_every_epochs)
    _check_positive("train.max_steps_per_epoch", t.max_steps_per_epoch, allow_zero=True)
    _check_positive("train.gamma_samples", t.gamma_samples, allow_zero=True)
    _check_positive("train.eval_every_epochs", t.eval_every_epochs, allow_zero=True)
    _check_positive("train.eval_batch_size", t.eval_batch_size)

    if not r.output:
        raise ValueError("run.output is empty: give a folder or fsspec URL for checkpoints and results")
    _check_positive("run.num_workers", r.num_workers)
    _check_positive("run.cpus_per_worker", r.cpus_per_worker)
    _check_positive("run.torch_threads", r.torch_threads, allow_zero=True)
    _check_endpoint_url("run.s3_endpoint_url", r.s3_endpoint_url)
    if b.kind == "local" and b.capacity < r.num_workers:
        raise ValueError(f"buffer.capacity={b.capacity} is smaller than run.num_workers={r.num_workers}")
