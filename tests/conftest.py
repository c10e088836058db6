"""Shared fixtures: the real data copy, one Ray instance per session, a loopback S3 server."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder with the real data copies (`cifar10/`, `celeba/`), set by GMMC_DATA_ROOT."""
    root = Path(os.environ.get("GMMC_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "cifar10" / "train").is_dir():
        pytest.fail(
            f"real data not found under {root}: set GMMC_DATA_ROOT to the folder that holds "
            "cifar10/train and cifar10/test"
        )
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs it (ray.init costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on 127.0.0.1 with dummy credentials.

    Yields the endpoint URL. Tests that need an empty store call `reset_s3(endpoint)`.
    """
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(_S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def reset_s3(endpoint: str) -> None:
    """Empty the moto server and drop s3fs's cached filesystem instances."""
    import urllib.request

    import s3fs

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    s3fs.S3FileSystem.clear_instance_cache()
