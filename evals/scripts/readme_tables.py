#!/usr/bin/env python
"""Render the README's benchmark tables (markdown) from the JSON files under evals/results/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def engine_table() -> str:
    d = json.loads((RESULTS / "bench_engine.json").read_text())
    rows = [("(a) DSPy `n=8` fan-out: 8 sequential engine calls", "sequential"),
            ("(b) one `sample(8)`: one prefill, 8 sequences decoded together", "batched"),
            ("(c) 8 threads, one request each, dynamic batching on", "concurrent_batched"),
            ("(d) 8 threads, one request each, dynamic batching off", "concurrent_unbatched")]
    out = ["| path | tokens | seconds | tokens/s |", "| --- | ---: | ---: | ---: |"]
    for label, key in rows:
        out.append(f"| {label} | {d['tokens'][key]} | {d['seconds'][key]:.2f} | {d[key + '_tok_s']:.1f} |")
    out.append("")
    out.append(f"`batched_over_sequential` = **{d['batched_over_sequential']:.2f}x**; concurrent batched over "
               f"unbatched = **{d['concurrent_batched_over_unbatched']:.2f}x** ({d['model']}, {d['device']}, "
               f"{d['dtype']}, prompt {d['prompt_tokens']} tokens).")
    return "\n".join(out)


def _x(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def retrieval_table() -> str:
    d = json.loads((RESULTS / "bench_retrieval.json").read_text())
    cal = next(iter(d.values()))["calibration"]
    out = ["| size | index | build s | memory MB | p50 ms | p99 ms | batch queries/s | recall@10 | numpy p50 ms "
           "| speed-up vs numpy (p50) | dspy Embeddings p50 ms: via call (search only) |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size, r in d.items():
        kind = f"IVF-Flat, nprobe {r['nprobe']}" if r["index_type"] == "ivf" else "exact"
        dspy_cell = (f"{r['baseline_dspy_embeddings_p50_ms']:.1f} ({r['baseline_dspy_embeddings_direct_p50_ms']:.2f})"
                     if "baseline_dspy_embeddings_p50_ms" in r else "-")
        out.append(f"| {int(size):,} | {kind} | {r['build_s']:.1f} | {r['memory_mb']:.0f} | {r['p50_ms']:.3f} | "
                   f"{r['p99_ms']:.3f} | {r['batch_qps']:,.0f} | {r['recall_at_10']:.3f} | "
                   f"{r['baseline_numpy_p50_ms']:.2f} | {_x(r['speedup_vs_numpy_p50'])} | {dspy_cell} |")
    out.append("")
    out.append(f"Calibration: median top-1 cosine of real MiniLM embeddings of GSM8K test questions against GSM8K "
               f"train = {cal['real_median_top1']:.3f}; synthetic at the same size = "
               f"{cal['synthetic_median_top1_at_reference']:.3f} (noise scale {cal['sigma']:.3f} around "
               f"{cal['clusters']:,} centres). Median cosine of random pairs: real "
               f"{cal['real_median_pair_cosine']:.3f}, synthetic {cal['synthetic_median_pair_cosine']:.3f}.")
    return "\n".join(out)


def softprompt_table() -> str:
    d = json.loads((RESULTS / "softprompt_multiarith" / "summary.json").read_text())
    rep = json.loads((RESULTS / "softprompt_multiarith" / "soft_prompt" / "report.json").read_text())
    out = ["| condition | accuracy | a number parses | explicit \"The answer is N\" | mean output tokens |",
           "| --- | ---: | ---: | ---: | ---: |"]
    for key, label in (("no_soft_prompt", "greedy CoT, no soft prompt"), ("soft_prompt", "greedy CoT + soft prompt")):
        r = d[key]
        out.append(f"| {label} | {r['accuracy']:.2f} ({round(r['accuracy'] * r['n'])}/{r['n']}) | "
                   f"{r['number_parse_rate']:.2f} | {r['strict_format_rate']:.2f} | {r['mean_output_tokens']:.0f} |")
    out.append("")
    out.append(f"Training: {rep['examples']} GSM8K train problems, {rep['steps_run']} steps, validation NLL "
               f"{rep['initial_val_loss']:.3f} -> {rep['best_val_loss']:.3f} (best step {rep['best_step']}), "
               f"{rep['seconds'] / 60:.0f} min on this CPU ({rep['seconds_per_step']:.1f} s/step).")
    return "\n".join(out)


TABLES = {"engine": engine_table, "retrieval": retrieval_table, "softprompt": softprompt_table}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(TABLES):
        print(TABLES[name]())
