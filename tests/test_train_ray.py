"""End-to-end training through Ray Train with 2 workers on a few hundred real CIFAR-10 images."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import copy_cifar_subset
from gmmc_dist import checkpoint
from gmmc_dist.config import build_config
from gmmc_dist.train.driver import run_training


@pytest.fixture(scope="module")
def small_cifar(data_root, tmp_path_factory) -> Path:
    return copy_cifar_subset(data_root, tmp_path_factory.mktemp("cifar-small"), {"train": 32, "test": 10})


def _config(source: Path, shards: Path, output: Path, **sections):
    overrides = {
        "data": {"source": str(source), "shards_url": str(shards)},
        "run": {"output": str(output), "num_workers": 2},
        "train": {"objective": "discriminative", "log_every_steps": 100},
        "optim": {"epochs": 3},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return build_config("tiny", overrides)


@pytest.mark.slow
def test_two_workers_loss_falls_and_run_resumes(ray_session, small_cifar, tmp_path):
    shards, output = tmp_path / "shards", tmp_path / "run"
    metrics = run_training(_config(small_cifar, shards, output))

    history = json.loads((output / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    steps_per_epoch = 320 // (16 * 2)
    assert [entry["step"] for entry in history] == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]
    assert history[-1]["loss"] < history[0]["loss"]
    assert metrics["test_count"] == 100
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["num_workers"] == 2
    assert metrics["gamma2"] > 0

    model, config = checkpoint.load_model(str(output))
    assert config.train.objective == "discriminative"
    assert model.gamma2.item() == pytest.approx(metrics["gamma2"])

    state_files = sorted(output.glob("train/checkpoint_*/state.pt"))
    state = checkpoint.load_payload(str(state_files[-1]))
    for key in ("model", "optimizer", "scheduler", "step", "epoch", "config", "rng", "version"):
        assert key in state
    assert state["step"] == 3 * steps_per_epoch

    # A second run with the same output continues at step 30 instead of starting over.
    run_training(_config(small_cifar, shards, output, optim={"epochs": 4}))
    resumed = json.loads((output / "history.json").read_text())
    assert [entry["epoch"] for entry in resumed] == [1, 2, 3, 4]
    assert resumed[:3] == history
    assert resumed[3]["step"] == 4 * steps_per_epoch


@pytest.mark.slow
def test_joint_run_writes_samples_and_buffers(ray_session, small_cifar, tmp_path):
    shards, output = tmp_path / "shards", tmp_path / "run"
    run_training(_config(
        small_cifar, shards, output,
        train={"objective": "joint", "joint_switch_epoch": 1}, optim={"epochs": 2},
    ))
    history = json.loads((output / "history.json").read_text())
    assert history[0]["beta"] == 0.0
    assert history[1]["beta"] == 0.5
    assert history[1]["buffer_draws"] > 0

    checkpoint_dir = sorted(output.glob("train/checkpoint_2*"))[-1]
    assert (checkpoint_dir / "buffer-rank0.pt").is_file()
    assert (checkpoint_dir / "buffer-rank1.pt").is_file()
    buffer_state = checkpoint.load_payload(str(checkpoint_dir / "buffer-rank1.pt"))
    assert buffer_state["states"].shape == (256, 3, 32, 32)  # 512 global slots over 2 workers
    assert int(buffer_state["ages"].max()) >= 1

    with Image.open(output / "samples.png") as image:
        width, height = image.size
    assert height == 2 + 10 * (32 + 2)  # one row per class
    assert width == 2 + 10 * (32 + 2)


def test_source_without_class_folders_rejected(ray_session, tmp_path, data_root):
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    for image in sorted((data_root / "cifar10" / "train" / "cat").iterdir())[:3]:
        shutil.copy(image, flat / image.name)
    with pytest.raises(ValueError, match="class"):
        run_training(_config(tmp_path / "flat", tmp_path / "shards", tmp_path / "run"))
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_wrong_image_size_rejected(ray_session, tmp_path, small_cifar):
    source = tmp_path / "source"
    shutil.copytree(small_cifar, source)
    Image.new("RGB", (64, 64)).save(source / "train" / "cat" / "large.png")
    with pytest.raises(ValueError, match="64"):
        run_training(_config(source, tmp_path / "shards", tmp_path / "run"))
    assert not (tmp_path / "run" / "train").exists()


def test_unwritable_output_rejected(ray_session, tmp_path, small_cifar):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should go")
    with pytest.raises((OSError, ValueError), match="blocker"):
        run_training(_config(small_cifar, tmp_path / "shards", blocker / "run"))
    assert not (tmp_path / "shards").exists()


def test_missing_shards_without_source_rejected(tmp_path):
    config = build_config("tiny", {"data": {"shards_url": str(tmp_path / "none")}, "run": {"output": str(tmp_path / "r")}})
    with pytest.raises(FileNotFoundError, match="jobs/prepare_data.py"):
        run_training(config)


@pytest.mark.slow
def test_shared_buffer_run_snapshots_and_resumes(ray_session, small_cifar, tmp_path):
    shards, output = tmp_path / "shards", tmp_path / "run"
    settings = dict(
        train={"objective": "generative"}, optim={"epochs": 1}, buffer={"kind": "shared", "capacity": 400},
    )
    run_training(_config(small_cifar, shards, output, **settings))
    history = json.loads((output / "history.json").read_text())
    # 10 steps x 16 chains x 2 workers, plus the batch each worker prefetched after its last step.
    assert history[0]["buffer_write_backs"] == 10 * 16 * 2
    assert history[0]["buffer_draws"] == 10 * 16 * 2 + 2 * 16

    state = checkpoint.load_payload(str(sorted(output.glob("train/checkpoint_2*/state.pt"))[-1]))
    reference = state["buffer"]
    assert reference["kind"] == "shared"
    assert reference["step"] == 10
    assert Path(reference["url"]).is_dir()
    assert not list(output.glob("train/checkpoint_2*/buffer-rank*.pt"))  # the states stay out of checkpoints

    settings["optim"] = {"epochs": 2}
    run_training(_config(small_cifar, shards, output, **settings))
    resumed = json.loads((output / "history.json").read_text())
    assert resumed[0] == history[0]
    assert resumed[1]["step"] == 20
    # The resumed shards start from the snapshot, so chains keep ageing instead of restarting at 0.
    assert resumed[1]["buffer_mean_age"] > history[0]["buffer_mean_age"]
