"""``ciea ingest --source urls`` on a real local Ray into real Delta tables, fetching from a
real HTTP server on loopback (``tests/http_faults.py``) that serves images and every fault
class: each ends in quarantine with its reason and URL; counts reconcile; a re-run fetches
nothing and changes nothing; a run killed mid-fetch and re-run leaves the tables of one
clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from http_faults import FaultServer, png_for
from ingest_helpers import content, reconcile, rows_by_id, run_ingest
from test_ingest_crash import DOC_DROP, Q_DROP, _reap

from pipelines.ingest.sources.urls import url_doc_id
from pipelines.store.delta_tables import Tables

pytestmark = pytest.mark.usefixtures("ray_local")

REPO = Path(__file__).resolve().parents[2]
FAST = ["--set", "source.fetch.connect_timeout_s=1", "--set", "source.fetch.read_timeout_s=0.5",
        "--set", "source.fetch.total_timeout_s=1", "--set", "source.fetch.retries=2",
        "--set", "source.fetch.backoff_s=0.05", "--set", "source.fetch.max_backoff_s=0.1",
        "--set", "source.fetch.max_mb=1", "--set", "source.fetch.max_redirects=3",
        "--set", "source.fetch.shard_kb=1"]
#: Fault class → (path, the reason it is quarantined with; None: it is stored).
CASES = {
    "ok": ("/img/ok.png", None), "redirected": ("/redirect/r.png", None),
    "flaky": ("/flaky/f.png", None), "limited": ("/limited/l.png", None),
    "missing": ("/missing/m.png", "fetch_http_404"), "slow": ("/slow/s.png", "fetch_timeout"),
    "truncated": ("/truncated/t.png", "fetch_truncated"), "huge": ("/huge/h.png", "fetch_too_large"),
    "huge-stream": ("/huge-stream/hs.png", "fetch_too_large"), "html": ("/html/x.png", "fetch_not_an_image"),
    "loop": ("/loop/a", "fetch_too_many_redirects"),
}


def write_list(path: Path, base: str, n_good: int = 12) -> list[dict]:
    rows = [{"doc_id": name, "url": base + p, "caption": f"{name} caption", "lang": "en"}
            for name, (p, _) in CASES.items()]
    rows += [{"url": f"{base}/img/g{i}.png", "caption": f"good {i}"} for i in range(n_good)]  # derived ids
    rows += [{"doc_id": "no-scheme", "url": "file:///etc/passwd", "caption": "not fetched"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _good_ids(rows: list[dict]) -> set[str]:
    ids = {name for name, (_, reason) in CASES.items() if reason is None}
    return ids | {url_doc_id(r["url"]) for r in rows if "doc_id" not in r}


def test_every_fault_is_quarantined_and_rerun_fetches_nothing(tmp_path):
    with FaultServer(slow_s=2.0, huge_bytes=2 << 20) as server:
        rows = write_list(tmp_path / "urls.jsonl", server.url)
        root = tmp_path / "data"
        summary = run_ingest(tmp_path, root, "--source", "urls", "--path", str(tmp_path / "urls.jsonl"), *FAST)
        assert summary["shards"] > 2
        reconcile(summary)
        d = summary["documents"]
        good = _good_ids(rows)
        assert d["read"] == len(rows) and d["accepted"] == len(good)
        expected = {}
        for _, reason in CASES.values():
            if reason:
                expected[reason] = expected.get(reason, 0) + 1
        expected["bad_url"] = 1
        assert d["quarantined_by_reason"] == dict(sorted(expected.items()))
        tables = Tables(str(root))
        docs = rows_by_id(tables.read(tables.documents))
        assert set(docs) == good
        assert docs["ok"]["image"] == png_for("ok.png") and docs["flaky"]["image"] == png_for("f.png")
        assert json.loads(docs["ok"]["metadata"]) == {"url": f"{server.url}/img/ok.png", "lang": "en",
                                                      "content_type": "image/png"}
        assert json.loads(docs["redirected"]["metadata"])["final_url"] == f"{server.url}/img/r.png"
        quarantine = {r["doc_id"]: r for r in tables.read(tables.quarantine).to_pylist()}
        for name, (path, reason) in CASES.items():
            if reason:
                assert quarantine[name]["reason"] == reason, name
                assert quarantine[name]["detail"].startswith(f"GET {server.url}{path}: "), quarantine[name]
        assert "only http and https" in quarantine["no-scheme"]["detail"]
        f = summary["fetch"]
        assert f["fetched"] == len(good) and f["failed"] == len(CASES) - 4
        assert f["failed_by_reason"]["fetch_timeout"] == 1 and f["skipped_stored"] == 0
        # Attempts: one per good URL, two for flaky and limited, three for slow and truncated;
        # the server also sees the redirect hops.
        assert f["requests"] == len(CASES) + 12 + 2 + 4 and server.requests() == f["requests"] + 1 + 3
        assert f["bytes"] == sum(len(png_for(Path(CASES[n][0]).name)) for n in ("ok", "flaky", "limited")) + \
            len(png_for("r.png")) + sum(len(png_for(f"g{i}.png")) for i in range(12))

        # Re-run: nothing fetched, nothing written.
        before = server.requests()
        version = tables.version(tables.documents)
        q_version = tables.version(tables.quarantine)
        again = run_ingest(tmp_path, root, "--source", "urls", "--path", str(tmp_path / "urls.jsonl"), *FAST)
        reconcile(again)
        assert server.requests() == before
        assert again["documents"]["unchanged"] == len(good) and again["documents"]["inserted"] == 0
        assert again["fetch"]["skipped_stored"] == len(good) and again["fetch"]["requests"] == 0
        assert again["fetch"]["skipped_failed"] == len(CASES) - 4
        assert tables.version(tables.documents) == version and tables.version(tables.quarantine) == q_version
        assert again["quarantine"]["inserted"] == 0

        # A changed caption is an update (fetched again); --set source.fetch.refetch_failed=true
        # fetches the failures again.
        rows[0]["caption"] = rows[0]["caption"].upper()  # same length: the other rows keep their refs
        (tmp_path / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        third = run_ingest(tmp_path, root, "--source", "urls", "--path", str(tmp_path / "urls.jsonl"), *FAST,
                           "--set", "source.fetch.refetch_failed=true")
        assert third["documents"]["updated"] == 1 and third["fetch"]["fetched"] == 1
        assert third["fetch"]["failed"] == len(CASES) - 4 and third["quarantine"]["inserted"] == 0


def _spawn(args: list[str], tmp: Path, failpoint: str) -> tuple[subprocess.Popen, str]:
    ray_tmp = tempfile.mkdtemp(prefix="ray-urls-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["CIEA_INGEST_FAILPOINT"] = failpoint
    cmd = [sys.executable, "-m", "jobs.ingest", *args, "--run-dir", str(tmp / "runs-killed"),
           "--num-cpus", "2", "--set", f"ray.temp_dir={ray_tmp}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    return proc, ray_tmp


def test_killed_mid_fetch_then_rerun_equals_one_clean_run(tmp_path):
    with FaultServer(slow_s=2.0, huge_bytes=2 << 20) as server:
        write_list(tmp_path / "urls.jsonl", server.url, n_good=30)
        args = ["--source", "urls", "--path", str(tmp_path / "urls.jsonl"), *FAST]
        killed_root = tmp_path / "killed"
        proc, ray_tmp = _spawn([*args, "--root", str(killed_root)], tmp_path, "documents_after_rows=8")
        try:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
        finally:
            _reap(proc, ray_tmp)
        assert server.requests() > 0
        run_ingest(tmp_path, killed_root, *args)
        clean_root = tmp_path / "clean"
        run_ingest(tmp_path, clean_root, *args)
    a, b = Tables(str(killed_root)), Tables(str(clean_root))
    assert content(a, a.documents, DOC_DROP, "doc_id") == content(b, b.documents, DOC_DROP, "doc_id")
    assert content(a, a.quarantine, Q_DROP, "quarantine_id") == content(b, b.quarantine, Q_DROP, "quarantine_id")
