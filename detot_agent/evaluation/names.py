"""Eval method names: 0.4's names say what a method is; 0.3's are accepted and run folders written under them are
renamed when next opened.

| 0.3 name | 0.4 name | what it is |
|---|---|---|
| `plain_cot` | `cot` | greedy chain of thought in the shared plain prompt |
| `plain_sc`, `plain_sc_adaptive` | `sc`, `sc_adaptive` | matched-budget self-consistency in that prompt |
| `plain_cisc`, `plain_pot` | `cisc`, `pot` | confidence-weighted votes; program of thought |
| `zero_shot`, `zero_shot_cot` | `dspy_predict`, `dspy_cot` | DSPy modules in DSPy's field layout |
| `few_shot_cot`, `knn_fewshot` | `dspy_fewshot_cot`, `dspy_knn_fewshot` | the same, with demos |
| `self_consistency` | `dspy_sc` | DSPy chain-of-thought samples, majority vote |
| `detot_plain_static`, `detot_plain` | `detot`, `detot_loop` | DETOT in the plain prompt, without and with the loop |
| `detot_static`, `detot` | `dspy_detot`, `dspy_detot_loop` | DETOT in DSPy's field layout, without and with the loop |

One 0.3 name is also a 0.4 name with another meaning: `detot` (0.3: DETOT in DSPy's layout with the loop;
0.4: DETOT in the plain prompt without it). On the command line a name means what 0.4 says; in a run folder
it means what the folder's `run.json` says: a folder without `method_names` was written under 0.3's names.

Example:
    >>> current("plain_sc"), current("detot"), current("detot_plain_static-retrieval", names=1)
    ('sc', 'detot', 'detot-retrieval')
    >>> current("detot", names=1)  # a 0.3 run folder's `detot`
    'dspy_detot_loop'
"""

from __future__ import annotations

__all__ = ["DETOT_METHODS", "NAMES_VERSION", "RENAMED", "current", "is_detot"]

NAMES_VERSION = 2  # run.json's `method_names`; a folder without it used 0.3's names (version 1)

RENAMED: dict[str, str] = {  # 0.3 name -> 0.4 name
    "plain_cot": "cot", "plain_sc": "sc", "plain_sc_adaptive": "sc_adaptive", "plain_cisc": "cisc",
    "plain_pot": "pot", "zero_shot": "dspy_predict", "zero_shot_cot": "dspy_cot", "few_shot_cot": "dspy_fewshot_cot",
    "knn_fewshot": "dspy_knn_fewshot", "self_consistency": "dspy_sc", "detot_plain_static": "detot",
    "detot_plain": "detot_loop", "detot_static": "dspy_detot", "detot": "dspy_detot_loop",
}

DETOT_METHODS = frozenset({"detot", "detot_loop", "dspy_detot", "dspy_detot_loop"})


def current(name: str, *, names: int = NAMES_VERSION) -> str:
    """The 0.4 name of `name` (an ablation `<method>-<parts>` keeps its parts), read under naming version `names`:
    1 renames every 0.3 name; 2 (the command line) renames the 0.3 names that are not also 0.4 names."""
    base, sep, parts = name.partition("-")
    if names < NAMES_VERSION or (base in RENAMED and base not in DETOT_METHODS):
        base = RENAMED.get(base, base)
    return f"{base}{sep}{parts}"


def is_detot(name: str) -> bool:
    """Whether the (0.4) method name, or the ablation of one, is a DETOT method."""
    return name.partition("-")[0] in DETOT_METHODS
