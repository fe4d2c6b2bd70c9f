"""Object store (MinIO or any S3 endpoint): pyarrow filesystems for every step's reads and writes,
the `minio` client for buckets and uploads, and the retry policy both follow.

The endpoint comes from `AWS_ENDPOINT_URL` (or `--endpoint`), the credentials from
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`; none live in the repository. The retry policy is the
params.yaml section `object_store`: each request is retried with doubling waits (pyarrow's AWS
standard strategy, urllib3's `Retry` for the minio client) and a step fails once a request has used
its attempts, naming the endpoint (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from pyarrow import fs

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.progress import progress_bar
from zhclip.components.core.settings import setting

# The policy of this process and of everything it starts (Ray workers, a pipeline task's step): the
# CLI sets it from params.yaml, the Kubeflow pipeline on each task.
POLICY_ENV = "ZHCLIP_OBJECT_STORE"


@dataclass
class ObjectStoreConfig:
    """How every step talks to the object store (params.yaml section `object_store`)."""

    retry_attempts: int = setting(
        6,
        "attempts of one object-store request before the step fails; the waits between them double "
        "(a step gives up after 9-22 s at 6 attempts, 39-56 s at 8: docs/reliability.md)",
    )
    connect_timeout_s: float = setting(5.0, "seconds to wait for a connection to the object store")
    request_timeout_s: float = setting(120.0, "seconds to wait for the answer to one request")


def use_policy(config: ObjectStoreConfig) -> None:
    """Make `config` the retry policy of this process and of the processes it starts."""
    os.environ[POLICY_ENV] = json.dumps(asdict(config))


def current_policy() -> ObjectStoreConfig:
    return ObjectStoreConfig(**json.loads(os.environ.get(POLICY_ENV) or "{}"))


def endpoint_url(endpoint: str | None = None) -> str:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or ""


@contextmanager
def object_store_errors() -> Iterator[None]:
    """Turn pyarrow's and urllib3's errors for an object store that does not answer into one message
    naming the endpoint and the setting that bounds the retries."""
    from urllib3.exceptions import MaxRetryError

    try:
        yield
    except (OSError, MaxRetryError) as err:
        text = str(err)
        if not isinstance(err, MaxRetryError) and "AWS Error NETWORK_CONNECTION" not in text:
            raise
        policy = current_policy()
        raise ZhclipError(
            f"the object store at {endpoint_url() or '(no AWS_ENDPOINT_URL)'} did not answer after "
            f"{policy.retry_attempts} attempts (params.yaml object_store.retry_attempts): {text.splitlines()[0]}"
        ) from err


def client(endpoint: str | None = None):
    """A minio client for `endpoint` (http://host:port or https://...), credentials from the environment,
    retrying as the object-store policy says."""
    from minio import Minio

    endpoint = endpoint_url(endpoint)
    if not endpoint:
        raise ZhclipError("no object-store endpoint: set AWS_ENDPOINT_URL (e.g. http://minio:9000) or pass --endpoint")
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ZhclipError(f"endpoint {endpoint!r} must look like http://host:port or https://host")
    missing = [name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(name)]
    if missing:
        raise ZhclipError(f"set {' and '.join(missing)} for the object store (never commit them)")
    return Minio(
        parsed.netloc,
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        secure=parsed.scheme == "https",
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        http_client=_retrying_pool(current_policy()),
    )


def _retrying_pool(policy: ObjectStoreConfig):
    """minio's own pool settings (certificates, status codes retried) with the policy's attempts,
    timeouts and doubling waits (0.5 s, 1 s, 2 s, ...) for refused or dropped connections as well."""
    import certifi
    import urllib3

    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=policy.connect_timeout_s, read=policy.request_timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=policy.retry_attempts - 1, backoff_factor=0.5, status_forcelist=[500, 502, 503, 504]
        ),
    )


class RetryingS3FileSystem(fs.S3FileSystem):
    """pyarrow's S3 filesystem with the policy's retries and timeouts, which it keeps when pickled
    (pyarrow's own pickling drops the retry strategy, and Ray Train sends it to every worker)."""

    def __init__(self, options: dict, policy: ObjectStoreConfig):
        super().__init__(
            **options,
            connect_timeout=policy.connect_timeout_s,
            request_timeout=policy.request_timeout_s,
            retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=policy.retry_attempts),
        )
        self._made_with = (options, policy)

    def __reduce__(self):
        return RetryingS3FileSystem, self._made_with


def arrow_filesystem(uri: str, endpoint: str | None = None, policy: ObjectStoreConfig | None = None):
    """(pyarrow filesystem, path inside it) for a local path or an s3://bucket/prefix URI; S3 goes to
    `endpoint` or $AWS_ENDPOINT_URL (MinIO) with the AWS_* credentials of the environment, retrying
    as `policy` (default: this process's) says."""
    if not str(uri).startswith("s3://"):
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    scheme, _, host = (endpoint or os.environ.get("AWS_ENDPOINT_URL", "")).rpartition("://")
    options = {
        "endpoint_override": host or None,
        "scheme": scheme or "https",
        "access_key": os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    }
    return RetryingS3FileSystem(options, policy or current_policy()), str(uri).removeprefix("s3://").rstrip("/")


class Folder:
    """A local folder or an s3:// prefix as pyarrow reads it. It pickles without its filesystem, so a
    Ray task on another node opens its own, with the credentials of its own environment and the retry
    policy of the process that made it."""

    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        self.policy = current_policy()
        self._filesystem, self.root = arrow_filesystem(self.uri, policy=self.policy)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_filesystem": None}

    @property
    def filesystem(self):
        if self._filesystem is None:
            self._filesystem = arrow_filesystem(self.uri, policy=self.policy)[0]
        return self._filesystem

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def name(self, relative: str) -> str:
        """How messages and quarantine records name a file: the URI as given, then the relative path."""
        return f"{self.uri.rstrip('/')}/{relative}"

    def kind(self, relative: str = ""):
        return self.filesystem.get_file_info(self.path(relative)).type

    def size(self, relative: str) -> int:
        return self.filesystem.get_file_info(self.path(relative)).size

    def open(self, relative: str):
        """A buffered binary stream of the file (iterating it gives its lines)."""
        import io

        return io.BufferedReader(self.filesystem.open_input_stream(self.path(relative)))

    def read_bytes(self, relative: str) -> bytes:
        with self.filesystem.open_input_stream(self.path(relative)) as stream:
            return stream.read()


def location(path: str | Path) -> str:
    """An s3:// URI as given, a local path made absolute (what Ray workers elsewhere can use)."""
    return str(path) if str(path).startswith("s3://") else str(Path(path).resolve())


def is_file(path: str) -> bool:
    filesystem, inner = arrow_filesystem(path)
    return filesystem.get_file_info(inner).type == fs.FileType.File


def read_text(path: str) -> str:
    filesystem, inner = arrow_filesystem(path)
    with filesystem.open_input_stream(inner) as handle:
        return handle.read().decode("utf-8")


def local_folder(path: str, scratch: str | Path) -> str:
    """`path` itself when local; an s3:// folder is first copied under `scratch`."""
    if not path.startswith("s3://"):
        return path
    filesystem, inner = arrow_filesystem(path)
    fs.copy_files(inner, str(scratch), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem())
    return str(scratch)


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ZhclipError(f"{uri!r} is not an s3://bucket/prefix URI")
    return parsed.netloc, parsed.path.strip("/")


def upload(src: str | Path, dest_uri: str, endpoint: str | None = None) -> dict:
    """Upload every file under `src` to `dest_uri` (s3://bucket/prefix), creating the bucket if needed."""
    from minio.error import S3Error

    src = Path(src)
    if not src.is_dir():
        raise ZhclipError(f"{src} is not a folder")
    bucket, prefix = split_s3_uri(dest_uri)
    store = client(endpoint)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    try:
        if not store.bucket_exists(bucket):
            store.make_bucket(bucket)
        for path in progress_bar(files, desc=f"upload to {dest_uri}", unit="files", leave=False):
            key = "/".join(part for part in (prefix, path.relative_to(src).as_posix()) if part)
            store.fput_object(bucket, key, str(path))
    except S3Error as err:
        raise ZhclipError(f"object store refused the upload to {dest_uri}: {err.code} {err.message}") from err
    return {"uploaded_files": len(files), "bytes": sum(p.stat().st_size for p in files), "destination": dest_uri}
