"""The README and the docs site stay true to the code: their Python snippets parse, import names that exist and
run verbatim; every command and option of the command-line reference is one the CLI accepts; the README stays
a landing page; every results page says how to regenerate it."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from detot_agent.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
# the pages whose snippets a reader runs in this order (the nav's order), after the README's own
GUIDES = ["getting-started.md", "guides/dspy.md", "guides/detot-module.md", "guides/task-embedding.md",
          "guides/loop.md", "guides/retrieval.md", "guides/soft-prompts.md", "guides/evaluation.md",
          "guides/scale-out.md", "guides/troubleshooting.md"]
CLI = (DOCS / "reference" / "cli.md").read_text()


def _snippets(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


README_SNIPPETS = _snippets(README)
SNIPPETS = [*README_SNIPPETS]
for _page in GUIDES:  # a guide repeating a README snippet verbatim runs once
    SNIPPETS += [s for s in _snippets((DOCS / _page).read_text()) if s not in SNIPPETS]


def _command_lines() -> list[str]:
    block = CLI.split("# Command line", 1)[1].split("```", 2)[1]
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
            assert not missing, f"the docs import {missing} from {node.module}, which has no such name"


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
                assert option in text, f"`detot {' '.join(path)}` has no option {option} (docs: {variant!r})"


@pytest.mark.slow
def test_the_snippets_run_verbatim_in_order_on_the_embedded_model(tmp_path):
    """The README's snippets, then the guides', pasted in order into one Python session, as a new user would, on
    a fresh checkout's layout (`../shared` beside the working folder): no set-up, the embedded model."""
    import os
    import subprocess
    import sys

    shared = Path(__file__).resolve().parents[2] / "shared"
    if not (shared / "data" / "gsm8k" / "train.jsonl").is_file():
        pytest.skip("../shared/data is not beside the repository")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(shared)
    script = "\n".join(f"print('--- snippet {i}', flush=True)\n{code}" for i, code in enumerate(SNIPPETS))
    assert "local_lm()" in SNIPPETS[0]  # the embedded default, nothing passed
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = {int(part.split("\n", 1)[0]): part.split("\n", 1)[1].strip().splitlines()
           for part in done.stdout.split("--- snippet ")[1:]}
    assert out[0][-1] == "Paris", out[0]  # a sensible answer from the embedded model
    answer, agreement = out[1][-1].split()[:2]  # one DETOT call: answer, agreement, votes, ...
    assert answer == "positive" and 0.5 <= float(agreement) <= 1  # a task the embedded model can do
    said = {line for lines in out.values() for line in lines}
    version = next(line for line in said if line.startswith("restored version")).split()
    assert version[2] == version[4], version  # a parent's save and load kept DETOT's learned version
    assert "cached True" in said  # the README's call again, from DSPy's cache
    streamed = next(lines for lines in out.values() if any(line.startswith("prediction ") for line in lines))
    assert streamed[0].startswith("chunk ") and streamed[-1].startswith("prediction ")  # chunks came first
    before, _, after = out[len(SNIPPETS) - 1][-1].partition(" -> ")  # soft-prompt tuning lowered the val loss
    assert float(after) <= float(before)
    for made in ("runs/detot.json", "runs/events.jsonl", "runs/sentiment-te", "runs/gsm8k-index", "runs/arith-sp",
                 "runs/arith-peft"):
        assert (work / made).exists(), made


def test_the_readme_is_a_landing_page_with_the_two_commands_and_two_snippets():
    assert len(README.encode()) <= 12_000, f"README.md is {len(README.encode())} bytes; move detail to docs/"
    assert "make demo" in README and "make test" in README
    assert len(README_SNIPPETS) == 2 and "local_lm()" in README_SNIPPETS[0] and "DETOT(" in README_SNIPPETS[1]
    # every figure it keeps sits beside a link to its results page
    assert "docs/results/accuracy-300.md" in README


def test_every_readme_link_to_the_docs_resolves():
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert links, "the README links to no docs page"
    assert [link for link in links if not (ROOT / link).is_file()] == []


def _command_blocks(text: str) -> list[str]:
    return [b for b in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S)
            if re.search(r"(?m)^\s*(detot |python |bash |[A-Z_]+=\S+ detot )", b)] + re.findall(
        r"`((?:detot|python) [^`]+)`", text)


def test_every_results_page_carries_the_command_that_regenerates_it():
    pages = sorted(p for p in (DOCS / "results").glob("*.md") if p.name != "index.md")
    assert len(pages) >= 15
    assert [p.name for p in pages if not _command_blocks(p.read_text())] == []
    listed = (DOCS / "results" / "index.md").read_text()
    assert [p.name for p in pages if f"({p.name})" not in listed] == []


def test_the_results_check_catches_a_page_without_a_command():
    assert _command_blocks("# A study\n\nWe measured things.\n") == []
    assert _command_blocks("```bash\ndetot bench engine --json x.json\n```\n")


def test_every_docs_and_readme_snippet_imports_only_from_the_top_level():
    deep = []
    for snippet in SNIPPETS:
        for node in ast.walk(ast.parse(snippet)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("detot_agent."):
                deep.append(node.module)
    assert deep == [], "docs examples import from `detot_agent` only; plumbing stays in its subpackage"


def _unlisted(results: Path, listing: str) -> list[str]:
    names = [p for p in sorted(results.iterdir()) if p.name != "accuracy"] + sorted((results / "accuracy").iterdir())
    return [str(p.relative_to(results)) for p in names if f"results/{p.relative_to(results)}" not in listing]


def test_evals_readme_lists_every_result_with_a_docs_page_that_exists():
    listing = (ROOT / "evals" / "README.md").read_text()
    assert _unlisted(ROOT / "evals" / "results", listing) == []
    pages = re.findall(r"\]\(\.\./(docs/[^)#]+)\)", listing)
    assert pages and [p for p in pages if not (ROOT / p).is_file()] == []


def test_the_evals_listing_check_catches_an_unlisted_result(tmp_path):
    (tmp_path / "accuracy" / "gsm8k").mkdir(parents=True)
    (tmp_path / "bench_new.json").write_text("{}")
    assert _unlisted(tmp_path, "| `results/accuracy/gsm8k/` |") == ["bench_new.json"]
