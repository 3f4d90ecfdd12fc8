"""``pipelines.store.storage.local_folder`` / ``upload_folder``: how a checkpoint or tokenizer
folder reaches the process that reads it. Local paths here; the ``s3://`` side runs in the
slow tier (``tests/integration/test_cluster_two_nodes.py``, moto's S3 on loopback)."""

from __future__ import annotations

from pathlib import Path

from pipelines.store.storage import local_folder, upload_folder


def test_a_local_folder_is_read_in_place(tmp_path: Path):
    with local_folder(str(tmp_path)) as here:
        assert here == str(tmp_path)
    assert tmp_path.exists()  # never removed: it is the caller's


def test_upload_copies_every_file_and_subfolder(tmp_path: Path):
    src = tmp_path / "model"
    (src / "tokenizer").mkdir(parents=True)
    (src / "ciea_checkpoint.json").write_text("{}")
    (src / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    upload_folder(src, str(tmp_path / "copy"))
    files = sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert files == ["ciea_checkpoint.json", "tokenizer/vocab.txt"]
    assert (tmp_path / "copy" / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
