"""An HTTP server on loopback that serves images and every fault the URL fetcher must
survive; started by test fixtures (and the ingest benchmark), never on the network.

Routes (``GET``):

* ``/img/<name>.png`` — 200, a small PNG whose colour follows ``<name>``;
* ``/missing/<name>.png`` — 404;
* ``/flaky/<name>.png`` — 500 the first time a name is asked for, then the image;
* ``/limited/<name>.png`` — 429 with ``Retry-After: 1`` the first time, then the image;
* ``/slow/<name>.png`` — waits ``slow_s`` before answering (longer than the client timeout);
* ``/truncated/<name>.png`` — says ``Content-Length: 5000``, sends 100 bytes, hangs up;
* ``/huge/<name>.png`` — ``Content-Length`` over any small cap; ``/huge-stream/<name>.png``
  — no length, streams ``huge_bytes`` bytes;
* ``/html/<name>.png`` — 200 with an HTML page;
* ``/loop/<name>`` — a redirect loop; ``/redirect/<name>.png`` — one redirect to the image;
* ``/redirect-to?url=<url>`` — one redirect to any URL (another port, another host);
  ``/redirect-signed/<name>.png`` — one redirect to the image with ``redirect_secret`` in
  its ``X-Amz-Signature`` and ``token`` parameters (a presigned final URL).

``delay_s`` adds latency to every response (the benchmark's 50 ms). ``hits`` counts
requests per path. ``host`` is the loopback address it listens on (``127.0.0.2``: a second
host for the address-policy tests).
"""

from __future__ import annotations

import functools
import hashlib
import io
import socket
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


@functools.lru_cache(maxsize=4096)
def png_for(name: str, size: int = 16) -> bytes:
    r, g, b = hashlib.sha256(name.encode()).digest()[:3]
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (r, g, b)).save(buf, format="PNG")
    return buf.getvalue()


class FaultServer:
    def __init__(self, delay_s: float = 0.0, slow_s: float = 3.0, huge_bytes: int = 4 << 20,
                 host: str = "127.0.0.1", redirect_secret: str = "") -> None:
        self.redirect_secret = redirect_secret
        self.delay_s, self.slow_s, self.huge_bytes = delay_s, slow_s, huge_bytes
        self.hits: Counter = Counter()
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in two writes: without this, Nagle's algorithm and
                # the client's delayed ACK add ~40 ms to every response.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                server._handle(self)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests(self) -> int:
        with self._lock:
            return sum(self.hits.values())

    def _first(self, path: str) -> bool:
        with self._lock:
            if path in self._seen:
                return False
            self._seen.add(path)
            return True

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str = "image/png",
              headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.hits[path] += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        kind, _, name = path.strip("/").partition("/")
        if kind == "img":
            self._send(h, 200, png_for(name))
        elif kind == "missing":
            self._send(h, 404, b"not found", "text/plain")
        elif kind == "flaky":
            if self._first(path):
                self._send(h, 500, b"try again", "text/plain")
            else:
                self._send(h, 200, png_for(name))
        elif kind == "limited":
            if self._first(path):
                self._send(h, 429, b"slow down", "text/plain", {"Retry-After": "1"})
            else:
                self._send(h, 200, png_for(name))
        elif kind == "slow":
            time.sleep(self.slow_s)
            try:
                self._send(h, 200, png_for(name))
            except OSError:
                pass  # the client gave up
        elif kind == "truncated":
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", "5000")
            h.end_headers()
            h.wfile.write(png_for(name)[:100])
            h.wfile.flush()
            h.close_connection = True
        elif kind == "huge":
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(self.huge_bytes))
            h.end_headers()
            h.close_connection = True  # the client stops reading at the header
        elif kind == "huge-stream":
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            chunk = b"\0" * 65536
            try:
                for _ in range(self.huge_bytes // len(chunk) + 1):
                    h.wfile.write(chunk)
            except OSError:
                pass  # the client hung up at its cap
        elif kind == "html":
            self._send(h, 200, b"<!doctype html><html><body>not an image</body></html>", "text/html")
        elif kind == "loop":
            back = name[:-1] if name.endswith("~") else name + "~"  # a → a~ → a → …
            self._send(h, 302, b"", "text/plain", {"Location": f"/loop/{back}"})
        elif kind == "redirect-to":
            target = urllib.parse.parse_qs(h.path.partition("?")[2]).get("url", ["/"])[0]
            self._send(h, 302, b"", "text/plain", {"Location": target})
        elif kind == "redirect-signed":
            secret = self.redirect_secret
            self._send(h, 302, b"", "text/plain",
                       {"Location": f"/img/{name}?X-Amz-Signature={secret}&token={secret}&w=1"})
        elif kind == "redirect":
            self._send(h, 302, b"", "text/plain", {"Location": f"/img/{name}"})
        else:
            self._send(h, 404, b"no such route", "text/plain")


def main(argv: list[str] | None = None) -> int:
    """Serve on loopback and write a URL list to try ``ciea ingest --source urls`` on."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(description="loopback image server with faults, and a URL list for it")
    p.add_argument("--list", required=True, help="JSON-lines URL list to write")
    p.add_argument("--n", type=int, default=20, help="good image URLs in the list")
    p.add_argument("--latency-ms", type=float, default=0.0, help="latency added to every response")
    args = p.parse_args(argv)
    with FaultServer(delay_s=args.latency_ms / 1000, slow_s=30.0) as server:
        rows = [{"url": f"{server.url}/img/{i}.png", "caption": f"a coloured square, number {i}"}
                for i in range(args.n)]
        rows += [{"doc_id": kind, "url": f"{server.url}/{kind}/{kind}.png", "caption": f"fault: {kind}"}
                 for kind in ("missing", "flaky", "limited", "slow", "truncated", "huge", "html")]
        rows.append({"doc_id": "loop", "url": f"{server.url}/loop/a", "caption": "fault: redirect loop"})
        Path(args.list).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"serving {server.url}; wrote {len(rows)} URLs to {args.list}; Ctrl-C stops", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
