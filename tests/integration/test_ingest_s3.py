"""The same ingest against ``s3://`` — source files and Delta tables — on moto's S3 server,
started on loopback by the fixture. Credentials come only from the environment."""

from __future__ import annotations

import json
import tempfile

import pytest
from ingest_fixtures import image_bytes
from s3_server import CREDS, moto_s3, s3_credentials

from jobs import ingest
from pipelines.store.delta_tables import Tables

BUCKET = "ciea-ingest-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 and a local Ray whose workers see the credentials."""
    import ray

    with s3_credentials(), moto_s3(BUCKET) as (endpoint, client):
        rows = [{"doc_id": "s1", "text": "stored in object storage"},
                {"doc_id": "s2", "caption": "an image on S3", "image": "img/s2.png"},
                {"doc_id": "s3", "caption": "broken", "image": "img/missing.png"}]
        client.put_object(Bucket=BUCKET, Key="src/docs.jsonl",
                          Body="".join(json.dumps(r) + "\n" for r in rows).encode())
        client.put_object(Bucket=BUCKET, Key="src/img/s2.png", Body=image_bytes((4, 5, 6)))
        ray_tmp = tempfile.mkdtemp(prefix="ray-s3-", dir="/tmp")
        # A Ray of its own: its workers must start with the credentials above in their
        # environment. The shared one (conftest's ray_local) stops first and restarts later.
        ray.shutdown()
        ray.init(num_cpus=2, _temp_dir=ray_tmp, include_dashboard=False, log_to_driver=False)
        try:
            yield endpoint, client
        finally:
            ray.shutdown()


def _ingest(endpoint: str, run_dir, *extra: str) -> dict:
    rc = ingest.main([
        "--source", "manifest", "--path", f"s3://{BUCKET}/src/docs.jsonl", "--root", f"s3://{BUCKET}/data",
        "--storage-option", f"AWS_ENDPOINT_URL={endpoint}", "--storage-option", "AWS_ALLOW_HTTP=true",
        "--storage-option", "AWS_REGION=us-east-1", "--run-dir", str(run_dir), "--no-progress", *extra])
    assert rc == 0
    return json.loads((run_dir / "latest.json").read_text())


def test_ingest_reads_and_writes_s3(s3, tmp_path):
    endpoint, client = s3
    summary = _ingest(endpoint, tmp_path)
    d = summary["documents"]
    assert (d["read"], d["inserted"], d["quarantined"]) == (3, 2, 1)
    assert d["quarantined_by_reason"] == {"image_missing": 1}
    tables = Tables(f"s3://{BUCKET}/data", {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true",
                                            "AWS_REGION": "us-east-1"})
    docs = {r["doc_id"]: r for r in tables.read(tables.documents).to_pylist()}
    assert docs["s2"]["image"] == image_bytes((4, 5, 6))
    assert docs["s1"]["text"] == "stored in object storage"
    assert tables.read(tables.quarantine).to_pylist()[0]["doc_id"] == "s3"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="data/")["Contents"]}
    assert any(k.startswith("data/corpus/documents/_delta_log/") for k in keys)

    # Re-ingest from S3: a no-op.
    version = tables.version(tables.documents)
    again = _ingest(endpoint, tmp_path)
    assert again["documents"]["unchanged"] == 2 and tables.version(tables.documents) == version

    # Credentials never reach what the run writes.
    for path in tmp_path.rglob("*.json"):
        text = path.read_text()
        assert CREDS["AWS_SECRET_ACCESS_KEY"] not in text and CREDS["AWS_ACCESS_KEY_ID"] not in text


def test_credentials_in_storage_options_are_refused_before_ray(s3, tmp_path):
    endpoint, _ = s3
    with pytest.raises(SystemExit) as exc:
        _ingest(endpoint, tmp_path, "--storage-option", "AWS_SECRET_ACCESS_KEY=oops")
    assert "environment" in str(exc.value) and "AWS_SECRET_ACCESS_KEY" in str(exc.value)
    assert "oops" not in str(exc.value)  # the refused secret is not echoed
    assert not (tmp_path / "latest.json").exists()
