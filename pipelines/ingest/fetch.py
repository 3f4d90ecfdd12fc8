"""Fetching images by URL: the only way ingest reads from the network.

``fetch_all(urls, settings)`` fetches a list of URLs concurrently inside one Ray Data task
(an asyncio loop over ``httpx2.AsyncClient`` pools of at most ``LANE_CONNECTIONS``
keep-alive connections each) and returns one :class:`FetchResult` per URL, in order. What it
guarantees:

* at most ``concurrency`` requests in flight per task and ``per_host`` per host;
* connect / read timeouts per request and a ``total_timeout_s`` deadline per attempt (a
  server that trickles bytes cannot hold a slot forever);
* retries (``retries`` more attempts) on 429, 408, 5xx, timeouts and broken connections
  (a refused connect, a body cut short), with exponential backoff and full jitter, waiting
  at least the server's ``Retry-After`` (seconds or an HTTP date) — up to
  ``max_retry_after_s``; a longer one gives up at once;
* at most ``max_redirects`` redirects (a loop ends there);
* at most ``max_bytes`` per body, checked on ``Content-Length`` and again while streaming,
  so an oversized body is never held;
* the body must be an image Pillow recognises (its header; validation decodes it fully);
* an address policy (:mod:`pipelines.ingest.address_policy`): only ``http`` and ``https``,
  and every connection — the first and each redirect hop — goes to a public address that
  was resolved and checked in the same step (no loopback, private, link-local, multicast or
  reserved address unless ``allow_private``); an address literal in any spelling is refused
  before the client starts.

What a failure says is what the operator needs, never what an internal service answered:
a refused address is ``fetch_blocked_address`` without the address; a body that is not an
image or is too large is not described (no size, no content type).

Every failure is a result with a stable ``reason`` (``fetch_http_404``,
``fetch_timeout``, ``fetch_too_large``, ``fetch_truncated``, ``fetch_too_many_redirects``,
``fetch_not_an_image``, ``fetch_connect_error``, ``fetch_network_error``, ``fetch_bad_url``,
``fetch_blocked_address``) and a ``detail`` that starts ``GET <url>`` — the URL redacted
(:func:`pipelines.store.secrets.redact_url`), as is ``final_url``; nothing raises for one
bad URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import io
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit

from pipelines.ingest.address_policy import (
    BLOCKED_REASON,
    BlockedAddress,
    guarded_backend,
    host_blocked,
)
from pipelines.store.secrets import redact_url

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
SCHEMES = ("http", "https")
#: Connections per client pool; a task's ``concurrency`` is split over ``ceil(concurrency / 8)`` pools.
LANE_CONNECTIONS = 8
#: A URL refused for the credentials it carries (``signed_urls="refuse"``; the sources check it).
SIGNED_URL_REFUSED = "signed_url_refused"


@dataclass(frozen=True)
class FetchSettings:
    """Limits of one fetch task; see the module docstring."""

    concurrency: int = 16
    per_host: int = 4
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 30.0
    max_redirects: int = 5
    max_bytes: int = 16 << 20
    user_agent: str = "ciea-ingest/1 (+https://github.com/ciea)"
    #: Let loopback, private, link-local, … addresses through (a trusted internal image server).
    allow_private: bool = False
    #: A URL with credentials: ``strip`` stores it without them, ``refuse`` quarantines it.
    signed_urls: str = "strip"


@dataclass
class FetchResult:
    """The outcome of one URL: ``data`` when ``ok``, else ``reason`` and ``detail``."""

    url: str
    ok: bool = False
    data: bytes | None = None
    status: int | None = None
    reason: str | None = None
    detail: str | None = None
    attempts: int = 0
    bytes: int = 0
    content_type: str | None = None
    final_url: str | None = None
    waits: list[float] = field(default_factory=list, repr=False)


class _Failure(Exception):
    def __init__(self, reason: str, detail: str, retryable: bool, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.retryable = reason, detail, retryable
        self.status, self.retry_after = status, retry_after


def check_url(url: object) -> str | None:
    """Why ``url`` cannot be fetched (not a string, not http/https, no host), or None."""
    if not isinstance(url, str) or not url.strip():
        return f"url must be a non-empty string, got {type(url).__name__} {url!r:.60}"
    try:
        parts = urlsplit(url.strip())
    except ValueError as e:
        return f"url {redact_url(url)!r:.200} does not parse ({e})"
    if parts.scheme.lower() not in SCHEMES:
        return f"url {redact_url(url)!r:.200} has scheme {parts.scheme!r}; only http and https are fetched"
    if not parts.hostname:
        return f"url {redact_url(url)!r:.200} has no host"
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now_dt = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return max(0.0, (when - now_dt).total_seconds())


def backoff(attempt: int, settings: FetchSettings, rng: random.Random) -> float:
    """Full-jitter exponential backoff before retry ``attempt`` (1-based)."""
    return rng.uniform(0, min(settings.max_backoff_s, settings.backoff_s * 2 ** (attempt - 1)))


def fetch_all(urls: Sequence[str], settings: FetchSettings, seed: int | None = None) -> list[FetchResult]:
    """Fetch ``urls`` concurrently (see the module docstring); one result per URL, in order."""
    if not urls:
        return []
    return asyncio.run(_fetch_all(list(urls), settings, random.Random(seed)))


async def _fetch_all(urls: list[str], settings: FetchSettings, rng: random.Random) -> list[FetchResult]:
    import httpx2

    timeout = httpx2.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s,
                             write=settings.read_timeout_s, pool=None)
    # The task's ``concurrency`` slots are spread over lanes of at most LANE_CONNECTIONS, one
    # client (and connection pool) each: httpcore2's pool scans all of its connections — a
    # liveness syscall per idle one — on every request, so one pool of 64 connections cost
    # more CPU per request than the rest of the fetch (issue 26). A free slot is a token
    # naming its lane; a lane never has more requests than connections, so none waits in a pool.
    lanes = -(-settings.concurrency // LANE_CONNECTIONS)
    free_slots: asyncio.Queue[int] = asyncio.Queue()
    for i in range(settings.concurrency):
        free_slots.put_nowait(i % lanes)
    host_slots: dict[str, asyncio.Semaphore] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for lane in range(lanes):
            size = len(range(lane, settings.concurrency, lanes))
            limits = httpx2.Limits(max_connections=size, max_keepalive_connections=size)
            transport = httpx2.AsyncHTTPTransport(verify=_tls_context(), limits=limits, trust_env=False)
            # The address policy sits where sockets are opened, so it sees every connection:
            # the first request's and each redirect hop's (httpx2 takes no backend argument).
            transport._pool._network_backend = guarded_backend(settings.allow_private)
            clients.append(await stack.enter_async_context(httpx2.AsyncClient(
                timeout=timeout, transport=transport, follow_redirects=True, max_redirects=settings.max_redirects,
                trust_env=False, headers={"User-Agent": settings.user_agent})))

        async def one(url: str) -> FetchResult:
            result = FetchResult(url)
            problem = check_url(url)
            if problem:
                result.reason, result.detail = "fetch_bad_url", f"GET {redact_url(url)}: {problem}"
                return result
            host = (urlsplit(url).hostname or "").lower()
            if host_blocked(host, settings.allow_private):  # refused before the client is asked
                result.reason, result.detail = BLOCKED_REASON, f"GET {redact_url(url)}: {BlockedAddress()}"
                return result
            slot = host_slots.setdefault(host, asyncio.Semaphore(settings.per_host))
            for attempt in range(1, settings.retries + 2):
                async with slot:  # host first: a waiter holds no task slot
                    lane = await free_slots.get()
                    result.attempts = attempt
                    try:
                        await _attempt(clients[lane], url, settings, result)
                        return result
                    except _Failure as f:
                        failure = f
                    finally:
                        free_slots.put_nowait(lane)
                result.status, result.reason = failure.status, failure.reason
                result.detail = f"GET {redact_url(url)}: {failure.detail} (after {attempt} attempt{'s' * (attempt > 1)})"
                if not failure.retryable or attempt > settings.retries:
                    return result
                if failure.retry_after is not None and failure.retry_after > settings.max_retry_after_s:
                    result.detail = (f"GET {redact_url(url)}: {failure.detail}; Retry-After {failure.retry_after:.0f} s is "
                                     f"over source.fetch.max_retry_after_s={settings.max_retry_after_s:g} "
                                     f"(after {attempt} attempt{'s' * (attempt > 1)})")
                    return result
                wait = max(failure.retry_after or 0.0, backoff(attempt, settings, rng))
                result.waits.append(wait)
                await asyncio.sleep(wait)  # outside the slots: a waiting retry holds no connection
            return result

        return list(await asyncio.gather(*(one(u) for u in urls)))


@functools.lru_cache(maxsize=1)
def _tls_context():
    """The default verifying TLS context, built once per process: loading the CA bundle costs
    ~50 ms of CPU, and every ``fetch_all`` call (one per chunk of a read task) opens clients."""
    import httpx2

    return httpx2.create_ssl_context(trust_env=False)


async def _attempt(client, url: str, settings: FetchSettings, result: FetchResult) -> None:
    """One GET: fills ``result`` on success, raises :class:`_Failure` otherwise."""
    import httpx2

    try:
        async with asyncio.timeout(settings.total_timeout_s):
            async with client.stream("GET", url) as response:
                status = response.status_code
                result.status = status
                result.final_url = redact_url(str(response.url))
                if status >= 400:
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                    raise _Failure(f"fetch_http_{status}", f"HTTP {status}", status in RETRY_STATUSES, status,
                                   retry_after)
                length = response.headers.get("content-length")
                if length and length.isdigit() and int(length) > settings.max_bytes:
                    raise _Failure("fetch_too_large", "the Content-Length is over the cap of "
                                   f"{settings.max_bytes} bytes (source.fetch.max_mb)", False, status)
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > settings.max_bytes:
                        raise _Failure("fetch_too_large", f"body passed the cap of {settings.max_bytes} bytes "
                                       "while streaming (source.fetch.max_mb); not kept", False, status)
                    chunks.append(chunk)
                data = b"".join(chunks)
                content_type = response.headers.get("content-type")
    except BlockedAddress as e:
        raise _Failure(BLOCKED_REASON, str(e), False) from None
    except TimeoutError:
        raise _Failure("fetch_timeout", f"no complete response within {settings.total_timeout_s:g} s "
                       "(source.fetch.total_timeout_s)", True) from None
    except httpx2.TooManyRedirects:
        raise _Failure("fetch_too_many_redirects", f"more than {settings.max_redirects} redirects "
                       "(a loop?) (source.fetch.max_redirects)", False) from None
    except httpx2.TimeoutException as e:
        raise _Failure("fetch_timeout", f"{type(e).__name__} (connect {settings.connect_timeout_s:g} s / "
                       f"read {settings.read_timeout_s:g} s)", True) from None
    except httpx2.RemoteProtocolError as e:
        raise _Failure("fetch_truncated", f"the response broke off ({e})", True) from None
    except httpx2.ConnectError as e:
        raise _Failure("fetch_connect_error", f"cannot connect ({e})", True) from None
    except httpx2.UnsupportedProtocol:
        raise _Failure("fetch_bad_url", "a redirect leads to a scheme other than http or https", False) from None
    except httpx2.TransportError as e:
        raise _Failure("fetch_network_error", f"{type(e).__name__}: {e}", True) from None
    except httpx2.InvalidURL as e:
        raise _Failure("fetch_bad_url", f"invalid URL ({e})", False) from None
    problem = _image_problem(data)
    if problem:
        # Neither the size nor the type nor the decoder's words: the answer may be an
        # internal service's, and the quarantine is not the place to describe it.
        raise _Failure("fetch_not_an_image", "the body is not an image Pillow can read", False, result.status)
    result.bytes = len(data)
    result.content_type = content_type
    result.ok, result.data, result.reason, result.detail = True, data, None, None


def _image_problem(data: bytes) -> str | None:
    """Why Pillow does not recognise ``data`` as an image (header only), or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.size  # noqa: B018 - the header parsed
    except UnidentifiedImageError:
        return "Pillow recognises no image format in it"  # its message holds an object address
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {str(e)[:120]}"
    return None
