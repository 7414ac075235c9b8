"""Suite loaders on real sample lines of each layout; lookup by name; seeded sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detot_agent.answers import AnswerFormat
from detot_agent.errors import DataFileError
from detot_agent.evaluation import load_suite, sample_examples

ROOT = Path(__file__).resolve().parents[2]

# AddSub / SingleEq and SVAMP records as their public repositories lay them out
ADDSUB = [{"iIndex": 1, "sQuestion": "Joan found 70 seashells on the beach. She gave Sam some of her seashells. "
                                     "She has 27 seashells. How many seashells did she give to Sam ?",
           "lEquations": ["X=(70.0-27.0)"], "lSolutions": [43.0]}]
SVAMP = [{"ID": "chal-1", "Body": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each "
                                  "pack", "Question": "How much do you have to pay to buy each pack?",
          "Equation": "( 76.0 - 25.0 )", "Answer": 51.0, "Type": "Subtraction"}]


def test_gsm8k_lines_keep_the_number_after_the_hashes(tmp_path, shared_data):
    lines = shared_data("gsm8k/test.jsonl").read_text().splitlines()[:3]
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    suite = load_suite(str(path))
    assert suite.answer_format is AnswerFormat.NUMBER
    first = suite.examples[0]
    assert first.id == "test:1" and first.answer == "18" and first.question.startswith("Janet")
    assert first.inputs().toDict() == {"question": first.question}
    assert [ex.answer for ex in suite.examples] == [json.loads(line)["answer"].split("####")[-1].strip()
                                                    for line in lines]


def test_multiarith_json_layout(tmp_path, shared_data):
    items = json.loads(shared_data("multiarith/MultiArith.json").read_text())[:2]
    path = tmp_path / "MultiArith.json"
    path.write_text(json.dumps(items))
    suite = load_suite(str(path))
    assert [ex.id for ex in suite.examples] == ["MultiArith:0", "MultiArith:1"]
    assert suite.examples[0].answer == "39" and "Halloween" in suite.examples[0].question


def test_addsub_and_svamp_layouts(tmp_path):
    (tmp_path / "AddSub.json").write_text(json.dumps(ADDSUB))
    (tmp_path / "SVAMP.json").write_text(json.dumps(SVAMP))
    addsub = load_suite(str(tmp_path / "AddSub.json"))
    assert addsub.examples[0].id == "AddSub:1" and addsub.examples[0].answer == "43"
    svamp = load_suite(str(tmp_path / "SVAMP.json"))
    ex = svamp.examples[0]
    assert ex.id == "SVAMP:chal-1" and ex.answer == "51" and ex.question.endswith("buy each pack?")


def test_generic_jsonl_with_a_field_mapping_and_labels(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text('{"uid": "r1", "text": "Great film", "label": "Positive"}\n'
                    '{"uid": "r2", "text": "Dull", "label": "negative"}\n')
    suite = load_suite(str(path), question_field="text", answer_field="label", id_field="uid",
                       labels=["positive", "negative"])
    assert suite.answer_format is AnswerFormat.LABEL
    assert [(ex.id, ex.question, ex.answer) for ex in suite.examples] == [("r1", "Great film", "positive"),
                                                                         ("r2", "Dull", "negative")]
    path.write_text('{"uid": "r1", "text": "Odd", "label": "meh"}\n')
    with pytest.raises(DataFileError, match=r"gold answer 'meh' is not a valid label \(labels: positive, negative\)"):
        load_suite(str(path), question_field="text", answer_field="label", id_field="uid",
                   labels=["positive", "negative"])


def test_named_suites_are_found_under_the_data_dir_or_say_where_they_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("DETOT_DATA_DIR", raising=False)
    (tmp_path / "addsub").mkdir()
    (tmp_path / "addsub" / "AddSub.json").write_text(json.dumps(ADDSUB))
    assert load_suite("addsub", data_dir=tmp_path).name == "addsub"
    monkeypatch.setenv("DETOT_DATA_DIR", str(tmp_path))
    assert load_suite("AddSub").source == str(tmp_path / "addsub" / "AddSub.json")
    with pytest.raises(DataFileError, match=r"suite 'svamp': no data file found \(looked in .*svamp/SVAMP.json"):
        load_suite("svamp")
    monkeypatch.delenv("DETOT_DATA_DIR")
    with pytest.raises(DataFileError, match="no --data-dir given and \\$DETOT_DATA_DIR unset"):
        load_suite("gsm8k")
    with pytest.raises(DataFileError, match="neither a file nor a known name"):
        load_suite("no-such-suite")


def test_hub_datasets_need_the_package_or_a_hub(monkeypatch):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataFileError, match="needs the `datasets` package: pip install datasets"):
            load_suite("hf:openai/gsm8k:main@test")
        return
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataFileError, match="Hugging Face datasets could not load it"):
        load_suite("hf:no-such-owner/no-such-set@test")


def test_duplicate_ids_and_missing_answers_are_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "question": "1+1?", "answer": "2"}\n{"id": "a", "question": "2+2?", "answer": "4"}\n')
    with pytest.raises(DataFileError, match="duplicate id 'a'"):
        load_suite(str(path), id_field="id")
    path.write_text('{"question": "1+1?"}\n')
    with pytest.raises(DataFileError, match=r"no gold answer .*pass --answer-field"):
        load_suite(str(path))


def test_seeded_draws_are_stable_and_nested(shared_data):
    suite = load_suite(str(shared_data("multiarith/MultiArith.json")))
    a = sample_examples(suite.examples, limit=10, seed=0)
    b = sample_examples(suite.examples, limit=10, seed=0)
    c = sample_examples(suite.examples, limit=10, seed=1)
    assert [x.id for x in a] == [x.id for x in b] != [x.id for x in c]
    assert [x.id for x in sample_examples(suite.examples, limit=50, seed=0)] == [
        x.id for x in sample_examples(suite.examples, limit=100, seed=0)][:50]
    assert len(sample_examples(suite.examples, limit=None, seed=0)) == 600
    with pytest.raises(DataFileError, match="--limit must be positive"):
        sample_examples(suite.examples, limit=0, seed=0)


def test_an_offset_draws_a_development_split_disjoint_from_the_reported_one(shared_data):
    suite = load_suite(str(shared_data("multiarith/MultiArith.json")))
    reported = [x.id for x in sample_examples(suite.examples, limit=300, seed=0)]
    dev = [x.id for x in sample_examples(suite.examples, limit=60, seed=0, offset=300)]
    assert len(dev) == 60 and not set(dev) & set(reported)
    assert dev == [x.id for x in sample_examples(suite.examples, limit=360, seed=0)][300:]
    assert len(sample_examples(suite.examples, limit=None, seed=0, offset=550)) == 50
    with pytest.raises(DataFileError, match="skips all 600 problems"):
        sample_examples(suite.examples, limit=10, seed=0, offset=600)
    with pytest.raises(DataFileError, match="--offset must be >= 0"):
        sample_examples(suite.examples, limit=10, seed=0, offset=-1)


def test_the_removed_legacy_draw_is_refused_with_what_to_do():
    import dspy

    xs = [dspy.Example(id=str(i)) for i in range(20)]
    with pytest.raises(DataFileError, match=r"legacy draw was removed in 0\.4.*detot eval report"):
        sample_examples(xs, limit=5, seed=0, draw="legacy")
    with pytest.raises(DataFileError, match="draw must be one of nested"):
        sample_examples(xs, limit=5, seed=0, draw="shuffled")


def test_a_canary_set_is_seeded_and_never_holds_a_problem_of_the_run():
    import dspy

    from detot_agent.evaluation.data import draw_canary

    pool = [dspy.Example(question=f"problem {i}", answer=str(i)) for i in range(30)]
    run = pool[:10]
    canary = draw_canary(pool, run, size=8, seed=3)
    assert len(canary) == 8 and canary == draw_canary(pool, run, size=8, seed=3)
    assert not {q for q, _ in canary} & {ex.question for ex in run}
    assert all(q == f"problem {a}" for q, a in canary)
    with pytest.raises(DataFileError, match="only 20 canary problems"):
        draw_canary(pool, run, size=21, seed=3)
