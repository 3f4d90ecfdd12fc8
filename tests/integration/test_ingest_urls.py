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
STRICT = ["--set", "source.fetch.connect_timeout_s=1", "--set", "source.fetch.read_timeout_s=0.5",
        "--set", "source.fetch.total_timeout_s=1", "--set", "source.fetch.retries=2",
        "--set", "source.fetch.backoff_s=0.05", "--set", "source.fetch.max_backoff_s=0.1",
        "--set", "source.fetch.max_mb=1", "--set", "source.fetch.max_redirects=3",
        "--set", "source.fetch.shard_kb=1"]
FAST = [*STRICT, "--set", "source.fetch.allow_private=true"]  # the test server is on loopback
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


# --- the address policy and credentials, end to end ----------------------------------------

SECRET = "SENTINELSECRET123"
RESIGNED = "SENTINELSECRET456"


def _secret_free(folder: Path) -> list[str]:
    """Files under ``folder`` (data files, ``_delta_log``, reports, logs) holding a sentinel."""
    return [str(p) for p in folder.rglob("*") if p.is_file()
            and (SECRET.encode() in p.read_bytes() or RESIGNED.encode() in p.read_bytes())]


def test_no_fetch_reaches_loopback_without_allow_private(tmp_path):
    with FaultServer() as server:
        port = server.url.rsplit(":", 1)[1]
        rows = [{"doc_id": "plain", "url": f"{server.url}/img/a.png"},
                {"doc_id": "decimal", "url": f"http://2130706433:{port}/img/b.png"},
                {"doc_id": "named", "url": f"http://localhost:{port}/img/c.png"},
                {"doc_id": "mapped", "url": f"http://[::ffff:127.0.0.1]:{port}/img/d.png"},
                {"doc_id": "metadata", "url": "http://169.254.169.254/latest/meta-data/"}]
        (tmp_path / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = run_ingest(tmp_path, tmp_path / "data", "--source", "urls", "--path",
                             str(tmp_path / "urls.jsonl"), *STRICT)
        assert server.requests() == 0, server.hits  # the server's own log
    reconcile(summary)
    assert summary["documents"]["quarantined_by_reason"] == {"fetch_blocked_address": len(rows)}
    assert summary["fetch"]["requests"] == 0 and summary["fetch"]["failed_by_reason"] == {
        "fetch_blocked_address": len(rows)}
    tables = Tables(str(tmp_path / "data"))
    for q in tables.read(tables.quarantine).to_pylist():
        said = q["detail"].split(": ", 1)[1]  # after "GET <url>: "
        assert "127.0.0.1" not in said and port not in said and "allow_private" in said, q["detail"]


def test_credentials_in_urls_reach_no_table_report_or_log(tmp_path, capfd):
    with FaultServer(redirect_secret=SECRET) as server:
        with_user = server.url.replace("http://", f"http://reader:{SECRET}@")
        rows = [
            {"doc_id": "userinfo", "url": f"{with_user}/img/u.png", "caption": "basic auth"},
            {"doc_id": "amz", "url": f"{server.url}/img/s.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                                     f"&X-Amz-Credential=AKIA%2F{SECRET}&X-Amz-Signature={SECRET}"},
            {"doc_id": "fragment", "url": f"{server.url}/img/f.png#access_token={SECRET}&state=1"},
            {"doc_id": "redirect", "url": f"{server.url}/redirect-signed/r.png"},
            {"doc_id": "token-404", "url": f"{server.url}/missing/t.png?token={SECRET}"},
            {"url": f"{server.url}/missing/g.png?sv=2022&sig={SECRET}", "caption": "derived id"},
            {"doc_id": "bad-scheme", "url": f"ftp://reader:{SECRET}@files.example/x.png?sig={SECRET}"},
            {"doc_id": "bad-caption", "url": f"{with_user}/img/c.png?api_key={SECRET}", "caption": 7},
            {"doc_id": "page", "url": f"{server.url}/img/p.png", "page": f"https://site.example/p?token={SECRET}"},
        ]
        listing = tmp_path / "urls.jsonl"
        listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
        root = tmp_path / "data"
        summary = run_ingest(tmp_path, root, "--source", "urls", "--path", str(listing), *FAST)
        reconcile(summary)
        assert summary["documents"]["quarantined_by_reason"] == {"bad_url": 1, "fetch_http_404": 2, "wrong_type": 1}
        tables = Tables(str(root))
        docs = rows_by_id(tables.read(tables.documents))
        assert set(docs) == {"userinfo", "amz", "fragment", "redirect", "page"}
        meta = {k: json.loads(v["metadata"]) for k, v in docs.items()}
        assert meta["userinfo"]["url"] == server.url.replace("http://", "http://***@") + "/img/u.png"
        assert meta["amz"]["url"].endswith("X-Amz-Credential=***&X-Amz-Signature=***")
        assert meta["redirect"]["final_url"] == f"{server.url}/img/r.png?X-Amz-Signature=***&token=***&w=1"
        assert meta["page"]["page"] == "https://site.example/p?token=***"
        assert docs["userinfo"]["image"] == png_for("u.png")  # the fetch itself used the credentials
        quarantine = tables.read(tables.quarantine).to_pylist()
        assert len(quarantine) == 4 and SECRET not in json.dumps(quarantine, default=str)
        derived = url_doc_id(f"{server.url}/missing/g.png?sv=2022&sig=***")
        assert {q["doc_id"] for q in quarantine} >= {"token-404", derived}

        # Re-signed URLs are the same documents; the failed ones are not fetched again.
        hits = server.requests()
        listing.write_text("".join(json.dumps(r).replace(SECRET, RESIGNED) + "\n" for r in rows))
        again = run_ingest(tmp_path, root, "--source", "urls", "--path", str(listing), *FAST)
        reconcile(again)
        assert again["fetch"]["skipped_failed"] == 2 and again["fetch"]["skipped_stored"] == 5, again["fetch"]
        assert again["fetch"]["requests"] == 0 and server.requests() == hits
        assert again["documents"]["inserted"] == 0 and again["quarantine"]["inserted"] == 0

        # signed_urls=refuse: every credentialed URL is quarantined unfetched.
        refused_root = tmp_path / "refused"
        hits = server.requests()
        refused = run_ingest(tmp_path, refused_root, "--source", "urls", "--path", str(listing), *FAST,
                             "--set", "source.fetch.signed_urls=refuse")
        reconcile(refused)
        assert refused["documents"]["quarantined_by_reason"] == {"bad_url": 1, "signed_url_refused": 6}
        assert server.requests() == hits + 3  # redirect (2 hops) and page only
    out, err = capfd.readouterr()
    assert SECRET not in out + err and RESIGNED not in out + err
    assert _secret_free(root) == [] and _secret_free(refused_root) == []
    assert _secret_free(tmp_path / "runs") == []
