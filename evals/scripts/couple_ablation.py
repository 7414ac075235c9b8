#!/usr/bin/env python
"""Should the LM loss move the retrieval weights? `lm_moves_retrieval=False` (default) vs True (0.3: `couple`; issue 16,
item 3; the summary keeps the keys `couple=False/True`).

Trains the same task embedding (per-input head, M components) on the same GSM8K train pairs with the same
budget twice, once with the LM gradient stopped at `q(x)` and once with it flowing into `w` and `alpha`,
then reports on held-out GSM8K train problems: the target NLL under each input's own `P(x)`, and how many
held-out inputs see different top-k demos from an exemplar index than before training (retrieval moved by
the LM loss alone: no retrieval evidence was given).

    python evals/scripts/couple_ablation.py --out evals/results/couple_ablation
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.embedding.update import Feedback
from detot_agent.engines.torch_engine import LocalEngine
from detot_agent.io.datafiles import read_exemplars
from detot_agent.retrieval.encoder import Encoder
from detot_agent.retrieval.index import ExemplarIndex
from detot_agent.softprompt.loss import TuneExample, target_nll
from detot_agent.softprompt.prompt import SoftPrompt

COT = "\nLet's think step by step."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("evals/results/couple_ablation"))
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--held", type=int, default=48)
    ap.add_argument("--pool", type=int, default=1000, help="exemplars in the retrieval index")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--components", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    gsm = read_exemplars(args.data_dir / "gsm8k" / "train.jsonl", fmt="gsm8k")
    order = random.Random(args.seed).sample(range(len(gsm)), args.train + 32 + args.held + args.pool)
    train, val = order[:args.train], order[args.train:args.train + 32]
    held = order[args.train + 32:args.train + 32 + args.held]
    pool = order[-args.pool:]
    encoder = Encoder()
    index = ExemplarIndex(encoder)
    index.add([gsm[i] for i in pool])
    engine = LocalEngine(args.model, device="cpu", dtype="float32")

    def items(ids: list[int]) -> list[Feedback]:
        e = encoder.encode([gsm[i].text for i in ids])
        return [Feedback(query=e[j], example=TuneExample(prompt=gsm[i].text + COT, target=gsm[i].fields["rationale"]))
                for j, i in enumerate(ids)]

    tr, va, he = items(train), items(val), items(held)
    base = TaskEmbedding.from_description("arith", "Solve arithmetic word problems step by step.", encoder=encoder,
                                          samples=[gsm[i].text for i in train[:32]])
    base.attach_head(SoftPrompt.initialize(engine, "arith", k=args.k, init="text").vectors,
                     components=args.components, model_id=engine.source.spec,
                     inputs=[f.query for f in tr])  # type: ignore[arg-type]
    import numpy as np

    held_e = np.stack([f.query for f in he])
    held_examples = [f.example for f in he]

    def top(te: TaskEmbedding) -> list[list[str]]:
        return [[h.id for h in index.search(q, args.top)] for q in te.query(held_e)]

    def nll(te: TaskEmbedding) -> float:
        return target_nll(engine, te.soft_prompts(held_e), held_examples)  # type: ignore[arg-type]

    before_top = top(base)
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "held_out_nll_before": nll(base)}
    print(f"held-out NLL before: {result['held_out_nll_before']:.4f}", flush=True)
    for couple in (False, True):
        te = copy.deepcopy(base)
        report = te.update(tr, val=va, engine=engine, steps=args.steps, head_lr=args.lr, eval_every=10,
                           patience=3, lm_moves_retrieval=couple, max_seconds=None, progress=False)
        after_top = top(te)
        changed = sum(set(a) != set(b) for a, b in zip(before_top, after_top, strict=True))
        row = {"accepted": report.accepted, "val_nll": [report.lm_before, report.lm_after],
               "held_out_nll": nll(te), "held_inputs_with_changed_top_demos": changed, "held_inputs": len(held),
               "w_moved_l2": float((te.w - base.w).norm()), "gate_usage": report.gate_usage,
               "seconds": report.seconds}
        result[f"couple={couple}"] = row
        print(json.dumps({f"couple={couple}": row}), flush=True)
    (args.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
