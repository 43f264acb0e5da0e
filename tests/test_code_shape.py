"""The package's shape (docs/architecture.md): no import loop between its modules, modules of one
concern (at most ~500 lines), functions that fit on a screen (at most 80 lines of body; a CLI
command's option list is its signature, not its body), and docstrings that cite only documents of
this repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "msif"
MAX_FILE_LINES = 500
MAX_BODY_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its file (top level or in a function;
    not under ``if TYPE_CHECKING``)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for t in ast.walk(tree) if isinstance(t, ast.If) and ast.unparse(t.test) == "TYPE_CHECKING"
                   for s in t.body for n in ast.walk(s)}  # annotations only: no import at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            root = base[: len(base) - node.level + 1] if node.level else []
            mod = ".".join(root + (node.module.split(".") if node.module else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("msif"):
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_loop_between_modules():
    modules = _modules()
    # a package's __init__ re-exporting its own modules is not a loop of concerns
    graph = {n: {m for m in _imports(n, p, modules) if not (p.name == "__init__.py" and m.startswith(n + "."))
                 and not (m == n.rpartition(".")[0] and modules[m].name == "__init__.py")}
             for n, p in modules.items()}
    assert _cycles(graph) == []


def test_the_checks_can_fail():
    """The loop finder finds a planted loop, and the body measure counts a long function."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    src = "def f(\n    x=1,\n    y=2,\n):\n    '''doc'''\n" + "    x += 1\n" * 90 + "    return x\n"
    (fn,) = ast.parse(src).body
    assert _body_lines(fn) == 91


def _body_lines(fn: ast.FunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    return 0 if not body else fn.end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_file_and_function_sizes(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path.name}: {len(text.splitlines())} lines; split it by concern"
    long = [(n.name, _body_lines(n)) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(n) > MAX_BODY_LINES]
    assert not long, f"functions over {MAX_BODY_LINES} lines of body: {long}; split them into named stages"


def test_docstrings_cite_documents_of_the_repository():
    cited = set()
    for p in PACKAGE.rglob("*.py"):
        text = p.read_text()
        cited |= set(re.findall(r"\bdocs/[\w./-]+\.md\b", text))  # docs/method.md, docs/architecture.md, …
        cited |= set(re.findall(r"\b(?:PAPER_NOTES|DESIGN|STYLE)\b(?:\.md)?", text))  # notes kept outside the repository
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, f"cited but not in the repository: {missing}"
