"""A DSPy ChatAdapter that small local models can satisfy.

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
    >>> from detot_agent.adapters import LenientChatAdapter
    >>> sig = dspy.ChainOfThought("question -> answer").predict.signature
    >>> text = "[[ ## question ## ]]\\n3 + 4 = 7.\\n\\n[[ ## answer ## ]]\\n7\\n\\n[[ ## answer ## ]]\\n7"
    >>> LenientChatAdapter().parse(sig, text)
    {'reasoning': '3 + 4 = 7.', 'answer': '7'}
"""

from __future__ import annotations

import re
from typing import Any

import dspy
from dspy.adapters.utils import parse_value
from dspy.utils.exceptions import AdapterParseError

__all__ = ["LenientChatAdapter"]

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
