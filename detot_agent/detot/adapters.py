"""DSPy adapters that small local models can satisfy.

`LenientChatAdapter` keeps DSPy's `[[ ## field ## ]]` layout and parses it leniently;
`PlainAdapter` drops the layout for one-answer signatures (see its docstring).

Models of a few hundred million parameters copy the `[[ ## field ## ]]` layout
from demos but often mislabel a section (writing `[[ ## question ## ]]` where
`[[ ## reasoning ## ]]` belongs) or repeat sections until `max_tokens`. The
strict ChatAdapter then fails the whole call. `LenientChatAdapter` first tries
the strict parse; if fields are missing, it assigns sections with unknown or
input-field headers, in order, to the missing output fields, and keeps the first
occurrence of each field. It never invents a value: a field with no section
still fails with DSPy's `AdapterParseError`.

Example:
    >>> import dspy
    >>> from detot_agent.detot.adapters import LenientChatAdapter
    >>> sig = dspy.ChainOfThought("question -> answer").predict.signature
    >>> text = "[[ ## question ## ]]\\n3 + 4 = 7.\\n\\n[[ ## answer ## ]]\\n7\\n\\n[[ ## answer ## ]]\\n7"
    >>> LenientChatAdapter().parse(sig, text)
    {'reasoning': '3 + 4 = 7.', 'answer': '7'}
    >>> PlainAdapter().parse(sig, "3 + 4 = 7 apples.\\nThe answer is 7.")
    {'reasoning': '3 + 4 = 7 apples.', 'answer': '7'}
"""

from __future__ import annotations

import re
import typing
from typing import Any, Literal

import dspy
from dspy.adapters.utils import parse_value
from dspy.utils.exceptions import AdapterParseError

from detot_agent.answers import ANSWER_CUE
from detot_agent.errors import ConfigError

__all__ = ["LenientChatAdapter", "PlainAdapter"]

_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")


def _sections(completion: str) -> list[tuple[str | None, str]]:
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in completion.splitlines():
        match = _HEADER.match(line.strip())
        if match:
            rest = line.strip()[match.end():].strip()
            sections.append((match.group(1), [rest] if rest else []))
        else:
            sections[-1][1].append(line)
    return [(name, "\n".join(lines).strip()) for name, lines in sections]


class LenientChatAdapter(dspy.ChatAdapter):
    """ChatAdapter with a tolerant fallback parse for small models (no JSON-adapter re-run by default)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("use_json_adapter_fallback", False)
        super().__init__(**kwargs)

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        """Strict parse first; then map mislabelled sections onto missing output fields."""
        try:
            return super().parse(signature, completion)
        except AdapterParseError:
            pass
        outputs = signature.output_fields
        fields: dict[str, str] = {}
        orphans: list[str] = []
        for name, text in _sections(completion):
            if name is not None and name in outputs:
                fields.setdefault(name, text)
            elif text and name != "completed":
                orphans.append(text)
        missing = [name for name in outputs if name not in fields]
        for name, text in zip(missing, orphans, strict=False):  # extra orphans are ignored
            fields[name] = text
        if fields.keys() != outputs.keys():
            raise AdapterParseError(
                adapter_name="LenientChatAdapter", signature=signature, lm_response=completion, parsed_result=fields
            )
        parsed: dict[str, Any] = {}
        for name, text in fields.items():
            try:
                parsed[name] = parse_value(text, outputs[name].annotation)
            except ValueError as exc:
                raise AdapterParseError(
                    adapter_name="LenientChatAdapter", signature=signature, lm_response=completion,
                    message=f"field {name} = {text!r} does not parse as {outputs[name].annotation}: {exc}",
                ) from exc
        return {name: parsed[name] for name in outputs}


# a statement runs to the end of its line or to the next statement on the same line; a cue that ends its line
# ("So, the answer is:\n\nParis") takes the next non-blank line
_STATEMENT = re.compile(rf"(?:{ANSWER_CUE})[ \t:=]*(?:\n\s*)?((?:(?!{ANSWER_CUE})[^\n])*)", re.IGNORECASE)

# DSPy's generated instructions ("Given the fields `question`, produce the fields `answer`."); ChainOfThought
# keeps the text of the signature it extends, so it need not name `reasoning`
_DEFAULT_INSTRUCTIONS = re.compile(r"Given the fields .*, produce the fields .*\.", re.DOTALL)


def _answer_text(raw: str) -> str:
    """`**8**.` -> `8`: closing full stops and markdown emphasis removed."""
    return raw.strip().rstrip(".").strip().strip("*").strip()


COT_CUE = "Let's think step by step."
"""The plain prompt's reasoning cue: `PlainAdapter`, the `cot` eval method, the matched-budget baselines and
DETOT's plain methods all send the question followed by this line."""


class PlainAdapter(dspy.Adapter):
    """Plain-text prompting for a signature with one answer field (plus `reasoning` from ChainOfThought).

    No field markers: a demo is the question as the user's turn and "<reasoning> The answer is
    <answer>." as the assistant's, and the request is the question plus a cue ("Let's think step
    by step." when the signature reasons). The reply is parsed from its last "The answer is X" (or
    "Answer: X") statement; the text before it is the reasoning. This is the plain chat prompt small
    instruction-tuned models handle best, and the one DETOT's arithmetic soft prompt was trained on
    (`evals/scripts/softprompt_multiarith.py`): on a 0.5B model DSPy's field layout costs accuracy
    (misformatted replies) and tokens (README, "Results on Qwen2.5-Coder-0.5B"). A reply with no answer statement raises
    DSPy's `AdapterParseError`, as the ChatAdapter does for a missing field.

    Args:
        cue: appended to the request's input; default: "Let's think step by step." for reasoning
            signatures, "Reply with: The answer is <answer>." otherwise; an answer field declared as
            `Literal["a", "b"]` adds its labels ("... The answer is one of: a, b.").
        labels: the label set for a plain `str` answer field, listed in the cue as a `Literal` field's
            would be (a field's own `Literal` wins). Opt-in: DETOT does not copy its task's `labels` here.

    Example:
        >>> import dspy
        >>> sig = dspy.ChainOfThought("question -> answer").predict.signature
        >>> demo = {"question": "1 + 1?", "reasoning": "1 + 1 = 2.", "answer": "2"}
        >>> [m["content"] for m in PlainAdapter().format(sig, [demo], {"question": "2 + 3?"})]
        ["1 + 1?\\nLet's think step by step.", '1 + 1 = 2.\\nThe answer is 2.', "2 + 3?\\nLet's think step by step."]
    """

    def __init__(self, cue: str | None = None, labels: typing.Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cue = cue
        self.labels = list(labels) if labels is not None else None
        if self.labels is not None and (not self.labels or not all(isinstance(x, str) and x for x in self.labels)):
            raise ConfigError(f"PlainAdapter(labels=...) needs non-empty label strings, got {labels!r}")

    def _answer_field(self, signature: Any) -> str:
        outputs = [name for name in signature.output_fields if name != "reasoning"]
        if len(outputs) != 1:
            raise ConfigError(f"PlainAdapter serves signatures with one answer field (and optionally `reasoning`); "
                              f"this one outputs {list(signature.output_fields)}: use LenientChatAdapter")
        return outputs[0]

    def _labels(self, signature: Any) -> list[str]:
        """The answer field's label set when it is declared as a `Literal[...]`, else the adapter's
        `labels` for a `str` field, else []."""
        annotation = signature.output_fields[self._answer_field(signature)].annotation
        if typing.get_origin(annotation) is Literal:
            return [str(a) for a in typing.get_args(annotation)]
        return list(self.labels) if self.labels and annotation is str else []

    def _cue(self, signature: Any) -> str:
        if self.cue is not None:
            return self.cue
        labels = self._labels(signature)
        if "reasoning" in signature.output_fields:  # the one shared plain prompt, plus the label set if declared
            return COT_CUE + (f" The answer is one of: {', '.join(labels)}." if labels else "")
        return "Reply with: The answer is " + (f"one of: {', '.join(labels)}." if labels else "<answer>.")

    def format(self, signature: Any, demos: list[dict[str, Any]], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Messages: the signature's own instructions as system message (none for DSPy's default text),
        the demos as user/assistant turns, the request as the last user turn."""
        self._answer_field(signature)  # refuses signatures it cannot lay out, before anything is formatted
        return [m for m in super().format(signature, demos, inputs) if m["role"] != "system" or m["content"]]

    def format_demos(self, signature: Any, demos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Demos in their given order, each with its answer; one without an answer is left out (a
        reasoning-less demo shows the answer statement alone)."""
        answer = self._answer_field(signature)
        messages = []
        for demo in demos:
            if demo.get(answer) is None or not any(demo.get(name) is not None for name in signature.input_fields):
                continue
            messages += [{"role": "user", "content": self.format_user_message_content(signature, demo)},
                         {"role": "assistant", "content": self.format_assistant_message_content(signature, demo)}]
        return messages

    def format_system_message(self, signature: Any) -> str:
        instructions = (signature.instructions or "").strip()
        return "" if _DEFAULT_INSTRUCTIONS.fullmatch(instructions) else instructions

    def format_field_description(self, signature: Any) -> str:
        return ""

    def format_field_structure(self, signature: Any) -> str:
        return ""

    def format_task_description(self, signature: Any) -> str:
        return str(signature.instructions or "")

    def format_user_message_content(self, signature: Any, inputs: dict[str, Any], prefix: str = "",
                                    suffix: str = "", main_request: bool = False) -> str:
        names = [name for name in signature.input_fields if inputs.get(name) is not None]
        if len(signature.input_fields) == 1:
            body = "\n".join(str(inputs[name]) for name in names)
        else:
            body = "\n".join(f"{signature.input_fields[name].json_schema_extra.get('prefix', name)} {inputs[name]}"
                             for name in names)
        parts = [prefix.strip(), body.strip(), self._cue(signature), suffix.strip()]
        return "\n".join(p for p in parts if p)

    def format_assistant_message_content(self, signature: Any, outputs: dict[str, Any],
                                         missing_field_message: str | None = None) -> str:
        answer = outputs.get(self._answer_field(signature))
        reasoning = str(outputs.get("reasoning") or "").strip()
        if answer is None:
            return reasoning or (missing_field_message or "")
        if reasoning and _STATEMENT.findall(reasoning):  # GSM8K-style rationales already state it
            return reasoning
        statement = f"The answer is {_answer_text(str(answer))}."
        return f"{reasoning}\n{statement}" if reasoning else statement

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        """`{"reasoning": text before the statement, <answer field>: the stated answer}`."""
        name = self._answer_field(signature)
        matches = list(_STATEMENT.finditer(completion))
        answer = _answer_text(matches[-1].group(1)) if matches else ""
        if not answer:
            raise AdapterParseError(adapter_name="PlainAdapter", signature=signature, lm_response=completion,
                                    message='no "The answer is ..." statement in the reply')
        try:
            value = parse_value(answer, signature.output_fields[name].annotation)
        except ValueError as exc:
            raise AdapterParseError(adapter_name="PlainAdapter", signature=signature, lm_response=completion,
                                    message=f"{name} = {answer!r} does not parse as "
                                            f"{signature.output_fields[name].annotation}: {exc}") from exc
        out: dict[str, Any] = {}
        if "reasoning" in signature.output_fields:
            out["reasoning"] = completion[: matches[-1].start()].strip()
        out[name] = value
        return out
