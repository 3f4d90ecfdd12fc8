"""Storage URIs: local paths and ``s3://`` behind one interface.

Tables and sources are addressed by URI. Local paths (``./data``, ``/abs``, ``file://``) are
the embedded default; ``s3://bucket/prefix`` works through ``storage_options``. Those hold
only the non-secret settings a backend documents (endpoint, region, ``AWS_ALLOW_HTTP``, …:
:data:`ALLOWED_OPTIONS`); credentials come only from the environment
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` or any other
source of the AWS default chain, ``AZURE_STORAGE_ACCOUNT_KEY``, ``GOOGLE_APPLICATION_CREDENTIALS``),
which deltalake, Lance and pyarrow read themselves. Any other key is refused — as a
credential when it looks like one (:func:`pipelines.store.secrets.looks_secret`), else as
unknown — so a secret can never be written into a resolved config or a log, and no error
shows the value it was given.
"""

from __future__ import annotations

import contextlib
import difflib
import posixpath
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import AfterValidator, BaseModel, Field, model_validator

from pipelines.store.secrets import looks_secret, redact_text


def _spellings(prefix: str, names: str) -> frozenset[str]:
    """Every name both with and without the backend's prefix (object_store accepts both)."""
    return frozenset(n for name in names.split() for n in (f"{prefix}{name}", name))


#: HTTP client and retry settings every backend takes (object_store ``ClientConfigKey``,
#: Lance's retry options).
CLIENT_OPTIONS = frozenset("""
    allow_http allow_invalid_certificates connect_timeout timeout pool_idle_timeout pool_max_idle_per_host
    http1_only http2_only http2_keep_alive_interval http2_keep_alive_timeout http2_keep_alive_while_idle
    http2_max_frame_size proxy_url proxy_ca_certificate proxy_excludes user_agent default_content_type
    randomize_addresses max_retries retry_timeout download_retry_count client_max_retries client_retry_timeout
""".split())

#: The non-secret settings of each backend, lower case, in the spellings deltalake
#: (object_store), Lance and pyarrow accept; keys are matched case-insensitively.
ALLOWED_OPTIONS: dict[str, frozenset[str]] = {
    "s3": CLIENT_OPTIONS | _spellings("aws_", """
        endpoint_url endpoint region default_region allow_http bucket bucket_name virtual_hosted_style_request
        checksum_algorithm conditional_put copy_if_not_exists disable_tagging imdsv1_fallback metadata_endpoint
        request_payer s3_express server_side_encryption skip_signature sse_bucket_key_enabled sse_kms_key_id
        unsigned_payload""") | frozenset("""
        aws_s3_allow_unsafe_rename aws_s3_locking_provider delta_dynamo_table_name aws_endpoint_url_dynamodb
        aws_profile aws_force_credential_load aws_iam_role_arn aws_iam_role_session_name aws_s3_assume_role_arn
        aws_s3_role_session_name aws_ec2_metadata_disabled aws_s3_pool_idle_timeout aws_sts_pool_idle_timeout
        aws_max_attempts""".split()),
    "gcs": CLIENT_OPTIONS | _spellings("google_", "bucket bucket_name skip_signature"),
    "azure": CLIENT_OPTIONS | _spellings("azure_", """
        container_name endpoint use_fabric_endpoint client_id tenant_id authority_id authority_host msi_endpoint
        identity_endpoint object_id msi_resource_id use_azure_cli skip_signature disable_tagging""") | frozenset("""
        azure_storage_account_name account_name azure_storage_endpoint azure_storage_client_id
        azure_storage_tenant_id azure_storage_authority_id azure_storage_use_emulator use_emulator""".split()),
}

#: Credential options each backend knows → the environment variable to export instead.
CREDENTIAL_ENV: dict[str, dict[str, str]] = {
    "s3": {
        "aws_access_key_id": "AWS_ACCESS_KEY_ID", "access_key_id": "AWS_ACCESS_KEY_ID",
        "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY", "secret_access_key": "AWS_SECRET_ACCESS_KEY",
        "aws_session_token": "AWS_SESSION_TOKEN", "session_token": "AWS_SESSION_TOKEN",
        "aws_token": "AWS_SESSION_TOKEN", "token": "AWS_SESSION_TOKEN",
        "aws_sse_customer_key_base64": "AWS_SSE_CUSTOMER_KEY_BASE64",
        "aws_web_identity_token_file": "AWS_WEB_IDENTITY_TOKEN_FILE",
        "aws_container_credentials_relative_uri": "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "aws_container_credentials_full_uri": "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "aws_container_authorization_token_file": "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    },
    "gcs": {
        "google_service_account": "GOOGLE_SERVICE_ACCOUNT", "service_account": "GOOGLE_SERVICE_ACCOUNT",
        "google_service_account_path": "GOOGLE_SERVICE_ACCOUNT_PATH",
        "service_account_path": "GOOGLE_SERVICE_ACCOUNT_PATH",
        "google_service_account_key": "GOOGLE_SERVICE_ACCOUNT_KEY", "service_account_key": "GOOGLE_SERVICE_ACCOUNT_KEY",
        "google_application_credentials": "GOOGLE_APPLICATION_CREDENTIALS",
        "application_credentials": "GOOGLE_APPLICATION_CREDENTIALS",
    },
    "azure": {
        **dict.fromkeys(("azure_storage_account_key", "azure_storage_access_key", "azure_storage_master_key",
                         "account_key", "access_key", "master_key"), "AZURE_STORAGE_ACCOUNT_KEY"),
        **dict.fromkeys(("azure_client_secret", "azure_storage_client_secret", "client_secret"),
                        "AZURE_CLIENT_SECRET"),
        **dict.fromkeys(("azure_storage_sas_key", "azure_storage_sas_token", "sas_key", "sas_token"),
                        "AZURE_STORAGE_SAS_KEY"),
        **dict.fromkeys(("azure_storage_token", "bearer_token", "token"), "AZURE_STORAGE_TOKEN"),
        **dict.fromkeys(("azure_federated_token_file", "federated_token_file"), "AZURE_FEDERATED_TOKEN_FILE"),
    },
}

#: URI schemes → backend.
SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "azure": "azure", "abfs": "azure",
           "abfss": "azure", "adl": "azure"}

#: Marks of a secret in an option's name, as substrings: the allow-list comes first, so a
#: non-secret key that happens to contain one (``aws_sse_kms_key_id``) is not affected.
_SECRET_MARKS = ("key", "secret", "token", "passw", "pwd", "credential", "sas", "sig", "private", "auth",
                 "session", "cert", "bearer")


def backend(uri: str | None) -> str | None:
    """``"s3"``, ``"gcs"`` or ``"azure"`` for an object-store URI; None for a local path or
    an unknown scheme (whose options are then checked against every backend's)."""
    if not uri or "://" not in uri:
        return None
    return SCHEMES.get(uri.split("://", 1)[0].lower())


def _allowed(kind: str | None) -> frozenset[str]:
    return ALLOWED_OPTIONS[kind] if kind else frozenset().union(*ALLOWED_OPTIONS.values())


def _credentials(kind: str | None) -> dict[str, set[str]]:
    """Credential option → the variables to export instead, for one backend or all."""
    out: dict[str, set[str]] = {}
    for name, env in CREDENTIAL_ENV.items():
        if kind in (None, name):
            for key, var in env.items():
                out.setdefault(key, set()).add(var)
    return out


def is_credential_option(key: str) -> bool:
    """Whether a storage option named ``key`` (not on the allow-list) would carry a secret."""
    k = key.lower()
    return any(k in env for env in CREDENTIAL_ENV.values()) or looks_secret(k) or any(m in k for m in _SECRET_MARKS)


def env_hint(key: str, kind: str | None = None) -> str:
    """The fix for a credential named ``key``: the variable to export (the nearest known
    credential option's, for a misspelling), else the backend's usual ones."""
    key = key.lower()
    known = _credentials(kind)
    match = key if key in known else next(iter(difflib.get_close_matches(key, known, n=1, cutoff=0.8)), None)
    if match:
        return "export " + " or ".join(sorted(known[match])) + " instead"
    examples = {"s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY", "gcs": "GOOGLE_APPLICATION_CREDENTIALS",
                "azure": "AZURE_STORAGE_ACCOUNT_KEY"}
    shown = [examples[kind]] if kind else list(examples.values())
    return "set the object store's own variable instead (e.g. " + ", ".join(shown) + ")"


def _canonical(kind: str | None) -> list[str]:
    """The allowed names a message lists: the prefixed spellings and the client settings."""
    prefixes = ("aws_", "google_", "azure_", "delta_")
    return sorted(k for k in _allowed(kind) if k.startswith(prefixes) or k in CLIENT_OPTIONS)


def check_storage_option(key: str, value: Any, uri: str | None = None) -> None:
    """Raises ValueError unless ``key`` is a non-secret setting of ``uri``'s backend.

    The message names the key, never ``value``, and the fix: a credential (by name,
    :func:`is_credential_option`) is to be exported in the environment; an unknown key gets
    the nearest allowed name and the allowed list; a URL value carrying credentials
    (``user:password@``, a signature parameter) is to be given without them.

    Args:
        key: The option's name, any case.
        value: Its value (only inspected for credentials inside a URL; never shown).
        uri: The table or source URI the options are for; None: any backend's settings pass.
    """
    kind = backend(uri)
    k = str(key).lower()
    where = f"storage_options.{key}"
    if k in _allowed(kind):
        if isinstance(value, str) and redact_text(value) != value:
            raise ValueError(f"{where} is a URL with credentials in it (user:password@ or a signature/token "
                             f"parameter); give it without them and put the credentials in the environment")
        return
    if is_credential_option(k):
        raise ValueError(f"{where} is a credential; credentials are read from the environment only, never from "
                         f"the config. Remove it and {env_hint(k, kind)}.")
    near = difflib.get_close_matches(k, sorted(_allowed(kind)), n=1, cutoff=0.75)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise ValueError(f"{where} is not a known {kind or 'object-store'} setting{hint}; allowed (any case): "
                     f"{', '.join(_canonical(kind))}")


def check_storage_options(options: Mapping[str, Any], uri: str | None = None) -> None:
    """:func:`check_storage_option` for every option; the first bad one raises ValueError."""
    for key, value in options.items():
        check_storage_option(key, value, uri)


def _checked(options: dict[str, str]) -> dict[str, str]:
    check_storage_options(options)
    return options


#: A config field of object-store settings: anything but a backend's non-secret settings is
#: refused (every job's config uses this type, so none can accept a secret). The URI is not
#: known here, so any backend's settings pass; ``check_storage_options(options, uri)`` where
#: a handle is made for a URI narrows that to the URI's backend.
StorageOptions = Annotated[dict[str, str], AfterValidator(_checked)]

#: The one config key of object-store settings, top level in every job's config.
STORAGE_KEY = "storage_options"
_MISSING = object()


def move_legacy_keys(data: Any, moved: Mapping[str, str]) -> Any:
    """For a ``model_validator(mode="before")``: settings older configs spelled elsewhere,
    taken from there. ``moved`` maps old dotted keys to new ones (``"num_cpus"`` →
    ``"ray.num_cpus"``, ``"input.storage_options"`` → ``"storage_options"``).

    The new place wins: given at both, the new value stays (two mappings are merged key by
    key, the new keys winning). ``data`` itself is left as it is; anything but a dict (a
    model instance) passes through.
    """
    if not isinstance(data, dict):
        return data
    for old, new in moved.items():
        value, data = _popped(data, old.split("."))
        if value is not _MISSING:
            data = _placed(data, new.split("."), value)
    return data


def _popped(node: Any, path: list[str]) -> tuple[Any, Any]:
    """``(value at path, node without it)``, or ``(_MISSING, node)``; copies, never mutates."""
    head, *rest = path
    if not isinstance(node, dict) or head not in node:
        return _MISSING, node
    if not rest:
        node = dict(node)
        return node.pop(head), node
    value, inner = _popped(node[head], rest)
    return (_MISSING, node) if value is _MISSING else (value, {**node, head: inner})


def _placed(node: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """``node`` with ``value`` at ``path`` unless one is there already (merged if both are mappings)."""
    head, *rest = path
    have = node.get(head, _MISSING)
    if isinstance(have, BaseModel):  # a section given as a model: as its fields
        have = have.model_dump()
    if rest:
        have = {} if have is _MISSING or have is None else have
        return {**node, head: _placed(have, rest, value)} if isinstance(have, dict) else node
    if have is _MISSING:
        return {**node, head: value}
    if isinstance(have, dict) and isinstance(value, dict):
        return {**node, head: {**value, **have}}
    return node


class StorageOptionsConfig(BaseModel):
    """A job config's object-store settings, in one place in every job: the top-level
    ``storage_options`` (``--storage-option KEY=VALUE``). The config hands them to every
    table handle it makes; a job config subclasses this and lists in
    :attr:`legacy_storage_keys` where its older configs put them."""

    #: Where older configs of the job put its storage options (dotted, e.g.
    #: ``input.storage_options``): moved to the top level on load; the top level wins.
    legacy_storage_keys: ClassVar[tuple[str, ...]] = ()

    storage_options: StorageOptions = Field(
        default_factory=dict,
        description="object-store settings of every table and file the job reads or writes (AWS_ENDPOINT_URL, "
                    "AWS_REGION, AWS_ALLOW_HTTP, ...); credentials only from the environment (refused here)")

    @model_validator(mode="before")
    @classmethod
    def _moved_storage_options(cls, data: Any) -> Any:
        return move_legacy_keys(data, dict.fromkeys(cls.legacy_storage_keys, STORAGE_KEY))


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


@contextlib.contextmanager
def local_folder(uri: str, storage_options: dict[str, str] | None = None) -> Iterator[str]:
    """A local folder holding what the folder ``uri`` holds, for code that reads files
    (a checkpoint, a tokenizer): ``uri`` itself when it is local; for an object-store
    prefix, a copy in a temporary folder of this process, removed on exit. Every process
    that needs the folder (a train worker, an encoder actor on another node) copies it for
    itself: nothing is handed over on one node's disk.

    Raises:
        FileNotFoundError: no file under ``uri``.
    """
    if not is_remote(uri):
        yield uri
        return
    fs, base = filesystem(uri, storage_options)
    files = [f for f in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
             if f.type == pafs.FileType.File]
    if not files:
        raise FileNotFoundError(f"{uri} holds no file: point it at a folder written there (e.g. by `ciea train`)")
    with tempfile.TemporaryDirectory(prefix="ciea-folder-") as tmp:
        for f in files:
            target = Path(tmp, posixpath.relpath(f.path, base))
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f.path) as src, target.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        yield tmp


def upload_folder(local: str | Path, uri: str, storage_options: dict[str, str] | None = None) -> None:
    """Copies the local folder ``local`` to the folder ``uri`` (files of the same names replaced)."""
    fs, base = filesystem(uri, storage_options)
    pafs.copy_files(str(Path(local).resolve()), base, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
