"""WebDataset shards for tests: samples → the bytes of one tar file."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Mapping, Sequence


def write_shard(samples: Sequence[tuple[str, Mapping[str, bytes]]], fmt: int = tarfile.PAX_FORMAT,
                pax: Mapping[str, Mapping[str, str]] | None = None) -> bytes:
    """A tar of ``samples`` (``(key, {ext: bytes})``, one member ``<key>.<ext>`` each) in
    format ``fmt``; ``pax`` gives extended headers to the members of a sample key (``"*"``:
    every sample's)."""
    pax = pax or {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                headers = pax.get(key, pax.get("*"))
                if headers:
                    info.pax_headers = dict(headers)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
