"""The table lease across processes (moved from the unit tier: each case starts processes or
a server): four processes racing for one lease, and the lease on S3 (moto's server on
loopback)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from s3_server import CREDS, moto_s3

from pipelines.store.lease import LeaseInfo, TableBusyError, TableLease, lease_uri

REPO = Path(__file__).resolve().parents[2]


RACER = textwrap.dedent("""
    import sys, time
    from pipelines.store.lease import TableBusyError, TableLease
    start = float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))
    try:
        with TableLease(sys.argv[1], "docs", "ciea embed"):
            print("HELD", flush=True)
            time.sleep(1.5)
    except TableBusyError:
        print("BUSY", flush=True)
""")


def test_processes_racing_for_the_lease_get_exactly_one_holder(tmp_path):
    db = str(tmp_path / "db")
    start = time.time() + 3.0  # all four past their imports, then released together
    procs = [subprocess.Popen([sys.executable, "-c", RACER, db, str(start)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    results = sorted(out.strip() for out, _ in outs)
    assert results == ["BUSY", "BUSY", "BUSY", "HELD"]
    assert not Path(lease_uri(db, "docs")).exists()


@pytest.fixture
def s3_db(monkeypatch):
    """An S3 bucket on moto's server (loopback); credentials only in the environment."""
    for key, value in CREDS.items():
        monkeypatch.setenv(key, value)
    with moto_s3("leases") as (endpoint, _):
        yield "s3://leases/vectors", {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}


def test_on_s3_the_second_run_is_refused_and_release_frees_the_table(s3_db):
    from pipelines.store import storage

    db, options = s3_db
    path = lease_uri(db, "docs")
    assert path == "s3://leases/vectors/_ciea_leases/docs.json"
    with TableLease(db, "docs", "ciea embed", options) as first:
        assert LeaseInfo.from_bytes(storage.read_bytes(path, options)).run_id == first.run_id
        with pytest.raises(TableBusyError, match=f"remove {path} if that run is dead"):
            TableLease(db, "docs", "ciea reindex", options).acquire()
    assert not storage.exists(path, options)
    with TableLease(db, "docs", "ciea reindex", options):
        assert storage.exists(path, options)
