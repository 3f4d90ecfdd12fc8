"""The table lease cannot be turned against the host: a symlinked lease file, lock or lease
folder is refused and nothing outside the database folder is written or deleted; a FIFO is
refused without waiting on it; a lease whose fields are not what a run writes stops the run
with one line naming the file and the fix — real files, links and FIFOs in a temp folder."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.store.lease import LEASE_DIR, LeaseFileError, LeaseInfo, TableLease, lease_uri

SENTINEL = b"precious bytes that are no lease\n"


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed) with a digest of its content."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _acquire(db: Path) -> str:
    """The one-line error of taking (then giving back) the lease of table ``docs``."""
    with pytest.raises(LeaseFileError) as e, TableLease(str(db), "docs", "ciea embed"):
        pass
    message = str(e.value)
    assert "\n" not in message and "nothing was written through it" in message
    return message


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(SENTINEL)
    (outside / "folder").mkdir()
    (outside / "folder" / "keep.txt").write_bytes(SENTINEL)
    db = tmp_path / "db"
    (db / LEASE_DIR).mkdir(parents=True)
    return {"outside": outside, "db": db, "leases": db / LEASE_DIR}


def test_a_symlinked_lease_file_is_refused_and_its_target_untouched(places):
    before = _tree(places["outside"])
    link = places["leases"] / "docs.json"
    link.symlink_to(places["outside"] / "victim.txt")
    message = _acquire(places["db"])
    assert message == (f"the lease file {link} is a symlink; remove the link; a lease is a regular file ciea "
                       "writes itself (nothing was written through it)")
    assert _tree(places["outside"]) == before
    assert (places["outside"] / "victim.txt").read_bytes() == SENTINEL
    assert link.is_symlink()  # left for a person to look at


def test_a_dangling_lease_link_creates_nothing_at_its_target(places):
    target = places["outside"] / "would-be-created.json"
    (places["leases"] / "docs.json").symlink_to(target)
    before = _tree(places["outside"])
    _acquire(places["db"])
    assert not target.exists() and _tree(places["outside"]) == before


def test_a_symlinked_lock_file_is_refused(places):
    before = _tree(places["outside"])
    (places["leases"] / "docs.json.lock").symlink_to(places["outside"] / "victim.txt")
    assert "lease lock" in _acquire(places["db"]) and "is a symlink" in _acquire(places["db"])
    assert _tree(places["outside"]) == before
    assert not (places["leases"] / "docs.json").exists()


@pytest.mark.parametrize("target", ["folder", "victim.txt"])
def test_a_symlinked_lease_folder_is_refused(places, target):
    leases = places["leases"]
    leases.rmdir()
    leases.symlink_to(places["outside"] / target)
    before = _tree(places["outside"])
    message = _acquire(places["db"])
    assert message == (f"the lease folder {leases} is a symlink or not a folder; remove it; ciea creates a real "
                       "folder there (nothing was written through it)")
    assert _tree(places["outside"]) == before


def test_a_fifo_at_the_lease_path_is_refused_without_waiting(places):
    fifo = places["leases"] / "docs.json"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def take() -> None:
        try:
            TableLease(str(places["db"]), "docs", "ciea embed").acquire()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001  (the test looks at it)
            outcome.append(e)

    worker = threading.Thread(target=take, daemon=True)
    t0 = time.monotonic()
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "taking the lease blocked on a FIFO"
    assert time.monotonic() - t0 < 5
    assert isinstance(outcome[0], LeaseFileError)
    assert str(outcome[0]) == (f"the lease file {fifo} is not a regular file; remove it; a lease is a regular file "
                               "ciea writes itself (nothing was written through it)")


def test_a_fifo_as_the_lock_is_refused(places):
    os.mkfifo(places["leases"] / "docs.json.lock")
    assert "lease lock" in _acquire(places["db"]) and "not a regular file" in _acquire(places["db"])


def test_a_lease_is_written_atomically_inside_the_lease_folder(places):
    with TableLease(str(places["db"]), "docs", "ciea embed") as lease:
        path = Path(lease_uri(str(places["db"]), "docs"))
        assert json.loads(path.read_text())["run_id"] == lease.run_id
        assert sorted(p.name for p in places["leases"].iterdir()) == ["docs.json", "docs.json.lock"]
    assert sorted(p.name for p in places["leases"].iterdir()) == ["docs.json.lock"]


def test_a_table_name_with_a_path_in_it_is_refused(places):
    with pytest.raises(LeaseFileError, match="cannot name a lease file"):
        TableLease(str(places["db"]), "../../outside/victim", "ciea embed")


# ---------------------------------------------------------------------------------------
# Hand-edited fields: one line, no traceback
# ---------------------------------------------------------------------------------------


def _valid() -> dict:
    now = time.time()
    return json.loads(LeaseInfo("run-1", "ciea embed", socket.gethostname(), 1, now, now).to_bytes())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


def _parses(data: bytes) -> bool:
    try:
        LeaseInfo.from_bytes(data)
    except ValueError:
        return False
    return True


def _one_line_refusal(db: Path, data: bytes) -> None:
    path = Path(lease_uri(str(db), "docs"))
    path.write_bytes(data)
    with pytest.raises(LeaseFileError) as e:
        TableLease(str(db), "docs", "ciea embed").acquire()
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"the lease file {path} is not a lease ciea wrote (")
    assert message.endswith("delete it if no run holds the table, then re-run")
    assert path.read_bytes() == data  # left as it was


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["run_id", "command", "host", "pid", "started", "heartbeat"]), value=json_values)
def test_any_malformed_field_is_one_line(places, field, value):
    lease = _valid()
    lease[field] = value
    data = json.dumps(lease).encode()
    if _parses(data):  # the value happens to be a valid one (a pid of 7, a host name)
        return
    _one_line_refusal(places["db"], data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_any_json_that_is_not_a_lease_object_is_one_line(places, value):
    _one_line_refusal(places["db"], json.dumps(value).encode())


@pytest.mark.parametrize("data", [
    b"", b"\xff\xfe not utf-8", b"[" * 100_000, b'{"pid": 1e999}', json.dumps({**_valid(), "extra": 1}).encode(),
    json.dumps({k: v for k, v in _valid().items() if k != "pid"}).encode(),
    json.dumps({**_valid(), "pid": 2**64}).encode(), json.dumps({**_valid(), "pid": True}).encode(),
    json.dumps({**_valid(), "heartbeat": 1e308}).encode(), json.dumps({**_valid(), "started": -1}).encode(),
    json.dumps({**_valid(), "host": "a\nb"}).encode(), b" " * 70_000,
    json.dumps({**_valid(), "heartbeat": float("nan")}).encode()])
def test_edited_leases_are_one_line(places, data):
    _one_line_refusal(places["db"], data)
