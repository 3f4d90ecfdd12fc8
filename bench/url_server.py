"""The URL benchmark's image server, in a process of its own (issue 26).

An asyncio HTTP/1.1 server on loopback that answers ``GET /img/<name>.png`` with the same
small PNG as the test server (:func:`tests.http_faults.png_for`) after ``--latency-ms``, keeps
connections alive and sets ``TCP_NODELAY`` (headers and body leave in one write anyway). It
serves only what the benchmark asks for — the fault routes stay in ``tests/http_faults.py``,
whose threaded server the tests keep using — and costs a few tens of microseconds of CPU per
request, so it is not what the benchmark measures: :class:`ServerProcess` reports its CPU
seconds beside the client's.

    python -m bench.url_server --latency-ms 50        # prints its base URL, serves until killed
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


async def _serve(host: str, latency_s: float, ready) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from http_faults import png_for

    cache: dict[str, bytes] = {}

    def response(path: str) -> bytes:
        body = cache.get(path)
        if body is None:
            kind, _, name = path.strip("/").partition("/")
            if kind == "img" and name.endswith(".png"):
                data, head = png_for(name), b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
            else:
                data, head = b"no such route", b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
            body = head + b"Content-Length: %d\r\n\r\n" % len(data) + data
            if len(cache) < 100_000:
                cache[path] = body
        return body

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")  # GET only: no request body
                line = head.split(b"\r\n", 1)[0].split(b" ")
                path = line[1].decode("latin-1").split("?", 1)[0] if len(line) > 1 else "/"
                if latency_s:
                    await asyncio.sleep(latency_s)
                writer.write(response(path))
                await writer.drain()
                if b"\r\nconnection: close" in head.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(client, host, 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    ready(f"http://{host}:{port}")
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.url_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency-ms", type=float, default=50.0, help="latency added to every response")
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)

    def ready(url: str) -> None:
        print(url, flush=True)

    try:
        asyncio.run(_serve(args.host, args.latency_ms / 1000, ready))
    except KeyboardInterrupt:
        pass
    return 0


class ServerProcess:
    """``python -m bench.url_server`` as a child process: ``url`` once started, ``cpu_s()``."""

    def __init__(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.url_server", "--latency-ms", str(self.latency_ms)],
                                     cwd=REPO, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.proc.kill()
            raise RuntimeError(f"the URL server did not start (exit {self.proc.wait()})")
        return self

    def cpu_s(self) -> float:
        from bench.meter import cpu_s

        return cpu_s(self.proc.pid)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    raise SystemExit(main())
