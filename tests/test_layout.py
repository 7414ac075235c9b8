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
    "evaluation": {"evaluation", "detot", "engines", "retrieval", "embedding", "softprompt", "io", "answers", "config",
                   "errors"},
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
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
