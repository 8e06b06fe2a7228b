"""The server's blob store settings (``[blobs]`` table) and the store they open (docs/blobs.md).

:func:`parse_blobs_config` turns the table into a frozen :class:`BlobsConfig` once, at the entry
point; every error is a :class:`ConfigError` naming ``blobs.<key>``. Credentials are never in
the file: the table names environment variables (``access_key_env`` ...) and
:func:`open_blob_store` reads them, failing with the variable's name when one is unset.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edge_agent.blobs import Credentials, LocalBlobStore, S3BlobStore, S3Location
from edge_agent.blobs.s3 import MIN_PART_BYTES
from edge_agent.blobs.sigv4 import MAX_PRESIGN_S
from edge_agent.blobs.store import BlobStore
from edge_agent.errors import ConfigError

__all__ = ["BlobsConfig", "open_blob_store", "parse_blobs_config"]

_BACKENDS = ("local", "s3")


@dataclass(frozen=True, kw_only=True)
class BlobsConfig:
    #: "local" (a directory, served to devices by broker_server.blob_http) or "s3"
    backend: str = "local"
    #: objects larger than this go by claim check (0: never)
    threshold: int = 8 << 20
    #: lifetime of presigned URLs, seconds (a grant lives at least as long as its task)
    url_lifetime_s: int = 3600
    #: the largest object the server accepts through a reference
    max_object_bytes: int = 1 << 30
    # local backend
    root: Path = Path("blobs")
    #: the URL devices use for the blob HTTP endpoint (e.g. "https://fl.example.com:8790")
    public_url: str = ""
    listen_host: str = "127.0.0.1"
    #: 0 picks a free port (then, without ``public_url``, devices get ``http://listen_host:<port>``)
    listen_port: int = 8790
    #: environment variable holding the local URL-signing secret (unset: a fresh one per start)
    secret_env: str = "FEDFLOCK_BLOB_SECRET"
    # s3 backend
    endpoint: str = ""
    bucket: str = ""
    region: str = "us-east-1"
    addressing: str = "path"
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    session_token_env: str = "AWS_SESSION_TOKEN"
    part_size: int = 16 << 20
    multipart_threshold: int = 64 << 20

    def s3_location(self) -> S3Location:
        return S3Location(endpoint=self.endpoint, bucket=self.bucket, region=self.region, addressing=self.addressing)


_INTS = {"threshold": 0, "url_lifetime_s": 1, "max_object_bytes": 1, "listen_port": 0}  # port 0: any free one
_INTS |= {"part_size": MIN_PART_BYTES, "multipart_threshold": MIN_PART_BYTES}


def parse_blobs_config(table: Mapping[str, Any]) -> BlobsConfig:
    """A :class:`BlobsConfig` from a ``[blobs]`` TOML table (keys as the dataclass fields)."""
    known = {f.name for f in fields(BlobsConfig)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"blobs.{key}: unknown key (known: {', '.join(sorted(known))})")
        values[key] = _value(key, value)
    config = BlobsConfig(**values)
    if config.backend not in _BACKENDS:
        raise ConfigError(f"blobs.backend must be one of {_BACKENDS}, not {config.backend!r}")
    if config.url_lifetime_s > MAX_PRESIGN_S:
        raise ConfigError(f"blobs.url_lifetime_s must be <= {MAX_PRESIGN_S} (7 days, S3's limit)")
    if config.backend == "s3":
        for key in ("endpoint", "bucket"):
            if not getattr(config, key):
                raise ConfigError(f"blobs.{key} is required with backend 's3'")
        config.s3_location()
    elif config.public_url and not config.public_url.startswith(("http://", "https://")):
        raise ConfigError(f"blobs.public_url must be an http(s) URL, not {config.public_url!r}")
    return config


def _value(key: str, value: Any) -> Any:
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < _INTS[key]:
            raise ConfigError(f"blobs.{key} must be an integer >= {_INTS[key]}, not {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"blobs.{key} must be a string, not {type(value).__name__}")
    return Path(value) if key == "root" else value


def _env(env: Mapping[str, str], name: str, *, required: bool) -> str:
    value = env.get(name, "")
    if required and not value:
        raise ConfigError(f"blobs: environment variable {name} is not set (the store's credentials come from it)")
    return value


def open_blob_store(
    config: BlobsConfig, env: Mapping[str, str], *, clock: Callable[[], float] = time.time
) -> BlobStore:
    """The configured store (no I/O: directories and buckets are used, not created, here)."""
    if config.backend == "local":
        secret = _env(env, config.secret_env, required=False).encode() or secrets.token_bytes(32)
        return LocalBlobStore(
            config.root, base_url=config.public_url, secret=secret, clock=clock, max_bytes=config.max_object_bytes
        )
    credentials = Credentials(
        _env(env, config.access_key_env, required=True),
        _env(env, config.secret_key_env, required=True),
        _env(env, config.session_token_env, required=False),
    )
    location = config.s3_location()
    return S3BlobStore(
        location, credentials, part_size=config.part_size, multipart_threshold=config.multipart_threshold
    )
