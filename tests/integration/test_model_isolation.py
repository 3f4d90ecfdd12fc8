"""``ciea_model`` is a library of torch + transformers only: it (and every submodule)
imports with Ray, LanceDB and Delta Lake made unimportable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = ("ray", "lancedb", "deltalake")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Block())
    for name in BLOCKED:  # nothing may already be loaded either
        assert name not in sys.modules, name

    import ciea_model

    names = ["ciea_model"]
    for info in pkgutil.walk_packages(ciea_model.__path__, "ciea_model."):
        importlib.import_module(info.name)
        names.append(info.name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    # The blocker works: importing a blocked package fails.
    for name in BLOCKED:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
        else:
            raise AssertionError(f"{name} imported despite the blocker")
    print("imported", len(names), "modules:", " ".join(names))
    """
)


def test_ciea_model_imports_without_ray_lancedb_deltalake():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for module in ("ciea_model.model", "ciea_model.training", "ciea_model.checkpoint",
                   "ciea_model.processor", "ciea_model.inference", "ciea_model.tokenizer"):
        assert module in out.split(), out
