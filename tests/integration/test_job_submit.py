"""``ray job submit`` for real: the laptop recipe of the README, end to end.

A local Ray head is started with ``ray start --head`` (dashboard and every port on
127.0.0.1, its own ``--temp-dir``), ``jobs.embed`` is submitted through Ray's
``JobSubmissionClient`` with the repository as ``working_dir`` and ``infra/runtime_env.yaml``
as the runtime_env — what ``ray job submit --working-dir . --runtime-env
infra/runtime_env.yaml -- python -m jobs.embed ...`` sends — on a tiny Delta corpus and a
tiny checkpoint; the test waits for SUCCEEDED and checks the LanceDB table the job wrote.
A job whose config is wrong must end FAILED with the job's own error in its logs.

The head runs in a process group of its own and is stopped by signalling that group, then
any process still holding its unique temp dir (by pid): never ``ray stop``, which would
stop every Ray on the machine.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from embed_helpers import make_checkpoint, synthetic_records, write_corpus
from job_server import job_client

# A real `ray start` head and `ray job submit` (≈ 30 s with the head's start and stop): slow tier.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "infra" / "runtime_env.yaml"
N_IMAGES, N_TEXTS = 16, 8
JOB_TIMEOUT_S = 150
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_under(path: str) -> list[int]:
    """Pids whose command line or working directory lies under ``path`` (this head's temp
    dir is unique, so this matches its daemons, workers and job drivers and nothing else)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if path.encode() in cmdline or cwd.startswith(path):
            pids.append(int(proc.name))
    return pids


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    # `ray start --block` lets its raylet go on SIGTERM but can linger with its GCS: give it a
    # few seconds, then SIGKILL the group (a test head keeps nothing worth a clean exit).
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            pass
        try:
            head.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + 10
    while (left := _processes_under(temp_dir)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[dict]:
    """A 2-CPU Ray head with its dashboard on 127.0.0.1; yields its job-submission client."""
    try:
        import aiohttp  # noqa: F401  (the dashboard's job server needs it)
        from ray.job_submission import JobSubmissionClient  # noqa: F401  (job_client builds it)
    except ImportError as e:
        pytest.fail(f"the job-submission server needs Ray's dashboard: pip install 'ray[default]' ({e})")

    log_dir = tmp_path_factory.mktemp("ray-head")
    temp_dir = tempfile.mkdtemp(prefix="rjs-", dir="/tmp")  # short: Ray's unix sockets live under it
    (gcs, dashboard, node_manager, object_manager, agent_listen, agent_grpc, metrics, runtime_env_agent,
     client_server) = _free_ports(9)
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false",
               # The job's `python` must be this venv's, as on a laptop with the venv active.
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "2", "--num-gpus", "0",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
           "--dashboard-agent-listen-port", str(agent_listen), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env_agent),
           "--ray-client-server-port", str(client_server), "--temp-dir", temp_dir]
    log = (log_dir / "ray-start.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=log_dir, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        client = job_client(url, failed=lambda: None if proc.poll() is None else (
            f"ray start exited {proc.returncode}:\n{(log_dir / 'ray-start.log').read_text()[-3000:]}"))
        yield {"client": client, "url": url, "temp_dir": temp_dir}
    finally:
        _stop_head(proc, temp_dir)
        log.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("submit")
    records = synthetic_records(N_IMAGES, N_TEXTS)
    root = tmp / "data"
    write_corpus(root, records)
    ckpt = make_checkpoint(tmp, [r["caption"] or r["text"] for r in records], seed=0)
    return {"tmp": tmp, "root": root, "ckpt": ckpt, "doc_ids": {r["doc_id"] for r in records}}


def _runtime_env() -> dict:
    """infra/runtime_env.yaml with ``working_dir`` = the repository (``--working-dir .``)."""
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    return {**env, "working_dir": str(REPO)}


def _submit_and_wait(client, entrypoint: list[str]) -> tuple[str, str]:
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=_runtime_env())
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job_id).value) not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {JOB_TIMEOUT_S} s:\n{client.get_job_logs(job_id)[-3000:]}")
        time.sleep(1)
    return status, client.get_job_logs(job_id)


def _embed_argv(corpus: dict, *extra: str) -> list[str]:
    return ["python", "-m", "jobs.embed", "--root", str(corpus["root"]), "--table", "submitted",
            "--run-dir", str(corpus["tmp"] / "runs-embed"), "--no-progress",
            "--set", "encode.threads=1", "--set", "encode.batch_size=16", *extra]


def test_submitted_embed_job_succeeds_and_writes_one_row_per_document(head, corpus):
    status, logs = _submit_and_wait(head["client"], _embed_argv(corpus, "--checkpoint", corpus["ckpt"]))
    assert status == "SUCCEEDED", logs[-4000:]
    assert "published version" in logs, logs[-2000:]

    import lancedb

    table = lancedb.connect(str(corpus["root"] / "lancedb")).open_table("submitted")
    doc_ids = table.to_arrow().column("doc_id").to_pylist()
    assert len(doc_ids) == len(corpus["doc_ids"])
    assert set(doc_ids) == corpus["doc_ids"]


def test_submitted_job_with_a_bad_config_fails_with_the_jobs_own_error(head, corpus):
    missing = corpus["tmp"] / "no-such-checkpoint"
    status, logs = _submit_and_wait(head["client"], _embed_argv(corpus, "--checkpoint", str(missing)))
    assert status == "FAILED"
    assert f"checkpoint {missing} is not a directory" in logs, logs[-2000:]
