"""A scripted DSPy engine for control-flow tests: answers come from a function, formatted for ChatAdapter
(or, with `plain=True`, as plain text ending in "The answer is X.", for PlainAdapter)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events


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
