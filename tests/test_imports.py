"""The import graph of the suite: no cycle, and no library module importing a script.

A script is a top-level module with an `if __name__ == "__main__":` block (the forget scripts,
pretraining, the driver and its worker, tables, sweeps); every other top-level module is a library.
Imports are read with ast at any depth: an import inside a function is an arrow too.
"""
import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_graph(root: Path) -> tuple[dict[str, set[str]], set[str]]:
    """module -> the suite modules it imports, and the set of scripts, for the top-level modules of `root`."""
    trees = {p.stem: ast.parse(p.read_text()) for p in sorted(root.glob("*.py"))}
    graph = {}
    for name, tree in trees.items():
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = imported & set(trees) - {name}
    scripts = {name for name, tree in trees.items() if any(_is_main_guard(node) for node in tree.body)}
    return graph, scripts


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def problems(root: Path) -> list[str]:
    graph, scripts = import_graph(root)
    found = []
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        found.append(f"import cycle: {' -> '.join(e.args[1])}")
    for library in sorted(set(graph) - scripts):
        found += [f"library module {library} imports the script {s}" for s in sorted(graph[library] & scripts)]
        text = (root / f"{library}.py").read_text()
        found += [f"library module {library} imports by name at run time ({call})"
                  for call in ("import_module(", "__import__(", "runpy.") if call in text]
    return found


def test_the_suite_has_no_import_cycle_and_no_library_imports_a_script():
    graph, scripts = import_graph(ROOT)
    assert {"forget_full_class_main", "forget_sub_class_main", "forget_random_main", "experiments"} <= scripts
    assert {"runner", "cli", "cluster", "methods", "common"} <= set(graph) - scripts
    assert problems(ROOT) == []


@pytest.mark.parametrize("modules, expected", [
    ({"a": "import b\n", "b": "def f():\n    from a import x\n"}, "import cycle"),
    ({"lib": "import task\n", "task": "import lib\nif __name__ == '__main__':\n    lib.main()\n"},
     "library module lib imports the script task"),
    ({"lib": "import importlib\nP = importlib.import_module('task').P\n",
      "task": "P = 1\nif __name__ == '__main__':\n    pass\n"}, "imports by name at run time"),
])
def test_the_check_finds_a_cycle_a_script_import_and_a_hidden_import(tmp_path, modules, expected):
    for name, text in modules.items():
        (tmp_path / f"{name}.py").write_text(text)
    assert any(expected in p for p in problems(tmp_path)), problems(tmp_path)
