"""Object store (MinIO or any S3 endpoint): create buckets and upload prepared data.

Uses the `minio` client. The endpoint comes from `AWS_ENDPOINT_URL` (or `--endpoint`), the
credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`; none live in the repository.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from zhclip.components.core.errors import ZhclipError


def client(endpoint: str | None = None):
    """A minio client for `endpoint` (http://host:port or https://...), credentials from the environment."""
    from minio import Minio

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
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
    )


def arrow_filesystem(uri: str, endpoint: str | None = None):
    """(pyarrow filesystem, path inside it) for a local path or an s3://bucket/prefix URI; S3 goes to
    `endpoint` or $AWS_ENDPOINT_URL (MinIO) with the AWS_* credentials of the environment."""
    from pyarrow import fs

    if not str(uri).startswith("s3://"):
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
    scheme, _, host = endpoint.rpartition("://")
    filesystem = fs.S3FileSystem(
        endpoint_override=host or None,
        scheme=scheme or "https",
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    return filesystem, str(uri).removeprefix("s3://").rstrip("/")


class Folder:
    """A local folder or an s3:// prefix as pyarrow reads it. It pickles without its filesystem, so a
    Ray task on another node opens its own, with the credentials of its own environment."""

    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        self._filesystem, self.root = arrow_filesystem(self.uri)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_filesystem": None}

    @property
    def filesystem(self):
        if self._filesystem is None:
            self._filesystem = arrow_filesystem(self.uri)[0]
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
    from pyarrow import fs

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
    from pyarrow import fs

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
        for path in tqdm(files, desc=f"upload to {dest_uri}", unit=" files", leave=False):
            key = "/".join(part for part in (prefix, path.relative_to(src).as_posix()) if part)
            store.fput_object(bucket, key, str(path))
    except S3Error as err:
        raise ZhclipError(f"object store refused the upload to {dest_uri}: {err.code} {err.message}") from err
    return {"uploaded_files": len(files), "bytes": sum(p.stat().st_size for p in files), "destination": dest_uri}
