"""Does llama.cpp's prefix cache change greedy replies? One request at a time (no batch-mates), the same 8 MultiArith
questions decoded greedily by the static scheduler, the continuous one without the prefix cache, with it, and with it
matching exact prompts only (`prefix_match="exact"`), with llama.cpp's extra buffer types (weight repacking) on and
off. Why partial hits change replies: `evals/scripts/prefill_chunks.py`.

    python evals/scripts/prefix_cache_paths.py --model "$(../shared/tools/bench-model.sh)" [--buffers auto,off]

Prints and writes `evals/results/prefix_cache_paths.json`: how many of the 8 replies are the same text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dspy.lm15 import Config, Message, Request

from detot_agent.engines.llamacpp_engine import LlamaCppEngine

CUE = "Solve the problem step by step, then finish with: The answer is <number>.\n\n"


def replies(model: str, questions: list[str], **settings: object) -> list[str]:
    engine = LlamaCppEngine(model, **settings)  # type: ignore[arg-type]
    try:
        return [engine.sample(Request(model="m", messages=[Message.user(CUE + q)],
                                      config=Config(max_tokens=160, temperature=0.0)), 1)[0].text for q in questions]
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="../shared/data/multiarith/MultiArith.json")
    parser.add_argument("--out", type=Path, default=Path("evals/results/prefix_cache_paths.json"))
    parser.add_argument("--buffers", default="auto", help="extra buffer settings to run, comma-separated: auto, off")
    args = parser.parse_args()
    data = json.loads(Path(args.data).read_text())
    questions = [data[i]["sQuestion"].strip() for i in range(0, 80, 10)]
    result: dict[str, dict[str, int]] = {}
    for buffers in args.buffers.split(","):
        static = replies(args.model, questions, scheduler="static", extra_buffers=buffers)
        plain = replies(args.model, questions, scheduler="continuous", prefix_cache=0, extra_buffers=buffers)
        cached = replies(args.model, questions, scheduler="continuous", prefix_cache=8, extra_buffers=buffers)
        exact = replies(args.model, questions, scheduler="continuous", prefix_cache=8, prefix_match="exact",
                        extra_buffers=buffers)
        same = {"static_vs_continuous_without_prefix_cache": sum(a == b for a, b in zip(static, plain, strict=True)),
                "static_vs_continuous_with_prefix_cache": sum(a == b for a, b in zip(static, cached, strict=True)),
                "static_vs_continuous_with_exact_prefix_cache": sum(a == b for a, b in zip(static, exact, strict=True)),
                "questions": len(questions)}
        result[f"extra_buffers={buffers}"] = same
        print(f"extra buffers {buffers}: the same reply as the static scheduler's on "
              f"{same['static_vs_continuous_without_prefix_cache']}/{len(questions)} without the prefix cache, "
              f"{same['static_vs_continuous_with_prefix_cache']}/{len(questions)} with it, "
              f"{same['static_vs_continuous_with_exact_prefix_cache']}/{len(questions)} with it matching exact prompts")
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
