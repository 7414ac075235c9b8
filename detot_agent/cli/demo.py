"""`detot demo`: DETOT end to end on the embedded model, with bundled exemplars.

The exemplars are generated here from templates (simple one- and two-step word
problems with worked rationales), so the package ships no copy of any dataset.
The index is built once and cached (default `~/.cache/detot/demo-index`, or
`$DETOT_CACHE/demo-index`), then loaded and validated on later runs.

Example:
    >>> from detot_agent.cli.demo import demo_exemplars
    >>> ex = demo_exemplars()[0]
    >>> ex.fields["rationale"].endswith("The answer is " + ex.fields["answer"] + ".")
    True
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

from detot_agent.retrieval.index import Exemplar

__all__ = ["DEMO_QUESTIONS", "demo_exemplars", "describe", "run_demo"]

_TEMPLATES = [
    ("{n} has {a} {thing} and gets {b} more. How many {thing} does {n} have now?",
     "{n} starts with {a} {thing} and gets {b} more, so {a} + {b} = {r}.", lambda a, b: a + b),
    ("{n} had {a} {thing} and gave away {b}. How many {thing} are left?",
     "{n} had {a} and gave away {b}, so {a} - {b} = {r}.", lambda a, b: a - b),
    ("Each box holds {a} {thing}. How many {thing} are in {b} boxes?",
     "There are {b} boxes with {a} each, so {b} * {a} = {r}.", lambda a, b: a * b),
    ("{n} shares {p} {thing} equally among {b} friends. How many does each friend get?",
     "{p} shared among {b} friends is {p} / {b} = {r}.", None),
    ("{n} buys {a} packs of {thing} with {b} in each pack and then eats 2. How many {thing} are left?",
     "{a} packs of {b} make {a} * {b} = {m}; after eating 2 there are {m} - 2 = {r}.", None),
]
_NAMES = ["Sam", "Lisa", "Omar", "Ana", "Ken", "Maya", "Tom", "Zoe"]
_THINGS = ["apples", "pens", "stickers", "marbles", "cookies", "books"]

DEMO_QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have now?", "7"),
    ("A box holds 6 eggs. How many eggs are in 5 boxes?", "30"),
    ("Lisa had 10 candies and ate 3 of them. How many candies are left?", "7"),
    ("Omar reads 12 pages a day. How many pages does he read in 3 days?", "36"),
    ("A class has 24 pupils split equally into 4 teams. How many pupils are in each team?", "6"),
    ("Ana has 15 stickers and gives 6 to her brother. How many stickers does she have left?", "9"),
]


def demo_exemplars(n: int = 60, seed: int = 7) -> list[Exemplar]:
    """Template-made word problems with rationales ending in "The answer is N."."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q_tpl, r_tpl, fn = _TEMPLATES[i % len(_TEMPLATES)]
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        if i % len(_TEMPLATES) == 1:
            a += b
        extra: dict[str, Any] = {}
        if fn is not None:
            result = fn(a, b)
        elif "shares" in q_tpl:
            result = a
            extra["p"] = a * b
        else:
            extra["m"] = a * b
            result = a * b - 2
        values = dict(n=name, thing=thing, a=a, b=b, r=result, **extra)
        question, reasoning = q_tpl.format(**values), r_tpl.format(**values)
        out.append(Exemplar(id=f"demo:{i}", text=question, fields={
            "question": question, "rationale": f"{reasoning} The answer is {result}.", "answer": str(result)}))
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("DETOT_CACHE") or Path.home() / ".cache" / "detot") / "demo-index"


def run_demo(*, model: str | None = None, device: str = "auto", dtype: str = "auto", max_tokens: int = 160,
             say: Any = print) -> dict[str, Any]:
    """Run the demo; prints as it goes through `say` and returns a summary."""
    from detot_agent.detot.module import DETOT
    from detot_agent.detot.task import AnswerFormat, TaskKind, TaskProfile, analyze
    from detot_agent.engines.lm import local_lm
    from detot_agent.errors import ArtefactError
    from detot_agent.retrieval.encoder import Encoder
    from detot_agent.retrieval.index import ExemplarIndex

    start = time.perf_counter()
    lm = local_lm(model, device=device, dtype=dtype, cache=False)
    say(f"model [bold]{lm.model}[/] on {lm.engine.device} ({time.perf_counter() - start:.1f}s)")
    if model is None:
        say("[yellow]the embedded SmolLM2-135M is too weak for arithmetic (about 2 of these 6 right): watch the "
            "mechanism (demos, votes, stopping, the loop's judge), or pass --model with a 0.5B+ GGUF[/]")
    encoder = Encoder()
    cache = _cache_dir()
    try:
        index = ExemplarIndex.load(cache, encoder=encoder)
        say(f"exemplar index: loaded {len(index)} exemplars from {cache}")
    except ArtefactError:
        index = ExemplarIndex(encoder)
        index.add(demo_exemplars())
        index.save(cache)
        say(f"exemplar index: built {len(index)} template exemplars, cached at {cache}")
    task = TaskProfile(name="arithmetic", description="Solve short arithmetic word problems.",
                       kind=TaskKind.ARITHMETIC, answer_format=AnswerFormat.NUMBER)
    adj = analyze(task, [q for q, _ in DEMO_QUESTIONS], k_exemplars=2, max_samples=6, max_tokens=max_tokens,
                  min_count=3, window=4, cooldown=0)
    detot = DETOT("question -> answer", task=task, index=index, lm=lm, adjustments=adj, background=False)
    say("adjustment rules applied: " + ", ".join(a.rule for a in adj.applied))
    say(f"each question: up to {adj.max_samples} samples in rounds of {adj.round_size} (the greedy answer first), "
        f"stopping early by the {adj.stopping.value} rule at {adj.stop_threshold}; the monitor watches the last "
        f"{adj.window} answers and may trigger after {adj.min_count}")
    correct = 0
    for i, (question, gold) in enumerate(DEMO_QUESTIONS, 1):
        t0 = time.perf_counter()
        pred = detot(question=question)
        ok = detot.feedback(pred, gold=gold)
        correct += ok
        say(describe(i, question, pred, gold, ok, index=index, max_samples=adj.max_samples,
                     seconds=time.perf_counter() - t0))
    stats = detot.monitor.stats()
    triggers = [e for e in detot.monitor.events if e["event"] == "trigger"]
    say(f"{correct}/{len(DEMO_QUESTIONS)} correct; window agreement {stats['agreement']:.2f}, accuracy "
        f"{stats['accuracy']:.2f}; triggers: {len(triggers)}" + (f" ({triggers[0]['reason']})" if triggers else ""))
    say("re-optimizing the task embedding on this evidence (retrieval weights + soft prompt) ...")
    event = detot.reoptimize()
    colour = "green" if event.accepted else "yellow"
    say(f"re-optimization: [{colour}]{event.reason}[/] (version {event.version_before} -> {event.version_after}, "
        f"{event.seconds:.1f}s)")
    if event.accepted:  # what the new version answers
        question, gold = DEMO_QUESTIONS[0]
        pred = detot(question=question)
        say(f"after it, version {pred.embedding_version} answers Q1: {pred.answer_key} (gold {gold})")
    total = time.perf_counter() - start
    say(f"demo finished in {total:.1f}s")
    return {"correct": correct, "questions": len(DEMO_QUESTIONS), "accepted": event.accepted, "seconds": total}


def _short(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(i: int, question: str, pred: Any, gold: str, ok: bool, *, index: Any, max_samples: int,
             seconds: float) -> str:
    """One question as a few short lines (readable at 80 columns): the retrieved demos' text, the votes and
    why sampling stopped, the answer against gold."""
    demos = [_short(index.get(d).text, 44) for d in pred.demo_ids]
    votes = " ".join(f"{k}:{int(v)}" for k, v in pred.votes.items()) or "none"
    stopped = ("stopped early: the vote was settled" if pred.samples_used < max_samples
               else "drew the whole budget: the vote never settled")
    unparsed = f", {pred.parse_failures} unparsed" if pred.parse_failures else ""
    verdict = "[green]right[/]" if ok else "[red]wrong[/]"
    return "\n".join([
        f"[bold]Q{i}[/] {_short(question, 74)}",
        *(f"    demo: {d}" for d in demos),
        f"    votes {votes} (agreement {pred.agreement:.2f}); {pred.samples_used} samples{unparsed}; {stopped}",
        f"    answer {pred.answer_key}, gold {gold}: {verdict}  ({seconds:.1f}s)",
    ])
