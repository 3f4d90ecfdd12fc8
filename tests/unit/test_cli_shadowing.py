"""The ``ciea`` entry point refuses, in one line, to run when ``pipelines`` or ``ciea_model``
resolve to someone else's modules (a project's own ``pipelines/`` folder on ``PYTHONPATH``,
the ``pipelines`` package on PyPI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jobs import cli

REPO = Path(__file__).resolve().parents[2]


def test_our_own_packages_resolve_here():
    assert cli.foreign_packages() == []


def test_a_shadowing_folder_is_named_with_the_fix(tmp_path, monkeypatch):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text("DAGSTER = True\n")
    monkeypatch.delitem(sys.modules, "pipelines", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    (line,) = cli.foreign_packages()
    assert str(tmp_path / "pipelines") in line and "shadows it" in line and "PYTHONPATH" in line


def test_the_console_script_exits_2_with_one_line(tmp_path):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    done = subprocess.run([sys.executable, "-c", "import sys; from jobs.cli import main; sys.exit(main(['ingest', '--help']))"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "'pipelines' resolves to" in done.stderr and "Traceback" not in done.stderr


def test_a_command_without_the_pipeline_extras_names_the_install(monkeypatch, capsys):
    monkeypatch.setattr(cli, "PIPELINE_MODULES", ("ray", "surely_not_installed_ciea_probe"))
    assert cli.main(["ingest", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "surely_not_installed_ciea_probe" in err and 'ciea[pipelines]' in err
