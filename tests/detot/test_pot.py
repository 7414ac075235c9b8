"""The program-of-thought evaluator: exact results on a table of programs, refusals by name, limits."""

from __future__ import annotations

import pytest

from detot_agent.detot.pot import run_program
from detot_agent.errors import DetotError, ProgramError

PROGRAMS = [
    ("apples = 3\nbought = 4\nanswer = apples + bought", 7),
    ("total = 12 * 7\nprint(total)", 84),
    ("price = 2.5\ncount = 4\nresult = price * count", 10),
    ("x = 10\nx -= 3\nx *= 2\nans = x", 14),
    ("a, b = 6, 7\na * b", 42),
    ("def solution():\n    eggs = 16 - 3 - 4\n    return eggs * 2", 18),
    ("s = 0\nfor i in range(1, 11):\n    if i % 2 == 0:\n        continue\n    s += i\nanswer = s", 25),
    ("n = 0\nwhile True:\n    n += 1\n    if n >= 5:\n        break\nanswer = n", 5),
    ("prices = [3, 4, 5]\nanswer = sum(prices) / len(prices)", 4),
    ("answer = round(10 / 3, 2)", 3.33),
    ("answer = max(3, 9) - min(2, 8) if 3 < 4 else 0", 7),
    ("answer = -(2 ** 10) // 3", -342),
    ("answer = int(7.9) + float(1)", 8),
]


@pytest.mark.parametrize(("source", "value"), PROGRAMS)
def test_programs_give_exact_results(source, value):
    assert run_program(source) == value


@pytest.mark.parametrize(("source", "why"), [
    ("import os\nanswer = 1", "Import is not allowed"),
    ("from math import pi\nanswer = pi", "ImportFrom is not allowed"),
    ("answer = (1).__class__", "Attribute is not allowed"),
    ("answer = open('x')", "Call is not allowed: open"),
    ("answer = __import__('os')", "Call is not allowed: __import__"),
    ("answer = eval('1')", "Call is not allowed: eval"),
    ("answer = 'a' * 3", "only numbers"),
    ("answer = 9 ** 99", "power too large"),
    ("answer = 10 ** 40", "out of range"),
    ("while True:\n    pass", "more than 20000 steps"),
    ("answer = sum(range(10 ** 9))", "exceeds the step limit"),
    ("answer = 1 / 0", "division by zero"),
    ("answer = [i for i in range(3)]", "ListComp is not allowed"),
    ("f = lambda: 1\nanswer = 1", "Lambda is not allowed"),
    ("answer = y + 1", "'y' is not defined"),
    ("x = 3", "no numeric answer"),
    ("answer =", "not an arithmetic expression or program"),
    ("answer = 1\n" * 2000, "the limit is 4000"),
    ("class A:\n    pass\nanswer = 1", "ClassDef is not allowed"),
    ("abs = 3\nanswer = abs", "cannot be assigned"),
])
def test_unsafe_or_broken_programs_are_refused_by_name(source, why):
    with pytest.raises(ProgramError, match=why):
        run_program(source)
    assert issubclass(ProgramError, DetotError)


def test_expression_mode_is_a_calculator():
    assert run_program("17 * 23 * 4", expression=True) == 1564
    with pytest.raises(ProgramError, match="Name is not allowed"):
        run_program("x + 1", expression=True)
    with pytest.raises(ProgramError, match="Call is not allowed: sum"):
        run_program("sum([1, 2])", expression=True)


@pytest.mark.parametrize("source, message", [
    ("def solution():\n    return solution()", "recursion is not allowed"),
    ("def solution():\n    x = 1\n    if x > 0:\n        return solution() + 1\n    return 0",
     "recursion is not allowed"),
    ("def solution():\n    return helper()\n\ndef helper():\n    return solution()", "FunctionDef is not allowed"),
    ("answer = " + "+".join(["1"] * 1900), "nests too deeply"),
    ("answer = " + "-" * 3000 + "1", "nests too deeply"),
])
def test_recursion_and_deep_nesting_are_program_errors_not_python_crashes(source, message):
    with pytest.raises(ProgramError, match=message):
        run_program(source)


def test_a_solution_called_once_still_works_after_the_recursion_guard():
    assert run_program("def solution():\n    return 2 + 3\n\nprint(solution())") == 5
