"""The package's shape: no import cycle, and the training daemon never imports the commands in prefix/tools/."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "prefix"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every prefix module → the prefix modules it imports, at the top or inside a function."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prefix"):
                for alias in node.names:  # `from prefix.runs import layout` names a module
                    target = f"{node.module}.{alias.name}"
                    found.add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("prefix")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_sees_the_imports_it_checks():
    graph = imports()
    assert {"prefix.trainer", "prefix.checkpoint", "prefix.state"} <= reachable(graph, "prefix.train")
    assert "prefix.tools.status" in graph["prefix.tools.report"]


def test_no_import_cycle():
    graph = imports()
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_training_imports_nothing_from_the_commands():
    graph = imports()
    daemon = reachable(graph, "prefix.train") | reachable(graph, "prefix.watchdog")
    assert not sorted(m for m in daemon if m.startswith("prefix.tools")), "prefix.train reaches prefix/tools/"


def test_the_training_path_does_not_import_transformers():
    """streaming imports transformers (~4 s of a start) for an isinstance check; prefix.data.compat avoids it,
    and a later `import transformers` is still the real one."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import prefix.train, prefix.trainer, prefix.data.loader, prefix.data.streams, prefix.data.leftovers\n"
            "from prefix.data.compat import StreamingDataset\n"
            "assert not [m for m in sys.modules if m.startswith('transformers')], 'transformers imported'\n"
            "from transformers.tokenization_utils_base import BatchEncoding\n"
            "assert hasattr(BatchEncoding, 'convert_to_tensors')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
