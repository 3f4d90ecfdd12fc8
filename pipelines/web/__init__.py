"""The read-only search page behind ``ciea serve``: a FastAPI app over one
:class:`pipelines.query.search.Searcher` and the static page in ``static/``."""

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
