import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "astarpo"


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install -e '.[test]')")
def test_ruff_clean():
    res = subprocess.run(["ruff", "check", "src", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports, at the top or inside a function.

    Importing ``a.b.c`` runs ``a.b`` first, so that counts as importing both; but that a module's own packages
    run first closes no circle. A module reading a name from the package's own ``__init__`` (``from . import
    __version__``) does count: it works only while ``__init__`` defines the name above the line that imports the
    module. A sub-package's plugin registry (its modules reading its ``register``) is left out.
    """
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets, read_from_root = set(), False
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0]
                target = f"{base}.{node.module}" if node.module else base
                names = {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
                read_from_root |= PACKAGE.name in names
                targets |= names
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE.name}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE.name:
                targets.add(node.module)
        targets |= {t.rsplit(".", i)[0] for t in targets for i in range(1, t.count(".") + 1)}
        graph[name] = {t for t in targets if t in modules and not (name + ".").startswith(t + ".")}
        if read_from_root and name != PACKAGE.name:
            graph[name].add(PACKAGE.name)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Circles in ``graph``, each a path that starts and ends at the same module; at least one wherever any is."""
    cycles, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    return cycles


def test_import_graph_sees_function_level_imports():
    graph = import_graph()
    assert "astarpo.bench.plan" in graph["astarpo.cli"]  # imported inside main()
    assert "astarpo.rewards.math" in graph["astarpo.data"] and "astarpo.rewards" in graph["astarpo.data"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    """A circle works only while every import in it stays inside a function or below the names it needs; the
    next top-level import breaks it. One module owns each shared name instead."""
    cycles = import_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


PIPELINE = ("training/trainer", "values", "evaluate", "distributed")


def test_the_pipeline_asks_the_sampler_not_the_engine_name():
    """Stage 1, Stage 2, evaluation and the strategies ask the engine's class what it can do (uses_policy,
    owns_weights, can_sleep, ...): a test of ``cfg.engine`` or ``cfg.vllm_mode`` there would need an edit for every
    new engine."""
    offenders = []
    for name in PIPELINE:
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.Compare):
                names = [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)]
                if {"engine", "vllm_mode"} & set(names):
                    offenders.append(f"{name}.py:{node.lineno}")
    assert not offenders, offenders


def test_the_stage_2_loop_stays_one_short_file():
    """trainer.py holds the loop a reader looks for; what grows beside it (metrics, logging, the layout) lives in
    the modules it calls."""
    assert len((PACKAGE / "training" / "trainer.py").read_text().splitlines()) <= 250
