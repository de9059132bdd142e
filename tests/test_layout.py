"""The package's shape: no import circle among the modules of pyibp/, and a training method's name
written in one registry (a name that only names a training method appears, quoted, in at most two
package files: its registration and the recipe's preset table)."""
import ast
import re
from pathlib import Path

import pyibp
from pyibp import attacks, evaluation
from pyibp.training import method_names

PACKAGE = Path(pyibp.__file__).resolve().parent


def _modules():
    """{dotted name: path} of every .py module of the package, and the names of its compiled ones."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    compiled = {"pyibp." + p.name.split(".")[0] for p in PACKAGE.glob("*.so")} | {"pyibp._C"}
    return modules, compiled


def _imports(name, path, modules, compiled):
    """The package modules ``name`` imports anywhere in its file (function-level imports included):
    ``from X import y`` is X.y when that is a module, else X."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules or f"{base}.{a.name}" in compiled
                       else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return components


def test_no_import_circle_among_the_modules():
    modules, compiled = _modules()
    graph = {name: _imports(name, path, modules, compiled) for name, path in modules.items()}
    assert {"pyibp.models", "pyibp.training"} <= graph["pyibp.runs.recipe"]   # it sees the imports
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]   # and finds circles
    assert _cycles(graph) == []


def test_a_training_method_name_is_written_in_at_most_two_package_files():
    other_names = set(evaluation.METHODS) | set(attacks.__all__) | set(attacks.VERSIONS)
    names = [m for m in method_names() if m not in other_names]
    assert {"mtl-ibp", "cc-ibp", "sabr"} <= set(names)
    sources = {path: path.read_text() for path in PACKAGE.rglob("*.py")}
    for name in names:
        quoted = re.compile(rf"[\"']{re.escape(name)}[\"']")
        files = sorted(str(p.relative_to(PACKAGE)) for p, text in sources.items() if quoted.search(text))
        assert len(files) <= 2, (name, files)
