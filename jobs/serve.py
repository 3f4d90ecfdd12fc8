"""``ciea serve``: the read-only search page over one published LanceDB table.

Opens the table at a pinned version (default: the one tagged ``published``; ``--version N``
or ``--tag NAME`` for another) with the checkpoint that made its vectors, and serves:

* ``GET /`` — the page: a search box, mode (vector / full-text / hybrid), modality and k;
  a grid of results with thumbnail, rank, score, caption or text and doc_id; on image
  results a toggle that draws the CIEA extractor's complementary weights ``w`` over the
  thumbnail — which patches the image adds to its caption, i.e. *why* CIEA found it.
* ``GET /api/search?q=...&k=10&mode=vector&modality=any`` — the same results as JSON.
* ``GET /api/health`` — table, version, model_id, rows.

Nothing is ever written: the routes are GET only and the searcher reads a pinned version.
It listens on 127.0.0.1 (this machine only). ``--host 0.0.0.0`` exposes it to the network:
that is the operator's choice, and it has no authentication — put it behind a proxy that
has, if other people should reach it.

Examples::

    ciea serve --db data/lancedb --table documents                  # http://127.0.0.1:8000
    ciea serve --db data/lancedb --table documents --port 8080 --tag src3-4f2a...
    ciea serve --db s3://vectors/webqa --table webqa --checkpoint ckpt \\
        --storage-option AWS_REGION=eu-west-1                       # credentials from the environment
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.store import storage as storage_mod

from .common import job_logging, job_overrides, job_parser, parse_job_config

logger = logging.getLogger("ciea.serve")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


class TableSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    db: str | None = Field(None, description="LanceDB database folder, local or s3:// (required)")
    table: str = Field("documents", pattern=r"^[A-Za-z0-9_.-]+$", description="table name")
    version: int | None = Field(None, ge=0, description="table version to serve (default: the 'published' tag)")
    tag: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                            description="tag to serve instead of 'published' (not with version)")
    storage_options: storage_mod.StorageOptions = Field(
        default_factory=dict,
        description="object-store settings (AWS_ENDPOINT_URL, AWS_REGION, ...); credentials only from the environment")


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


class ServeConfig(BaseModel):
    """The whole ``ciea serve`` configuration, validated before anything is opened."""

    model_config = ConfigDict(extra="forbid")
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


def _is_loopback(host: str) -> bool:
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
    return ["127.0.0.1", "localhost", "[::1]", "::1"] if _is_loopback(cfg.host) else None


# ---------------------------------------------------------------------------------------
# Opening the table and building the app (what tests call)
# ---------------------------------------------------------------------------------------


def open_searcher(cfg: ServeConfig) -> Any:
    """Opens the :class:`pipelines.query.search.Searcher` the config names.

    Raises:
        SystemExit: no such table / version / tag, or no usable checkpoint, with the fix.
    """
    from pipelines.query.search import Searcher, SearchError

    version: int | str | None = cfg.input.version if cfg.input.version is not None else cfg.input.tag
    try:
        # Searcher.open refuses a missing or file --db before connecting: serving creates nothing.
        return Searcher.open(cfg.input.db, cfg.input.table, version=version, checkpoint=cfg.model.checkpoint,
                             storage_options=cfg.input.storage_options, device=cfg.model.device)
    except (SearchError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"ciea serve: {e}") from None


def serve_info(searcher: Any) -> Any:
    """What the page reports about the searcher's pinned table version."""
    from pipelines.store.lance_tables import META_PATCH_GRID, PATCH_WEIGHTS
    from pipelines.web import ServeInfo, parse_patch_grid

    rows = searcher.count_rows()
    grid = parse_patch_grid(searcher.metadata.get(META_PATCH_GRID))
    if grid is not None and PATCH_WEIGHTS not in searcher.schema.names:
        grid = None  # a grid without weights to lay on it
    return ServeInfo(table=searcher.name, version=searcher.version, model_id=searcher.model_id, rows=rows,
                     patch_grid=grid, tag=searcher.tag)


def build_app(cfg: ServeConfig, searcher: Any | None = None) -> tuple[Any, Any]:
    """``(FastAPI app, ServeInfo)`` for the config (opens the searcher unless given one)."""
    from pipelines.web import create_app

    searcher = searcher if searcher is not None else open_searcher(cfg)
    info = serve_info(searcher)
    app = create_app(searcher, info, allowed_hosts=resolve_allowed_hosts(cfg.server))
    return app, info


def check_port_free(host: str, port: int) -> None:
    """Fails fast, with the fix, when the port is taken (uvicorn would log and exit 1)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise SystemExit(f"ciea serve: port {port} on {host} is in use: pass --port with a free one "
                                 f"(e.g. --port {port + 1})") from None
            raise SystemExit(f"ciea serve: cannot listen on {host}:{port}: {e.strerror}; pass --host with an "
                             "address of this machine (default 127.0.0.1)") from None


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


PROG = "ciea serve"
STORAGE = "input.storage_options"
#: Flags of this job → config keys (the shared ones are in ``jobs/common.py``).
FLAGS = {"db": "input.db", "table": "input.table", "version": "input.version", "tag": "input.tag",
         "checkpoint": "model.checkpoint", "host": "server.host", "port": "server.port"}


def _parser() -> argparse.ArgumentParser:
    p = job_parser(PROG, __doc__, ServeConfig, storage=STORAGE, progress=None, set_example="server.log_level=warning")
    p.add_argument("--db", help="LanceDB folder, local or s3:// (input.db)")
    p.add_argument("--table", help="table name (input.table; default documents)")
    p.add_argument("--version", type=int, help="serve this table version (input.version; default: 'published')")
    p.add_argument("--tag", help="serve the version with this tag (input.tag)")
    p.add_argument("--checkpoint", help="checkpoint for the queries (model.checkpoint; default: the table's)")
    p.add_argument("--host", help="listen address (server.host; default 127.0.0.1, this machine only — "
                                  "another address exposes the page, without authentication, to the network: "
                                  "the operator's choice)")
    p.add_argument("--port", type=int, help="TCP port (server.port; default 8000)")
    return p


def parse_config(argv: list[str] | None) -> tuple[ServeConfig, argparse.Namespace]:
    """The command line → the validated config (nothing opened yet); exits with the errors."""
    args = _parser().parse_args(argv)
    overrides = job_overrides(args, FLAGS, storage=STORAGE)
    return parse_job_config(PROG, ServeConfig, args, overrides, storage=STORAGE), args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv)
    job_logging(args.verbose)
    check_port_free(cfg.server.host, cfg.server.port)
    if cfg.model.device == "cpu":
        import torch

        torch.set_num_threads(cfg.model.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app, info = build_app(cfg)

    import uvicorn

    where = f"{cfg.server.host}:{cfg.server.port}"
    url = f"http://[{cfg.server.host.strip('[]')}]:{cfg.server.port}/" if ":" in cfg.server.host.strip("[]") \
        else f"http://{where}/"
    exposure = "this machine only" if _is_loopback(cfg.server.host) else "EXPOSED to the network, no authentication"
    print(f"ciea serve: table {info.table} @ version {info.version}"
          f"{f' (tag {info.tag})' if info.tag else ''}, {info.rows} documents, model_id {info.model_id}; "
          f"w overlay {'on' if info.patch_grid else 'off (the table stores no patch weights)'}\n"
          f"  read-only, {exposure}: {url}  (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.server.host.strip("[]"), port=cfg.server.port, log_level=cfg.server.log_level,
                access_log=cfg.server.log_level in ("info", "debug"), server_header=False)
    return 0
