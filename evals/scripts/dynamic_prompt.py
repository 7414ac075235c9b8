#!/usr/bin/env python
"""No soft prompt vs the static one vs the dynamic task embedding: greedy CoT (issue 16, measurement).

Conditions, on the same engine, prompt and seeded problems:
  none     greedy zero-shot CoT, no soft prompt;
  static   the static soft prompt (`--static`, a `SoftPrompt` folder: today's `detot tune` output);
  dynamic  the task embedding's per-input soft prompt P(x) (`--dynamic`, a `TaskEmbedding` folder with a
           soft-prompt head, trained by `detot tune --components M` on the same data and budget).

Each condition's per-problem results are appended to `<out>/<suite>/<condition>.jsonl` as they finish, so an
interrupted run resumes. `--nll` also writes the held-out target NLL of each condition (GSM8K train problems
that neither prompt trained or early-stopped on) to `<out>/nll.json`. `--summary` prints the table with exact
McNemar p-values (static vs dynamic, none vs each). `--train-dynamic --demos K --index DIR` trains the task
embedding with K demos in each prompt, as DETOT serves it (`detot_agent.detot.served`), instead of the
question alone.

    python evals/scripts/dynamic_prompt.py --model "$(../shared/tools/bench-model.sh)" --suite gsm8k \
        --conditions none,static,dynamic --static S --dynamic D --out evals/results/dynamic_prompt
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from dspy.lm15 import Config, Message, Request

from detot_agent.answers import extract_number, numbers_equal
from detot_agent.engines.torch_engine import LocalEngine
from detot_agent.io.datafiles import read_exemplars

COT = "\nLet's think step by step."
SUITES = {"multiarith": ("multiarith/MultiArith.json", "multiarith"), "gsm8k": ("gsm8k/test.jsonl", "gsm8k")}


def problems(data_dir: Path, suite: str, limit: int, seed: int) -> list[Any]:
    rel, fmt = SUITES[suite]
    found = read_exemplars(data_dir / rel, fmt=fmt)
    return [found[i] for i in sorted(random.Random(seed).sample(range(len(found)), limit))]


class Prompts:
    """Per-condition soft prompt for a problem text (None: no soft prompt)."""

    def __init__(self, static: Path | None, dynamic: Path | None, hidden: int) -> None:
        self.static = self.task = self.encoder = None
        if static is not None:
            from detot_agent.softprompt.prompt import SoftPrompt

            self.static = SoftPrompt.load(static, hidden_size=hidden).vectors
        if dynamic is not None:
            from detot_agent.embedding.task_embedding import TaskEmbedding
            from detot_agent.retrieval.encoder import Encoder

            self.task = TaskEmbedding.load(dynamic, hidden_size=hidden)
            self.encoder = Encoder(self.task.encoder_name)

    def for_texts(self, cond: str, texts: list[str]) -> list[Any]:
        if cond == "none":
            return [None] * len(texts)
        if cond == "static":
            if self.static is None:
                raise SystemExit("condition 'static' needs --static")
            return [self.static] * len(texts)
        if self.task is None or self.encoder is None:
            raise SystemExit("condition 'dynamic' needs --dynamic")
        return list(self.task.soft_prompts(self.encoder.encode(texts)))  # (N, k, H)


def run_condition(engine: LocalEngine, prompts: Prompts, cond: str, chosen: list[Any], path: Path,
                  max_tokens: int) -> None:
    done = {json.loads(line)["id"] for line in path.open()} if path.exists() else set()
    todo = [p for p in chosen if p.id not in done]
    start = time.perf_counter()
    with path.open("a") as f:
        for i in range(0, len(todo), 8):
            batch = todo[i:i + 8]
            softs = prompts.for_texts(cond, [p.text for p in batch])
            rows = [engine.build_row(Request(model="bench", messages=(Message.user(p.text + COT),),
                                             config=Config(max_tokens=max_tokens)), soft_prompt=s)
                    for p, s in zip(batch, softs, strict=True)]
            for p, outs in zip(batch, engine.generate_batch(rows), strict=True):
                value, strict = extract_number(outs[0].text)
                rec = {"id": p.id, "gold": p.fields["answer"], "pred": value, "strict_format": strict,
                       "correct": numbers_equal(value, p.fields["answer"]), "tokens": len(outs[0].token_ids),
                       "output": outs[0].text}
                f.write(json.dumps(rec) + "\n")
                f.flush()
            print(f"{path.parent.name}/{cond}: {len(done) + i + len(batch)}/{len(chosen)} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)


def held_out_nll(engine: LocalEngine, prompts: Prompts, conds: list[str], data_dir: Path, seed: int,
                 skip: int, n: int) -> dict[str, float]:
    """Target NLL on GSM8K train problems beyond the first `skip` of the tuning order (never trained on)."""
    from detot_agent.softprompt.loss import TuneExample, target_nll

    gsm = read_exemplars(data_dir / "gsm8k" / "train.jsonl", fmt="gsm8k")
    pick = random.Random(seed).sample(range(len(gsm)), skip + n)[skip:]
    texts = [gsm[i].text for i in pick]
    pairs = [TuneExample(prompt=gsm[i].text + COT, target=gsm[i].fields["rationale"]) for i in pick]
    out = {}
    for cond in conds:
        softs = prompts.for_texts(cond, texts)
        if cond == "none":
            out[cond] = target_nll(engine, None, pairs)
        else:  # one example at a time: each carries its own soft prompt
            out[cond] = sum(target_nll(engine, s, [p]) for s, p in zip(softs, pairs, strict=True)) / len(pairs)
        print(f"held-out NLL {cond}: {out[cond]:.4f}", flush=True)
    return out


def train_dynamic(engine: LocalEngine, args: argparse.Namespace) -> Path:
    """The dynamic task embedding on the static prompt's data and budget (`softprompt_multiarith.py`): the same
    600 GSM8K train problems and 32 for early stopping, text-initialised P0 of the same k, the same steps,
    learning rate, batch size, dropout, L2 pull and early stopping; only the bank, the gate and `balance` differ."""
    from detot_agent.cli.plots import plot_loss
    from detot_agent.embedding.task_embedding import TaskEmbedding
    from detot_agent.embedding.update import Feedback
    from detot_agent.retrieval.encoder import Encoder
    from detot_agent.softprompt.loss import TuneExample
    from detot_agent.softprompt.prompt import SoftPrompt

    out = args.out / "dynamic_task_embedding"
    if (out / "manifest.json").is_file():
        return out
    gsm = read_exemplars(args.data_dir / "gsm8k" / "train.jsonl", fmt="gsm8k")
    pick = random.Random(args.seed).sample(range(len(gsm)), args.train + 32)
    encoder = Encoder()
    e = encoder.encode([gsm[i].text for i in pick])
    te = TaskEmbedding.from_description("arithmetic", "Solve arithmetic word problems step by step.",
                                        encoder=encoder, samples=[gsm[i].text for i in pick[32:64]])
    p0 = SoftPrompt.initialize(engine, "arithmetic", k=args.k, init="text").vectors
    te.attach_head(p0, components=args.components, tau=args.tau, model_id=engine.source.spec, inputs=e[32:])
    if args.demos:  # each question behind the demos DETOT serves it with (never its own exemplar)
        from detot_agent.detot.served import served_examples
        from detot_agent.retrieval.index import ExemplarIndex

        index = ExemplarIndex.load(args.index, encoder=encoder)
        examples = served_examples(te, index, [gsm[i].text for i in pick], [gsm[i].fields["rationale"] for i in pick],
                                   k=args.demos)
    else:
        examples = [TuneExample(prompt=gsm[i].text + COT, target=gsm[i].fields["rationale"]) for i in pick]
    items = [Feedback(query=e[j], example=x) for j, x in enumerate(examples)]
    report = te.update(items[32:], val=items[:32], engine=engine, steps=args.steps, head_lr=args.lr,
                       batch_size=args.batch_size, eval_every=20, patience=3, balance=args.balance,
                       max_seconds=None, progress=True)
    te.save(out)
    (out / "report.json").write_text(report.model_dump_json(indent=2))
    plot_loss(report.train_loss, report.val_loss, out / "loss.png", title="dynamic task embedding",
              initial_val=report.lm_before)
    print(f"trained: val NLL {report.lm_before:.3f} -> {report.lm_after:.3f}, gate usage {report.gate_usage}, "
          f"{report.seconds:.0f}s, accepted={report.accepted}", flush=True)
    return out


def mcnemar(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    from scipy.stats import binomtest

    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return only_a, only_b, float(p)


def summary(out: Path, conds: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for suite_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name in SUITES):
        recs = {c: {r["id"]: r for r in map(json.loads, (suite_dir / f"{c}.jsonl").open())}
                for c in conds if (suite_dir / f"{c}.jsonl").exists()}
        common = sorted(set.intersection(*(set(v) for v in recs.values()))) if recs else []
        rows = {}
        for c, byid in recs.items():
            rs = [byid[i] for i in common]
            rows[c] = {"n": len(rs), "accuracy": sum(r["correct"] for r in rs) / max(len(rs), 1),
                       "strict_format_rate": sum(r["strict_format"] for r in rs) / max(len(rs), 1),
                       "mean_output_tokens": sum(r["tokens"] for r in rs) / max(len(rs), 1)}
        tests = {}
        for a, b in (("static", "dynamic"), ("none", "static"), ("none", "dynamic")):
            if a in recs and b in recs:
                only_a, only_b, p = mcnemar([recs[a][i]["correct"] for i in common],
                                            [recs[b][i]["correct"] for i in common])
                tests[f"{a}_vs_{b}"] = {f"only_{a}": only_a, f"only_{b}": only_b, "exact_mcnemar_p": p}
        table[suite_dir.name] = {"conditions": rows, "paired": tests}
    if (out / "nll.json").exists():
        table["held_out_nll"] = json.loads((out / "nll.json").read_text())
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("evals/results/dynamic_prompt"))
    ap.add_argument("--suite", default="multiarith,gsm8k")
    ap.add_argument("--conditions", default="none,static,dynamic")
    ap.add_argument("--static", type=Path, default=None)
    ap.add_argument("--dynamic", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--nll", action="store_true", help="also measure held-out target NLL")
    ap.add_argument("--nll-skip", type=int, default=632, help="tuning problems to skip (train + validation)")
    ap.add_argument("--nll-n", type=int, default=64)
    ap.add_argument("--summary", action="store_true", help="only print the table from the JSONL files")
    ap.add_argument("--train-dynamic", action="store_true",
                    help="train the dynamic task embedding first (into <out>/dynamic_task_embedding)")
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--components", type=int, default=4)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--balance", type=float, default=0.1)
    ap.add_argument("--demos", type=int, default=0,
                    help="--train-dynamic: demos in each training prompt, as DETOT serves them (needs --index)")
    ap.add_argument("--index", type=Path, default=None, help="exemplar index for --demos (the GSM8K train index)")
    args = ap.parse_args()
    conds = [c.strip() for c in args.conditions.split(",") if c.strip()]
    bad = sorted(set(conds) - {"none", "static", "dynamic"})
    if bad:
        raise SystemExit(f"unknown condition(s) {bad}; choose from none, static, dynamic")
    if args.demos and (args.index is None or not args.train_dynamic):
        raise SystemExit("--demos trains with demos in context: it needs --train-dynamic and --index DIR")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary:
        engine = LocalEngine(args.model, dtype=args.dtype, device="cpu")
        if args.train_dynamic:
            args.dynamic = train_dynamic(engine, args)
        prompts = Prompts(args.static, args.dynamic, engine.hidden_size)
        for suite in [s.strip() for s in args.suite.split(",") if s.strip()]:
            chosen = problems(args.data_dir, suite, args.limit, args.seed)
            (args.out / suite).mkdir(exist_ok=True)
            for cond in conds:
                run_condition(engine, prompts, cond, chosen, args.out / suite / f"{cond}.jsonl", args.max_tokens)
        if args.nll:
            nll_path = args.out / "nll.json"
            known = json.loads(nll_path.read_text()) if nll_path.exists() else {}
            known.update(held_out_nll(engine, prompts, conds, args.data_dir, args.seed, args.nll_skip, args.nll_n))
            nll_path.write_text(json.dumps(known, indent=2) + "\n")
    table = summary(args.out, conds)
    (args.out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
