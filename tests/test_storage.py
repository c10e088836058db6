"""Tests of the fsspec storage layer on local disk and on a loopback S3 server (moto)."""

import os

import pyarrow.fs
import pytest
import s3fs
from conftest import reset_s3
from fsspec.implementations.local import LocalFileSystem

from gmmc_dist import storage


@pytest.fixture
def bucket(s3_server):
    reset_s3(s3_server)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    fs.mkdir("bucket")
    return s3_server


def test_resolve_local_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("data/shards")
    assert isinstance(fs, LocalFileSystem)
    assert path == str(tmp_path / "data" / "shards")


def test_resolve_empty_location_rejected():
    with pytest.raises(ValueError, match="invalid storage location"):
        storage.resolve("")


def test_resolve_s3_endpoint_precedence(monkeypatch):
    monkeypatch.setenv(storage.ENDPOINT_ENV_VAR, "http://127.0.0.1:1")
    s3fs.S3FileSystem.clear_instance_cache()

    fs, path = storage.resolve("s3://bucket/prefix")
    assert path == "bucket/prefix"
    assert fs.endpoint_url == "http://127.0.0.1:1"

    fs, _ = storage.resolve("s3://bucket/prefix", {"endpoint_url": "http://127.0.0.1:2"})
    assert fs.endpoint_url == "http://127.0.0.1:2"

    fs, _ = storage.resolve("s3://bucket/prefix", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:3"}})
    assert fs.endpoint_url is None
    assert fs.client_kwargs == {"endpoint_url": "http://127.0.0.1:3"}


def test_join_local_and_url():
    assert storage.join("/data/out", "a.tar") == os.path.join("/data/out", "a.tar")
    assert storage.join("s3://bucket/prefix/", "a.tar") == "s3://bucket/prefix/a.tar"
    assert storage.join("s3://bucket", "x", "y.json") == "s3://bucket/x/y.json"


def test_write_atomic_local_leaves_no_temp(tmp_path):
    target = tmp_path / "deep" / "file.bin"
    storage.write_bytes_atomic(str(target), b"first")
    storage.write_bytes_atomic(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]
    assert storage.exists(str(target))
    assert storage.read_bytes(str(target)) == b"second"


def test_read_missing_file_names_location(tmp_path):
    missing = tmp_path / "absent.bin"
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        storage.read_bytes(str(missing))


def test_s3_write_read_exists(bucket):
    options = {"endpoint_url": bucket}
    url = "s3://bucket/prefix/file.bin"
    assert not storage.exists(url, options)
    storage.write_bytes_atomic(url, b"payload", options)
    assert storage.exists(url, options)
    assert storage.read_bytes(url, options) == b"payload"


def test_s3_endpoint_from_environment(bucket, monkeypatch):
    monkeypatch.setenv(storage.ENDPOINT_ENV_VAR, bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    storage.write_bytes_atomic("s3://bucket/env.bin", b"via env")
    assert storage.read_bytes("s3://bucket/env.bin", {"endpoint_url": bucket}) == b"via env"


def test_ensure_writable_parent_is_file(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    with pytest.raises(NotADirectoryError, match="blocker is a file"):
        storage.ensure_writable(str(blocker / "shards"))


def test_ensure_writable_location_is_file(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    with pytest.raises(NotADirectoryError, match="is an existing file"):
        storage.ensure_writable(str(blocker))


def test_ensure_writable_creates_directory(tmp_path):
    target = tmp_path / "a" / "b"
    storage.ensure_writable(str(target))
    assert target.is_dir()
    assert list(target.iterdir()) == []


def test_ensure_writable_missing_bucket(bucket):
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket'"):
        storage.ensure_writable("s3://no-such-bucket/prefix", {"endpoint_url": bucket})


def test_ensure_writable_s3_leaves_nothing(bucket):
    options = {"endpoint_url": bucket}
    storage.ensure_writable("s3://bucket/prefix", options)
    fs, _ = storage.resolve("s3://bucket", options)
    fs.invalidate_cache()
    assert fs.find("bucket") == []


def test_arrow_filesystem_local(tmp_path):
    fs, path = storage.arrow_filesystem(str(tmp_path))
    assert isinstance(fs, pyarrow.fs.LocalFileSystem)
    assert path == str(tmp_path)


def test_arrow_filesystem_s3_round_trip(bucket):
    options = {"endpoint_url": bucket}
    fs, path = storage.arrow_filesystem("s3://bucket/runs", options)
    assert isinstance(fs, pyarrow.fs.PyFileSystem)
    assert path == "bucket/runs"
    with fs.open_output_stream(f"{path}/checkpoint.txt") as stream:
        stream.write(b"weights")
    assert storage.read_bytes("s3://bucket/runs/checkpoint.txt", options) == b"weights"


def test_redact_url_and_options():
    assert storage.redact("s3://AKIA:topsecret@bucket/key") == "s3://AKIA:***@bucket/key"
    assert (
        storage.redact("https://host/obj?X-Amz-Signature=abc&X-Amz-Security-Token=t&part=1")
        == "https://host/obj?X-Amz-Signature=%2A%2A%2A&X-Amz-Security-Token=%2A%2A%2A&part=1"
    )
    options = {
        "key": "AKIA",
        "secret": "topsecret",
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"aws_secret_access_key": "x", "region_name": "us-east-1"},
    }
    assert storage.redact(options) == {
        "key": "***",
        "secret": "***",
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"aws_secret_access_key": "***", "region_name": "us-east-1"},
    }
    assert storage.redact("/plain/local/path") == "/plain/local/path"
