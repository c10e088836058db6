"""Training end to end on object storage: shards, Ray checkpoints and results on a loopback S3 server.

The moto server from the `s3_server` fixture listens on 127.0.0.1. Ray was started without
GMMC_S3_ENDPOINT_URL, and AWS_ENDPOINT_URL points at a closed loopback port, so the workers reach
the server only if `run.s3_endpoint_url` is applied in every process.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import s3fs
import torch
from conftest import CIFAR10_CLASSES, reset_s3
from PIL import Image

from gmmc_dist import checkpoint, storage
from gmmc_dist.config import build_config
from gmmc_dist.train.driver import run_training
from gmmc_dist.train.results import evaluate_test_split

BUCKET = "bucket"
SHARDS_URL = f"s3://{BUCKET}/shards"
OUTPUT_URL = f"s3://{BUCKET}/run"
TRAIN_PER_CLASS, TEST_PER_CLASS = 32, 10
SHARD_SIZE = 100
BATCH_PER_WORKER, WORKERS = 16, 2
STEPS_PER_EPOCH = TRAIN_PER_CLASS * len(CIFAR10_CLASSES) // (BATCH_PER_WORKER * WORKERS)  # 10


@pytest.fixture(scope="module")
def small_cifar(data_root, tmp_path_factory) -> Path:
    """An ImageFolder copy of the first real CIFAR-10 images: 32 train and 10 test per class."""
    target = tmp_path_factory.mktemp("cifar-s3")
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for name in CIFAR10_CLASSES:
            (target / split / name).mkdir(parents=True)
            for image in sorted((data_root / "cifar10" / split / name).iterdir())[:count]:
                shutil.copy(image, target / split / name / image.name)
    return target


@pytest.fixture
def s3_shards(s3_server, small_cifar) -> s3fs.S3FileSystem:
    """An empty bucket holding only the shards that jobs/prepare_data.py wrote to SHARDS_URL.

    320 train images go into 4 shards (100, 100, 100, 20), 100 test images into 1.
    """
    from jobs.prepare_data import main as prepare_data

    assert storage.ENDPOINT_ENV_VAR not in os.environ, "unset GMMC_S3_ENDPOINT_URL: the test checks run.s3_endpoint_url"
    reset_s3(s3_server)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    fs.mkdir(BUCKET)
    prepare_data([
        "--source", str(small_cifar), "--dataset", "cifar10", "--output", SHARDS_URL,
        "--shard-size", str(SHARD_SIZE), "--s3-endpoint-url", s3_server,
    ])
    return fs


def _config(endpoint: str, output: str = OUTPUT_URL, **sections):
    overrides = {
        "data": {"shards_url": SHARDS_URL, "source": "", "loader_workers": 1},
        "run": {"output": output, "num_workers": WORKERS, "s3_endpoint_url": endpoint},
        "train": {"objective": "joint", "joint_switch_epoch": 1, "log_every_steps": 100},
        "optim": {"epochs": 2, "batch_size_per_worker": BATCH_PER_WORKER},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return build_config("tiny", overrides)


def _read_json(fs: s3fs.S3FileSystem, path: str):
    return json.loads(fs.cat_file(path))


def _state_paths(fs: s3fs.S3FileSystem) -> list[str]:
    fs.invalidate_cache()
    return sorted(fs.glob(f"{BUCKET}/run/train/checkpoint_*/state.pt"))


@pytest.mark.slow
def test_s3_train_resume_evaluate(ray_session, s3_server, s3_shards, tmp_path, monkeypatch):
    fs = s3_shards
    manifest = _read_json(fs, f"{BUCKET}/shards/manifest.json")
    assert [shard["count"] for shard in manifest["splits"]["train"]["shards"]] == [100, 100, 100, 20]
    assert manifest["splits"]["test"]["count"] == 100

    # First run: epoch 1 discriminative, epoch 2 generative (replay buffers in the checkpoints).
    metrics = run_training(_config(s3_server))
    history = _read_json(fs, f"{BUCKET}/run/history.json")
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert [entry["step"] for entry in history] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert history[1]["buffer_draws"] > 0
    assert metrics["test_count"] == 100
    assert metrics["num_workers"] == WORKERS

    states = _state_paths(fs)
    assert len(states) == 2
    latest = states[-1].rsplit("/", 1)[0]
    assert fs.isfile(f"{latest}/buffer-rank0.pt")
    assert fs.isfile(f"{latest}/buffer-rank1.pt")
    for name in ("model.pt", "metrics.json", "history.json"):
        assert fs.isfile(f"{BUCKET}/run/{name}")
    with Image.open(fs.open(f"{BUCKET}/run/samples.png")) as image:
        assert image.size == (2 + 10 * 34, 2 + 10 * 34)

    # Second run with the same output: resumes at step 20 from the checkpoint on S3.
    resumed_metrics = run_training(_config(s3_server, optim={"epochs": 3}))
    resumed = _read_json(fs, f"{BUCKET}/run/history.json")
    assert [entry["epoch"] for entry in resumed] == [1, 2, 3]
    assert resumed[:2] == history
    assert resumed[2]["step"] == 3 * STEPS_PER_EPOCH
    assert resumed_metrics["steps"] == 3 * STEPS_PER_EPOCH
    resumed_states = _state_paths(fs)
    assert len(resumed_states) == 2  # CheckpointConfig(num_to_keep=2)
    assert resumed_states[-1] not in states

    # Evaluation in this process; the endpoint now comes from GMMC_S3_ENDPOINT_URL.
    monkeypatch.setenv(storage.ENDPOINT_ENV_VAR, s3_server)
    s3fs.S3FileSystem.clear_instance_cache()
    model, config = checkpoint.load_model(OUTPUT_URL)
    assert config.train.objective == "joint"
    assert config.run.s3_endpoint_url == s3_server
    assert model.gamma2.item() == pytest.approx(resumed_metrics["gamma2"])
    figures = evaluate_test_split(model, SHARDS_URL, "test", 50, 0, 1, torch.device("cpu"))
    assert figures["test_count"] == 100
    assert figures["test_accuracy"] == pytest.approx(resumed_metrics["test_accuracy"], abs=0.011)

    from jobs.evaluate import main as evaluate

    evaluation_folder = tmp_path / "evaluation"
    status = evaluate([
        "--checkpoint", OUTPUT_URL, "--output", str(evaluation_folder), "--evals", "accuracy",
        "--test-shards", SHARDS_URL, "--test-limit", "0",
    ])
    assert status == 0
    evaluation = json.loads((evaluation_folder / "evaluation.json").read_text())
    assert evaluation["results"]["accuracy"]["count"] == 100
    assert evaluation["results"]["accuracy"]["accuracy"] == pytest.approx(figures["test_accuracy"], abs=0.011)

    # No credential value or name in any object the runs wrote (metrics, history, configs, checkpoints).
    secrets = {os.environ["AWS_ACCESS_KEY_ID"].encode(), os.environ["AWS_SECRET_ACCESS_KEY"].encode()}
    written = fs.find(f"{BUCKET}/run")
    assert len(written) >= 7
    for path in written:
        data = fs.cat_file(path)
        for secret in secrets:
            assert secret not in data, path
        assert b"AWS_SECRET_ACCESS_KEY" not in data, path


@pytest.mark.parametrize(("endpoint", "message"), [
    ("127.0.0.1:9000", "http:// or https://"),
    ("ftp://127.0.0.1:9000", "http:// or https://"),
    ("http://", "http:// or https://"),
    ("http://127.0.0.1:99999", "port"),
    ("http://user:secret@127.0.0.1:9000", "user name or password"),
    ("http://127.0.0.1:9000/?X-Amz-Signature=abc", "query string"),
])
def test_s3_endpoint_config_rejected(endpoint, message):
    with pytest.raises(ValueError, match=message) as error:
        build_config("tiny", {"run": {"s3_endpoint_url": endpoint}})
    assert "secret" not in str(error.value)


@pytest.mark.parametrize("endpoint", ["", "http://127.0.0.1:9000", "https://s3.example.com", "http://[::1]:9000/"])
def test_s3_endpoint_config_accepted(endpoint):
    assert build_config("tiny", {"run": {"s3_endpoint_url": endpoint}}).run.s3_endpoint_url == endpoint


@pytest.mark.slow
def test_s3_shared_buffer_snapshots_resume(ray_session, s3_server, s3_shards):
    fs = s3_shards
    output = f"s3://{BUCKET}/shared-run"
    settings = dict(
        train={"objective": "generative"}, optim={"epochs": 1}, buffer={"kind": "shared", "capacity": 400, "num_shards": 2},
    )
    run_training(_config(s3_server, output, **settings))
    history = _read_json(fs, f"{BUCKET}/shared-run/history.json")
    assert history[0]["step"] == STEPS_PER_EPOCH
    assert history[0]["buffer_write_backs"] == STEPS_PER_EPOCH * BATCH_PER_WORKER * WORKERS

    # The buffer shard actors and the driver write snapshots through run.s3_endpoint_url too.
    latest = _read_json(fs, f"{BUCKET}/shared-run/buffer/latest.json")
    assert latest["step"] == STEPS_PER_EPOCH
    assert latest["url"].startswith(f"s3://{BUCKET}/shared-run/buffer/")
    snapshot = latest["url"].removeprefix("s3://")
    assert fs.isfile(f"{snapshot}/manifest.json")
    assert fs.isfile(f"{snapshot}/shard-00000-of-00002.npz")
    assert fs.isfile(f"{snapshot}/shard-00001-of-00002.npz")

    settings["optim"] = {"epochs": 2}
    run_training(_config(s3_server, output, **settings))
    resumed = _read_json(fs, f"{BUCKET}/shared-run/history.json")
    assert resumed[0] == history[0]
    assert resumed[1]["step"] == 2 * STEPS_PER_EPOCH
    # The shards reload the snapshot from S3, so chains keep ageing instead of restarting at 0.
    assert resumed[1]["buffer_mean_age"] > history[0]["buffer_mean_age"]
