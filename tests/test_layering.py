"""Imports point one way: cli → pipeline/eval/distributed → serialization → api → algorithms/baselines → nn →
kernels → numerics; ``models/`` (adapters as data, the embedded model) imports none of them: api, pipeline and
eval read it."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dvdquant"
RANK = {"models": -1, "numerics": 0, "kernels": 1, "nn": 2, "algorithms": 3, "baselines": 3, "api": 5,
        "serialization": 6, "pipeline": 7, "eval": 7, "distributed": 7, "cli": 8}
LEAVES = {"errors", "config", "data", "fileio", "_version", "__init__"}   # importable from anywhere (no internal imports upward)


def _internal_imports(path: Path):
    tree = ast.parse(path.read_text())
    pkg_parts = path.relative_to(SRC).parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = list(pkg_parts[: len(pkg_parts) - node.level + 1])
            mod = base + (node.module.split(".") if node.module else [])
            if mod:
                yield mod[0], node.lineno
            else:
                for alias in node.names:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dvdquant."):
            yield node.module.split(".")[1], node.lineno


def _layer(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0] if len(rel) > 1 else rel[0][:-3]


def test_imports_point_one_way():
    bad = []
    for path in SRC.rglob("*.py"):
        me = _layer(path)
        if me in LEAVES or me not in RANK:
            continue
        for target, line in _internal_imports(path):
            if target in LEAVES or target == me or target not in RANK:
                continue
            if RANK[target] > RANK[me]:
                bad.append(f"{path.relative_to(SRC)}:{line} ({me}) imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_numerics_and_kernels_never_import_diffusers():
    for sub in ("numerics", "kernels"):
        for path in (SRC / sub).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n.split(".")[0] == "diffusers" for n in names), f"{path}:{node.lineno}"


def test_eval_modules_import_without_cycles():
    """Inside eval/, imports form no cycle (report may import quality's tables, quality never imports report)."""
    graph = {}
    for path in (SRC / "eval").glob("*.py"):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dvdquant.eval."):
                deps.add(node.module.split(".")[2])
        graph[path.stem] = {d.split(".")[0] for d in deps} - {path.stem}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, seen + (d,))) for d in graph.get(start, ()))
    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, f"eval modules in an import cycle: {cycles}"
    assert not reaches("quality", "report")
