"""The package's import graph: no cycles, and no import hidden in a function
to dodge one.

The graph is read from the source with ``ast`` (no module is imported): an
edge ``a -> b`` for every ``import``/``from ... import`` of a flowcore module
``b`` at the top level of module ``a`` (``if TYPE_CHECKING:`` blocks do not
count, they never run).  ``from pkg import sub`` where ``sub`` is a
submodule is an edge to ``pkg.sub`` only: the package ``pkg`` itself is
already imported (as a parent) before any of its modules.

Imports inside functions are listed too.  Each must be in ``LAZY_ALLOWED``
with the reason it is lazy (an optional dependency, a heavy module a
process should not pay for at start, a process role's entry point); and
none may close a cycle (if hoisting it to the top would make one, the
layering is wrong and the module belongs lower or the code higher).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "flowcore"

# (importing module, imported module) -> why the import sits in a function.
_OPTIONAL = "needs an optional extra (or another library); the module imports without it"
_HEAVY = ("a heavy module (tornado, the client, the store, the dashboard) loaded on first "
          "use, so a process that never calls it does not pay for it at start")
_ROLE = "a command line entry point loads the process role it starts, when it starts it"
_PUBLIC = "flowcore/__init__.py: public names load on first use (see its docstring)"
_PRELOAD = ("imported by init() while the head and node processes it launched boot, not "
            "before launching them")
_PENDING = ("a light import not yet hoisted to the top of its module; it closes no cycle "
            "(test_no_function_level_import_dodges_a_cycle)")
LAZY_ALLOWED: dict[tuple[str, str], str] = {
    ("flowcore.node.cli", "flowcore.objects.mapping"): (
        "preloaded while the head boots, so workers forked from the node have it"),
    ("flowcore.node.cli", "flowcore.node.worker"): (
        "preloaded while the head boots, so workers forked from the node have it"),
    ("flowcore", "flowcore.actor"): _PUBLIC,
    ("flowcore", "flowcore.remote_function"): _PUBLIC,
    ("flowcore.api", "flowcore.protocol.comm"): _HEAVY,
    ("flowcore.api", "flowcore.runtime_context"): _HEAVY,
    ("flowcore.client.core", "flowcore.objects.serialization"): _PENDING,
    ("flowcore.client.object_io", "flowcore.objects.mapping"): _HEAVY,
    ("flowcore.client.object_io", "flowcore.objects.store"): _HEAVY,
    ("flowcore.client.inline", "flowcore.client.core"): _HEAVY,
    ("flowcore.cluster", "flowcore.objects.store"): _HEAVY,
    ("flowcore.cluster", "flowcore.protocol.comm"): _HEAVY,
    ("flowcore.dashboard", "flowcore.dashboard.app"): _HEAVY,
    ("flowcore.dashboard.app", "flowcore.dashboard"): _HEAVY,
    ("flowcore.dashboard.app", "flowcore.graph.draw"): _OPTIONAL,
    ("flowcore.dashboard.app", "flowcore.scheduler.export"): _HEAVY,
    ("flowcore.graph.visualize", "flowcore.graph.draw"): _OPTIONAL,
    ("flowcore.job_submission.cli", "flowcore.job_submission.client"): _ROLE,
    ("flowcore.job_submission.client", "flowcore.client.core"): _HEAVY,
    ("flowcore.job_submission.supervisor", "flowcore.job_submission.runner"): _HEAVY,
    ("flowcore.node.cli", "flowcore.node.server"): _ROLE,
    ("flowcore.node.cli", "flowcore.private_files"): _ROLE,
    ("flowcore.node.packages", "flowcore.private_files"): _PENDING,
    ("flowcore.node.procs", "flowcore.node.worker"): _ROLE,
    ("flowcore.node.procs", "flowcore.private_files"): _ROLE,
    ("flowcore.node.server", "flowcore.exceptions"): _PENDING,
    ("flowcore.node.server", "flowcore.objects.serialization"): _PENDING,
    ("flowcore.node.server", "flowcore.objects.store"): _HEAVY,
    ("flowcore.node.server", "flowcore.protocol.comm"): _HEAVY,
    ("flowcore.node.worker", "flowcore.api"): (
        "preload(): the node imports the API tasks call before forking workers"),
    ("flowcore.node.worker", "flowcore.client.inline"): _HEAVY,
    ("flowcore.node.worker", "flowcore.exceptions"): _PENDING,
    ("flowcore.node.worker", "flowcore.ids"): _PENDING,
    ("flowcore.node.worker", "flowcore.node.actor_listener"): _HEAVY,
    ("flowcore.node.worker", "flowcore.node.output"): _PENDING,
    ("flowcore.node.worker", "flowcore.objects.generator"): _PENDING,
    ("flowcore.node.worker", "flowcore.objects.serialization"): _PENDING,
    ("flowcore.node.worker", "flowcore.protocol.comm"): _HEAVY,
    ("flowcore.node.worker", "flowcore.protocol.tls"): _PENDING,
    ("flowcore.node.worker", "flowcore.remote_function"): _PENDING,
    ("flowcore.node.worker", "flowcore.runtime_context"): _PENDING,
    ("flowcore.scheduler.cli", "flowcore.dashboard"): _ROLE,
    ("flowcore.scheduler.cli", "flowcore.scheduler.persist"): _ROLE,
    ("flowcore.scheduler.cli", "flowcore.scheduler.server"): _ROLE,
    ("flowcore.scheduler.cli", "flowcore.scheduler.machine"): _ROLE,
    ("flowcore.scheduler.machine", "flowcore.objects.serialization"): _PENDING,
    ("flowcore.scheduler.packages", "flowcore.runtime_env"): _PENDING,
    ("flowcore.scheduler.server", "flowcore.scheduler.explain"): _HEAVY,
    ("flowcore.scheduler.server", "flowcore.scheduler.export"): _HEAVY,
    ("flowcore.serve.api", "flowcore.serve.controller"): _OPTIONAL,
    ("flowcore.serve.api", "flowcore.serve.proxy"): _OPTIONAL,
    ("flowcore.serve.api", "flowcore.serve.replica"): _OPTIONAL,
    ("flowcore.serve.controller", "flowcore.serve.proxy"): _OPTIONAL,
    ("flowcore.serve.controller", "flowcore.serve.replica"): _OPTIONAL,
    ("flowcore.session", "flowcore.client.core"): _HEAVY,
    ("flowcore.session", "flowcore.cluster"): _HEAVY,
    ("flowcore.session", "flowcore.objects.serialization"): _HEAVY,
    ("flowcore.session", "flowcore.objects.generator"): _PRELOAD,
    ("flowcore.session", "flowcore.objects.ref"): _PRELOAD,
    ("flowcore.session", "flowcore.options"): _PRELOAD,
    ("flowcore.session", "flowcore.scheduling"): _PRELOAD,
    ("flowcore.session", "flowcore.runtime_env"): _HEAVY,
    ("flowcore.session", "flowcore.protocol.tls"): _HEAVY,
    ("flowcore.train.trainer", "flowcore.data"): _OPTIONAL,
    ("flowcore.tune.search", "flowcore.tune.search.optuna"): _OPTIONAL,
}

# Function-level imports that do close a cycle, each with why it stays for now.
_DATA_MODEL = ("Dataset builds iterators and grouped views, and their operations return new "
               "Datasets (read_api builds them): the two-way relation of the data model")
KNOWN_CYCLE_BREAKS: dict[tuple[str, str], str] = {
    ("flowcore.data.iterator", "flowcore.data.read_api"): _DATA_MODEL,
    ("flowcore.data.grouped", "flowcore.data.read_api"): _DATA_MODEL,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _targets(mods: dict[str, Path], current: str, is_pkg: bool,
             node: ast.Import | ast.ImportFrom) -> list[str]:
    found: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = current.split(".") if is_pkg else current.split(".")[:-1]
            if node.level > 1:
                base = base[:-(node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
        names = subs if len(subs) == len(node.names) else subs + [module]
    for name in names:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in mods and name != current and name.startswith("flowcore"):
            found.append(name)
    return found


@lru_cache(maxsize=1)
def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(top-level edges, function-level imports as (module, target, line))."""
    mods = _modules()
    top: dict[str, set[str]] = defaultdict(set)
    lazy: list[tuple[str, str, int]] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(mods, name, is_pkg, child):
                        if in_function:
                            lazy.append((name, target, child.lineno))
                        else:
                            top[name].add(target)
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    visit(child, True)
                elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                else:
                    visit(child, in_function)

        visit(tree, False)
    return top, lazy


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _reaches(graph: dict[str, set[str]], src: str, dst: str) -> bool:
    seen, todo = {src}, [src]
    while todo:
        v = todo.pop()
        if v == dst:
            return True
        for w in graph.get(v, ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return False


def _allowed(module: str, target: str) -> bool:
    return (module, target) in LAZY_ALLOWED or (module, target) in KNOWN_CYCLE_BREAKS


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    top, _ = import_graph()
    assert "flowcore.api" in top, "the graph reader found no modules"
    found = cycles(top)
    assert not found, ("import cycles among flowcore modules (top-level imports): "
                       + "; ".join(" <-> ".join(c) for c in found)
                       + ". Move the shared part into a lower module")


def test_no_function_level_import_dodges_a_cycle() -> None:
    top, lazy = import_graph()
    dodging = sorted({f"{m}:{line} imports {t}" for m, t, line in lazy
                      if _reaches(top, t, m) and (m, t) not in KNOWN_CYCLE_BREAKS})
    assert not dodging, ("imports placed inside functions only because a top-level import "
                         "would close a cycle: " + "; ".join(dodging))


def test_allowlists_hold_no_stale_entries() -> None:
    _, lazy = import_graph()
    present = {(m, t) for m, t, _ in lazy}
    stale = sorted(set(LAZY_ALLOWED) - present) + sorted(set(KNOWN_CYCLE_BREAKS) - present)
    assert not stale, f"allowlisted lazy imports that no longer exist (remove them): {stale}"


def test_function_level_imports_are_justified() -> None:
    _, lazy = import_graph()
    unlisted = sorted({f"{m}:{line} imports {t}" for m, t, line in lazy if not _allowed(m, t)})
    assert not unlisted, ("function-level imports of flowcore modules not in "
                          "tests/test_import_layers.py LAZY_ALLOWED (import at the top, or "
                          "add the pair with the reason it must be lazy): "
                          + "; ".join(unlisted))
