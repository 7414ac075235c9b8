"""The matched-budget baselines on a batched engine with scripted decoding: budgets, rules, the shared prompt."""

from __future__ import annotations

import dspy
import pytest
from scripted import ScriptedLocalEngine, scripted_local_lm

from detot_agent.engines.generation import GenOutput
from detot_agent.evaluation import EvalContext
from detot_agent.evaluation.baselines import BASELINES

Q = "What is 3 plus 4?"
EXAMPLE = dspy.Example(question=Q, answer="7").with_inputs("question")


def _method(name, model_dir, answer, **kw):
    lm, engine = scripted_local_lm(model_dir, answer, plain=True, **{k: v for k, v in kw.items() if k != "n"})
    ctx = EvalContext(lm=lm, n=kw.get("n", 5), temperature=0.5, max_tokens=32, task_name="arith")
    return BASELINES[name](ctx), engine


def test_plain_sc_draws_the_greedy_answer_and_n_samples_in_the_shared_plain_prompt(long_tiny_model_dir):
    method, engine = _method("sc", long_tiny_model_dir, lambda t, n: "7" if n % 3 else "8")
    record = method(EXAMPLE)
    assert record["samples"] == 6 and record["pred"] == "7" and record["votes"] == {"8": 2.0, "7": 4.0}
    # every sample's vote key in the order drawn (greedy first): what the report's prefix curve is built from
    assert record["sample_keys"] == ["8", "7", "7", "8", "7", "7"] and len(record["sample_tokens"]) == 6
    row = engine.rows[0]
    assert (row.n, row.greedy) == (6, 1)  # one prefill: the greedy answer first, then five samples
    # PlainAdapter's prompt without demos (DETOT's plain prompt), no longer cue
    assert f"{Q}\nLet's think step by step." in engine.prompts[0] and "End with" not in engine.prompts[0]


def test_plain_sc_adaptive_stops_early_on_agreement_and_spends_the_budget_on_a_split(long_tiny_model_dir):
    method, _ = _method("sc_adaptive", long_tiny_model_dir, lambda t, n: "7")
    assert method(EXAMPLE)["samples"] == 4  # Beta rule: P(p > 0.5) = 31/32 after four agreeing samples
    method, _ = _method("sc_adaptive", long_tiny_model_dir, lambda t, n: str(n % 2))
    assert method(EXAMPLE)["samples"] == 6


def test_plain_cisc_lets_confident_samples_outvote_a_majority(long_tiny_model_dir):
    answer = lambda t, n: "8" if n in (1, 2) else "7"  # noqa: E731
    confident = lambda t, n: -0.01 if n in (1, 2) else -1.5  # noqa: E731
    cisc, _ = _method("cisc", long_tiny_model_dir, answer, logprob=confident)
    plain, _ = _method("sc", long_tiny_model_dir, answer, logprob=confident)
    assert cisc(EXAMPLE)["pred"] == "8" and plain(EXAMPLE)["pred"] == "7"


def test_plain_pot_runs_the_program_safely(long_tiny_model_dir):
    code = "Let me compute.\n```python\napples = 3\nanswer = apples + 4\n```"
    method, engine = _method("pot", long_tiny_model_dir, lambda t, n: code, raw=True)
    record = method(EXAMPLE)
    assert record["pred"] == "7" and record["program_error"] is None and engine.rows[0].temperature == 0
    method, _ = _method("pot", long_tiny_model_dir, lambda t, n: "```python\nimport os\nanswer = 1\n```",
                        raw=True)
    record = method(EXAMPLE)
    assert record["pred"] is None and record["parse_failures"] == 1
    assert "Import is not allowed" in record["program_error"]


def test_baselines_need_a_batched_engine():
    from scripted import scripted_lm

    from detot_agent.errors import ConfigError

    lm, _ = scripted_lm(lambda t, n: "7")
    with pytest.raises(ConfigError, match="sample through a local or vLLM engine"):
        BASELINES["sc"](EvalContext(lm=lm))


def test_plain_cot_the_baselines_and_plain_detot_share_one_plain_prompt(long_tiny_model_dir, encoder,
                                                                        multiarith_file):
    """Compared methods send the same user turn: the question, then COT_CUE."""
    from detot_agent.detot.adapters import COT_CUE
    from detot_agent.evaluation.methods import build_method
    from detot_agent.io.datafiles import read_exemplars
    from detot_agent.retrieval.index import ExemplarIndex

    index = ExemplarIndex(encoder)
    index.add(read_exemplars(multiarith_file, fmt="multiarith")[100:110])

    def prompt(name: str) -> str:
        lm, engine = scripted_local_lm(long_tiny_model_dir, lambda t, n: "7", plain=True)
        ctx = EvalContext(lm=lm, index=index, encoder=encoder, k=2, n=1, temperature=0.5, max_tokens=16,
                          task_name="arith", no_soft_prompt=True)
        build_method(name, ctx)(EXAMPLE)
        assert len(engine.prompts) == 1
        return engine.prompts[0]  # the whole templated prompt: no system message, no demos

    shared = {name: prompt(name) for name in ("cot", "sc", "detot-retrieval")}
    assert len(set(shared.values())) == 1 and f"\n{Q}\n{COT_CUE}</s>" in shared["cot"], shared


class SeededEngine(ScriptedLocalEngine):
    """Scripted decoding where each sample's answer and confidence depend only on the seed it is drawn with
    (the engines' rule: sample j of a row has seed `seed + j - greedy`; the greedy one has none)."""

    def _run(self, rows):
        out = []
        for row in rows:
            self.rows.append(row)
            samples = []
            for j in range(row.n):
                seed = None if row.is_greedy(j) else row.seed + j - row.greedy
                answer = "8" if seed is not None and seed % 4 == 0 else "7"  # a confident "8" one seed in four
                ids = self.tokenizer(f"step\nThe answer is {answer}.", add_special_tokens=False)["input_ids"]
                per_token = -0.01 if answer == "8" else -1.0
                samples.append(GenOutput(text=f"step\nThe answer is {answer}.", token_ids=list(ids),
                                         finish_reason="stop", logprob=per_token * len(ids)))
            out.append(samples)
        return out


def test_adaptive_and_cisc_re_vote_plain_sc_s_samples_and_match_drawing_them(long_tiny_model_dir, tmp_path):
    from detot_agent import local_lm
    from detot_agent.evaluation import run_eval
    from detot_agent.evaluation.runner import read_records

    examples = [dspy.Example(id=f"q{i}", question=f"What is {i} plus 7?", answer="7").with_inputs("question")
                for i in range(8)]
    run = {"suite": "s", "source": "s", "model": "m", "seed": 0, "limit": None, "k": 3, "n": 5,
           "temperature": 0.5, "max_tokens": 32}
    variants = ["sc_adaptive", "cisc"]

    def evaluate(methods, out):
        engine = SeededEngine(long_tiny_model_dir, lambda t, n: None, plain=True)
        ctx = EvalContext(lm=local_lm(engine=engine, cache=False), n=5, temperature=0.5, max_tokens=32)
        run_eval(examples, methods, ctx, out, run=run, threads=1, progress=False)
        return engine, {m: {r["id"]: r for r in read_records(out / f"{m}.jsonl")} for m in methods}

    engine, revoted = evaluate(["sc", *variants], tmp_path / "together")
    assert len(engine.rows) == len(examples)  # only sc drew: one row of six per question
    _, drawn = evaluate(variants, tmp_path / "apart")  # no sc records: they draw
    for m in variants:
        for qid, rec in revoted[m].items():
            assert rec["revoted_from"] == "sc" and "revoted_from" not in drawn[m][qid]
            for field in ("pred", "samples", "sample_keys", "sample_tokens", "votes", "tokens"):
                assert rec[field] == drawn[m][qid][field], (m, qid, field)
    sc = revoted["sc"]
    adaptive = revoted["sc_adaptive"]
    assert all(r["sample_keys"] == sc[q]["sample_keys"][: r["samples"]] for q, r in adaptive.items())
    assert any(r["samples"] < 6 for r in revoted["sc_adaptive"].values())  # it did stop early somewhere
    assert any(revoted["cisc"][q]["pred"] != sc[q]["pred"] for q in sc)  # and CISC's weights did change votes
    from detot_agent.evaluation import write_report
    from detot_agent.evaluation.report import render_markdown

    rows = {line.split(" | ")[0].strip("| "): line for line in render_markdown(
        write_report(tmp_path / "together", plots=False)).splitlines() if line.startswith(("| sc", "| cisc"))}
    assert "re-voted" in rows["cisc"] and "re-voted" not in rows["sc"]  # no timing claimed for them
