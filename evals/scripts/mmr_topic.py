#!/usr/bin/env python
"""Which MMR lambda keeps retrieval on topic? (issue 20, item 4: the default must keep the top hit and stay on topic.)

For GSM8K test questions (a seeded sample) as queries against the GSM8K train index, DETOT's query vector
(a description-initialised task embedding, as `DETOT` builds one) retrieves `k` exemplars at each lambda, and
for each lambda the script reports, averaged over queries:

- `top_kept`: the plain top hit is the first hit (MMR's first pick is always the most relevant one when
  lambda > 0, so this should be 1.00: a check, not a finding);
- `similarity`: mean cosine similarity of the hits to the query;
- `in_top10`: share of hits among the query's 10 most similar exemplars;
- `shares_subject`: share of hits sharing a content word with the query (a lower-case word of 4+ letters
  outside a stop list of function words and generic word-problem words: "apples", "tickets", "garden");
- `redundancy`: mean pairwise cosine similarity among the hits (what MMR trades relevance for).

    python evals/scripts/mmr_topic.py --index runs/gsm8k-train-index --out evals/results/mmr_topic.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

import numpy as np

from detot_agent.embedding.task_embedding import TaskEmbedding
from detot_agent.io.persist import atomic_write_text
from detot_agent.retrieval.encoder import Encoder
from detot_agent.retrieval.index import ExemplarIndex

_STOP_WORDS = """
about after again also always another any anything around back been before being between both bought
but buys can cost costs could does each else even every every first from gave gets give given gives has
have having her here hers him his how into its just last like many more most much must need needs next
only other over same second she should some such than that the their them then there these they this
those three through time times total twice under until very want wants was were what when where which
while who whom will with would your year years week weeks day days hour hours minute minutes half each
number numbers amount left remaining altogether together spend spent make makes made take takes took
four five seven eight nine zero hundred thousand dollars dollar cents price"""
STOP = set(_STOP_WORDS.split())
WORD = re.compile(r"[a-z]{4,}")


def subject(text: str) -> set[str]:
    """Content words of a problem, plural 's' stripped ("apples" and "apple" match)."""
    return {w.rstrip("s") for w in WORD.findall(text.lower()) if w not in STOP}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--index", default="runs/gsm8k-train-index")
    ap.add_argument("--queries", default="../shared/data/gsm8k/test.jsonl")
    ap.add_argument("--n", type=int, default=300, help="queries (seeded sample)")
    ap.add_argument("--k", type=int, default=3, help="hits per query (DETOT's default k)")
    ap.add_argument("--lambdas", default="1.0,0.9,0.7,0.5,0.3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="evals/results/mmr_topic.json")
    args = ap.parse_args(argv)

    enc = Encoder()
    index = ExemplarIndex.load(args.index, encoder=enc)
    rows = [json.loads(line) for line in Path(args.queries).read_text().splitlines() if line.strip()]
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    questions = [rows[i]["question"] for i in order[: args.n]]
    task = TaskEmbedding.from_description("arith", "Grade-school math word problems", encoder=enc)
    queries = task.query(enc.encode(questions))  # (Q, D), DETOT's query side
    plain10 = index.search_many(queries, 10)
    results = []
    for lam in [float(x) for x in args.lambdas.split(",")]:
        hits = index.search_many(queries, args.k, mmr=None if lam == 1.0 else lam)
        kept, sim, top10, topic, redundancy = [], [], [], [], []
        for q, text, found, ref in zip(queries, questions, hits, plain10, strict=True):
            vecs = index.vectors([h.id for h in found])  # (k, D)
            qn = q / np.linalg.norm(q)
            kept.append(found[0].id == ref[0].id)
            sim.append(float(np.mean(vecs @ qn)))
            near = {h.id for h in ref}
            top10.append(np.mean([h.id in near for h in found]))
            words = subject(text)
            topic.append(np.mean([bool(words & subject(h.text)) for h in found]))
            pair = vecs @ vecs.T
            redundancy.append(float(pair[np.triu_indices(len(found), 1)].mean()) if len(found) > 1 else 1.0)
        results.append({"lambda": lam, "top_kept": float(np.mean(kept)), "similarity": float(np.mean(sim)),
                        "in_top10": float(np.mean(top10)), "shares_subject": float(np.mean(topic)),
                        "redundancy": float(np.mean(redundancy))})
    out = {"index": args.index, "queries": args.queries, "n": len(questions), "k": args.k, "seed": args.seed,
           "results": results}
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n")
    print(f"{len(questions)} GSM8K test queries, k = {args.k}, GSM8K train index ({len(index)} exemplars)")
    print("| lambda | top hit kept | similarity | in plain top-10 | shares subject | redundancy |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['lambda']:.1f} | {r['top_kept']:.2f} | {r['similarity']:.3f} | {r['in_top10']:.2f} | "
              f"{r['shares_subject']:.2f} | {r['redundancy']:.3f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
