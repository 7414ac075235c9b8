"""Renaming a run folder written under 0.3's method names (`evaluation/names.py`), when it is next opened.

`upgrade_run(folder)` is a no-op on a folder whose `run.json` has `method_names` (0.4 and later). On an older
folder it writes its plan (`.renaming.json`, with the steps done), moves every per-method file to its new name
through a staging folder (a new name may be an old one: 0.3's `detot_plain_static` becomes `detot`, whose
0.3 files become `dspy_detot_loop`), rewrites the records' `method` and `revoted_from` and `methods.json`'s
keys, removes the report files, and last writes `run.json` with the new names: a folder stopped part way
finishes from its plan when next opened. Resuming (`detot eval --resume`) and reading (`detot eval report`)
both call it.

Example:
    >>> import json, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "run.json").write_text(json.dumps({"ids": ["q1"], "methods": ["plain_cot", "detot"]}))
    >>> _ = (folder / "detot.jsonl").write_text(json.dumps({"id": "q1", "method": "detot"}) + "\\n")
    >>> upgrade_run(folder)
    {'plain_cot': 'cot', 'detot': 'dspy_detot_loop'}
    >>> sorted(p.name for p in folder.iterdir())
    ['dspy_detot_loop.jsonl', 'run.json']
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from detot_agent.errors import ArtefactError
from detot_agent.evaluation.names import NAMES_VERSION, current
from detot_agent.io.persist import atomic_write_text

__all__ = ["PER_METHOD", "upgrade_run"]

logger = logging.getLogger(__name__)

PER_METHOD = (".jsonl", ".events.jsonl", ".evidence.jsonl", ".shadow.jsonl", ".program.json",
              ".program.json.tensors")
PLAN = ".renaming.json"
STAGING = ".renaming"
DERIVED = ("report.md", "report.json")  # rewritten by the next report under the new names


def upgrade_run(folder: str | Path) -> dict[str, str]:
    """Rename a 0.3 run folder's methods to 0.4's names in place; returns `{old: new}` (empty: nothing to do).

    Raises:
        ArtefactError: `run.json` is unreadable, or the folder cannot be written (the message says how far it got;
            opening it again continues).
    """
    out = Path(folder)
    path = out / "run.json"
    try:
        run: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ArtefactError(f"{path}: unreadable ({exc})") from None
    if int(run.get("method_names", 1)) >= NAMES_VERSION and not (out / PLAN).exists():
        return {}
    try:
        plan, done = _plan(out, run)
        for step, do in (("staged", _stage), ("moved", _unstage), ("records", _rewrite_records),
                         ("methods.json", _rewrite_methods_json)):
            if step not in done:  # each step once: a second pass would read the new names as old ones
                do(out, plan)
                done.append(step)
                atomic_write_text(out / PLAN, json.dumps({"rename": plan, "done": done}, indent=2) + "\n")
        for name in DERIVED:
            (out / name).unlink(missing_ok=True)
        run["methods"] = [plan.get(m, m) for m in run.get("methods", [])]
        run["method_names"] = NAMES_VERSION
        atomic_write_text(path, json.dumps(run, indent=2) + "\n")
        (out / PLAN).unlink()
    except OSError as exc:
        raise ArtefactError(f"{out}: renaming its methods to 0.4's names stopped ({exc}); fix the cause and open "
                            "it again to finish (the plan is in .renaming.json)") from None
    changed = {old: new for old, new in plan.items() if old != new}
    if changed:
        logger.warning("%s: methods renamed to 0.4's names: %s", out,
                       ", ".join(f"{old} -> {new}" for old, new in changed.items()))
    return changed


def _plan(out: Path, run: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """The folder's `{old: new}` and the steps done, written before anything moves (read back when a rename was
    interrupted)."""
    if (out / PLAN).exists():
        saved = json.loads((out / PLAN).read_text())
        return dict(saved["rename"]), list(saved["done"])
    plan = {m: current(m, names=1) for m in run.get("methods", [])}
    atomic_write_text(out / PLAN, json.dumps({"rename": plan, "done": []}, indent=2) + "\n")
    return plan, []


def _stage(out: Path, plan: dict[str, str]) -> None:
    """Every per-method file into the staging folder under its new name (nothing moves back yet, so an old name
    still in the folder is an old file): no new name can overwrite an old file that waits for its move."""
    staging = out / STAGING
    staging.mkdir(exist_ok=True)
    for old, new in plan.items():
        for suffix in PER_METHOD:
            src = out / f"{old}{suffix}"
            if src.exists() and not (staging / f"{new}{suffix}").exists():
                src.rename(staging / f"{new}{suffix}")


def _unstage(out: Path, plan: dict[str, str]) -> None:
    staging = out / STAGING
    if staging.is_dir():
        for item in sorted(staging.iterdir()):
            item.rename(out / item.name)
        shutil.rmtree(staging)


def _rewrite_records(out: Path, plan: dict[str, str]) -> None:
    """Each record's `method` is its file's (new) name; `revoted_from` names a baseline renamed without clash."""
    for new in plan.values():
        path = out / f"{new}.jsonl"
        if not path.is_file():
            continue
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                lines.append(line)  # a torn last line: left for the runner's repair
                continue
            if isinstance(record, dict):
                record["method"] = new
                if isinstance(record.get("revoted_from"), str):
                    record["revoted_from"] = current(record["revoted_from"], names=1)
            lines.append(json.dumps(record))
        atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def _rewrite_methods_json(out: Path, plan: dict[str, str]) -> None:
    path = out / "methods.json"
    if not path.is_file():
        return
    configs = json.loads(path.read_text())
    renamed = {plan.get(k, current(k, names=1)): v for k, v in configs.items()}
    for config in renamed.values():
        if isinstance(config, dict) and isinstance(config.get("revoted_from"), str):
            config["revoted_from"] = current(config["revoted_from"], names=1)
    atomic_write_text(path, json.dumps(renamed, indent=2) + "\n")
