"""The search page's HTTP app: ``GET /`` (the page), ``GET /api/search`` (text, or "more like
this" with ``like=DOC_ID``), ``POST /api/search`` (a picture as the raw request body, with
optional text in ``q``), ``GET /api/health``.

Read-only by construction: the app holds one :class:`pipelines.query.search.Searcher` (which reads
a pinned LanceDB version) and registers GET routes plus the one POST that carries a picture;
every other method gets a 405. Nothing here writes to the table, the disk or anywhere else: an
uploaded picture is read into memory (the byte cap enforced while reading, so an oversize body
is never read past it), checked by the same rule as ingest's images
(:func:`pipelines.store.images.normalise_image`, inside the searcher), encoded and dropped. The
body is the picture's bytes with its ``Content-Type`` (``image/png`` …), not a multipart form:
nothing to parse, and no form parser that spools large parts to a temporary file.

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
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
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
SEARCH_PARAMS = ("q", "k", "mode", "modality", "like")
#: Longest doc_id ``like`` takes (a doc_id is an identifier, not a text).
MAX_DOC_ID_CHARS = 200
#: Default cap on an uploaded picture's bytes (``server.max_upload_mb``; never above the
#: store's ``MAX_IMAGE_BYTES``, the cap ingest applies to the corpus's images).
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024 * 1024
#: Content types ``POST /api/search`` takes: the raster formats Pillow decodes.
PICTURE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/x-ms-bmp",
                 "image/tiff")

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
        accepts_pictures: whether the table's model encodes a picture query (``False`` for
            text-only models: the page then hides its picture control).
    """

    table: str
    version: int
    model_id: str
    rows: int
    patch_grid: tuple[int, int] | None = None
    tag: str | None = None
    accepts_pictures: bool = False


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
    """One checked search: text ``q``, "more like this" ``like``, or (``picture``) a picture
    in the request body with optional text ``q``."""

    q: str | None
    k: int = DEFAULT_K
    mode: str = "vector"
    modality: str | None = None
    like: str | None = None
    picture: bool = False


def _single(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name) or []
    if len(values) > 1:
        raise BadRequest(f"{name} was given {len(values)} times: give it once", name)
    return values[0] if values else None


def _check_text(value: str, name: str, limit: int) -> str:
    if len(value) > limit:
        raise BadRequest(f"{name} is {len(value)} characters long: shorten it to at most {limit}", name)
    if any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        raise BadRequest(f"{name} contains control characters: send plain text", name)
    return value


def parse_search_params(params: Mapping[str, Sequence[str]], *, picture: bool = False) -> SearchRequest:
    """Validates ``/api/search`` query parameters (each name → its list of values).

    Args:
        params: the query string.
        picture: the request carries a picture (``POST``): ``q`` is then optional (the text
            that goes with the picture), ``like`` is refused and the mode must be ``vector``.

    Raises:
        BadRequest: the first problem found, naming the parameter and the fix.
    """
    unknown = sorted(set(params) - set(SEARCH_PARAMS))
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)}: /api/search takes "
                         f"{', '.join(SEARCH_PARAMS)}", unknown[0])
    q = _check_text((_single(params, "q") or "").strip(), "q", MAX_QUERY_CHARS)
    like = _single(params, "like")
    if like is not None:
        like = _check_text(like.strip(), "like", MAX_DOC_ID_CHARS)
        if not like:
            raise BadRequest("like is empty: give a result's doc_id, e.g. like=img-000000008", "like")
        if picture:
            raise BadRequest("like does not go with a picture: send either the picture or like=DOC_ID", "like")
        if q:
            raise BadRequest("q and like were both given: \"more like this\" takes the document alone; "
                             "drop q (or drop like to search the text)", "like")
    elif not q and not picture:
        raise BadRequest("q is empty: type what you are looking for, e.g. q=a red circle", "q")
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
    if mode != "vector" and (picture or like is not None):
        what = "a picture query" if picture else "\"more like this\""
        raise BadRequest(f"{what} is a vector search: use mode=vector (fts and hybrid rank query text)", "mode")
    modality = (_single(params, "modality") or "any").strip().lower()
    if modality not in MODALITY_CHOICES:
        raise BadRequest(f"modality must be one of {', '.join(MODALITY_CHOICES)} (got {modality[:20]!r})",
                         "modality")
    return SearchRequest(q=q or None, k=k, mode=mode, modality=None if modality == "any" else modality,
                         like=like, picture=picture)


def picture_type(content_type: str | None) -> str | None:
    """The request's ``Content-Type`` reduced to its media type if it is one
    :data:`PICTURE_TYPES` names, else ``None``."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media if media in PICTURE_TYPES else None


#: Python object reprs (``<_io.BytesIO object at 0x7f…>``) that Pillow's messages carry: no
#: use to the person who uploaded the picture.
_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def picture_error(message: str) -> str:
    """The searcher's refusal of an uploaded picture as one line for its sender (no object
    reprs, no line breaks, no ``picture 0:`` batch index)."""
    text = _REPR.sub("(the upload)", message)
    text = re.sub(r"^picture 0: ", "", text)
    return " ".join(text.split())[:400]


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
            return _error(405, f"{request.method} is not allowed here: this server is read-only, use GET "
                               "(POST only to /api/search, with a picture as the body)")
        return _error(exc.status_code, str(exc.detail))


class _Searching:
    """Runs the searcher for both ``/api/search`` routes: one search at a time, errors as
    one-line JSON, hits as cards."""

    def __init__(self, searcher: Any, info: ServeInfo, make_filter: Callable[[str | None], Any]) -> None:
        self.searcher, self.info, self.make_filter = searcher, info, make_filter
        # The searcher's model and Lance handles are not documented thread-safe, and FastAPI
        # runs plain ``def`` routes (and ``run_in_threadpool``) on a thread pool: one search
        # at a time.
        self.lock = threading.Lock()

    def run(self, req: SearchRequest, image: bytes | None = None) -> Any:
        """The search ``req`` (with ``image`` for a picture query) → the JSON body or an
        error response."""
        from pipelines.query.search import DocumentNotFoundError

        try:
            where = self.make_filter(req.modality)
        except ValueError as e:  # the searcher's FilterError: still the user's input
            return _error(400, str(e))
        kind = "picture" if req.picture else "like" if req.like is not None else req.mode
        t0 = time.perf_counter()
        try:
            with self.lock:
                if req.like is not None:
                    hits = self.searcher.search(like=req.like, k=req.k, mode=req.mode, where=where)
                elif req.picture:
                    hits = self.searcher.search(req.q, image=image, k=req.k, mode=req.mode, where=where)
                else:
                    hits = self.searcher.search(req.q, k=req.k, mode=req.mode, where=where)
        except DocumentNotFoundError:
            return _error(404, f"no document {req.like[:MAX_DOC_ID_CHARS]!r} in table {self.info.table!r} "
                               f"@ version {self.info.version}: \"more like this\" takes a doc_id of a "
                               "result on this page", "like")
        except ValueError as e:
            # The searcher refuses what it cannot do with valid-looking input: a picture that
            # does not decode, a full-text query its parser rejects. The user can change it.
            if req.picture:
                return _error(400, f"cannot search with this picture: {picture_error(str(e))}", "picture")
            if req.like is not None:
                return _error(400, f"cannot search like this document: {e}", "like")
            return _error(400, f"cannot run this {req.mode} search: {e}", "q")
        except Exception:
            logger.exception("search failed for a %s query (%d characters of text)", kind, len(req.q or ""))
            return _error(500, "the search failed on the server (see its log); try again or "
                               "another mode")
        took_ms = round((time.perf_counter() - t0) * 1000, 1)
        info = self.info
        return {
            "query": req.q, "like": req.like, "picture": req.picture,
            "k": req.k, "mode": req.mode, "modality": req.modality or "any",
            "table": info.table, "version": info.version, "model_id": info.model_id,
            "patch_grid": list(info.patch_grid) if info.patch_grid else None, "took_ms": took_ms,
            "hits": [hit_to_json(h, info.patch_grid) for h in hits],
        }


def _query_params(request: Request) -> dict[str, list[str]]:
    return {key: request.query_params.getlist(key) for key in request.query_params.keys()}


def _get_route(searching: _Searching):
    """``GET /api/search``: text (``q``) or "more like this" (``like``)."""

    def search(request: Request):
        try:
            req = parse_search_params(_query_params(request))
        except BadRequest as e:
            return _error(400, str(e), e.param)
        return searching.run(req)

    return search


async def read_capped(request: Request, max_bytes: int) -> bytes | None:
    """The request body, or ``None`` as soon as it passes ``max_bytes``: the rest is never
    read (a declared ``Content-Length`` over the cap is refused before reading anything)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            return None
    return bytes(body)


def _post_route(searching: _Searching, max_upload_bytes: int):
    """``POST /api/search``: the picture is the body, the query string as for GET (``q`` the
    optional text that goes with it)."""
    mib = max_upload_bytes / (1024 * 1024)

    async def search_picture(request: Request):
        try:
            req = parse_search_params(_query_params(request), picture=True)
        except BadRequest as e:
            return _error(400, str(e), e.param)
        if not searching.info.accepts_pictures:
            return _error(400, f"table {searching.info.table!r} was embedded by a text-only model, which encodes "
                               "no picture: search it with text (GET /api/search?q=...)", "picture")
        if picture_type(request.headers.get("content-type")) is None:
            given = (request.headers.get("content-type") or "none").split(";", 1)[0][:60]
            return _error(415, f"Content-Type {given} is not a picture this server takes: send the picture's "
                               f"bytes as the body with Content-Type one of {', '.join(PICTURE_TYPES)}", "picture")
        data = await read_capped(request, max_upload_bytes)
        if data is None:
            return _error(413, f"the picture is over {mib:g} MiB ({max_upload_bytes} bytes), this server's "
                               "upload limit (server.max_upload_mb): send a smaller one", "picture")
        if not data:
            return _error(400, "the request body is empty: send the picture's bytes as the body", "picture")
        return await run_in_threadpool(searching.run, req, data)

    return search_picture


def create_app(
    searcher: Any,
    info: ServeInfo,
    *,
    make_filter: Callable[[str | None], Any] = _default_filter,
    allowed_hosts: Sequence[str] | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> FastAPI:
    """The FastAPI app over one open searcher.

    Args:
        searcher: a :class:`pipelines.query.search.Searcher` (anything with its ``search``
            and ``stored_vectors``).
        info: what the health endpoint and page header report.
        make_filter: modality (or ``None``) → the searcher's ``where`` filter.
        allowed_hosts: ``Host`` header values to accept (a loopback server refuses other
            names, which defeats DNS-rebinding pages in the user's browser); ``None``: any.
        max_upload_bytes: the most bytes a picture upload may have; the body is never read
            past it.

    Returns:
        A ``fastapi.FastAPI`` with GET routes and ``POST /api/search`` only, and no generated
        docs pages (they load their scripts from a CDN, and the machine may be offline).

    Raises:
        ValueError: ``max_upload_bytes`` is not a positive number of bytes.
    """
    if not isinstance(max_upload_bytes, int) or max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes={max_upload_bytes!r}: pass a positive number of bytes")
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
                    max_query_chars=MAX_QUERY_CHARS, max_upload_bytes=max_upload_bytes,
                    picture_types=list(PICTURE_TYPES))
        return body

    searching = _Searching(searcher, info, make_filter)
    app.get("/api/search")(_get_route(searching))
    app.post("/api/search")(_post_route(searching, max_upload_bytes))
    return app
