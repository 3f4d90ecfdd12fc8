"""WebDataset shards cut at every byte, corrupted at random, over their caps: every sample is
a document or a quarantine row, and the reader's memory stays bounded (no Ray)."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tar_shards import write_shard

from pipelines.ingest.sources.webdataset import (
    BLOCK,
    TarCaps,
    WebDatasetSource,
    iter_tar_samples,
)

LONG = "deep/" + "n" * 120  # > 100 characters: a pax header (PAX) or a GNU long name (GNU)


class Zeros:
    """``n`` zero bytes as a stream, so a test writes a big member without holding it."""

    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\0" * n


def samples(n: int = 4) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    for i in range(n):
        key = f"{LONG}{i}" if i == 1 else f"s{i}"
        out.append((key, {"png": bytes([i]) * (100 + 37 * i), "txt": f"caption {i}".encode(),
                          "json": json.dumps({"i": i}).encode()}))
    return out


def shard(fmt: int = tarfile.PAX_FORMAT, items=None, pax: dict[str, str] | None = None) -> bytes:
    return write_shard(items if items is not None else samples(), fmt, {"*": pax} if pax else None)


def layout(data: bytes) -> tuple[list[int], int]:
    """Where each sample's first header ends (its key is known from there) and where the
    end-of-archive block starts, as ``tarfile`` reads the intact shard."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    firsts, seen = [], set()
    for m in members:
        key = m.name.rsplit("/", 1)
        key = "/".join(key[:-1] + [key[-1].split(".", 1)[0]])
        if key not in seen:
            seen.add(key)
            firsts.append(m.offset_data)
    last = members[-1]
    return firsts, last.offset_data + -(-last.size // BLOCK) * BLOCK


def check_cut(full: bytes, cut: int, expected, firsts: list[int], end: int) -> None:
    got = list(iter_tar_samples(io.BytesIO(full[:cut])))
    if cut >= end + BLOCK:  # the end-of-archive block is whole: the shard is complete
        assert [(s.key, s.members, s.reason) for s in got] == [(k, m, None) for k, m in expected]
        return
    *kept, last = got
    # Exactly the samples whose successor's header was read before the cut are kept, whole.
    n_kept = sum(1 for f in firsts[1:] if f <= cut)
    assert [(s.key, s.members, s.reason) for s in kept] == [(k, m, None) for k, m in expected[:n_kept]], cut
    # ... and one row stands for the rest: the sample the cut hit, or the shard itself.
    assert last.reason == ("shard_unreadable" if cut == 0 else "shard_truncated"), (cut, last)
    assert last.members == {}
    assert last.key == (expected[n_kept][0] if cut >= firsts[0] else None), (cut, last.key)
    if cut:
        assert f"byte {cut}" in last.detail or "header at byte" in last.detail, last.detail


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_a_cut_at_every_byte_reconciles(fmt):
    full = shard(fmt)
    firsts, end = layout(full)
    expected = samples()
    # PAX: every byte up to one block past the end-of-archive block (~4 s). GNU: every byte of
    # its header blocks, a stride of 7 through data and padding. Then the zero padding by stride.
    if fmt == tarfile.PAX_FORMAT:
        cuts = list(range(0, end + 2 * BLOCK + 1))
    else:
        with tarfile.open(fileobj=io.BytesIO(full)) as tar:
            headers = [range(m.offset, m.offset_data + 1) for m in tar.getmembers()]
        cuts = sorted({c for r in headers for c in r} | set(range(0, end + 2 * BLOCK + 1, 7)))
    cuts += list(range(end + 2 * BLOCK, len(full) + 1, 97))
    for cut in cuts:
        check_cut(full, cut, expected, firsts, end)


def test_cuts_through_the_source_name_the_shard_and_offset(tmp_path):
    full = shard()
    firsts, _ = layout(full)
    folder = tmp_path / "w"
    folder.mkdir()
    cut = firsts[2] + 300  # inside the third sample's first member
    (folder / "c.tar").write_bytes(full[:cut])
    rows = [r for i, spec in enumerate(WebDatasetSource(str(folder)).plan())
            for t in WebDatasetSource(str(folder)).read(i, spec) for r in t.to_pylist()]
    assert [r["error"] for r in rows] == [None, None, "shard_truncated"]
    assert rows[2]["record_ref"] == "c.tar#s2" and rows[2]["doc_id"] == "c/s2"
    assert "c.tar" in rows[2]["error_detail"] and f"byte {cut}" in rows[2]["error_detail"]
    # A cut exactly between two samples is no silent end: the sample before it is held back.
    (folder / "c.tar").write_bytes(full[: firsts[2] - BLOCK])
    rows = [r for t in WebDatasetSource(str(folder)).read(0, WebDatasetSource(str(folder)).plan()[0])
            for r in t.to_pylist()]
    assert [r["error"] for r in rows] == [None, "shard_truncated"]
    assert rows[1]["record_ref"] == f"c.tar#{LONG}1"


@pytest.mark.parametrize("codec", ["gzip", "bz2", "lzma"])
def test_compressed_shards_are_read_and_cuts_reconcile(codec):
    import importlib

    full = shard()
    packed = importlib.import_module(codec).compress(full)
    assert [s.reason for s in iter_tar_samples(io.BytesIO(packed))] == [None] * 4
    for cut in range(0, len(packed), 7):
        got = list(iter_tar_samples(io.BytesIO(packed[:cut])))
        assert got and all(s.reason is None for s in got[:-1])
        # A cut past the end-of-archive block (in the gzip trailer) leaves every sample whole.
        assert got[-1].reason in ("shard_truncated", "shard_unreadable") or len(got) == 4, (cut, got[-1])


def test_a_sample_over_the_cap_is_quarantined_unread_and_memory_stays_bounded(tmp_path):
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        for key, size in (("a", 10), ("huge", 24 << 20), ("b", 10)):
            info = tarfile.TarInfo(f"{key}.bin")
            info.size = size
            tar.addfile(info, Zeros(size))
        info = tarfile.TarInfo("b.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"end"))
    caps = TarCaps(max_member_bytes=32 << 20, max_sample_bytes=1 << 20, max_header_bytes=64 << 10)
    with open(path, "rb") as f:
        tracemalloc.start()
        got = [(s.key, s.reason, sum(map(len, s.members.values()))) for s in iter_tar_samples(f, caps)]
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert got == [("a", None, 10), ("huge", "sample_too_large", 0), ("b", None, 13)]
    assert peak < 3 << 20, f"the reader held {peak} bytes for a 24 MiB member over a 1 MiB cap"


def test_members_of_one_sample_count_together():
    items = [("x", {"a": b"1" * 600, "b": b"2" * 600}), ("y", {"a": b"3" * 10})]
    got = list(iter_tar_samples(io.BytesIO(shard(items=items)), TarCaps(1000, 1000, 1024)))
    assert [(s.key, s.reason) for s in got] == [("x", "sample_too_large"), ("y", None)]
    assert "source.max_sample_mb" in got[0].detail


def test_a_huge_pax_header_is_quarantined_unread_and_memory_stays_bounded(tmp_path):
    items = [("a", {"txt": b"first"}), ("p", {"txt": b"padded"}), ("c", {"txt": b"last"})]
    path = tmp_path / "pax.tar"
    path.write_bytes(write_shard(items, pax={"p": {"comment": "x" * (4 << 20)}}))  # a 4 MiB extended header
    with open(path, "rb") as f:
        tracemalloc.start()
        got = [(s.key, s.reason, s.members) for s in iter_tar_samples(f, TarCaps(max_header_bytes=64 << 10))]
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert got == [("a", None, {"txt": b"first"}), ("p", "header_too_large", {}), ("c", None, {"txt": b"last"})]
    assert peak < 3 << 20, f"the reader held {peak} bytes for a 4 MiB pax header over a 64 KiB cap"
    # Through the source: the row names the cap's key.
    folder = tmp_path / "src"
    folder.mkdir()
    path.rename(folder / "pax.tar")
    src = WebDatasetSource(str(folder), max_header_bytes=64 << 10)
    rows = [r for t in src.read(0, src.plan()[0]) for r in t.to_pylist()]
    assert [r["error"] for r in rows] == [None, "header_too_large", None]
    assert "source.max_header_kb" in rows[1]["error_detail"]


def test_a_pax_path_names_the_member():
    got = list(iter_tar_samples(io.BytesIO(shard(items=[(LONG, {"txt": b"t"})]))))
    assert [(s.key, s.members) for s in got] == [(LONG, {"txt": b"t"})]


def test_not_a_tar_and_empty_are_one_unreadable_row():
    assert [s.reason for s in iter_tar_samples(io.BytesIO(b"not a tar " * 100))] == ["shard_unreadable"]
    assert [s.reason for s in iter_tar_samples(io.BytesIO(b""))] == ["shard_unreadable"]


FULL = shard()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, len(FULL)),
       flips=st.lists(st.tuples(st.integers(0, len(FULL) - 1), st.integers(0, 255)), max_size=6))
def test_random_cuts_and_corruptions_never_raise_and_end_in_one_row(cut, flips):
    data = bytearray(FULL)
    for pos, value in flips:
        data[pos] = value
    caps = TarCaps(max_member_bytes=4096, max_sample_bytes=8192, max_header_bytes=2048)
    got = list(iter_tar_samples(io.BytesIO(bytes(data[:cut])), caps))
    assert got, "a shard always yields at least one row"
    ending = {"shard_truncated", "shard_corrupt", "shard_unreadable"}
    # A shard-ending reason only on the last row; every other row is a sample or a capped one.
    assert all(s.reason not in ending for s in got[:-1])
    for s in got:
        assert bool(s.members) == (s.reason is None)
        assert sum(map(len, s.members.values())) <= caps.max_sample_bytes
    if not flips and cut < len(FULL):
        assert got[-1].reason in ending or cut >= layout(FULL)[1] + BLOCK


def test_an_unreachable_s3_endpoint_is_one_line(monkeypatch):
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(name, value)
    src = WebDatasetSource("s3://bucket/shards", storage_options={
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"})
    with pytest.raises(ValueError) as e:
        src.plan()
    message = str(e.value)
    assert message.startswith("cannot reach s3://bucket/shards: ") and "\n" not in message
    assert "check the endpoint / storage_options" in message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(FULL)),
       flips=st.lists(st.tuples(st.integers(0, len(FULL) - 1), st.integers(0, 255)), max_size=4))
def test_random_damage_through_the_source_is_rows_never_an_exception(tmp_path, cut, flips):
    from pipelines.ingest.validation import Limits, validate_batch

    data = bytearray(FULL)
    for pos, value in flips:
        data[pos] = value
    folder = tmp_path / "h"
    folder.mkdir(exist_ok=True)
    (folder / "d.tar").write_bytes(bytes(data[:cut]))
    src = WebDatasetSource(str(folder), max_member_bytes=4096, max_sample_bytes=8192, max_header_bytes=2048)
    tables = list(src.read(0, src.plan()[0]))
    rows = [r for t in tables for r in t.to_pylist()]
    assert rows and all(r["record_ref"].startswith("d.tar") for r in rows)
    validated = [v for t in tables for v in validate_batch(t, Limits()).to_pylist()]
    assert len(validated) == len(rows)  # in = accepted + quarantined, record for record
