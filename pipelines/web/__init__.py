"""The read-only search page behind ``ciea serve``: a FastAPI app over one
:class:`pipelines.query.search.Searcher` and the static page in ``static/`` (``app``), and
what the command puts around it — its config, the Host-header rule, building the app from
the config, the port check (``server``)."""

from __future__ import annotations

from pipelines.web.app import (
    MAX_K,
    MAX_QUERY_CHARS,
    MODALITY_CHOICES,
    MODES,
    ServeInfo,
    create_app,
    parse_patch_grid,
)

__all__ = ["MAX_K", "MAX_QUERY_CHARS", "MODALITY_CHOICES", "MODES", "ServeInfo", "create_app", "parse_patch_grid"]
