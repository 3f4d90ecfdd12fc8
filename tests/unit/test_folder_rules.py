"""The folder rules, read from the source (every import statement, top level or inside a
function): ``ciea_model`` imports nothing of ``pipelines``, ``jobs`` or Ray (the import-time
side is ``test_model_isolation``); ``pipelines`` imports nothing of ``jobs`` or ``bench``;
``bench`` uses no private (``_``) name of another package; nothing imports ``tests``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ciea_model", "pipelines", "jobs", "bench")


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in ``path``; relative imports are
    resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                module = ".".join(base + ([module] if module else []))
            out.append((node.lineno, module, [a.name for a in node.names]))
    return out


def _violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in _modules(package):
        for line, module, _ in _imports(path):
            if module.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize(("package", "forbidden"), [
    ("ciea_model", ("pipelines", "jobs", "bench", "tests", "ray", "lancedb", "deltalake", "lance")),
    ("pipelines", ("jobs", "bench", "tests")),
    ("jobs", ("bench", "tests")),
])
def test_no_upward_imports(package, forbidden):
    assert _violations(package, forbidden) == []


def _private_uses(path: Path) -> list[str]:
    """Private names of our other packages that ``path`` imports or reaches as attributes
    of an imported module (``from jobs import ingest; ingest._init_ray(...)``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    ours = ("ciea_model", "pipelines", "jobs")
    bad, module_aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ours:
            for a in node.names:
                if a.name.startswith("_"):
                    bad.append(f"{path.name}:{node.lineno} imports {node.module}.{a.name}")
                module_aliases.add(a.asname or a.name)  # may be a module: check its attributes
            if any(part.startswith("_") for part in node.module.split(".")):
                bad.append(f"{path.name}:{node.lineno} imports private module {node.module}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ours:
                    module_aliases.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in module_aliases):
            bad.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return bad


def test_bench_uses_only_public_names():
    bad = [v for path in _modules("bench") for v in _private_uses(path)]
    assert bad == [], "bench/ must call public functions only:\n" + "\n".join(bad)


def test_the_rule_checker_sees_what_it_should(tmp_path):
    """The checkers are not vacuous: a planted upward import and a private call are found."""
    fake = REPO / "pipelines" / "_folder_rule_probe.py"
    assert not fake.exists()
    try:
        fake.write_text("def f():\n    from jobs.common import init_ray\n    return init_ray\n")
        assert any("_folder_rule_probe" in v for v in _violations("pipelines", ("jobs",)))
    finally:
        fake.unlink()
    probe = tmp_path / "probe.py"
    probe.write_text("from jobs import ingest\nfrom pipelines.x import _hidden\n\ningest._init_ray(1)\n")
    found = _private_uses(probe)
    assert any("ingest._init_ray" in v for v in found) and any("_hidden" in v for v in found)


def test_test_modules_have_unique_basenames():
    """pytest imports test files by basename (no packages under tests/): two tiers with a
    ``test_x.py`` each make collection fail with "import file mismatch" on a clean checkout."""
    seen: dict[str, list[str]] = {}
    for path in (REPO / "tests").rglob("*.py"):
        if "__pycache__" not in path.parts:
            seen.setdefault(path.name, []).append(str(path.relative_to(REPO)))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1 and name != "conftest.py"}
    assert clashes == {}, f"rename one of each pair: {clashes}"
