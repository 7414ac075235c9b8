"""Scripted engines for control-flow tests: answers come from a function, formatted for ChatAdapter (or, with
`plain=True`, as plain text ending in "The answer is X.", for PlainAdapter). `ScriptedEngine` is a DSPy engine
(DETOT samples it by rollouts); `ScriptedLocalEngine` is a batched local engine (DETOT's `sample(n)` path);
`FillingEngine` answers any signature (a prompt model or reflection LM for optimizers)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Any

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events

from detot_agent import LocalEngine
from detot_agent.engines.generation import GenOutput, GenRow


class ScriptedEngine:
    """`answer(prompt_text, call_no)` returns the answer text, or None for an unparseable reply."""

    supported_params = frozenset({"temperature", "max_tokens", "seed"})

    def __init__(self, answer: Callable[[str, int], str | None], *, plain: bool = False) -> None:
        self.answer = answer
        self.plain = plain
        self.calls = 0
        self.prompts: list[str] = []
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> ScriptedEngine:
        return self

    def complete(self, request: Any) -> Response:
        text = "\n".join(m.text or "" for m in request.messages)
        with self._lock:
            n = self.calls
            self.calls += 1
            self.prompts.append(text)
        ans = self.answer(text, n)
        if ans is None:
            body = "garbage without fields"
        elif self.plain:
            body = f"step {n}\nThe answer is {ans}."
        else:
            body = f"[[ ## reasoning ## ]]\nstep {n}\n\n[[ ## answer ## ]]\n{ans}\n\n[[ ## completed ## ]]"
        return Response(id=None, model="scripted", message=Message.assistant([TextPart(body)]), finish_reason="stop",
                        usage=Usage(input_tokens=10, output_tokens=5))

    def stream(self, request: Any) -> Any:
        return iter(response_to_events(self.complete(request)))

    def close(self) -> None:
        pass


class AsyncScriptedEngine:
    def __init__(self, sync: ScriptedEngine) -> None:
        self.sync = sync

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncScriptedEngine:
        return self

    async def complete(self, request: Any) -> Response:
        return self.sync.complete(request)

    async def stream(self, request: Any) -> Any:
        for e in self.sync.stream(request):
            yield e

    async def aclose(self) -> None:
        pass


def scripted_lm(answer: Callable[[str, int], str | None], *, plain: bool = False) -> tuple[Any, ScriptedEngine]:
    engine = ScriptedEngine(answer, plain=plain)
    return dspy.LM("scripted/test", engine=engine, async_engine=AsyncScriptedEngine(engine), cache=False,
                   num_retries=0), engine


class ScriptedLocalEngine(LocalEngine):
    """A real batched engine whose decoding is scripted: the tiny model's tokenizer and chat template,
    `build_row`, `sample(n)` (one row, n samples), `complete`, soft prompts and budgets all run as in
    `LocalEngine`; only `_run` is replaced, by `answer(prompt_text, call_no)` (None: an unparseable reply), so
    batches go through the static scheduler (the one that calls `_run`).
    Replies are ChatAdapter fields, or with `plain=True` "... The answer is X." for PlainAdapter."""

    def __init__(self, model_dir: Any, answer: Callable[[str, int], str | None], *, plain: bool = False,
                 raw: bool = False, logprob: Callable[[str, int], float] | None = None) -> None:
        super().__init__(str(model_dir), device="cpu", dtype="float32", dynamic_batching=False, scheduler="static")
        self.answer = answer
        self.plain = plain
        self.raw = raw  # the answer function's text is the whole reply
        self.logprob = logprob  # per-token log-prob of a reply (default -0.1)
        self.calls = 0
        self.prompts: list[str] = []
        self.rows: list[GenRow] = []

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_scripted, (self.config.model, self.answer, self.plain))

    def _run(self, rows: list[GenRow]) -> list[list[GenOutput]]:
        out = []
        for row in rows:
            text = self.tokenizer.decode(row.prompt_ids)
            self.prompts.append(text)
            self.rows.append(row)
            samples = []
            for _ in range(row.n):
                ans = self.answer(text, self.calls)
                n = self.calls
                self.calls += 1
                if ans is None:
                    body = "garbage without fields"
                elif self.raw:
                    body = ans
                elif self.plain:
                    body = f"step {n}\nThe answer is {ans}."
                else:
                    body = f"[[ ## reasoning ## ]]\nstep {n}\n\n[[ ## answer ## ]]\n{ans}"
                ids = self.tokenizer(body, add_special_tokens=False)["input_ids"]
                per_token = -0.1 if self.logprob is None else self.logprob(text, n)
                samples.append(GenOutput(text=body, token_ids=list(ids), finish_reason="stop",
                                         logprob=per_token * len(ids)))
            out.append(samples)
        return out


_ASKED = re.compile(r"What is (\d+) plus (\d+)\?")


class AdditionEngine(ScriptedLocalEngine):
    """Answers "What is a plus b?" (plain replies) by `rule(a, b, kind)`, where `kind = self.kind(row)` tells the
    rows apart (the serving soft prompt or a candidate's, a prompt or none: subclasses say how)."""

    def __init__(self, model_dir: Any, rule: Callable[[int, int, Any], str]) -> None:
        super().__init__(model_dir, lambda text, n: None, plain=True)
        self.rule = rule
        self.lock = threading.Lock()

    def kind(self, row: GenRow) -> Any:
        raise NotImplementedError

    def _run(self, rows: list[GenRow]) -> list[list[GenOutput]]:
        out = []
        for row in rows:
            with self.lock:
                kind = self.kind(row)
                self.answer = lambda text, n, k=kind: self.rule(*map(int, _ASKED.findall(text)[-1]), k)
                out += super()._run([row])
        return out


def _rebuild_scripted(model: str, answer: Any, plain: bool) -> ScriptedLocalEngine:
    return ScriptedLocalEngine(model, answer, plain=plain)


def scripted_local_lm(model_dir: Any, answer: Callable[[str, int], str | None], *, plain: bool = False,
                      **kwargs: Any) -> tuple[Any, ScriptedLocalEngine]:
    """A `local_lm` on a `ScriptedLocalEngine` (DETOT takes its batched-engine path)."""
    from detot_agent import local_lm

    engine = ScriptedLocalEngine(model_dir, answer, plain=plain, **kwargs)
    return local_lm(engine=engine, cache=False), engine


_OUTPUT_FIELDS = re.compile(r"Your output fields are:\n(.*?)(?:\n\n|All interactions)", re.DOTALL)
_FIELD_NAME = re.compile(r"^\d+\. `(\w+)`", re.MULTILINE)


class FillingEngine(ScriptedEngine):
    """A scripted DSPy engine for any signature: each output field the ChatAdapter (or JSONAdapter) asks for
    gets `fill(field)`; a request without DSPy's field layout gets `fill("raw")`.
    Stands in for MIPROv2's prompt model and GEPA's reflection LM."""

    def __init__(self, fill: Callable[[str], str]) -> None:
        super().__init__(lambda text, n: None)
        self.fill = fill

    def complete(self, request: Any) -> Response:
        system = request.system if isinstance(request.system, str) else ""
        found = _OUTPUT_FIELDS.search(system)
        with self._lock:
            self.calls += 1
            self.prompts.append(system + "\n" + "\n".join(m.text or "" for m in request.messages))
        if found and "Outputs will be a JSON object" in system:  # DSPy's JSONAdapter (GEPA's reflection)
            body = json.dumps({name: self.fill(name) for name in _FIELD_NAME.findall(found.group(1))})
        elif found:
            names = _FIELD_NAME.findall(found.group(1))
            body = "".join(f"[[ ## {name} ## ]]\n{self.fill(name)}\n\n" for name in names) + "[[ ## completed ## ]]"
        else:
            body = self.fill("raw")
        return Response(id=None, model="filling", message=Message.assistant([TextPart(body)]), finish_reason="stop",
                        usage=Usage(input_tokens=10, output_tokens=5))


def filling_lm(fill: Callable[[str], str]) -> tuple[Any, FillingEngine]:
    engine = FillingEngine(fill)
    return dspy.LM("filling/test", engine=engine, async_engine=AsyncScriptedEngine(engine), cache=False,
                   num_retries=0), engine
