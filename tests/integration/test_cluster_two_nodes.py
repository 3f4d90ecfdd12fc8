"""Cluster-shaped: the whole pipeline as ``ray job submit`` jobs on a real two-node Ray
cluster, every table and checkpoint on S3 (issue 26).

One machine, two Ray nodes: Ray's own ``ray.cluster_utils.Cluster`` (what Ray's test suite
uses), a head with ``{"node_a": 1}`` and a second node with ``{"node_b": 1}``, each with its
own raylet, object store and workers; 2 logical CPUs each, so that a Ray Data task always
finds a CPU beside the 0.5-CPU train workers and encoder actors (STACK_NOTES: the 2-CPU
deadlock). Every Delta table, the LanceDB table, the mined negatives and Ray Train's
checkpoints live on moto's S3 server on loopback. The jobs are submitted through the head's
job server (``JobSubmissionClient``, what ``ray job submit`` calls): ingest → train (one
worker per node: ``scaling.placement_strategy=STRICT_SPREAD``) → mine-negatives → embed →
a change (more documents ingested, two deleted) → reindex → evaluate; then ``ciea search``.
The ingests keep the duplicate rule's accepted ids in Ray actors (``dedupe.distributed_min_records=0``)
and the embed plans and checks on Ray (``plan.distributed_min_rows=0``, the hash-partitioned
key diff reading Delta and Lance on S3): the forms a corpus of millions takes by default.

Checks (all run; the failures are reported together):

1. both nodes did work in every distributed stage: Ray's state API (``list_tasks`` /
   ``list_actors`` by the job's id) names the node of every task and actor: ingest (both
   times), mine-negatives, embed and reindex ran tasks or actors on both, their encoder
   actors one per node, and the train workers one per node (``STRICT_SPREAD``) or both on
   one (``STRICT_PACK``). ``ciea evaluate`` ranks in its driver (it never joins Ray) and
   ``ciea search`` runs without Ray;
2. nothing is written outside S3 and Ray's temp dir: the test's own folders, the TMPDIR the
   nodes were started with (every Ray process' temp files), the repository and ``~`` are
   listed before and after (the last two only for this run's names: other work shares
   them). Inside Ray's temp dir, the jobs' working directory is the driver's local disk:
   only the runs' reports may appear there (summaries, resolved configs, curves, the
   evaluation report), never a model, a tokenizer or a table;
3. results equal a single-node run's where that is deterministic: the same training with
   both workers packed on one node (``STRICT_PACK``, same tokenizer) ends with the same
   weights (the last checkpoint's ``model_id``, a hash of config + every weight: DDP's
   all-reduce of two ranks is a + b wherever they run); the table the two nodes embedded
   (no ANN index) evaluates as the same checkpoint ranking the corpus in one process, to
   1e-3 (other batch compositions may change the last float bits, which can only swap
   near-ties).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import yaml
from job_server import job_client
from s3_server import moto_s3, s3_credentials

# A two-node cluster and eight submitted jobs (a few minutes on 2 cores): slow tier.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "infra" / "runtime_env.yaml"
BUCKET = "ciea-cluster"
TAG = f"c2n{os.getpid()}"
JOB_TIMEOUT_S = 420
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
#: What a search should find at the top, phrased like the synthetic corpus' captions.
SEARCH_QUERY = "a red circle on a white background"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listing(root: Path, skip: tuple[str, ...] = ()) -> set[str]:
    """Every file under ``root`` (relative paths), without the folders named in ``skip``."""
    out: set[str] = set()
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        rel = Path(dirpath).relative_to(root)
        out.update(str(rel / f) for f in filenames)
    return out


class Cluster2:
    """The two-node cluster, its job client and the S3 endpoint."""

    def __init__(self, cluster, client, url: str, endpoint: str, s3, temp_dir: str, tmpdir: Path) -> None:
        self.cluster, self.client, self.url, self.endpoint, self.s3 = cluster, client, url, endpoint, s3
        self.temp_dir, self.tmpdir = temp_dir, tmpdir
        self.jobs: dict[str, str] = {}  # stage → Ray job id
        self.seconds: dict[str, float] = {}

    @property
    def storage(self) -> list[str]:
        return ["--storage-option", f"AWS_ENDPOINT_URL={self.endpoint}", "--storage-option", "AWS_ALLOW_HTTP=true",
                "--storage-option", "AWS_REGION=us-east-1"]

    @property
    def storage_options(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}

    def submit(self, stage: str, argv: list[str]) -> str:
        """Submits ``python -m jobs.<...>`` as a job, waits for SUCCEEDED; returns its logs."""
        env = yaml.safe_load(RUNTIME_ENV.read_text())
        t0 = time.monotonic()
        while True:
            try:
                sid = self.client.submit_job(entrypoint=shlex.join(["python", "-m", *argv]),
                                             runtime_env={**env, "working_dir": str(REPO)})
                break
            except RuntimeError as e:  # the head's agent registers a few seconds after the dashboard
                if "No available agent" not in str(e) or time.monotonic() > t0 + 90:
                    raise
                time.sleep(2)
        deadline = t0 + JOB_TIMEOUT_S
        while (status := self.client.get_job_status(sid).value) not in TERMINAL:
            if time.monotonic() > deadline:
                self.client.stop_job(sid)
                pytest.fail(f"{stage}: job still {status} after {JOB_TIMEOUT_S} s:\n"
                            f"{self.client.get_job_logs(sid)[-4000:]}")
            time.sleep(1)
        # The driver's last lines reach the job's log a moment after it ends: read until stable.
        logs, settle = self.client.get_job_logs(sid), time.monotonic() + 15
        while time.monotonic() < settle:
            time.sleep(1)
            if (again := self.client.get_job_logs(sid)) == logs:
                break
            logs = again
        assert status == "SUCCEEDED", f"{stage}: {status}\n{logs[-5000:]}"
        self.jobs[stage] = sid
        self.seconds[stage] = round(time.monotonic() - t0, 1)
        return logs

    def nodes_of(self, stage: str) -> dict[str, set[str]] | None:
        """``{"tasks": {node tags}, "actors": {node tags}, "train_workers": {node tags}}`` of the
        stage's job (node tags: ``node_a`` / ``node_b``, from each node's custom resource);
        ``None`` for a job that never joined Ray (``ciea evaluate`` ranks in its own process)."""
        from ray.util.state import list_actors, list_nodes, list_tasks

        tag = {}
        for n in list_nodes(address=self.url, detail=True):
            res = n.resources_total or {}
            tag[n.node_id] = "node_a" if "node_a" in res else "node_b" if "node_b" in res else n.node_id
        job = next(j.job_id for j in self.client.list_jobs() if j.submission_id == self.jobs[stage])
        if job is None:
            return None
        # Task events reach the GCS in batches (once a second): give the last ones time.
        time.sleep(2)
        tasks = list_tasks(address=self.url, filters=[("job_id", "=", job)], limit=10000, detail=True,
                           raise_on_missing_output=False)
        actors = list_actors(address=self.url, filters=[("job_id", "=", job)], limit=10000, detail=True,
                             raise_on_missing_output=False)
        return {"tasks": {tag.get(t.node_id, t.node_id) for t in tasks if t.node_id and t.type == "NORMAL_TASK"},
                "actors": {tag.get(a.node_id, a.node_id) for a in actors if a.node_id},
                "train_workers": {tag.get(a.node_id, a.node_id) for a in actors
                                  if a.node_id and "TrainWorker" in (a.class_name or "")}}

    def working_dirs(self) -> set[str]:
        """Files in the jobs' unpacked working directories (the driver's local disk)."""
        out: set[str] = set()
        for d in Path(self.temp_dir).glob("session_*/runtime_resources*/working_dir_files/*"):
            out |= {f"{d.name}/{f}" for f in _listing(d, skip=("__pycache__",))}
        return out


@pytest.fixture(scope="module")
def c2(tmp_path_factory) -> Iterator[Cluster2]:
    try:
        import aiohttp  # noqa: F401  (the dashboard's job server needs it)
        from ray.cluster_utils import Cluster
        from ray.job_submission import JobSubmissionClient  # noqa: F401  (job_client builds it)
    except ImportError as e:
        pytest.fail(f"the job-submission server needs Ray's dashboard: pip install 'ray[default]' ({e})")
    import ray

    ray.shutdown()  # the session's shared local Ray (if any) is not this cluster
    temp_dir = tempfile.mkdtemp(prefix="rc2-", dir="/tmp")  # short: Ray's unix sockets live under it
    tmpdir = tmp_path_factory.mktemp("node-tmp")  # every Ray process' TMPDIR: must stay empty
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "PATH", "OMP_NUM_THREADS", "RAY_ADDRESS")}
    os.environ.pop("RAY_ADDRESS", None)
    # The nodes (and every worker and job driver they start) inherit this environment: the
    # venv's python first, as on a laptop with the venv active.
    os.environ.update(TMPDIR=str(tmpdir), OMP_NUM_THREADS="1",
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cluster = None
    try:
        with s3_credentials(), moto_s3(BUCKET) as (endpoint, s3):
            dashboard = _free_port()
            # No "latest cluster" pointer (ray_current_cluster) in Ray's default temp dir: no
            # other ray.init on the machine may join this cluster ...
            with mock.patch("ray._private.utils.write_ray_address"):
                cluster = Cluster(initialize_head=True, head_node_args={
                    "num_cpus": 2, "resources": {"node_a": 1},
                    "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard,
                    "temp_dir": temp_dir, "object_store_memory": 200 * 1024 * 1024,
                    # Ray's fixed defaults (52365, ...) may be taken by another Ray on the machine.
                    "dashboard_agent_listen_port": _free_port(), "metrics_export_port": _free_port()})
            # A worker node shares the head's session folder (Ray: --temp-dir is the head's);
            # its own runtime_env folder is what a second host's disk would hold, so it
            # cannot unpack a job's working_dir over the driver's.
            cluster.add_node(num_cpus=2, resources={"node_b": 1}, temp_dir=temp_dir,
                             object_store_memory=200 * 1024 * 1024, runtime_env_dir_name="runtime_resources_b",
                             metrics_export_port=_free_port())
            cluster.wait_for_nodes()
            # ... but in its own temp dir, where the job supervisor looks for the cluster its
            # drivers join ("auto"); without it they would join any Ray found on the machine.
            ray._private.utils.write_ray_address(cluster.address, temp_dir)
            url = f"http://127.0.0.1:{dashboard}"
            client = job_client(url)
            yield Cluster2(cluster, client, url, endpoint, s3, temp_dir, tmpdir)
    finally:
        if cluster is not None:
            cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import shutil

        # Twice: a daemon on its way out may still write a file (Prometheus' service discovery).
        for _ in range(2):
            shutil.rmtree(temp_dir, ignore_errors=True)
            time.sleep(2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _local_disk(c2: Cluster2, cwd: Path) -> dict[str, set[str]]:
    home = Path.home()
    return {
        "node TMPDIR": _listing(c2.tmpdir),
        "search cwd": _listing(cwd),
        # Other engineers work in the same tree and home: only what this test's names reach.
        "repository": {f for f in _listing(REPO, skip=(".git", ".venv", "__pycache__")) if TAG in f},
        "home": {f for d in ("ray_results", ".ray", ".cache") for f in _listing(home / d) if TAG in f}
        | ({"~/.ray/auth_token"} if (home / ".ray" / "auth_token").exists() else set()),
        "job working dirs": c2.working_dirs(),
    }


def _is_report(path: str) -> bool:
    """A run's summary, resolved config, metrics, curve or evaluation report: what a person
    reads, never what a later job or another node needs (weights, tokenizers, tables)."""
    rel = path.split("/", 1)[1]
    parts = rel.split("/")
    return (rel.startswith("runs/") and not {"model", "tokenizer", "lancedb"} & set(parts)
            and Path(rel).suffix in {".json", ".jsonl", ".md", ".png", ".txt"})


def _s3_keys(c2: Cluster2, prefix: str) -> set[str]:
    keys, token = set(), None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = c2.s3.list_objects_v2(**kw)
        keys |= {o["Key"] for o in page.get("Contents", [])}
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def _manifest(c2: Cluster2, model_uri: str) -> dict:
    key = model_uri.removeprefix(f"s3://{BUCKET}/") + "/ciea_checkpoint.json"
    return json.loads(c2.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def _last_checkpoint(c2: Cluster2, run_uri: str) -> tuple[int, str]:
    """(step, model_id) of a run's last checkpoint on S3."""
    prefix = run_uri.removeprefix(f"s3://{BUCKET}/")
    states = {k.rsplit("/", 1)[0]: json.loads(c2.s3.get_object(Bucket=BUCKET, Key=k)["Body"].read())
              for k in _s3_keys(c2, f"{prefix}/checkpoint_") if k.endswith("/training_state.json")}
    assert states, f"no checkpoint under {run_uri}"
    last = max(states, key=lambda d: states[d]["step"])
    manifest = json.loads(c2.s3.get_object(Bucket=BUCKET, Key=f"{last}/ciea_checkpoint.json")["Body"].read())
    return states[last]["step"], manifest["model_id"]


def _lance_rows(c2: Cluster2, db: str) -> dict[str, list]:
    from pipelines.store.lance_tables import VectorTable

    table = VectorTable(db, "docs", c2.storage_options).db.open_table("docs")
    return table.to_arrow().select(["doc_id", "model_id"]).to_pydict()


def _eval_report(c2: Cluster2, logs: str) -> dict:
    """The evaluate job's report.json (a report on the driver's disk, like its summary)."""
    path = Path(_line(logs, "report:").split(" (")[0]).with_name("report.json")
    found = [p for p in Path(c2.temp_dir).glob(f"session_*/runtime_resources/working_dir_files/*/{path}")]
    if path.is_absolute():
        found = [path]
    assert found, (path, logs[-2000:])
    return json.loads(found[0].read_text())


def _line(logs: str, prefix: str) -> str:
    found = [line for line in logs.splitlines() if line.startswith(prefix)]
    assert found, f"no line starting {prefix!r}:\n{logs[-3000:]}"
    return found[-1][len(prefix):].strip()


def test_pipeline_on_two_nodes_and_s3_only(c2: Cluster2, tmp_path: Path):
    from pipelines.store.delta_tables import Tables

    t_start = time.monotonic()
    base = f"s3://{BUCKET}/{TAG}"
    root, db, runs = f"{base}/data", f"{base}/lancedb", f"{base}/runs/train"
    search_cwd = tmp_path / "search-cwd"
    search_cwd.mkdir()
    # The jobs' working directory is unpacked by the first job: list it after that one.
    before = _local_disk(c2, search_cwd)

    # ---- ingest: the tiny synthetic corpus (260 documents) ---------------------------
    # The distributed forms of the driver's per-document state, at this test's size: the
    # duplicate rule's ids in actors on both nodes, the embed plan and its check on Ray.
    dedupe_on_ray = ("--set", "dedupe.distributed_min_records=0")
    c2.submit("ingest", ["jobs.ingest", "--preset", "tiny", "--root", root, "--no-progress", *dedupe_on_ray,
                         *c2.storage])
    before["job working dirs"] = c2.working_dirs()  # as Ray unpacked it (+ what ingest wrote: checked below)

    # ---- train: two workers, one per node; then the same run packed on one node --------
    def train(name: str, strategy: str, *extra: str) -> str:
        logs = c2.submit(f"train-{strategy}", [
            "jobs.train", "--preset", "tiny", "--root", root, "--storage-path", runs, "--name", name,
            "--no-progress", "--set", "train.epochs=2", "--set", f"scaling.placement_strategy={strategy}",
            *extra, *c2.storage])
        model = _line(logs, "model:")
        assert model == f"{runs}/{name}/model", logs[-3000:]  # on S3, not on the driver's disk
        return model

    model = train(f"s1-{TAG}", "STRICT_SPREAD")
    # The same run with both workers on one node, and the same tokenizer (the tiny preset
    # trains one per run, and its trainer breaks ties in hash-map order).
    packed = train(f"s1-packed-{TAG}", "STRICT_PACK", "--set", f"model.tokenizer={runs}/s1-{TAG}/tokenizer")

    # ---- mine-negatives, embed ---------------------------------------------------------
    c2.submit("mine-negatives", ["jobs.mine_negatives", "--checkpoint", model, "--root", root,
                                 "--output", f"{base}/negatives/s1", "--k", "10", "--no-progress",
                                 "--set", "pool_size=2", "--set", "cpus_per_actor=0.5", *c2.storage])
    # No ANN index: the table is searched exhaustively, as the in-process ranking below is.
    embed_argv = ["--checkpoint", model, "--root", root, "--db", db, "--table", "docs", "--no-progress",
                  "--set", "index.ann=none",
                  "--set", "encode.actors=2", "--set", "encode.cpus_per_actor=0.5", "--set", "encode.threads=1",
                  "--set", "encode.batch_size=32", *c2.storage]
    c2.submit("embed", ["jobs.embed", *embed_argv, "--set", "plan.distributed_min_rows=0"])

    # ---- a change: four more documents ingested, two deleted; then reindex -------------
    c2.submit("ingest-change", ["jobs.ingest", "--preset", "tiny", "--root", root, "--no-progress",
                                "--set", "source.synthetic.num_text_docs=64", *dedupe_on_ray, *c2.storage])
    tables = Tables(root, c2.storage_options)
    docs = tables.read(tables.documents).column("doc_id").to_pylist()
    assert len(docs) == 264
    gone = sorted(docs)[:2]
    tables.documents_table().delete(f"doc_id IN ({', '.join(repr(d) for d in gone)})")
    c2.submit("reindex", ["jobs.reindex", *embed_argv, "--set", "encode.in_process_max_docs=0"])

    # ---- evaluate: the table both nodes wrote, and the checkpoint ranked in-process ------
    eval_logs = c2.submit("evaluate", [
        "jobs.evaluate", "--root", root, "--split", "test", "--variant", f"table={'table:' + db + '/docs'}",
        "--variant", f"exact=checkpoint:{model}", "--out", f"runs/eval-{TAG}", *c2.storage])

    # ---- ciea search, as an analyst runs it (no Ray), from a folder of its own ---------
    import subprocess

    out = subprocess.run([sys.executable, "-m", "jobs.search", SEARCH_QUERY, "--db", db, "--table", "docs",
                          "--k", "5", "--json", *c2.storage], cwd=search_cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    hits = json.loads(out.stdout)
    runtime = round(time.monotonic() - t_start, 1)
    print(out.stdout[:2000])
    print(eval_logs[-2500:])

    # Every check below runs and the failures are reported together (a run takes minutes).
    problems: list[str] = []

    def check(ok: object, what: object) -> None:
        if not ok:
            problems.append(str(what)[:3000])

    # (1) both nodes did work in every distributed stage.
    placement = {stage: c2.nodes_of(stage) for stage in c2.jobs}
    report = {"seconds": c2.seconds, "total_seconds": runtime,
              "placement": {s: p and {k: sorted(v) for k, v in p.items()} for s, p in placement.items()}}
    print(json.dumps(report, indent=1))
    for stage in ("ingest", "mine-negatives", "embed", "ingest-change", "reindex"):
        both = placement[stage]["tasks"] | placement[stage]["actors"]
        check(both >= {"node_a", "node_b"}, (stage, placement[stage]))
    check(placement["train-STRICT_SPREAD"]["train_workers"] == {"node_a", "node_b"}, placement)
    check(len(placement["train-STRICT_PACK"]["train_workers"]) == 1, placement)
    for stage in ("mine-negatives", "embed", "reindex"):  # the encoder actors: one per node
        check({"node_a", "node_b"} <= placement[stage]["actors"], (stage, placement[stage]))

    # (2) nothing written outside S3 and Ray's temp dir; in the jobs' working directory (the
    # driver's disk, inside Ray's temp dir) only the runs' reports: nothing another process reads.
    after = _local_disk(c2, search_cwd)
    # Jobs' files: under runs/, or anything not in the repository (each job unpacks the
    # repository as it was when submitted: other edits give later jobs a new copy).
    by_jobs = sorted(f for f in after.pop("job working dirs") if (rel := f.split("/", 1)[1]).startswith("runs/")
                     or not (REPO / rel).exists())
    before.pop("job working dirs")
    # Ray's own: the runtime_env agents' lock files in the nodes' TMPDIR.
    after["node TMPDIR"] = {f for f in after["node TMPDIR"] if not f.startswith("_ray_lockfiles/")}
    new = {k: sorted(after[k] - before[k]) for k in after if after[k] - before[k]}
    check(not new, f"written to local disk: {json.dumps(new, indent=1)[:4000]}")
    handed = [f for f in by_jobs if not _is_report(f)]
    check(not handed, f"the jobs left files on the driver's disk that are not reports: {handed[:40]}")
    print("reports on the driver's disk:", json.dumps(by_jobs, indent=1))
    keys = _s3_keys(c2, f"{TAG}/")
    for part in ("data/corpus/documents/_delta_log/", "lancedb/docs.lance/", f"runs/train/s1-{TAG}/checkpoint",
                 "negatives/s1/_delta_log/"):
        check(any(k.startswith(f"{TAG}/{part}") for k in keys), (part, sorted(keys)[:40]))

    # (3) equal to a single-node run where that is deterministic.
    # Training: model_id hashes config + every weight; DDP's all-reduce of two ranks is a + b
    # wherever the ranks run, and each rank reads the same shard in the same order. Compared
    # on the last checkpoint (the weights after the last step): the kept model is the best
    # on dev, which a run this short may leave at step 0.
    last = [_last_checkpoint(c2, m.rsplit("/", 1)[0]) for m in (model, packed)]
    check(last[0] == last[1], f"one worker per node trained other weights than both on one node: {last}")
    check(last[0][0] > 0, last)
    kept = [_manifest(c2, m)["model_id"] for m in (model, packed)]
    check(kept[0] == kept[1], kept)
    vectors = _lance_rows(c2, db)
    check(set(vectors["model_id"]) == {kept[0]}, f"table model_ids {set(vectors['model_id'])}, kept model {kept[0]}")
    # The change, and nothing else.
    check(sorted(vectors["doc_id"]) == sorted(set(docs) - set(gone)), "the table's doc_ids are not the corpus'")
    # Evaluation: the table the two nodes embedded ranks as the checkpoint encoding the corpus
    # in one process. Vectors may differ in the last float bits (other batch compositions),
    # which can only swap near-ties: metrics agree to 1e-3, not bit for bit.
    report = _eval_report(c2, eval_logs)
    for metric in ("MRR@10", "NDCG@10", "Recall@5"):
        a, b = (report["variants"][v]["metrics"][metric] for v in ("table", "exact"))
        check(abs(a - b) <= 1e-3, (metric, a, b))
    # Search: the analyst's CLI on S3 finds documents of the table, best first.
    check([h["doc_id"] for h in hits["results"][0]["hits"]][:1], out.stdout)
    assert not problems, "\n".join(problems)
