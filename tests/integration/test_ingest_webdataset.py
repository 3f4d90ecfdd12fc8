"""WebDataset shards through a real local Ray into real Delta tables, locally and through
``s3://`` (moto's S3 server on loopback): three shards, one with a corrupt image, one
truncated; every sample is accounted for and a re-run changes nothing."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from ingest_fixtures import image_bytes
from ingest_helpers import reconcile, rows_by_id, run_ingest
from s3_server import moto_s3, s3_credentials
from tar_shards import write_shard

from pipelines.store.delta_tables import Tables

BUCKET = "ciea-wds-test"
PER_SHARD = 4


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 and the module's local Ray (its workers see the
    credentials, which come only from the environment)."""
    import ray

    with s3_credentials(), moto_s3(BUCKET) as (endpoint, client):
        ray_tmp = tempfile.mkdtemp(prefix="ray-wds-", dir="/tmp")
        # A Ray of its own: its workers must start with the credentials above in their
        # environment. The shared one (conftest's ray_local) stops first and restarts later.
        ray.shutdown()
        ray.init(num_cpus=2, _temp_dir=ray_tmp, include_dashboard=False, log_to_driver=False)
        try:
            yield endpoint, client
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def make_shards() -> tuple[dict[str, bytes], dict[str, dict]]:
    """Three shards of PER_SHARD samples: 00001 has a corrupt image, 00002 is cut inside
    its third sample. Returns (shard name → bytes, doc_id → expected fields)."""
    shards: dict[str, bytes] = {}
    expected: dict[str, dict] = {}
    for s in range(3):
        samples = []
        for i in range(PER_SHARD):
            key = f"{s:05d}{i:04d}"
            img = image_bytes((s * 60, i * 50, 90))
            meta = {"url": f"http://example.com/{key}.png", "width": 12}
            if i == 1:
                meta["doc_id"] = f"custom-{s}-{i}"
            members = {"png": img, "txt": f"sample {s}/{i}".encode(), "json": json.dumps(meta).encode()}
            if s == 1 and i == 2:
                members = {"jpg": b"\xff\xd8\xff\xe0 corrupt", "txt": b"broken image"}
            samples.append((key, members))
            doc_id = meta.get("doc_id") or f"{s:05d}/{key}"
            expected[doc_id] = {"caption": f"sample {s}/{i}", "image": img, "shard": s, "i": i}
        data = write_shard(samples)
        if s == 2:
            cut = data.index(f"{s:05d}0002.png".encode()) + 512 + 30  # inside the third image
            data = data[:cut]
        shards[f"{s:05d}.tar"] = data
    return shards, expected


def _check(summary: dict, tables: Tables, expected: dict[str, dict]) -> None:
    reconcile(summary)
    d = summary["documents"]
    # 12 samples in the shards; shard 2 lost its last two, so 10 were read (+1 truncation record).
    assert d["read"] == 3 * PER_SHARD - 1
    assert d["quarantined_by_reason"] == {"image_unrecognised": 1, "shard_truncated": 1}
    assert d["accepted"] == 3 * PER_SHARD - 3
    docs = rows_by_id(tables.read(tables.documents))
    kept = {k: v for k, v in expected.items() if not (v["shard"] == 1 and v["i"] == 2) and
            not (v["shard"] == 2 and v["i"] >= 2)}
    assert set(docs) == set(kept)
    for doc_id, e in kept.items():
        row = docs[doc_id]
        assert row["caption"] == e["caption"] and row["image"] == e["image"] and row["modality"] == "image"
        meta = json.loads(row["metadata"])
        assert meta["width"] == 12 and "doc_id" not in meta
    assert docs["custom-0-1"]["record_ref"] == "00000.tar#000000001"
    quarantine = {r["reason"]: r for r in tables.read(tables.quarantine).to_pylist()}
    assert quarantine["shard_truncated"]["record_ref"] == "00002.tar#000020002"
    assert quarantine["image_unrecognised"]["doc_id"] == "00001/000010002"


def test_local_shards_round_trip_and_rerun_is_a_no_op(s3, tmp_path):
    shards, expected = make_shards()
    for name, data in shards.items():
        (tmp_path / "wds" / "shards").mkdir(parents=True, exist_ok=True)
        (tmp_path / "wds" / "shards" / name).write_bytes(data)
    root = tmp_path / "data"
    summary = run_ingest(tmp_path, root, "--source", "webdataset", "--path", str(tmp_path / "wds" / "shards"))
    assert summary["shards"] == 3
    tables = Tables(str(root))
    _check(summary, tables, expected)
    version = tables.version(tables.documents)
    # A brace range, two shards per task: the same documents, nothing changes.
    again = run_ingest(tmp_path, root, "--source", "webdataset", "--path",
                       str(tmp_path / "wds" / "shards" / "{00000..00002}.tar"), "--set", "source.shards_per_task=2")
    assert again["shards"] == 2
    d = again["documents"]
    assert (d["inserted"], d["updated"], d["unchanged"]) == (0, 0, 3 * PER_SHARD - 3)
    assert tables.version(tables.documents) == version
    assert again["quarantine"]["inserted"] == 0


def test_s3_shards_round_trip(s3, tmp_path):
    endpoint, client = s3
    shards, expected = make_shards()
    for name, data in shards.items():
        client.put_object(Bucket=BUCKET, Key=f"wds/{name}", Body=data)
    opts = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    flags = [a for k, v in opts.items() for a in ("--storage-option", f"{k}={v}")]
    summary = run_ingest(tmp_path, f"s3://{BUCKET}/data", "--source", "webdataset",
                         "--path", f"s3://{BUCKET}/wds/*.tar", *flags)
    assert summary["shards"] == 3
    _check(summary, Tables(f"s3://{BUCKET}/data", opts), expected)


def test_missing_shard_in_a_brace_range_is_quarantined(s3, tmp_path):
    shards, _ = make_shards()
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "00000.tar").write_bytes(shards["00000.tar"])
    summary = run_ingest(tmp_path, tmp_path / "data", "--source", "webdataset",
                         "--path", str(Path(tmp_path / "w") / "{00000..00001}.tar"))
    reconcile(summary)
    assert summary["documents"]["accepted"] == PER_SHARD
    assert summary["documents"]["quarantined_by_reason"] == {"shard_unreadable": 1}


def test_a_cut_between_samples_and_a_huge_pax_header_are_quarantined(s3, tmp_path):
    """A shard cut exactly at a member boundary used to end in silence; a 1 MiB pax header
    was parsed in memory. Both are now rows of their own and the counts reconcile."""
    folder = tmp_path / "wds"
    folder.mkdir()
    samples = [(f"k{i}", {"png": image_bytes((i * 60, 10, 10)), "txt": f"caption {i}".encode()}) for i in range(3)]
    data = write_shard(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        boundary = next(m.offset for m in tar.getmembers() if m.name == "k2.png")
    (folder / "cut.tar").write_bytes(data[:boundary])  # ends right after k1's last member
    (folder / "pax.tar").write_bytes(write_shard(samples, pax={"k1": {"comment": "x" * (1 << 20)}}))
    root = tmp_path / "data"
    summary = run_ingest(tmp_path, root, "--source", "webdataset", "--path", str(folder),
                         "--set", "source.max_header_kb=64")
    reconcile(summary)
    d = summary["documents"]
    assert d["quarantined_by_reason"] == {"shard_truncated": 1, "header_too_large": 1}
    assert d["read"] == 2 + 3 and d["accepted"] == 3
    tables = Tables(str(root))
    assert set(rows_by_id(tables.read(tables.documents))) == {"cut/k0", "pax/k0", "pax/k2"}
    quarantine = {r["reason"]: r for r in tables.read(tables.quarantine).to_pylist()}
    assert quarantine["shard_truncated"]["record_ref"] == "cut.tar#k1"
    assert f"byte {boundary}" in quarantine["shard_truncated"]["detail"]
    assert quarantine["header_too_large"]["record_ref"] == "pax.tar#k1"
    assert summary["quarantine"]["rows_this_run"] == 2


def test_an_unreachable_endpoint_is_one_line(s3, tmp_path, capsys):
    import socket

    from jobs import ingest

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [a for kv in (f"AWS_ENDPOINT_URL=http://127.0.0.1:{port}", "AWS_ALLOW_HTTP=true",
                          "AWS_REGION=us-east-1") for a in ("--storage-option", kv)]
    with pytest.raises(SystemExit) as e:
        ingest.main(["--source", "webdataset", "--path", f"s3://{BUCKET}/wds/", *flags, "--root",
                     str(tmp_path / "data"), "--run-dir", str(tmp_path / "runs"), "--no-progress"])
    message = str(e.value.code)
    assert message.startswith(f"ciea ingest: cannot reach s3://{BUCKET}/wds") and "\n" not in message
    assert "check the endpoint / storage_options" in message
    assert "Traceback" not in capsys.readouterr().err
