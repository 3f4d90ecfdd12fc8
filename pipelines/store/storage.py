"""Storage URIs: local paths and ``s3://`` behind one interface.

Tables and sources are addressed by URI. Local paths (``./data``, ``/abs``, ``file://``) are
the embedded default; ``s3://bucket/prefix`` works through ``storage_options`` — the
non-secret settings (endpoint, region, ``AWS_ALLOW_HTTP``) in the job config, the
credentials only from the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN`` or any other source of the AWS default chain), which both deltalake
and pyarrow read themselves. A secret in ``storage_options`` is rejected, so it can never
be written into a resolved config or a log.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import AfterValidator

#: Keys that carry secrets; they must come from the environment.
SECRET_KEYS = frozenset(
    {
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key_id",
        "secret_access_key",
        "session_token",
        "token",
        "password",
    }
)


def check_storage_options(options: dict[str, str]) -> None:
    """Raises ValueError naming a secret key, with the fix (use the environment)."""
    for key in options:
        if key.lower() in SECRET_KEYS:
            raise ValueError(
                f"storage_options.{key} is a credential; credentials are read from the "
                f"environment only, never from the config. Remove it and export "
                f"{key.upper()} instead."
            )


def _checked(options: dict[str, str]) -> dict[str, str]:
    check_storage_options(options)
    return options


#: A config field of object-store settings: credential keys are refused (every job's config
#: uses this type, so none can accept a secret).
StorageOptions = Annotated[dict[str, str], AfterValidator(_checked)]


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def normalise_uri(uri: str) -> str:
    """Absolute local path for local URIs (deltalake and Ray workers agree on it), else as is."""
    if uri.startswith("file://"):
        return str(Path(urlparse(uri).path).resolve())
    if is_remote(uri):
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri).joinpath(*parts))


def dirname(uri: str) -> str:
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return str(Path(uri).parent)


def filesystem(uri: str, storage_options: dict[str, str] | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for ``uri``.

    Args:
        uri: Local path or ``s3://bucket/key``.
        storage_options: deltalake-style options; for S3 ``AWS_ENDPOINT_URL``,
            ``AWS_REGION`` and ``AWS_ALLOW_HTTP`` are honoured (credentials come from the
            environment through the AWS default chain).

    Returns:
        ``(filesystem, path)``.

    Raises:
        ValueError: An unsupported scheme, with the supported ones.
    """
    options = {k.upper(): v for k, v in (storage_options or {}).items()}
    if not is_remote(uri):
        return pafs.LocalFileSystem(), normalise_uri(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        endpoint = options.get("AWS_ENDPOINT_URL") or options.get("AWS_ENDPOINT")
        kwargs: dict = {}
        if endpoint:
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc or endpoint
            kwargs["scheme"] = ep.scheme or "https"
        elif options.get("AWS_ALLOW_HTTP", "").lower() == "true":
            kwargs["scheme"] = "http"
        region = options.get("AWS_REGION") or options.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    raise ValueError(
        f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix"
    )


def read_bytes(uri: str, storage_options: dict[str, str] | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    with fs.open_input_file(path) as f:
        return f.read()


def exists(uri: str, storage_options: dict[str, str] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound
