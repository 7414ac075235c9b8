"""Reasoning strategies beside chain of thought: program of thought (PoT) and a mix of both.

With `Adjustments.strategy = "pot"`, DETOT asks the model for a short Python program instead of
prose; `detot/pot.py` runs it safely and its result is the sample's answer. `"mix"` draws each round
half as CoT samples and half as PoT samples and pools their votes. Demos for PoT are the retrieved
exemplars' rationales turned into programs (`rationale_to_program`: each worked equation of the
rationale, such as GSM8K's "48/2 = 24", becomes one assignment, kept only when the program computes
the exemplar's gold answer); exemplars without such a rationale are left out of a PoT prompt.

Example:
    >>> print(rationale_to_program("She sold 48/2 = 24 in May. In all 48+24 = 72. The answer is 72.", "72"))
    # She sold 48/2 = 24 in May.
    step1 = 48 / 2
    # In all 48+24 = 72.
    step2 = 48 + 24
    answer = step2
    >>> parse_program("```python\\nanswer = 6 * 7\\n```")
    {'reasoning': 'answer = 6 * 7', 'answer': '42'}
"""

from __future__ import annotations

import re
from typing import Any

from detot_agent.answers import format_number
from detot_agent.detot.pot import run_program
from detot_agent.errors import ProgramError

__all__ = ["POT_CUE", "STRATEGIES", "extract_program", "parse_program", "pot_messages", "rationale_to_program"]

STRATEGIES = ("cot", "direct", "pot", "mix")
POT_CUE = ("Write a short Python program that computes the answer. Use only arithmetic, and store the final "
           "number in a variable named `answer`.")
_CODE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_NUM = r"\$?\d[\d,]*(?:\.\d+)?"
_EQUATION = re.compile(rf"((?:\(?\s*{_NUM}\s*\)?\s*[-+*/x×÷]\s*)+\(?\s*{_NUM}\s*\)?)\s*=\s*\$?(-?\d[\d,]*(?:\.\d+)?)")
_SENTENCE = re.compile(r"(?:[^.!?\n]|\.(?=\d))+(?:[.!?]|$)")  # a full stop inside a number does not end it


def _expr(text: str) -> str:
    out = text.replace("$", "").replace(",", "").replace("×", "*").replace("÷", "/")
    out = re.sub(r"(?<=[\d)\s])x(?=[\s\d(])", "*", out)
    return re.sub(r"\s*([-+*/])\s*", r" \1 ", out).strip()


def rationale_to_program(rationale: str | None, answer: Any) -> str | None:
    """A PoT demo program from a worked rationale, or None when its equations do not compute `answer`."""
    if not rationale or answer is None:
        return None
    lines: list[str] = []
    step = 0
    for sentence in _SENTENCE.findall(rationale):
        found = _EQUATION.findall(sentence)
        if not found:
            continue
        lines.append(f"# {sentence.strip()}")
        for expr, _ in found:
            step += 1
            lines.append(f"step{step} = {_expr(expr)}")
    if step == 0:
        return None
    lines.append(f"answer = step{step}")
    program = "\n".join(lines)
    try:
        value = run_program(program)
    except ProgramError:
        return None
    return program if format_number(value) == format_number(str(answer)) else None


def pot_messages(question: str, demos: list[tuple[str, str]], system: str = "") -> list[dict[str, str]]:
    """Chat messages asking for a program: `(question, program)` demos as user/assistant turns, then the
    question, each with the PoT cue."""
    messages = [{"role": "system", "content": system}] if system else []
    for q, program in demos:
        messages += [{"role": "user", "content": f"{q}\n{POT_CUE}"},
                     {"role": "assistant", "content": f"```python\n{program}\n```"}]
    return [*messages, {"role": "user", "content": f"{question}\n{POT_CUE}"}]


def extract_program(text: str) -> str:
    """The program in a reply: its last code block, else the whole reply."""
    found = _CODE.findall(text)
    return (found[-1] if found else text).strip()


def parse_program(text: str) -> dict[str, Any] | None:
    """`{"reasoning": program, "answer": result}` for a reply holding a program (`extract_program`), or None
    when the program is refused or gives no number."""
    source = extract_program(text)
    try:
        value = run_program(source)
    except ProgramError:
        return None
    return {"reasoning": source, "answer": format_number(value)}
