"""One writer per LanceDB table: ``ciea embed`` / ``ciea reindex`` against a table another
run writes, on a real local Ray, a real Delta corpus and real Lance tables.

The lease is exercised both ways: held by the test itself (deterministic: the second run
must stop before it writes), and by two ``ciea embed`` processes started at the same
instant on one table (true concurrency, both joining the module's Ray). The commit-time
fence is exercised with real Lance commits of another run landing after a run planned,
before and during its commit.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from embed_helpers import embedded_corpus, run_embed

from jobs import reindex
from jobs.embed import EXIT_TABLE_BUSY
from pipelines.store.lance_tables import TX_RUN_ID, ConcurrentWriteError, VectorTable
from pipelines.store.lease import LeaseInfo, TableLease, lease_uri

pytestmark = pytest.mark.usefixtures("ray_local")

N_IMAGES, N_TEXTS = 40, 20
N = N_IMAGES + N_TEXTS
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return embedded_corpus(tmp_path_factory.mktemp("one-writer"), N_IMAGES, N_TEXTS)


@pytest.fixture(scope="module")
def base(env) -> str:
    """A table embedded once (one row per document); tests that write to it get a copy."""
    rc, summary = run_embed(env["tmp"], env["root"], env["ckpt"], "base")
    assert rc == 0 and summary["rows_written"] == N
    return "base"


def clone(env, src: str, dst: str) -> VectorTable:
    shutil.copytree(Path(env["db"]) / f"{src}.lance", Path(env["db"]) / f"{dst}.lance")
    return VectorTable(env["db"], dst)


def _doc_ids(vt: VectorTable) -> list[str]:
    return vt.dataset().to_table(columns=["doc_id"])["doc_id"].to_pylist()


#: A progress line of the job's own logging (``HH:MM:SS LEVEL logger: ...``) or of Ray's.
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d )?[\d:,]+\s+(INFO|WARNING) ")


def _one_line(err: str, prog: str) -> str:
    """The job's error: one line; the rest of stderr is progress logging, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(LOG_LINE.match(line) for line in lines if line not in errors), err
    return errors[0]


def test_a_run_finding_the_table_held_exits_with_one_line_and_writes_nothing(env, capsys):
    with TableLease(env["db"], "held", "ciea embed"):
        rc, summary = run_embed(env["tmp"], env["root"], env["ckpt"], "held")
        assert rc == EXIT_TABLE_BUSY and summary is None
        line = _one_line(capsys.readouterr().err, "ciea embed")
        assert line.startswith("ciea embed: table held is being written by another run (ciea embed, pid "
                               f"{os.getpid()} on host {socket.gethostname()} since ")
        assert line.endswith(f"remove {lease_uri(env['db'], 'held')} if that run is dead")
        assert not VectorTable(env["db"], "held").exists()  # not even created
    assert not Path(lease_uri(env["db"], "held")).exists()


def test_two_embeds_started_together_leave_one_row_per_document(env, ray_local):
    address = ray_local.get_runtime_context().gcs_address
    start = time.time() + 8.0  # both past their imports, then released at the same instant
    # Each joins the module's Ray; the loser stops at the lease, before any Ray Data work.
    runner = ("import sys, time; time.sleep(max(0.0, float(sys.argv[1]) - time.time())); "
              "from jobs.embed import main; raise SystemExit(main(sys.argv[2:]))")
    procs = [subprocess.Popen(
        [sys.executable, "-c", runner, str(start), "--checkpoint", env["ckpt"], "--root", str(env["root"]),
         "--table", "pair", "--run-dir", str(env["tmp"] / f"runs-pair-{i}"), "--no-progress",
         "--set", f"ray.address={address}", "--set", "encode.threads=1", "--set", "encode.batch_size=32"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, EXIT_TABLE_BUSY], [err[-3000:] for _, err in outs]
    loser = outs[codes.index(EXIT_TABLE_BUSY)][1]
    assert _one_line(loser, "ciea embed").startswith("ciea embed: table pair is being written by another run (ciea embed, pid ")
    vt = VectorTable(env["db"], "pair")
    ids = _doc_ids(vt)
    assert len(ids) == len(set(ids)) == N
    assert vt.published_version() == vt.version()
    # Every row-adding commit at the head came from the one run that held the lease.
    ds = vt.dataset()
    runs = {ds.read_transaction(v).transaction_properties.get(TX_RUN_ID) for v in range(1, ds.version + 1)
            if type(ds.read_transaction(v).operation).__name__ == "Append"}
    assert len(runs) == 1 and None not in runs


def test_a_lease_left_by_a_dead_run_is_taken_over(env, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    path = Path(lease_uri(env["db"], "orphan"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(LeaseInfo("crashed-run", "ciea embed", socket.gethostname(), dead.pid, now, now).to_bytes())
    with caplog.at_level(logging.WARNING, logger="pipelines.store.lease"):
        rc, summary = run_embed(env["tmp"], env["root"], env["ckpt"], "orphan")
    assert rc == 0 and summary["rows_written"] == N
    assert f"its process {dead.pid} no longer runs on this host" in caplog.text
    assert not path.exists()  # released at the end
    ids = _doc_ids(VectorTable(env["db"], "orphan"))
    assert len(ids) == len(set(ids)) == N


def _foreign_append(env, table: str, rows) -> int:
    """Another run's commit: the same documents appended again under its own fence."""
    from lance.fragment import LanceFragment

    other = VectorTable(env["db"], table)
    other.fence_writes("other-run")
    return other.commit_fragments([LanceFragment.create(other.uri, rows)])


def test_a_commit_planned_before_another_runs_rows_landed_is_refused(env, base):
    from lance.fragment import LanceFragment

    ours = clone(env, base, "fenced")
    planned = ours.fence_writes("this-run")
    rows = ours.dataset().to_table(limit=5)
    ours.delete_doc_ids(["no-such-doc"])  # this run's own (non-appending) versions are fine
    foreign = _foreign_append(env, "fenced", rows)
    assert foreign > planned
    frags = [LanceFragment.create(ours.uri, rows)]
    with pytest.raises(ConcurrentWriteError, match=f"run other-run \\(version {foreign}\\) after this run "
                                                   f"planned against version {planned}"):
        ours.commit_fragments(frags)
    assert ours.version() == foreign and ours.count_rows() == N + 5  # nothing of this run at the head
    # Unfenced (another run's view): the same commit goes through; the fence is what stops it.
    assert VectorTable(env["db"], "fenced").commit_fragments(frags) == foreign + 1


def test_an_append_that_races_another_runs_commit_is_withdrawn(env, base):
    """The check passed, then another run's rows landed before this run's commit (Lance
    rebases appends): the commit is caught after landing and its fragments deleted."""
    import lance
    from lance.fragment import LanceFragment

    ours = clone(env, base, "raced")
    ours.fence_writes("this-run")
    checked = ours.dataset()  # the version this run's check saw
    rows = checked.to_table(limit=4)
    foreign = _foreign_append(env, "raced", rows)
    with pytest.raises(ConcurrentWriteError, match=f"version {foreign}"):
        ours._commit_checked(checked, lance.LanceOperation.Append([LanceFragment.create(ours.uri, rows)]),
                             withdraw_on_race=True)
    head = ours.dataset()
    assert head.version == foreign + 2  # this run's append, then its withdrawal
    assert head.count_rows() == N + 4  # the other run's rows only
    assert type(head.read_transaction(head.version).operation).__name__ == "Delete"


def test_reindex_refuses_while_an_embed_holds_the_table(env, base, capsys):
    vt = clone(env, base, "busy")
    before = vt.version()
    capsys.readouterr()
    with TableLease(env["db"], "busy", "ciea embed"):
        rc = reindex.main(["--checkpoint", env["ckpt"], "--root", str(env["root"]), "--table", "busy",
                           "--run-dir", str(env["tmp"] / "runs-reindex-busy"), "--no-progress"])
    assert rc == EXIT_TABLE_BUSY
    line = _one_line(capsys.readouterr().err, "ciea reindex")
    assert line.startswith("ciea reindex: table busy is being written by another run (ciea embed, pid ")
    assert vt.version() == before
