"""Errors users see are one line that names the fix, never a traceback — and read-only
commands create nothing, not even the ``--db`` folder they were pointed at by mistake.

Real pieces, no Ray: a tiny random-init checkpoint, a LanceDB table stamped and published
for it the way ``ciea embed`` leaves one, a Delta corpus and query split for ``ciea
evaluate``; broken copies of the checkpoint (weights truncated, empty, not safetensors,
missing). Each job runs through its ``main`` as the console script calls it.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from embed_helpers import make_checkpoint, synthetic_records, write_corpus, write_query_split
from safetensors.torch import load_file, save_file

from ciea_model import load_checkpoint, model_id
from ciea_model.checkpoint import WEIGHTS, CheckpointError, read_manifest
from jobs import embed as embed_job
from jobs import evaluate as evaluate_job
from jobs import mine_negatives as mine_job
from jobs import search as search_job
from jobs import serve as serve_job
from jobs import sql as sql_job
from pipelines.query.search import Filter, FilterError, Searcher
from pipelines.store.lance_tables import META_CHECKPOINT, VectorTable, row_model

TABLE = "docs"
REPO = Path(__file__).resolve().parents[2]
#: A log line of ours (INFO progress before the failure), not part of the error.
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO) ")
INT64 = "-9223372036854775808..9223372036854775807"


def _table(db: str, ckpt: str, records: list[dict]) -> None:
    """The table ``ciea embed`` would leave: stamped with the model, rows, the checkpoint, published."""
    model, _ = load_checkpoint(ckpt)
    vt = VectorTable(db, TABLE)
    vt.create_if_missing(model_id(model), model.dim)
    rng = np.random.default_rng(0)
    row = row_model(model.dim)
    vt.table.add([row(doc_id=r["doc_id"], vector=(v := rng.normal(size=model.dim)) / np.linalg.norm(v),
                      modality=r["modality"], text=r["text"] or None, caption=r["caption"] or None,
                      content_sha256="0" * 64, model_id=model_id(model), source_version=0,
                      embedded_at=datetime(2026, 1, 1)) for r in records])
    vt.update_metadata({META_CHECKPOINT: ckpt})
    vt.publish("v1")


def _broken(tmp: Path, ckpt: str, name: str, weights: bytes | None) -> str:
    """A copy of the checkpoint with its weights replaced (``None``: deleted)."""
    copy = tmp / name
    shutil.copytree(ckpt, copy)
    if weights is None:
        (copy / WEIGHTS).unlink()
    else:
        (copy / WEIGHTS).write_bytes(weights)
    return str(copy)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("one-line")
    records = synthetic_records(8, 8)
    root = tmp / "data"
    write_corpus(root, records)
    write_query_split(root, "test", [{"qid": "q1", "query": records[0]["caption"] or "a query", "kind": "image",
                                      "positive_doc_ids": [records[0]["doc_id"]]}])
    ckpt = make_checkpoint(tmp, [r["caption"] or r["text"] for r in records], seed=0)
    db = str(root / "lancedb")
    _table(db, ckpt, records)
    weights = (Path(ckpt) / WEIGHTS).read_bytes()
    broken = {"truncated": _broken(tmp, ckpt, "truncated", weights[: len(weights) // 2]),
              "empty": _broken(tmp, ckpt, "empty", b""),
              "not safetensors": _broken(tmp, ckpt, "garbage", b"PK\x03\x04 a zip, not weights" * 4),
              "missing": _broken(tmp, ckpt, "missing", None)}
    a_file = tmp / "not-a-folder"
    a_file.write_text("x")
    return {"tmp": tmp, "root": root, "db": db, "ckpt": ckpt, "broken": broken, "file": str(a_file)}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def one_line(capsys, main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    """Runs a job's ``main``; returns (exit code, its only error line) as a shell would show them.

    ``SystemExit("text")`` is what Python prints as one line with exit code 1.
    """
    try:
        rc = main(argv)
        message = None
    except SystemExit as e:
        rc, message = (1, str(e.code)) if isinstance(e.code, str) else (e.code, None)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() + ([message] if message else [])
             if line.strip() and not LOG_LINE.match(line)]
    assert "Traceback" not in err and len(lines) == 1 and "\n" not in lines[0], err + (message or "")
    assert rc != 0
    return rc, lines[0]


# ---------------------------------------------------------------------------------------
# Corrupt or missing model.safetensors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["truncated", "empty", "not safetensors", "missing"])
def test_broken_weights_are_one_checkpoint_error(env, case):
    ckpt = env["broken"][case]
    for load in (read_manifest, load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(ckpt)
        text = str(info.value)
        assert "\n" not in text and ckpt in text and WEIGHTS in text and "ciea train" in text
        assert ("missing" if case == "missing" else "corrupt or truncated") in text


def test_weights_of_another_model_are_one_checkpoint_error(env, tmp_path):
    # Valid safetensors, one parameter short: not the model the manifest describes.
    copy = Path(shutil.copytree(env["ckpt"], tmp_path / "short"))
    tensors = load_file(str(copy / WEIGHTS))
    del tensors[sorted(tensors)[0]]
    save_file(tensors, str(copy / WEIGHTS))
    read_manifest(copy)  # the header is whole: only loading finds out
    with pytest.raises(CheckpointError, match=r"does not hold the parameters .*ciea train") as info:
        load_checkpoint(copy)
    assert "\n" not in str(info.value) and len(str(info.value)) < 600


@pytest.mark.parametrize("case", ["truncated", "missing"])
def test_search_and_serve_with_broken_weights(env, capsys, case):
    ckpt = env["broken"][case]
    _, line = one_line(capsys, search_job.main, ["red", "--db", env["db"], "--table", TABLE, "--checkpoint", ckpt])
    assert line.startswith("ciea search: checkpoint ") and WEIGHTS in line and "ciea train" in line
    _, line = one_line(capsys, serve_job.main, ["--db", env["db"], "--table", TABLE, "--checkpoint", ckpt,
                                                "--port", free_port()])
    assert line.startswith("ciea serve: checkpoint ") and WEIGHTS in line


def test_embed_evaluate_and_mine_negatives_with_broken_weights(env, capsys):
    ckpt = env["broken"]["truncated"]
    _, line = one_line(capsys, embed_job.main, ["--checkpoint", ckpt, "--root", str(env["root"]), "--table", "new",
                                                "--run-dir", str(env["tmp"] / "embed-run"), "--no-progress"])
    assert line.startswith("ciea embed: ") and "corrupt or truncated" in line
    _, line = one_line(capsys, evaluate_job.main, ["--root", str(env["root"]), "--out", str(env["tmp"] / "eval"),
                                                   "--no-progress", "--variant", f"x=checkpoint:{ckpt}"])
    assert line.startswith("ciea evaluate: ") and "corrupt or truncated" in line
    _, line = one_line(capsys, mine_job.main, ["--checkpoint", ckpt, "--root", str(env["root"]),
                                               "--output", str(env["tmp"] / "negatives")])
    assert "corrupt or truncated" in line and WEIGHTS in line


def test_the_console_script_prints_one_line(env):
    """Through ``ciea`` itself, in a fresh interpreter: stderr is the one line, nothing more."""
    ckpt = env["broken"]["not safetensors"]
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "search", "red", "--db", env["db"], "--table", TABLE,
                           "--checkpoint", ckpt], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "corrupt or truncated" in proc.stderr


# ---------------------------------------------------------------------------------------
# --db that is a file, or missing (read-only commands create nothing)
# ---------------------------------------------------------------------------------------


def _readers(db: str) -> list[tuple[str, Callable[[list[str]], int], list[str]]]:
    return [("ciea search", search_job.main, ["red", "--db", db, "--table", TABLE]),
            ("ciea sql", sql_job.main, ["SELECT 1", "--db", db]),
            ("ciea serve", serve_job.main, ["--db", db, "--table", TABLE, "--port", free_port()])]


def test_a_db_that_is_a_file(env, capsys):
    for prog, main, argv in _readers(env["file"]):
        _, line = one_line(capsys, main, argv)
        assert line == (f"{prog}: the LanceDB database {env['file']} is a file, not a folder: point --db at the "
                        "folder `ciea embed` wrote (by default <root>/lancedb)")
    _, line = one_line(capsys, evaluate_job.main, ["--root", str(env["root"]), "--out", str(env["tmp"] / "eval"),
                                                   "--no-progress", "--variant", f"x=table:{env['file']}/{TABLE}"])
    assert line.startswith(f"ciea evaluate: the LanceDB database {env['file']} is a file")


def test_a_missing_db_is_refused_and_not_created(env, capsys):
    missing = env["tmp"] / "no" / "such" / "lancedb"
    for prog, main, argv in _readers(str(missing)):
        _, line = one_line(capsys, main, argv)
        assert line == (f"{prog}: no LanceDB database at {missing}: run `ciea embed` first, or point --db at the "
                        "folder it wrote (by default <root>/lancedb)")
        assert not (env["tmp"] / "no").exists(), prog
    _, line = one_line(capsys, evaluate_job.main, ["--root", str(env["root"]), "--out", str(env["tmp"] / "eval"),
                                                   "--no-progress", "--variant", f"x=table:{missing}/{TABLE}"])
    assert "no LanceDB database at" in line and not (env["tmp"] / "no").exists()
    # --root without --db: the default <root>/lancedb, also left uncreated.
    _, line = one_line(capsys, search_job.main, ["red", "--root", str(env["tmp"] / "no")])
    assert "no LanceDB database at" in line and not (env["tmp"] / "no").exists()


# ---------------------------------------------------------------------------------------
# Integer filter values the column cannot hold
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [str(2**63), str(-(2**63) - 1), "99999999999999999999999999"])
def test_an_integer_filter_that_overflows_names_the_column_and_range(env, capsys, value):
    _, line = one_line(capsys, search_job.main, ["red", "--db", env["db"], "--table", TABLE,
                                                 "--where", f"source_version={value}"])
    assert line == (f"ciea search: filter value {int(value)} for 'source_version' is out of range: 'source_version' "
                    f"is int64 and holds {INT64}; pass an integer in that range")


def test_integer_filters_at_the_edges_of_the_range(env):
    s = Searcher.open(env["db"], TABLE)
    assert s.search("red", where=Filter(equals={"source_version": 2**63 - 1})) == []
    assert len(s.search("red", where=Filter(in_={"source_version": [-(2**63), 0]}), k=3)) == 3
    with pytest.raises(FilterError, match=f"holds {INT64}"):
        s.search("red", where=Filter(in_={"source_version": [0, 2**63]}))


# ---------------------------------------------------------------------------------------
# Config mistakes through the console script: one line, never a traceback, nothing echoed
# ---------------------------------------------------------------------------------------

#: A credential that must never be printed, whichever way a config carries it.
SECRET = "S3NT1NEL-CREDENTIAL-0123456789"
#: Nine levels of nine aliases: 9^9 (387 million) strings when expanded.
ALIAS_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))


def _config_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(case, argv after ``ciea``, a part of the one line it must print)."""
    def file(name: str, content: str | bytes) -> str:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    a_file = file("not-a-folder", "x")
    sql = ["sql", "SELECT 1", "--db", str(tmp / "no-db")]
    azure = ("DefaultEndpointsProtocol=https;AccountName=acct;"
             f"AccountKey={SECRET}==;EndpointSuffix=core.windows.net")
    return [
        ("yaml list", [*sql, "--config", file("list.yaml", "- a\n- b\n")], "expected config keys (a YAML mapping)"),
        ("yaml scalar", [*sql, "--config", file("scalar.yaml", "42\n")], "expected config keys (a YAML mapping)"),
        ("not utf-8", [*sql, "--config", file("latin1.yaml", b"root: caf\xe9\n")], "not UTF-8 text"),
        ("alias bomb", [*sql, "--config", file("bomb.yaml", ALIAS_BOMB)], "YAML aliases (*name) are not accepted"),
        ("nested too deep", [*sql, "--config", file("deep.yaml", "a: " + "[" * 20000 + "]" * 20000 + "\n")],
         "nested too deep"),
        ("value then key", [*sql, "--set", "a=x", "--set", "a.b=y"], "a was set to a value by an earlier --set"),
        ("unclosed", [*sql, "--set", "k=[unclosed"], "--set k=…: the value is not valid YAML"),
        (".inf", [*sql, "--set", "max_rows=.inf"], "max_rows: .inf is not a number a setting can hold"),
        ("timeout 1e308", [*sql, "--timeout", "1e308"], "timeout_s: Input should be less than or equal to 86400"),
        ("memory limit", [*sql, "--memory-limit", "999999TB"], "more than this machine's memory"),
        ("root is a file", ["sql", "SELECT 1", "--root", a_file], "is a file, not a folder (root)"),
        ("ingest root is a file", ["ingest", "--preset", "tiny", "--root", a_file], "is a file, not a folder"),
        ("train root missing", ["train", "--preset", "tiny", "--root", str(tmp / "no-root"), "--set",
                                f"run.storage_path={tmp / 'runs'}"], "does not exist (data.root)"),
        ("azure string", [*sql, "--config", file("azure.yaml", f"storage_optons:\n  connection: \"{azure}\"\n")],
         "storage_optons.connection holds a credential"),
        ("azure string --set", [*sql, "--set", f"storge.conn={azure}"], "storge.conn holds a credential"),
        ("sas in a value", [*sql, "--set", f"note=SharedAccessSignature=sv=2020&sig={SECRET}"], "holds a credential"),
        ("signed url", [*sql, "--set", f"storge.url=https://h.example/x?sig={SECRET}"], "URL with credentials"),
    ]


def test_config_mistakes_through_the_console_script_are_one_line(tmp_path):
    """Each case in a fresh ``python -m jobs.cli`` (what ``ciea`` runs), several at a time:
    exit code not 0, exactly one line on stderr, no traceback, no secret, no hang."""
    cases = _config_cases(tmp_path)
    failures = []
    for start in range(0, len(cases), 6):
        batch = [(name, part, subprocess.Popen([sys.executable, "-m", "jobs.cli", *argv], cwd=tmp_path,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                 for name, argv, part in cases[start:start + 6]]
        for name, part, proc in batch:
            try:
                out, err = proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                failures.append(f"{name}: still running after 240 s (hangs)")
                continue
            lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]
            problems = [what for what, bad in (
                ("a traceback", "Traceback" in out + err), (f"exit code {proc.returncode}", proc.returncode == 0),
                (f"{len(lines)} lines on stderr", len(lines) != 1), ("the secret", SECRET in out + err),
                (f"no {part!r}", part not in err)) if bad]
            if problems:
                failures.append(f"{name}: {', '.join(problems)}:\n{err[-2000:]}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "no-db").exists() and not (tmp_path / "no-root").exists()
