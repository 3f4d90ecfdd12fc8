"""The folder rules, read from the source (every import statement, top level or inside a
function): ``ciea_model`` imports nothing of ``pipelines``, ``jobs`` or Ray (the import-time
side is ``test_model_isolation``); ``pipelines`` imports nothing of ``jobs`` or ``bench``, and
its phases meet only through ``pipelines/store`` (plus the arrows :data:`PHASE_ARROWS`
declares); ``bench`` uses no private (``_``) name of another package; nothing imports
``tests``. The checks read a tree's files and write nothing into the repository."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ciea_model", "pipelines", "jobs", "bench")


def _modules(package: str, root: Path = REPO) -> list[Path]:
    return sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path, root: Path = REPO) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in ``path``; relative imports are
    resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
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


def _violations(package: str, forbidden: tuple[str, ...], root: Path = REPO) -> list[str]:
    bad = []
    for path in _modules(package, root):
        for line, module, _ in _imports(path, root):
            if module.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(root)}:{line} imports {module}")
    return bad


#: The phases of ``pipelines/`` and the other phases each may import besides ``store``
#: (where all of them meet): the query phase's scoring is what training's dev evaluation,
#: the re-index gate and the page call. Anything else crossing phases is a violation.
PHASE_ARROWS: dict[str, set[str]] = {
    "store": set(), "ingest": set(), "query": set(),
    "train": {"query"}, "index": {"query"}, "web": {"query"},
}


def _phase_violations(root: Path = REPO) -> list[str]:
    bad = []
    for path in _modules("pipelines", root):
        parts = path.relative_to(root).parts
        own = parts[1] if len(parts) > 2 else None
        for line, module, _ in _imports(path, root):
            m = module.split(".")
            if m[0] != "pipelines" or len(m) < 2 or m[1] not in PHASE_ARROWS or own is None:
                continue
            if m[1] not in (own, "store") and m[1] not in PHASE_ARROWS.get(own, set()):
                bad.append(f"{path.relative_to(root)}:{line} imports {module} (phase {own} → {m[1]})")
    return bad


def test_phases_meet_only_through_the_store():
    assert set(PHASE_ARROWS) == {p.name for p in (REPO / "pipelines").iterdir()
                                 if p.is_dir() and p.name != "__pycache__"}, "a new phase needs its arrows"
    assert _phase_violations() == []


def _cycles(root: Path = REPO) -> list[tuple[str, str]]:
    """Pairs of ``pipelines`` modules that import each other (any import, typing included)."""
    edges: dict[str, set[str]] = {}
    for path in _modules("pipelines", root):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        edges[name] = {m for _, m, names in _imports(path, root) for m in (m, *(f"{m}.{n}" for n in names))}
    return sorted((a, b) for a in edges for b in edges.get(a, ()) if b in edges and a < b and a in edges[b])


def test_no_two_modules_import_each_other():
    assert _cycles() == []


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
    """The checkers are not vacuous: a planted upward import, a phase crossing, a cycle and
    a private call are found — in a tree under ``tmp_path``, never in the repository."""
    tree = tmp_path / "tree"
    (tree / "pipelines" / "train").mkdir(parents=True)
    (tree / "pipelines" / "index").mkdir()
    (tree / "pipelines" / "train" / "probe.py").write_text(
        "def f():\n    from jobs.common import init_ray\n    from pipelines.ingest.sources import x\n"
        "    from pipelines.query.evaluation import rank\n    return init_ray\n")
    (tree / "pipelines" / "index" / "a.py").write_text("from .b import B\n")
    (tree / "pipelines" / "index" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                       "    from .a import A\n")
    assert any("probe" in v for v in _violations("pipelines", ("jobs",), tree))
    assert [v.split(" (")[1] for v in _phase_violations(tree)] == ["phase train → ingest)"]
    assert _cycles(tree) == [("pipelines.index.a", "pipelines.index.b")]
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
