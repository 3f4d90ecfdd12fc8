"""The search page's HTTP app: ``GET /`` (the page), ``GET /api/search``, ``GET /api/health``.

Read-only by construction: the app holds one :class:`pipelines.query.search.Searcher` (which reads
a pinned LanceDB version) and registers GET routes only; every other method gets a 405.
Nothing here writes to the table, the disk or anywhere else.

Inputs are validated by hand rather than by FastAPI's declarative ``Query`` checks so that a
bad request gets one plain sentence that says what to change (``k must be a whole number
from 1 to 50 (got '500')``) instead of a pydantic error list, and every error — a bad
parameter, an unknown page, a wrong method — is the same JSON shape::

    {"error": "<what is wrong and how to fix it>", "param": "<the parameter, if one>"}

Each image hit carries the extractor's complementary weights ``w`` (one per patch, stored
at embed time: exactly the weights the model used) and the table records the patch grid,
so the page can draw ``w`` over the thumbnail with no model at hand. Thumbnails travel
inline as ``data:`` URIs: they are small (<= 96 px JPEGs), need no second lookup by
``doc_id``, and cannot go stale against the pinned version.

The page itself (``static/``) is plain HTML, CSS and JavaScript: no build step and nothing
fetched from elsewhere (the machine it runs on may be offline). A Content-Security-Policy
allows only the app's own scripts and styles and ``data:`` images.
"""

from __future__ import annotations

import base64
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

MODES = ("vector", "fts", "hybrid")
#: ``any`` (or an empty value) means no modality filter.
MODALITY_CHOICES = ("any", "image", "text")
MAX_QUERY_CHARS = 500
MAX_K = 50
DEFAULT_K = 10
#: Longest text shown on a card (the table may hold whole articles).
EXCERPT_CHARS = 600
SEARCH_PARAMS = ("q", "k", "mode", "modality")

SECURITY_HEADERS = {
    # Own scripts and styles only, images from the app or inline data: URIs (thumbnails).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class ServeInfo:
    """What ``/api/health`` reports and the page shows in its header.

    Attributes:
        table: LanceDB table name.
        version: the table version searched (pinned for the server's lifetime).
        model_id: checkpoint id of the vectors (and of the query encoder).
        rows: documents in that version.
        patch_grid: (rows, cols) that ``patch_weights`` is laid out on, row-major;
            ``None`` when the table has no weights (text-only models, older tables).
        tag: the tag the version was resolved from, if any.
    """

    table: str
    version: int
    model_id: str
    rows: int
    patch_grid: tuple[int, int] | None = None
    tag: str | None = None


class BadRequest(ValueError):
    """A request parameter that cannot be used, with the fix in the message."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_patch_grid(text: str | None) -> tuple[int, int] | None:
    """``"7x7"`` (the ``ciea.patch_grid`` table metadata) → ``(7, 7)``; ``None`` if absent
    or malformed (the page then shows no overlay rather than a wrong one)."""
    if not text:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        logger.warning("ignoring malformed patch grid %r (expected e.g. '7x7')", text)
        return None
    rows, cols = int(parts[0]), int(parts[1])
    return (rows, cols) if rows > 0 and cols > 0 else None


# ---------------------------------------------------------------------------------------
# Request validation (pure functions: the unit of the API's contract)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRequest:
    q: str
    k: int = DEFAULT_K
    mode: str = "vector"
    modality: str | None = None


def _single(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name) or []
    if len(values) > 1:
        raise BadRequest(f"{name} was given {len(values)} times: give it once", name)
    return values[0] if values else None


def parse_search_params(params: Mapping[str, Sequence[str]]) -> SearchRequest:
    """Validates ``/api/search`` query parameters (each name → its list of values).

    Raises:
        BadRequest: the first problem found, naming the parameter and the fix.
    """
    unknown = sorted(set(params) - set(SEARCH_PARAMS))
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}: /api/search takes "
                         f"{', '.join(SEARCH_PARAMS)}", unknown[0])
    q = (_single(params, "q") or "").strip()
    if not q:
        raise BadRequest("q is empty: type what you are looking for, e.g. q=a red circle", "q")
    if len(q) > MAX_QUERY_CHARS:
        raise BadRequest(f"q is {len(q)} characters long: shorten it to at most {MAX_QUERY_CHARS}", "q")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in q):
        raise BadRequest("q contains control characters: send plain text", "q")
    raw_k = _single(params, "k")
    k = DEFAULT_K
    if raw_k not in (None, ""):
        try:
            k = int(raw_k)
        except ValueError:
            raise BadRequest(f"k must be a whole number from 1 to {MAX_K} (got {raw_k[:20]!r})", "k") from None
        if not 1 <= k <= MAX_K:
            raise BadRequest(f"k must be a whole number from 1 to {MAX_K} (got {k})", "k")
    mode = (_single(params, "mode") or "vector").strip().lower()
    if mode not in MODES:
        raise BadRequest(f"mode must be one of {', '.join(MODES)} (got {mode[:20]!r})", "mode")
    modality = (_single(params, "modality") or "any").strip().lower()
    if modality not in MODALITY_CHOICES:
        raise BadRequest(f"modality must be one of {', '.join(MODALITY_CHOICES)} (got {modality[:20]!r})",
                         "modality")
    return SearchRequest(q=q, k=k, mode=mode, modality=None if modality == "any" else modality)


# ---------------------------------------------------------------------------------------
# Hits → JSON
# ---------------------------------------------------------------------------------------


def _finite(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _excerpt(text: str | None) -> str | None:
    if not text:
        return None
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1].rstrip() + "…"


def hit_to_json(hit: Any, patch_grid: tuple[int, int] | None) -> dict[str, Any]:
    """One :class:`pipelines.query.search.Hit` → the JSON a card is drawn from."""
    thumb = getattr(hit, "thumbnail", None)
    weights = getattr(hit, "patch_weights", None)
    w = None
    if weights is not None and patch_grid is not None:
        vals = [_finite(v) for v in weights]
        if len(vals) == patch_grid[0] * patch_grid[1] and None not in vals:
            w = [round(v, 4) for v in vals]
        else:
            logger.warning("document %s: %d patch weights do not fit the %dx%d grid; no overlay",
                           hit.doc_id, len(vals), *patch_grid)
    metadata = getattr(hit, "metadata", None)
    return {
        "rank": int(hit.rank),
        "doc_id": hit.doc_id,
        "score": _finite(hit.score),
        "modality": hit.modality,
        "caption": _excerpt(getattr(hit, "caption", None)),
        "text": _excerpt(getattr(hit, "text", None)),
        "thumbnail": ("data:image/jpeg;base64," + base64.b64encode(bytes(thumb)).decode()) if thumb else None,
        "patch_weights": w,
        "metadata": metadata if isinstance(metadata, dict) else {},
    }


# ---------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------


def _default_filter(modality: str | None) -> Any:
    from pipelines.query.search import Filter

    return None if modality is None else Filter(modality=modality)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if param:
        body["param"] = param
    return JSONResponse(body, status_code=status)


def _add_guards(app: FastAPI, allowed_hosts: Sequence[str] | None) -> None:
    """Host check, security headers on every response, and errors that name the fix."""
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error(404, f"no page at {request.url.path[:100]}: the page is /, the API is "
                               "/api/search?q=... and /api/health")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed: this server is read-only, use GET")
        return _error(exc.status_code, str(exc.detail))


def _search_route(searcher: Any, info: ServeInfo, make_filter: Callable[[str | None], Any]):
    """``GET /api/search``: parameters checked, one search at a time, hits as JSON."""
    # The searcher's model and Lance handles are not documented thread-safe, and FastAPI
    # runs plain ``def`` routes on a thread pool: one search at a time.
    lock = threading.Lock()

    def search(request: Request):
        params = {key: request.query_params.getlist(key) for key in request.query_params.keys()}
        try:
            req = parse_search_params(params)
            where = make_filter(req.modality)
        except BadRequest as e:
            return _error(400, str(e), e.param)
        except ValueError as e:  # the searcher's FilterError: still the user's input
            return _error(400, str(e))
        t0 = time.perf_counter()
        try:
            with lock:
                hits = searcher.search(req.q, k=req.k, mode=req.mode, where=where)
        except ValueError as e:
            # The searcher refuses what it cannot do with valid-looking input (e.g. a
            # full-text query its parser rejects): the user can change the query.
            return _error(400, f"cannot run this {req.mode} search: {e}", "q")
        except Exception:
            logger.exception("search failed for a %s query of %d characters", req.mode, len(req.q))
            return _error(500, "the search failed on the server (see its log); try again or "
                               "another mode")
        took_ms = round((time.perf_counter() - t0) * 1000, 1)
        return {
            "query": req.q, "k": req.k, "mode": req.mode, "modality": req.modality or "any",
            "table": info.table, "version": info.version, "model_id": info.model_id,
            "patch_grid": list(info.patch_grid) if info.patch_grid else None, "took_ms": took_ms,
            "hits": [hit_to_json(h, info.patch_grid) for h in hits],
        }

    return search


def create_app(
    searcher: Any,
    info: ServeInfo,
    *,
    make_filter: Callable[[str | None], Any] = _default_filter,
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """The FastAPI app over one open searcher.

    Args:
        searcher: a :class:`pipelines.query.search.Searcher` (anything with its ``search``).
        info: what the health endpoint and page header report.
        make_filter: modality (or ``None``) → the searcher's ``where`` filter.
        allowed_hosts: ``Host`` header values to accept (a loopback server refuses other
            names, which defeats DNS-rebinding pages in the user's browser); ``None``: any.

    Returns:
        A ``fastapi.FastAPI`` with GET routes only and no generated docs pages (they load
        their scripts from a CDN, and the machine may be offline).
    """
    app = FastAPI(title="ciea search", docs_url=None, redoc_url=None, openapi_url=None)
    _add_guards(app, allowed_hosts)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        body = asdict(info)
        body["patch_grid"] = list(info.patch_grid) if info.patch_grid else None
        body.update(status="ok", modes=list(MODES), modalities=list(MODALITY_CHOICES), max_k=MAX_K,
                    max_query_chars=MAX_QUERY_CHARS)
        return body

    app.get("/api/search")(_search_route(searcher, info, make_filter))
    return app
