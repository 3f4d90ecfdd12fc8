"""The table lease (``pipelines.store.lease``): one holder at a time, abandoned leases taken
over, the heartbeat, a lost lease noticed — on the local file system (real processes racing
for it) and on S3 (moto's server on loopback)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipelines.store.lease import (
    LeaseFileError,
    LeaseInfo,
    LeaseLostError,
    TableBusyError,
    TableLease,
    lease_uri,
)

REPO = Path(__file__).resolve().parents[2]


def _write(path: str, info: LeaseInfo) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(info.to_bytes())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_is_refused_with_one_line_naming_the_holder_and_the_fix(tmp_path):
    db = str(tmp_path / "db")
    with TableLease(db, "docs", "ciea embed") as first:
        path = lease_uri(db, "docs")
        held = json.loads(Path(path).read_text())
        assert held["run_id"] == first.run_id and held["pid"] == os.getpid()
        assert held["host"] == socket.gethostname() and held["command"] == "ciea embed"
        with pytest.raises(TableBusyError) as e:
            TableLease(db, "docs", "ciea reindex").acquire()
        msg = str(e.value)
        assert "\n" not in msg
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and "ciea embed" in msg
        assert f"remove {path} if that run is dead" in msg
        # Another table of the same database is free.
        with TableLease(db, "other", "ciea embed"):
            pass
    assert not Path(path).exists()
    with TableLease(db, "docs", "ciea reindex") as second:
        assert json.loads(Path(path).read_text())["run_id"] == second.run_id


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    db = str(tmp_path / "db")
    path = lease_uri(db, "docs")
    now = time.time()
    _write(path, LeaseInfo("crashed", "ciea embed", socket.gethostname(), _dead_pid(), now, now))
    with caplog.at_level(logging.WARNING, logger="pipelines.store.lease"), TableLease(db, "docs", "ciea embed") as ours:
        assert json.loads(Path(path).read_text())["run_id"] == ours.run_id
    assert "taking over the lease of table docs" in caplog.text and "no longer runs on this host" in caplog.text


def test_another_hosts_lease_is_abandoned_only_after_the_ttl(tmp_path, caplog):
    db = str(tmp_path / "db")
    path = lease_uri(db, "docs")
    now = time.time()
    other = LeaseInfo("remote-run", "ciea reindex", "some-other-host", 1, now - 3600, now - 5)
    _write(path, other)
    with pytest.raises(TableBusyError, match="pid 1 on host some-other-host"):
        TableLease(db, "docs", "ciea embed", ttl_s=60).acquire()
    _write(path, replace(other, heartbeat=now - 120))
    with caplog.at_level(logging.WARNING, logger="pipelines.store.lease"), \
            TableLease(db, "docs", "ciea embed", ttl_s=60) as ours:
        assert json.loads(Path(path).read_text())["run_id"] == ours.run_id
    assert "no heartbeat for 12" in caplog.text


def test_an_unreadable_lease_file_stops_the_run_with_one_line(tmp_path):
    # Leases are written atomically (temp file + rename): a file that is not one was edited
    # by hand, and only a person can say whether a run still holds the table.
    db = str(tmp_path / "db")
    path = lease_uri(db, "docs")
    Path(path).parent.mkdir(parents=True)
    Path(path).write_text('{"run_id": "half-writ')
    with pytest.raises(LeaseFileError) as e:
        TableLease(db, "docs", "ciea embed").acquire()
    assert str(e.value) == (f"the lease file {path} is not a lease ciea wrote (not a JSON object); delete it if "
                            "no run holds the table, then re-run")
    assert Path(path).read_text() == '{"run_id": "half-writ'
    Path(path).unlink()
    with TableLease(db, "docs", "ciea embed") as ours:
        assert json.loads(Path(path).read_text())["run_id"] == ours.run_id


def test_the_heartbeat_moves_and_a_taken_lease_is_noticed(tmp_path, caplog):
    db = str(tmp_path / "db")
    path = lease_uri(db, "docs")
    lease = TableLease(db, "docs", "ciea embed", heartbeat_s=0.05)
    lease.acquire()
    try:
        first = json.loads(Path(path).read_text())["heartbeat"]
        deadline = time.time() + 5
        while json.loads(Path(path).read_text())["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert json.loads(Path(path).read_text())["heartbeat"] > first
        lease.check()  # still ours
        # Another run judged it abandoned and took it: this run must stop committing.
        now = time.time()
        _write(path, LeaseInfo("usurper", "ciea embed", "host-b", 7, now, now))
        with caplog.at_level(logging.ERROR, logger="pipelines.store.lease"), \
                pytest.raises(LeaseLostError, match="now held by ciea embed, pid 7 on host host-b"):
            lease.check()
        deadline = time.time() + 5
        while "was now held by" not in caplog.text and time.time() < deadline:
            time.sleep(0.02)
        assert "was now held by" in caplog.text  # the heartbeat saw it too, and stopped
    finally:
        lease.release()
    assert json.loads(Path(path).read_text())["run_id"] == "usurper"  # release leaves others' leases alone

