"""The URL fetcher against a loopback server serving every fault class (no Ray)."""

from __future__ import annotations

import random
import time

import pytest
from http_faults import FaultServer, png_for

from pipelines.ingest.fetch import FetchSettings, backoff, check_url, fetch_all, parse_retry_after

FAST = FetchSettings(concurrency=8, per_host=8, connect_timeout_s=1.0, read_timeout_s=0.5, total_timeout_s=1.0,
                     retries=2, backoff_s=0.05, max_backoff_s=0.1, max_retry_after_s=5.0, max_redirects=3,
                     max_bytes=1 << 20, allow_private=True)  # the test server is on loopback


@pytest.fixture(scope="module")
def server():
    with FaultServer(slow_s=1.5, huge_bytes=2 << 20) as s:
        yield s


def test_every_fault_class_has_its_reason(server):
    u = server.url
    urls = [f"{u}/img/a.png", f"{u}/missing/b.png", f"{u}/flaky/c.png", f"{u}/limited/d.png",
            f"{u}/slow/e.png", f"{u}/truncated/f.png", f"{u}/huge/g.png", f"{u}/huge-stream/h.png",
            f"{u}/html/i.png", f"{u}/loop/j", f"{u}/redirect/k.png", "ftp://example.com/x.png"]
    t0 = time.perf_counter()
    res = fetch_all(urls, FAST, seed=0)
    elapsed = time.perf_counter() - t0
    by = {r.url.rsplit("/", 2)[-2] if r.url.startswith(u) else "bad": r for r in res}
    assert [r.url for r in res] == urls
    assert by["img"].ok and by["img"].data == png_for("a.png") and by["img"].attempts == 1
    assert by["missing"].reason == "fetch_http_404" and by["missing"].attempts == 1  # not retried
    assert by["flaky"].ok and by["flaky"].attempts == 2 and by["flaky"].data == png_for("c.png")
    assert by["limited"].ok and by["limited"].attempts == 2 and by["limited"].waits[0] >= 1.0  # Retry-After
    assert by["slow"].reason == "fetch_timeout" and by["slow"].attempts == 3
    assert by["truncated"].reason == "fetch_truncated" and by["truncated"].attempts == 3
    assert by["huge"].reason == "fetch_too_large" and "Content-Length" in by["huge"].detail
    assert str(2 << 20) not in by["huge"].detail  # the cap, never the size an internal service claims
    assert by["huge-stream"].reason == "fetch_too_large" and "while streaming" in by["huge-stream"].detail
    assert by["html"].reason == "fetch_not_an_image" and "not an image" in by["html"].detail
    assert "text/html" not in by["html"].detail and "bytes" not in by["html"].detail  # nothing of the answer
    assert by["loop"].reason == "fetch_too_many_redirects"
    assert by["redirect"].ok and by["redirect"].final_url.endswith("/img/k.png")
    assert by["bad"].reason == "fetch_bad_url" and by["bad"].attempts == 0
    for r in res:
        if not r.ok:
            assert r.detail.startswith(f"GET {r.url}: "), r.detail
    assert server.hits["/huge-stream/h.png"] == 1
    assert elapsed < 8, elapsed  # all concurrent: the slow URL's three attempts dominate


def test_retry_after_too_long_gives_up(server):
    s = FetchSettings(max_retry_after_s=0.5, retries=3, backoff_s=0.01, allow_private=True)
    (r,) = fetch_all([f"{server.url}/limited/zz.png"], s)
    assert r.reason == "fetch_http_429" and r.attempts == 1 and "Retry-After" in r.detail


def test_per_host_limit_bounds_concurrency():
    with FaultServer(delay_s=0.2) as s:
        urls = [f"{s.url}/img/{i}.png" for i in range(8)]
        t0 = time.perf_counter()
        res = fetch_all(urls, FetchSettings(concurrency=8, per_host=2, allow_private=True))
        took = time.perf_counter() - t0
    assert all(r.ok for r in res)
    assert took >= 0.8 - 0.05  # 8 requests, 2 at a time, 0.2 s each


def test_concurrency_spread_over_pools_is_used_in_full_and_never_exceeded():
    # 20 slots over ceil(20 / LANE_CONNECTIONS) client pools: the server sees up to 20
    # requests at once — never more, and more than one pool's worth (every pool is used).
    import threading

    with FaultServer(delay_s=0.3) as s:
        lock, now, peak = threading.Lock(), [0], [0]
        handle = s._handle

        def counted(h):
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            try:
                handle(h)
            finally:
                with lock:
                    now[0] -= 1

        s._handle = counted
        urls = [f"{s.url}/img/{i}.png" for i in range(60)]
        res = fetch_all(urls, FetchSettings(concurrency=20, per_host=20, allow_private=True))
    assert [r.data for r in res] == [png_for(f"{i}.png") for i in range(60)]
    assert 14 < peak[0] <= 20, peak[0]


def test_helpers():
    assert check_url("http://a/b.png") is None
    assert "scheme" in check_url("file:///etc/passwd")
    assert "no host" in check_url("http:///x")
    assert "non-empty" in check_url(None)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None
    rng = random.Random(0)
    waits = [backoff(a, FetchSettings(backoff_s=1, max_backoff_s=4), rng) for a in (1, 2, 3, 4, 5)]
    assert all(0 <= w <= min(4, 2 ** (a - 1)) for w, a in zip(waits, (1, 2, 3, 4, 5)))
