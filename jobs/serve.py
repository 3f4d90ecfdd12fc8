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
import os
import sys

from pipelines.web.server import ServeConfig, ServeError, build_app, check_port_free, is_loopback

from .common import STORAGE, job_logging, job_overrides, job_parser, parse_job_config

PROG = "ciea serve"
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
    try:
        check_port_free(cfg.server.host, cfg.server.port)
        if cfg.model.device == "cpu":
            import torch

            torch.set_num_threads(cfg.model.threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        app, info = build_app(cfg)
    except ServeError as e:
        raise SystemExit(f"ciea serve: {e}") from None

    import uvicorn

    where = f"{cfg.server.host}:{cfg.server.port}"
    url = f"http://[{cfg.server.host.strip('[]')}]:{cfg.server.port}/" if ":" in cfg.server.host.strip("[]") \
        else f"http://{where}/"
    exposure = "this machine only" if is_loopback(cfg.server.host) else "EXPOSED to the network, no authentication"
    print(f"ciea serve: table {info.table} @ version {info.version}"
          f"{f' (tag {info.tag})' if info.tag else ''}, {info.rows} documents, model_id {info.model_id}; "
          f"w overlay {'on' if info.patch_grid else 'off (the table stores no patch weights)'}\n"
          f"  read-only, {exposure}: {url}  (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.server.host.strip("[]"), port=cfg.server.port, log_level=cfg.server.log_level,
                access_log=cfg.server.log_level in ("info", "debug"), server_header=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
