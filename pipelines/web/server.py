"""What ``ciea serve`` puts around the page (:mod:`pipelines.web.app`): its typed
:class:`ServeConfig`, the Host-header rule (:func:`resolve_allowed_hosts`), opening the pinned
:class:`~pipelines.query.search.Searcher` and building the app (:func:`build_app`), and the
port check that fails before the model loads (:func:`check_port_free`).

The page listens on loopback unless the operator says otherwise; anything else exposes an
unauthenticated page to the network, which is the operator's choice. On loopback only
loopback Host headers are accepted, so a web page elsewhere that rebinds its DNS name to
127.0.0.1 gets nothing.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.store import storage as storage_mod
from pipelines.store.images import MAX_IMAGE_BYTES

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pipelines.query.search import Searcher
    from pipelines.web.app import ServeInfo

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
MIB = 1024 * 1024


class ServeError(ValueError):
    """The page cannot be served as configured (no such table / version / tag, no usable
    checkpoint, a port in use), with the fix."""


class TableSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    db: str | None = Field(None, description="LanceDB database folder, local or s3:// (required)")
    table: str = Field("documents", pattern=r"^[A-Za-z0-9_.-]+$", description="table name")
    version: int | None = Field(None, ge=0, description="table version to serve (default: the 'published' tag)")
    tag: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                            description="tag to serve instead of 'published' (not with version)")


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(None, description="checkpoint for the queries (default: the one recorded "
                                                     "in the table metadata; its model_id must match the table's)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="torch device that encodes the queries")
    threads: int = Field(1, ge=1, description="torch threads for query encoding")


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = Field("127.0.0.1", description="address to listen on; anything but loopback exposes the "
                                               "unauthenticated page to the network (the operator's choice)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    allowed_hosts: list[str] | None = Field(
        None, description="Host header values accepted (default: loopback names when host is loopback, "
                          "else any)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="uvicorn log level")
    max_upload_mb: float = Field(8.0, gt=0, le=MAX_IMAGE_BYTES / MIB,
                                 description="largest picture the page takes as a query, in MiB (held in memory "
                                             "only; at most the store's image cap, "
                                             f"{MAX_IMAGE_BYTES // MIB} MiB)")

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes (what the app enforces while reading an upload)."""
        return max(1, int(self.max_upload_mb * MIB))


class ServeConfig(storage_mod.StorageOptionsConfig):
    """The whole ``ciea serve`` configuration, validated before anything is opened."""

    model_config = ConfigDict(extra="forbid")
    legacy_storage_keys = ("input.storage_options",)
    input: TableSettings = Field(default_factory=TableSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if not self.input.db:
            raise ValueError("input.db is required: pass --db DIR (the LanceDB folder `ciea embed` wrote, "
                             "by default <root>/lancedb)")
        if self.input.version is not None and self.input.tag is not None:
            raise ValueError("pass either --version or --tag, not both (neither: the 'published' version)")
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine only."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_allowed_hosts(cfg: ServerSettings) -> list[str] | None:
    """Host headers to accept: on loopback only loopback names (a web page elsewhere that
    rebinds its DNS name to 127.0.0.1 then gets nothing), else whatever the operator set."""
    if cfg.allowed_hosts is not None:
        return list(cfg.allowed_hosts)
    return ["127.0.0.1", "localhost", "[::1]", "::1"] if is_loopback(cfg.host) else None


# ---------------------------------------------------------------------------------------
# Opening the table and building the app (what tests call)
# ---------------------------------------------------------------------------------------


def open_searcher(cfg: ServeConfig) -> Searcher:
    """Opens the :class:`pipelines.query.search.Searcher` the config names.

    Raises:
        ServeError: no such database / table / version / tag, or no usable checkpoint, with the fix.
    """
    from pipelines.query.search import Searcher, SearchError

    version: int | str | None = cfg.input.version if cfg.input.version is not None else cfg.input.tag
    try:
        # Searcher.open refuses a missing or file --db before connecting: serving creates nothing.
        return Searcher.open(cfg.input.db, cfg.input.table, version=version, checkpoint=cfg.model.checkpoint,
                             storage_options=cfg.storage_options, device=cfg.model.device)
    except (SearchError, FileNotFoundError, OSError) as e:
        raise ServeError(str(e)) from None


def serve_info(searcher: Any) -> ServeInfo:
    """What the page reports about the searcher's pinned table version."""
    from pipelines.store.lance_tables import META_PATCH_GRID, PATCH_WEIGHTS
    from pipelines.web.app import ServeInfo, parse_patch_grid

    rows = searcher.count_rows()
    grid = parse_patch_grid(searcher.metadata.get(META_PATCH_GRID))
    if grid is not None and PATCH_WEIGHTS not in searcher.schema.names:
        grid = None  # a grid without weights to lay on it
    config = getattr(getattr(searcher, "model", None), "config", None)
    return ServeInfo(table=searcher.name, version=searcher.version, model_id=searcher.model_id, rows=rows,
                     patch_grid=grid, tag=searcher.tag, accepts_pictures=bool(getattr(config, "uses_images", False)))


def build_app(cfg: ServeConfig, searcher: Any | None = None) -> tuple[FastAPI, ServeInfo]:
    """``(FastAPI app, ServeInfo)`` for the config (opens the searcher unless given one).

    Raises:
        ServeError: as :func:`open_searcher`.
    """
    from pipelines.web.app import create_app

    searcher = searcher if searcher is not None else open_searcher(cfg)
    info = serve_info(searcher)
    app = create_app(searcher, info, allowed_hosts=resolve_allowed_hosts(cfg.server),
                     max_upload_bytes=cfg.server.max_upload_bytes)
    return app, info


def check_port_free(host: str, port: int) -> None:
    """Fails fast, with the fix, when the port is taken (uvicorn would log and exit 1).

    Raises:
        ServeError: the port is in use, or ``host`` is no address of this machine.
    """
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServeError(f"port {port} on {host} is in use: pass --port with a free one "
                                 f"(e.g. --port {port + 1})") from None
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}; pass --host with an "
                             "address of this machine (default 127.0.0.1)") from None
