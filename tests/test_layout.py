"""The package's shape: a cheap `import detot_agent`, imports that flow one way, one error family."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import detot_agent

PACKAGE = Path(detot_agent.__file__).parent

# what each room may import from the package (ARCHITECTURE.md, "Rules of the road")
ALLOWED = {
    "answers": set(),
    "config": {"errors"},
    "errors": set(),
    "_lazy": set(),
    "testing": set(),
    "io": {"io", "answers", "config", "errors"},
    "softprompt": {"softprompt", "io", "config", "errors"},
    "embedding": {"embedding", "softprompt", "io", "config", "errors"},
    "retrieval": {"retrieval", "embedding", "softprompt", "io", "config", "errors"},
    "engines": {"engines", "softprompt", "io", "config", "errors"},
    "detot": {"detot", "engines", "retrieval", "embedding", "softprompt", "io", "answers", "config", "errors"},
    "fit": {"fit", "detot", "engines", "retrieval", "embedding", "softprompt", "io", "answers", "config", "errors"},
    "evaluation": {"evaluation", "detot", "engines", "retrieval", "embedding", "softprompt", "io", "answers", "config",
                   "errors"},
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    """The package modules a file imports, deprecation shims aside (see `_is_deprecation_shim`)."""
    tree = ast.parse(path.read_text())
    found = []
    shims = [n for n in tree.body if _is_deprecation_shim(n)]
    skip = {id(node) for shim in shims for node in ast.walk(shim)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("detot_agent"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("detot_agent")]
    return found


def test_imports_flow_one_way():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        room = _room(".".join(rel.parts))
        if room in ("__init__", "__main__", "cli"):
            continue  # the top of the house may import anything
        allowed = ALLOWED[room]
        for target in _imports(path):
            if _room(target) not in allowed and target != "detot_agent._lazy":
                offences.append(f"{rel}: imports {target}")
    assert offences == []


def test_the_rule_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from detot_agent.detot.module import DETOT\n")
    assert _room(_imports(bad)[0]) not in ALLOWED["engines"]


HEAVY = ("torch", "transformers", "dspy", "faiss", "sentence_transformers")


@pytest.mark.parametrize("code", ["import detot_agent", "import detot_agent.cli.app"])
def test_importing_the_package_or_the_cli_loads_no_heavy_library(code):
    probe = f"import sys; {code}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_public_names_resolve_and_unknown_ones_fail():
    for name in detot_agent.__all__:
        assert getattr(detot_agent, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = detot_agent.Nope


def test_every_error_class_in_the_package_derives_from_detot_error():
    import importlib

    classes = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
                classes.append(getattr(importlib.import_module(module), node.name))
    assert len(classes) >= 12
    assert [c.__name__ for c in classes if not issubclass(c, detot_agent.DetotError)] == []


# ---- every raise is one of ours ---------------------------------------------------------------------------------
# What may be raised that is not a `DetotError`, and why (nothing else):
PROTOCOL = {
    "NotImplementedError": "an abstract hook of a base class",
    "AttributeError": "only from __getattr__ (Python's attribute protocol)",
    "AdapterParseError": "DSPy's own error: its adapters' contract (DSPy retries and falls back on it)",
    "SystemExit": "only in cli/: the command's exit status",
    "BadParameter": "only in cli/: typer's error for a bad command-line value",
}


def _raised_name(node: ast.Raise) -> str | None:
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    if exc is None:
        return None  # a bare `raise` re-raises what was caught
    if isinstance(exc, ast.Attribute):
        return exc.attr
    return exc.id if isinstance(exc, ast.Name) else "<expression>"


def _raises(path: Path) -> list[tuple[str, str, int]]:
    """(raised name, enclosing function, line) for every `raise` of a class (not of a caught variable)."""
    tree = ast.parse(path.read_text())
    found = []

    def walk(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            if isinstance(child, ast.Raise):
                name = _raised_name(child)
                if name is not None and not name[:1].islower():  # `raise exc`: a caught value, re-raised
                    found.append((name, func, child.lineno))
            walk(child, inner)

    walk(tree, "")
    return found


def _private_signals(path: Path) -> set[str]:
    """Exceptions a module defines for its own control flow: `_Name(Exception)`, never leaving the module."""
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.startswith("_")
            and any(isinstance(b, ast.Name) and b.id == "Exception" for b in n.bases)}


def _offences(path: Path, ours: set[str]) -> list[str]:
    rel = path.relative_to(PACKAGE.parent)
    in_cli = rel.parts[1] == "cli"
    signals = _private_signals(path)
    bad = []
    for name, func, line in _raises(path):
        if name in ours or name in signals:
            continue
        if name == "AttributeError" and func == "__getattr__":
            continue
        if name in ("NotImplementedError", "AdapterParseError") or (in_cli and name in ("SystemExit", "BadParameter")):
            continue
        bad.append(f"{rel}:{line}: raise {name}")
    return bad


def _our_errors() -> set[str]:
    """Names of every `DetotError` subclass the package defines (in `errors.py` or beside its code)."""
    import importlib

    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        classes = [n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]
        if not classes:
            continue
        module = importlib.import_module(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        found |= {c for c in classes if isinstance(getattr(module, c, None), type)
                  and issubclass(getattr(module, c), detot_agent.DetotError)}
    return found


def test_every_raise_in_the_package_is_a_detot_error_or_a_listed_protocol():
    ours = _our_errors()
    offences = [o for path in sorted(PACKAGE.rglob("*.py")) for o in _offences(path, ours)]
    assert offences == [], f"raise a DetotError subclass instead (allowed otherwise: {PROTOCOL})"


def test_the_raise_check_catches_a_bare_value_error(tmp_path):
    bad = PACKAGE / "detot" / "_probe_raise.py"  # a file inside the package, so its room is known
    try:
        bad.write_text("class _Stop(Exception):\n    pass\n\n\ndef f(x):\n    if x:\n        raise _Stop\n"
                       "    raise ValueError('no')\n\n\ndef __getattr__(name):\n    raise AttributeError(name)\n")
        assert _offences(bad, _our_errors()) == ["detot_agent/detot/_probe_raise.py:8: raise ValueError"]
    finally:
        bad.unlink()


# ---- no import circle between two files -------------------------------------------------------------------------
def _is_deprecation_shim(node: ast.AST) -> bool:
    """A module-level `__getattr__` that warns `DeprecationWarning`: it serves a moved name from its new home
    (saved programs and pickles name the old path), so its import points the way the name moved."""
    return (isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
            and any(isinstance(n, ast.Name) and n.id == "DeprecationWarning" for n in ast.walk(node)))


def _edges(source: str) -> set[str]:
    """Every package module a file imports (top of file, inside functions, under TYPE_CHECKING), except
    from a deprecation shim."""
    tree = ast.parse(source)
    found: set[str] = set()
    for top in tree.body:
        if _is_deprecation_shim(top):
            continue
        for node in ast.walk(top):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("detot_agent"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("detot_agent")}
    return found


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = _edges(path.read_text())
    return graph


def _circles(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs of modules that import each other (at any level: top of file or inside a function)."""
    return sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                   if a != b and a in graph.get(b, set()) and not b.endswith("__init__")
                   and b != "detot_agent" and a != "detot_agent"})  # type: ignore[misc]


def test_no_two_files_import_each_other():
    assert _circles(_module_graph()) == []


def test_the_circle_check_catches_a_pair_and_only_exempts_a_warning_shim():
    assert _circles({"detot_agent.a": {"detot_agent.b"}, "detot_agent.b": {"detot_agent.a"},
                     "detot_agent.c": {"detot_agent.a"}}) == [("detot_agent.a", "detot_agent.b")]
    lazy = "def f():\n    from detot_agent.b import X\n    return X\n"
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from detot_agent.b import X\n"
    shim = ("import warnings\ndef __getattr__(name):\n    warnings.warn('moved', DeprecationWarning)\n"
            "    from detot_agent.b import X\n    return X\n")
    silent = "def __getattr__(name):\n    from detot_agent.b import X\n    return X\n"
    assert _edges(lazy) == _edges(typing_only) == _edges(silent) == {"detot_agent.b"}
    assert _edges(shim) == set()


# ---- the public API: what a user builds or catches ----------------------------------------------------------------
def test_the_public_api_is_what_users_build_or_catch_and_plumbing_still_resolves_with_a_warning():
    public = set(detot_agent.__all__)
    assert 30 <= len(public) <= 45, len(public)
    errors = {n for n in public if n.endswith("Error")}
    import detot_agent.errors as family

    assert errors == {n for n in family.__all__}  # every error is catchable from the top level
    for name in ("Controller", "TaskState", "Monitor", "PromptHead", "Sample", "AsyncLocalEngine", "vote"):
        assert name not in public
        with pytest.warns(DeprecationWarning, match=f"from detot_agent import {name}` is deprecated"):
            obj = getattr(detot_agent, name)
        assert obj is not None


# ---- files stay small: one role each ----------------------------------------------------------------------------
MAX_LINES = 420  # "about 400": a file past it holds more than one role (split it, as module.py and controller.py were)


def _too_long(paths: list[Path], limit: int = MAX_LINES, base: Path = PACKAGE.parent) -> list[str]:
    return [f"{p.relative_to(base)}: {n} lines" for p in paths if (n := len(p.read_text().splitlines())) > limit]


def test_no_file_in_the_package_is_over_about_400_lines():
    assert _too_long(sorted(PACKAGE.rglob("*.py"))) == []


def test_the_size_check_catches_a_long_file(tmp_path):
    long = tmp_path / "long.py"
    long.write_text("x = 1\n" * (MAX_LINES + 1))
    short = tmp_path / "short.py"
    short.write_text("x = 1\n" * MAX_LINES)
    assert _too_long([long, short], base=tmp_path) == [f"long.py: {MAX_LINES + 1} lines"]
