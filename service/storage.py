"""Blob storage: uploads, aligned crops, pseudo targets and model weights, keyed by content hash (sha256 hex).

`LocalStorage` (a directory, the default) and `S3Storage` (any S3-compatible store via boto3). Writes are atomic: a
local blob is written to a temporary file and renamed into place; an S3 PUT is atomic by nature. Because keys are
content hashes, writing the same bytes twice is a no-op and a key never changes meaning.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import boto3
from botocore.exceptions import ClientError

from service.settings import ServiceSettings, per_settings


class BlobNotFound(KeyError):
    pass


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Storage:
    def put(self, data: bytes) -> str:
        """Store `data` and return its key (sha256 hex)."""
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def list_keys(self):
        """Every blob key in the store (an iterator; for the garbage-collection sweep)."""
        raise NotImplementedError

    def ping(self) -> None:
        """Raise when the store cannot be reached."""

    def setup(self) -> None:
        """Create what the store needs (folder, bucket); called once at API start."""

    def fetch_to(self, key: str, path: Path) -> Path:
        """Write blob `key` to `path` atomically (skipped when `path` already holds it)."""
        path = Path(path)
        if path.is_file() and _sha256_file(path) == key:
            return path
        atomic_write(path, self.get(key))
        return path


def _check_key(key: str) -> str:
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise BlobNotFound(f"invalid blob key {key!r}")
    return key


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key[:2] / key[2:4] / key

    def put(self, data: bytes) -> str:
        key = content_key(data)
        p = self._path(key)
        if not p.is_file():
            atomic_write(p, data)
        return key

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list_keys(self):
        if not self.root.is_dir():
            return
        for p in self.root.glob("??/??/*"):
            if len(p.name) == 64 and p.name[:2] == p.parent.parent.name and all(c in "0123456789abcdef" for c in p.name):
                yield p.name

    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise OSError(f"storage folder {self.root} is not writable")


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None):
        if not bucket:
            raise ValueError("FACEADAPT_S3_BUCKET is required for the s3 storage backend")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
        )

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, data: bytes) -> str:
        key = content_key(data)
        if not self.exists(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return key

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise BlobNotFound(key) from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list_keys(self):
        prefix = f"{self.prefix}/" if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix):]
                if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
                    yield name

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def setup(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)


def make_storage(settings: ServiceSettings) -> Storage:
    if settings.storage_backend == "local":
        return LocalStorage(settings.storage_path)
    if settings.storage_backend == "s3":
        return S3Storage(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region,
                         settings.s3_access_key_id, settings.s3_secret_access_key)
    raise ValueError(f"unknown storage backend {settings.storage_backend!r}: use 'local' or 's3'")


get_storage = per_settings(make_storage)  # the configured store
