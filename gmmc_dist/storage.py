"""One filesystem layer over fsspec for local paths and URLs such as `s3://bucket/prefix`.

S3 settings come from the standard places that botocore reads (the `AWS_*` environment variables,
including `AWS_ENDPOINT_URL`, the `~/.aws` config and credentials files, an instance role), plus two
explicit endpoint options, in this order of precedence:

1. `storage_options`, passed to `s3fs.S3FileSystem` as keyword arguments
   (for example `{"endpoint_url": "http://127.0.0.1:9000"}` or `{"client_kwargs": {...}}`);
2. the environment variable `GMMC_S3_ENDPOINT_URL`, used when `storage_options` sets no endpoint.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

ENDPOINT_ENV_VAR = "GMMC_S3_ENDPOINT_URL"
S3_PROTOCOLS = ("s3", "s3a")

_REDACTED = "***"
# Option names and URL query parameters whose values are secrets (s3fs `key`/`secret`/`token`,
# botocore `aws_secret_access_key`, presigned URL signatures, passwords).
_SECRET_NAME = re.compile(
    r"(^key$|secret|token|password|passwd|credential|signature|session|private|access_key)",
    re.IGNORECASE,
)


def protocol_of(url: str) -> str:
    """Return the fsspec protocol of `url` ("file" for a local path)."""
    protocol, _ = fsspec.core.split_protocol(str(url))
    return protocol or "file"


def is_local(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def s3_options(storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build keyword arguments for `s3fs.S3FileSystem` from `storage_options` and the environment.

    `GMMC_S3_ENDPOINT_URL` fills `endpoint_url` only when the options set no endpoint, either at
    the top level or in `client_kwargs`. Everything else is left to botocore's own lookup.
    """
    options = dict(storage_options or {})
    client_kwargs = options.get("client_kwargs") or {}
    has_endpoint = bool(options.get("endpoint_url") or client_kwargs.get("endpoint_url"))
    env_endpoint = os.environ.get(ENDPOINT_ENV_VAR, "").strip()
    if env_endpoint and not has_endpoint:
        options["endpoint_url"] = env_endpoint
    return options


def resolve(
    url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem for `url` and the path inside it.

    Local paths become absolute. For `s3://` URLs the path is `bucket/key` without the protocol.
    fsspec caches filesystem instances per process and drops its cache after a fork, so calling
    this inside a DataLoader worker creates that worker's own S3 client.
    """
    url = os.fspath(url)
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"invalid storage location {url!r}: give a local path or a URL such as s3://bucket/prefix")
    protocol = protocol_of(url)
    if protocol in S3_PROTOCOLS:
        options = s3_options(storage_options)
    else:
        options = dict(storage_options or {})
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as error:
        raise ValueError(
            f"cannot open storage location {redact(url)}: {error}. "
            "Check the protocol and install its fsspec implementation (s3fs for s3://)."
        ) from error
    return fs, path


def join(url: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or URL with the separator that location uses."""
    url = os.fspath(url)
    if is_local(url) and "://" not in url:
        return os.path.join(url, *parts)
    joined = url.rstrip("/")
    for part in parts:
        joined = f"{joined}/{part.strip('/')}"
    return joined


def exists(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = resolve(url, storage_options)
    return fs.exists(path)


def read_bytes(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Read a whole file. Raises FileNotFoundError naming the location when it does not exist."""
    fs, path = resolve(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"file not found: {redact(os.fspath(url))}") from error


def write_bytes_atomic(
    url: str | os.PathLike, data: bytes, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write `data` so that readers see either the old file or the complete new one.

    Local files go to a temporary name in the same directory, are flushed to disk and then renamed
    over the final name. Other filesystems get one `pipe_file` call. On S3 the object becomes
    visible only when the upload completes: a single PUT, or a completed multipart upload for
    data above s3fs's multipart threshold.
    """
    fs, path = resolve(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        _write_local_atomic(Path(path), data)
        return
    fs.pipe_file(path, data)


def _write_local_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def ensure_writable(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
    """Check that files can be written under the directory or prefix `url`, creating it if local.

    Writes and deletes a small probe file, so failures show up before expensive work starts.
    Raises NotADirectoryError, FileNotFoundError or PermissionError naming the location and the fix.
    """
    safe_url = redact(os.fspath(url))
    fs, path = resolve(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        _check_local_directory(Path(path), safe_url)
    elif protocol_of(os.fspath(url)) in S3_PROTOCOLS:
        bucket = path.split("/", 1)[0]
        if not bucket:
            raise ValueError(f"invalid S3 location {safe_url}: expected s3://bucket/prefix")
        if not fs.exists(bucket):
            raise FileNotFoundError(
                f"S3 bucket {bucket!r} for output {safe_url} was not found: create the bucket or check "
                f"the endpoint ({ENDPOINT_ENV_VAR}, AWS_ENDPOINT_URL or storage_options['endpoint_url'])"
            )
    probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except (PermissionError, OSError) as error:
        raise PermissionError(
            f"cannot write to output location {safe_url}: {error}. "
            "Choose a location you can write to or fix its permissions or credentials."
        ) from error


def _check_local_directory(path: Path, safe_url: str) -> None:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"output location {safe_url} is an existing file, not a directory: remove it or choose another location"
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(
                    f"cannot create output directory {safe_url}: {parent} is a file, not a directory. "
                    "Choose another location or remove that file."
                )
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(
            f"cannot create output directory {safe_url}: {error}. Choose a location you can write to."
        ) from error


def arrow_filesystem(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None):
    """Return `(pyarrow.fs.FileSystem, path)` for `url`, for `RunConfig(storage_path=path,
    storage_filesystem=filesystem)` in Ray Train.

    Local paths use `pyarrow.fs.LocalFileSystem`; every other location wraps the fsspec filesystem
    from `resolve` (so it has the same endpoint settings) in `PyFileSystem(FSSpecHandler(...))`.
    The path carries no protocol, for example `bucket/prefix` for S3.
    """
    import pyarrow.fs

    fs, path = resolve(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def redact(value: Any) -> Any:
    """Return a copy of a URL string or an options mapping that is safe to log.

    URLs lose the password in `user:password@host` and the values of query parameters with
    secret names. Mappings (nested too) get `***` for values under secret names such as `key`,
    `secret`, `token`, `password` and `aws_secret_access_key`.
    """
    if isinstance(value, Mapping):
        return {
            name: _REDACTED if _SECRET_NAME.search(str(name)) and item is not None else redact(item)
            for name, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    if isinstance(value, str) and "://" in value:
        return _redact_url(value)
    return value


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{_REDACTED}@{host}" if ":" in userinfo else f"{_REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(name, _REDACTED if _SECRET_NAME.search(name) else item) for name, item in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = _read_umask()
