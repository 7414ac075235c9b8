"""The README stays true to the code: its Python snippets parse and import names that exist, and every command
and option of its command-line summary is one the CLI accepts."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from detot_agent.cli.app import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def _command_lines() -> list[str]:
    block = README.split("## Command line", 1)[1].split("```", 2)[1]
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if line.startswith("detot "):
            if current:
                lines.append(current)
            current = line
        elif line.strip() and current:
            current += " " + line.strip()
    return [*lines, current] if current else lines


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippets_parse_and_import_names_that_exist(snippet):
    tree = ast.parse(snippet)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("detot_agent"):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"README imports {missing} from {node.module}, which has no such name"


def test_every_readme_command_and_option_exists():
    lines = _command_lines()
    assert len(lines) >= 10
    runner = CliRunner()
    for line in lines:
        for variant in line.split(" | "):  # "detot eval report DIR | detot eval methods"
            words = variant.removeprefix("detot ").split()
            path = []
            for w in words:  # the command path: leading lower-case words that are not arguments
                if not re.fullmatch(r"[a-z][a-z-]*", w) or w == "COMMAND":
                    break
                path.append(w)
            helped = runner.invoke(app, [*path, "--help"], terminal_width=200)
            assert helped.exit_code == 0, (path, helped.output)
            text = " ".join(helped.output.split())
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-k)\b", variant):
                assert option in text, f"`detot {' '.join(path)}` has no option {option} (README: {variant!r})"


@pytest.mark.slow
def test_the_first_snippet_runs_verbatim_on_the_embedded_model_and_prints_a_sensible_answer(tmp_path):
    """The README's first snippet, as a new user pastes it: the embedded model, no set-up."""
    import os
    import subprocess
    import sys

    first = SNIPPETS[0]
    assert "local_lm()" in first  # the embedded default, nothing passed
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", first], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "Paris", done.stdout
