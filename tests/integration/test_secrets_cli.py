"""A secret given to a real ``ciea`` command in a subprocess is refused before anything runs
(no Ray, no table, no run folder): exit status 1, one line on stderr naming the key — never
the value — and the value in no output and no file the run leaves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SENTINEL = "SENTINEL123-e7d1"


def _ciea(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _files_with_sentinel(folder: Path, skip: set[Path]) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p not in skip and SENTINEL.encode() in p.read_bytes()]


def _ingest(tmp: Path, *extra: str) -> list[str]:
    return ["ingest", "--preset", "tiny", "--root", str(tmp / "data"), "--run-dir", str(tmp / "runs"),
            "--ray-temp-dir", str(tmp / "ray"), *extra]


CASES = {
    # (a) a credential under a key of another backend's spelling, via --storage-option
    "storage-option": (lambda t: _ingest(t, "--storage-option", f"azure_storage_account_key={SENTINEL}"),
                       "storage_options.azure_storage_account_key", "AZURE_STORAGE_ACCOUNT_KEY"),
    # (b) a misspelled credential via --set, under the storage options and elsewhere
    "set-misspelled": (lambda t: _ingest(t, "--set", f"output.storage_options.aws_secert_access_key={SENTINEL}"),
                       "output.storage_options.aws_secert_access_key", "AWS_SECRET_ACCESS_KEY"),
    "set-elsewhere": (lambda t: _ingest(t, "--set", f"source.client_secret={SENTINEL}"),
                      "source.client_secret", "AZURE_CLIENT_SECRET"),
    # (c) credentials inside a URL-bearing flag
    "root-userinfo": (lambda t: _ingest(t, "--root", f"s3://AKIAEXAMPLE:{SENTINEL}@bucket/data"),
                      "output.root", "URL with credentials"),
    "path-userinfo": (lambda t: _ingest(t, "--source", "manifest", "--path", f"https://u:{SENTINEL}@h.example/m.jsonl"),
                      "source.path", "URL with credentials"),
    "allow-root-presigned": (lambda t: _ingest(t, "--source", "folder", "--path", str(t),
                                               "--allow-root", f"https://h.example/x?X-Amz-Signature={SENTINEL}"),
                             "source.allow_roots.0", "URL with credentials"),
    # other commands share the rule
    "embed": (lambda t: ["embed", "--root", str(t / "data"), "--checkpoint", str(t / "ckpt"), "--run-dir",
                         str(t / "runs"), "--storage-option", f"sas_token={SENTINEL}"],
              "storage_options.sas_token", "AZURE_STORAGE_SAS_KEY"),
    "sql": (lambda t: ["sql", "--db", f"s3://AKIAEXAMPLE:{SENTINEL}@bucket/lancedb", "SELECT 1"],
            "db", "URL with credentials"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_secret_on_the_command_line_is_refused_in_one_line_and_written_nowhere(case, tmp_path):
    build, key, fix = CASES[case]
    result = _ciea(*build(tmp_path), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ciea {build(tmp_path)[0]}: {key} ") and fix in lines[0], lines[0]
    assert SENTINEL not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists() and not (tmp_path / "ray").exists()
    assert _files_with_sentinel(tmp_path, set()) == []


def test_a_secret_in_a_config_file_is_refused_and_copied_nowhere(tmp_path):
    config = tmp_path / "ingest.yaml"
    config.write_text(f"output:\n  storage_options:\n    AWS_REGION: eu-west-1\n    password: {SENTINEL}\n")
    result = _ciea(*_ingest(tmp_path, "--config", str(config)), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("ciea ingest: output.storage_options.password is a credential")
    assert len(result.stderr.strip().splitlines()) == 1 and SENTINEL not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    assert _files_with_sentinel(tmp_path, {config}) == []
