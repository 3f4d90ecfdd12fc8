"""The Delta table handle (``pipelines.store.delta_tables.Tables``) is the one way to open a
Delta table: its methods on a real local table, and a source rule that nothing outside
``pipelines/store/`` constructs a ``DeltaTable`` itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake
from deltalake.exceptions import TableNotFoundError

from pipelines.store.delta_tables import CDF_CONFIG, Tables

REPO = Path(__file__).resolve().parents[2]
#: Folders whose modules must open Delta tables through ``Tables``.
SCANNED = ("pipelines", "jobs", "bench", "tests")
#: Where ``DeltaTable`` may be constructed: the handle itself.
HOME = "pipelines/store/"
#: Modules that still construct ``DeltaTable`` directly: none left (issue 15 moved the last
#: ones to ``Tables``). Never add one: open the table with ``Tables.open``.
ALLOWED: tuple[str, ...] = ()


def delta_table_constructions(source: str) -> list[int]:
    """Line numbers where ``DeltaTable(...)`` (or ``deltalake.DeltaTable(...)``, an alias of
    it, or a constructor such as ``DeltaTable.create(...)``) is called."""
    tree = ast.parse(source)
    names = {"DeltaTable"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "deltalake":
            names |= {a.asname for a in node.names if a.name == "DeltaTable" and a.asname}

    def is_delta_table(expr: ast.expr) -> bool:
        return (isinstance(expr, ast.Name) and expr.id in names) or (
            isinstance(expr, ast.Attribute) and expr.attr == "DeltaTable")

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if is_delta_table(f) or (isinstance(f, ast.Attribute) and is_delta_table(f.value)):
                lines.append(node.lineno)
    return sorted(lines)


def test_the_rule_sees_every_way_of_constructing_a_delta_table():
    src = ("import deltalake\nfrom deltalake import DeltaTable as DT\n"
           "a = DeltaTable('x')\nb = deltalake.DeltaTable('x')\nc = DT('x')\nd = DeltaTable.create('x', s)\n"
           "e = tables.open('documents')\n")
    assert delta_table_constructions(src) == [3, 4, 5, 6]


def test_no_module_outside_the_store_constructs_a_delta_table():
    offenders = []
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith(HOME) or rel.startswith(ALLOWED):
                continue
            for line in delta_table_constructions(path.read_text(encoding="utf-8")):
                offenders.append(f"{rel}:{line}")
    assert not offenders, (
        "DeltaTable constructed outside pipelines/store/ (open it with a Tables handle: "
        f"tables.open(kind_or_uri, version), tables.documents_table(version)): {offenders}")


# ---------------------------------------------------------------------------------------
# The handle's methods, on a real local table
# ---------------------------------------------------------------------------------------


def docs(ids: list[str]) -> pa.Table:
    return pa.table({"doc_id": ids, "content_sha256": [f"h-{d}" for d in ids]})


@pytest.fixture
def tables(tmp_path) -> Tables:
    """corpus/documents with version 0 (a, b) and version 1 (+ c)."""
    t = Tables(str(tmp_path / "data"))
    write_deltalake(t.documents, docs(["a", "b"]), configuration=CDF_CONFIG)
    write_deltalake(t.documents, docs(["c"]), mode="append")
    return t


def test_kinds_resolve_under_the_root_and_anything_else_is_a_uri(tmp_path):
    t = Tables(str(tmp_path / "data") + "/")
    root = str((tmp_path / "data").resolve())
    assert t.root == root
    assert t.uri("documents") == t.documents == f"{root}/corpus/documents"
    assert t.uri("quarantine") == t.quarantine == f"{root}/corpus/quarantine"
    assert t.uri("queries/dev") == t.queries("dev") == f"{root}/queries/dev"
    assert t.uri("qrels/test") == t.qrels("test") == f"{root}/qrels/test"
    assert t.uri("/elsewhere/table") == "/elsewhere/table"
    assert t.uri("s3://bucket/x/y") == "s3://bucket/x/y"
    assert Tables("s3://bucket/root/").documents == "s3://bucket/root/corpus/documents"


def test_a_credential_in_the_storage_options_is_refused_when_the_handle_is_made(tmp_path):
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY"):
        Tables(str(tmp_path), {"aws_secret_access_key": "s3cr3t"})
    ok = Tables(str(tmp_path), {"AWS_REGION": "eu-west-1"})
    assert ok.storage_options == {"AWS_REGION": "eu-west-1"}


def test_open_by_kind_or_uri_at_a_version(tables):
    assert tables.open("documents").version() == 1
    assert tables.open(tables.documents).version() == 1
    assert tables.documents_table().version() == 1
    assert tables.documents_table(0).version() == 0
    assert tables.open("documents", version=0).to_pyarrow_table().num_rows == 2
    assert tables.documents_table().to_pyarrow_table().num_rows == 3


def test_version_is_none_where_there_is_no_table_and_open_raises(tables):
    assert tables.version() == tables.version("documents") == 1
    assert tables.version("quarantine") is None and tables.version("queries/dev") is None
    with pytest.raises(TableNotFoundError):
        tables.open("quarantine")


def test_dataset_schema_and_read_of_a_version(tables):
    assert tables.dataset().count_rows() == 3
    assert tables.dataset("documents", 0).count_rows() == 2
    assert tables.schema().names == ["doc_id", "content_sha256"]
    old = tables.read("documents", columns=["doc_id"], version=0)
    assert sorted(old["doc_id"].to_pylist()) == ["a", "b"] and old.schema.field("doc_id").type == pa.string()
    assert sorted(tables.read(tables.documents)["doc_id"].to_pylist()) == ["a", "b", "c"]


def test_changes_come_from_the_feed(tables):
    feed = tables.changes("documents", 1)
    assert feed["doc_id"].to_pylist() == ["c"] and feed["_change_type"].to_pylist() == ["insert"]


def test_image_files_are_read_through_the_handle(tmp_path):
    image = tmp_path / "img.bin"
    image.write_bytes(b"\x89PNG-bytes")
    t = Tables(str(tmp_path / "data"))
    fs, path = t.filesystem(str(image))
    assert path == str(image.resolve()) and fs.get_file_info(path).size == len(b"\x89PNG-bytes")
    assert t.read_bytes(str(image)) == b"\x89PNG-bytes"
    with pytest.raises(ValueError, match="unsupported storage URI"):
        t.read_bytes("ftp://host/x.png")


def test_ensure_creates_a_table_by_kind(tmp_path):
    t = Tables(str(tmp_path / "data"))
    schema = pa.schema([("qid", pa.string())])
    created = t.ensure("queries/dev", schema)
    assert created.version() == 0 and t.version("queries/dev") == 0
    with pytest.raises(ValueError, match="has columns"):
        t.ensure("queries/dev", pa.schema([("other", pa.string())]))


def test_the_lance_side_refuses_credentials_too(tmp_path):
    from pipelines.store.lance_tables import VectorTable, connect

    with pytest.raises(ValueError, match="AWS_SESSION_TOKEN"):
        connect(str(tmp_path / "lancedb"), {"aws_session_token": "t"})
    with pytest.raises(ValueError, match="AWS_SESSION_TOKEN"):
        VectorTable(str(tmp_path / "lancedb"), "docs", {"aws_session_token": "t"})
