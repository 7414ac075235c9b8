"""A `dspy.ReAct` agent with a safe calculator tool, whose answering step is DETOT.

    python -m programs.agent --train ../shared/data/gsm8k/train.jsonl --train-limit 500 \
        --question "A crate holds 17 boxes of 23 pens. How many pens in 4 crates?"

The tool evaluates arithmetic with the library's safe evaluator (`detot_agent.detot.pot.run_program`
in expression mode: numbers, + - * / // % **, parentheses, and abs/round/min/max); anything else
(names, attributes, calls, huge powers) is refused with a message the agent sees as the tool's
observation. Python's `eval` is never used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError

from detot_agent import DETOT, ExemplarIndex, TaskProfile, analyze, local_lm
from detot_agent.answers import AnswerFormat
from detot_agent.detot.pot import run_program
from detot_agent.detot.task import TaskKind
from detot_agent.errors import DetotError

MAX_LENGTH = 200


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression, e.g. "17 * 23 * 4" or "round(10 / 3, 2)"."""
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"expression is {len(expression)} characters; the limit is {MAX_LENGTH}")
    # the library's safe evaluator (never eval), in calculator mode: numbers, operators, abs/round/min/max
    return str(run_program(expression.replace("^", "**").replace(",", ", "), expression=True))


class CalculatorAgent(dspy.ReAct):
    """ReAct with `calculate` as its tool and DETOT as its final answering step."""

    def __init__(self, index: ExemplarIndex, *, lm: Any, max_iters: int = 4, max_tokens: int = 256) -> None:
        super().__init__("question -> answer", tools=[calculate], max_iters=max_iters)
        fallback: Any = getattr(self, "extract")  # noqa: B009  (ReAct's ChainOfThought, replaced below)
        signature = fallback.predict.signature.delete("reasoning")  # DETOT adds its own reasoning step
        task = TaskProfile(name="agent-math", description="Solve arithmetic word problems step by step.",
                           kind=TaskKind.ARITHMETIC, answer_format=AnswerFormat.NUMBER)
        self.extract = DETOT(signature, task=task, index=index, lm=lm, background=False,
                             adjustments=analyze(task, [], max_tokens=max_tokens, max_samples=4),
                             demo_fields={"question": "question", "reasoning": "rationale", "answer": "answer"})

    def _call_with_potential_trajectory_truncation(self, module: Any, trajectory: Any, **input_args: Any) -> Any:
        try:
            return super()._call_with_potential_trajectory_truncation(module, trajectory, **input_args)
        except AdapterParseError as exc:
            if module is self.react:  # an unreadable tool choice ends the loop; DETOT still answers
                raise ValueError(f"unparseable tool choice ({exc.lm_response[:80]!r})") from None
            raise


def main(argv: list[str] | None = None) -> int:
    from programs.math_qa import load_or_build_index

    ap = argparse.ArgumentParser(prog="python -m programs.agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--question", required=True)
    ap.add_argument("--train", type=Path, help="Training problems for DETOT's demos.")
    ap.add_argument("--train-limit", type=int, help="Index only the first N training problems.")
    ap.add_argument("--index", type=Path, default=Path("runs/math-qa-index"))
    ap.add_argument("--model", help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M).")
    ap.add_argument("--max-iters", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    try:
        index = load_or_build_index(args.index, args.train, limit=args.train_limit)
        lm = local_lm(args.model, cache=False, max_tokens=args.max_tokens, temperature=0.0)
        agent = CalculatorAgent(index, lm=lm, max_iters=args.max_iters, max_tokens=args.max_tokens)
        with dspy.context(lm=lm):
            pred = agent(question=args.question)
        for key, value in pred.trajectory.items():
            print(f"  {key}: {value}")
        print(f"A: {pred.answer}  (agreement {pred.agreement:.2f} over {pred.samples_used} samples)")
    except DetotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
