"""What the confinement tests of both tiers share: a secret no table may ever hold, a
folder of outside files, and a guard that fails a test a FIFO would block forever."""

from __future__ import annotations

import contextlib
import io
import signal
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

SECRET = b"TOP-SECRET-CONTENT-0123456789"


def png(color: tuple[int, int, int] = (10, 20, 30), size: int = 4) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()


@contextlib.contextmanager
def fails_if_blocked(seconds: int, what: str) -> Iterator[None]:
    """A reader that opened a FIFO would block forever: raise after ``seconds`` instead."""
    def boom(*_):
        raise TimeoutError(f"{what} blocked (opened a FIFO?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def make_outside(tmp_path: Path, image: bytes) -> Path:
    """A folder outside every root: a secret text, a secret named like an image, and a
    valid image (``image``) that must never be stored."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_bytes(SECRET)
    (d / "secret.png").write_bytes(SECRET)
    (d / "real.png").write_bytes(image)
    return d
