"""Program of thought, evaluated safely: a short Python program a model wrote, run without `eval`/`exec`.

`run_program(source)` parses the text with `ast` and interprets a small arithmetic subset itself:
assignments (names and tuples), `+=`-style updates, `if`/`elif`/`else`, `for` over `range(...)` or a
list, `while`, `break`/`continue`, one `def solution():` with `return` (PAL style), `print(...)`, and
expressions of numbers, lists, comparisons, `and`/`or`/`not`, `x if c else y`, indexing and the
functions `abs round min max int float sum len range`. Everything else is refused by name: imports,
attributes, other calls, strings, lambdas, comprehensions. Limits: source length, interpreted steps
(long loops), wall time, the magnitude of every number and the size of powers.

The answer is, in order: the value `solution()` returns, the last value printed, the variable
`answer` (or `result`, `ans`), else the last expression statement's value.

Example:
    >>> run_program("apples = 3\\nbought = 4\\nanswer = apples + bought")
    7
    >>> run_program("def solution():\\n    total = 0\\n    for i in range(1, 5):\\n        total += i\\n"
    ...             "    return total")
    10
    >>> run_program("import os")
    Traceback (most recent call last):
    ...
    detot_agent.errors.ProgramError: Import is not allowed in a program of thought
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Callable
from typing import Any

from detot_agent.errors import ProgramError

__all__ = ["MAX_MAGNITUDE", "run_program"]

MAX_MAGNITUDE = 1e15
MAX_SOURCE = 4000
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge}
_FUNCS: dict[str, Callable[..., Any]] = {"abs": abs, "round": round, "min": min, "max": max, "int": int,
                                         "float": float, "sum": sum, "len": len}
_NAMES = ("answer", "result", "ans")


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Return(Exception):
    def __init__(self, value: Any) -> None:
        self.value = value


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, list):
        if len(value) > 10_000:
            raise ProgramError("a list longer than 10000 items")
        return value
    if not isinstance(value, (int, float)):
        raise ProgramError(f"only numbers (and lists of them) are allowed, got {type(value).__name__}")
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > MAX_MAGNITUDE:
        raise ProgramError("result out of range")
    return value


class _Interpreter:
    def __init__(self, *, max_steps: int, max_seconds: float, allow_names: bool) -> None:
        self.vars: dict[str, Any] = {}
        self.printed: list[Any] = []
        self.last: Any = None
        self.solution: ast.FunctionDef | None = None
        self.steps = 0
        self.max_steps = max_steps
        self.deadline = time.monotonic() + max_seconds
        self.allow_names = allow_names
        self.in_solution = False

    def tick(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise ProgramError(f"the program ran more than {self.max_steps} steps (a long or endless loop)")
        if self.steps % 256 == 0 and time.monotonic() > self.deadline:
            raise ProgramError("the program ran out of time")

    # ---- statements ----------------------------------------------------------------------------
    def block(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            self.stmt(stmt)

    def stmt(self, node: ast.stmt) -> None:
        self.tick()
        if isinstance(node, ast.Assign):
            value = self.expr(node.value)
            for target in node.targets:
                self.assign(target, value)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            self.assign(node.target, self.binary(node.op, self.name(node.target.id), self.expr(node.value)))
        elif isinstance(node, ast.Expr):
            self.last = self.expr(node.value)
        elif isinstance(node, ast.If):
            self.block(node.body if self.expr(node.test) else node.orelse)
        elif isinstance(node, ast.For) and not node.orelse:
            for item in self.expr(node.iter):
                self.assign(node.target, item)
                if not self.loop_body(node.body):
                    break
        elif isinstance(node, ast.While) and not node.orelse:
            while self.expr(node.test):
                self.tick()
                if not self.loop_body(node.body):
                    break
        elif isinstance(node, ast.Break):
            raise _Break
        elif isinstance(node, ast.Continue):
            raise _Continue
        elif isinstance(node, ast.Pass):
            pass
        elif isinstance(node, ast.Return):
            raise _Return(None if node.value is None else self.expr(node.value))
        elif (isinstance(node, ast.FunctionDef) and node.name == "solution" and not node.args.args
              and not node.decorator_list and self.solution is None):
            self.solution = node
        else:
            raise ProgramError(f"{type(node).__name__} is not allowed in a program of thought")

    def loop_body(self, body: list[ast.stmt]) -> bool:
        """Run one pass of a loop body; False when it broke out."""
        try:
            self.block(body)
        except _Break:
            return False
        except _Continue:
            pass
        return True

    def assign(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name):
            if target.id in _FUNCS or target.id.startswith("__"):
                raise ProgramError(f"the name {target.id!r} cannot be assigned")
            self.vars[target.id] = _number(value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = list(value) if isinstance(value, (list, tuple)) else None
            if values is None or len(values) != len(target.elts):
                raise ProgramError("cannot unpack: the number of values does not match")
            for t, v in zip(target.elts, values, strict=True):
                self.assign(t, v)
        else:
            raise ProgramError(f"assigning to {type(target).__name__} is not allowed")

    # ---- expressions ---------------------------------------------------------------------------
    def name(self, ident: str) -> Any:
        if ident in self.vars:
            return self.vars[ident]
        if ident in ("True", "False"):
            return ident == "True"
        hint = "" if self.allow_names else " (use numbers, + - * / // % ** and abs/round/min/max)"
        raise ProgramError(f"Name is not allowed: {ident!r} is not defined{hint}")

    def binary(self, op: ast.operator, left: Any, right: Any) -> Any:
        fn = _BINARY.get(type(op))
        if fn is None:
            raise ProgramError(f"{type(op).__name__} is not allowed")
        if isinstance(op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ProgramError("power too large (exponent at most 64, base at most 1e6)")
        if isinstance(left, list) or isinstance(right, list):
            raise ProgramError("arithmetic on lists is not allowed")
        try:
            return _number(fn(left, right))
        except ZeroDivisionError:
            raise ProgramError("division by zero") from None

    def expr(self, node: ast.expr) -> Any:
        self.tick()
        if isinstance(node, ast.Constant):
            return _number(node.value)
        if isinstance(node, ast.Name):
            return self.name(node.id)
        if isinstance(node, ast.BinOp):
            return self.binary(node.op, self.expr(node.left), self.expr(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _number(_UNARY[type(node.op)](self.expr(node.operand)))
        if isinstance(node, ast.BoolOp):
            values = node.values
            out = self.expr(values[0])
            for v in values[1:]:
                if (isinstance(node.op, ast.And) and not out) or (isinstance(node.op, ast.Or) and out):
                    break
                out = self.expr(v)
            return out
        if isinstance(node, ast.Compare):
            left = self.expr(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self.expr(right_node)
                if type(op) not in _COMPARE:
                    raise ProgramError(f"{type(op).__name__} is not allowed")
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.expr(node.body) if self.expr(node.test) else self.expr(node.orelse)
        if isinstance(node, (ast.List, ast.Tuple)):
            return _number([self.expr(e) for e in node.elts])
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
            seq, index = self.expr(node.value), self.expr(node.slice)
            if not isinstance(seq, list) or not isinstance(index, int):
                raise ProgramError("only lists can be indexed, by whole numbers")
            try:
                return seq[index]
            except IndexError:
                raise ProgramError("list index out of range") from None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            self.allowed_call(node.func.id)  # refused before its arguments are evaluated
            return self.call(node.func.id, [self.expr(a) for a in node.args])
        raise ProgramError(f"{type(node).__name__} is not allowed in a program of thought"
                           + ("" if self.allow_names else "; use numbers, + - * / // % ** and abs/round/min/max"))

    def _functions(self) -> dict[str, Callable[..., Any]]:
        return _FUNCS if self.allow_names else {k: _FUNCS[k] for k in ("abs", "round", "min", "max")}

    def allowed_call(self, fn: str) -> None:
        names = [*self._functions(), *(("print", "range") if self.allow_names else ())]
        if fn in names or (fn == "solution" and self.solution is not None):
            return
        raise ProgramError(f"Call is not allowed: {fn}() (allowed: {', '.join(names)})")

    def call(self, fn: str, args: list[Any]) -> Any:
        if fn == "print" and self.allow_names:
            self.printed.extend(args)
            return None
        if fn == "range" and self.allow_names:
            if not 1 <= len(args) <= 3 or not all(isinstance(a, int) for a in args):
                raise ProgramError("range() takes one to three whole numbers")
            span = range(*args)
            if len(span) > self.max_steps:
                raise ProgramError(f"range of {len(span)} items exceeds the step limit ({self.max_steps})")
            return list(span)
        if fn == "solution" and self.solution is not None and not args:
            if self.in_solution:
                raise ProgramError("solution() calls itself: recursion is not allowed in a program of thought")
            self.in_solution = True
            try:
                self.block(self.solution.body)
            except _Return as ret:
                return ret.value
            finally:
                self.in_solution = False
            return None
        self.allowed_call(fn)
        allowed = self._functions()
        try:
            return _number(allowed[fn](*args))
        except (TypeError, ValueError) as exc:
            raise ProgramError(f"{fn}(): {exc}") from None


def run_program(source: str, *, max_steps: int = 20_000, max_seconds: float = 1.0, max_chars: int = MAX_SOURCE,
                expression: bool = False) -> int | float:
    """The answer of a program of thought (see the module docstring); `expression=True` accepts one
    arithmetic expression only (no names, no statements), as a calculator.

    Raises:
        ProgramError: a refused construct (named), a limit passed, a runtime error, or no answer.
    """
    try:
        return _run(source, max_steps=max_steps, max_seconds=max_seconds, max_chars=max_chars, expression=expression)
    except RecursionError:  # nesting deep enough to exhaust Python's stack (parser or interpreter)
        raise ProgramError("the program nests too deeply (or recurses) to evaluate") from None


def _run(source: str, *, max_steps: int, max_seconds: float, max_chars: int, expression: bool) -> int | float:
    text = source.strip()
    if len(text) > max_chars:
        raise ProgramError(f"the program is {len(text)} characters; the limit is {max_chars}")
    try:
        tree = ast.parse(text, mode="eval" if expression else "exec")
    except SyntaxError:
        raise ProgramError(f"not an arithmetic expression or program: {text[:80]!r}") from None
    run = _Interpreter(max_steps=max_steps, max_seconds=max_seconds, allow_names=not expression)
    if isinstance(tree, ast.Expression):
        value: Any = run.expr(tree.body)
    else:
        assert isinstance(tree, ast.Module)
        try:
            run.block(tree.body)
        except (_Break, _Continue):
            raise ProgramError("break or continue outside a loop") from None
        except _Return:
            raise ProgramError("return outside solution()") from None
        if run.solution is not None:
            value = run.call("solution", [])
        elif run.printed:
            value = run.printed[-1]
        else:
            value = next((run.vars[n] for n in _NAMES if n in run.vars), run.last)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProgramError("the program gave no numeric answer (set `answer`, print it, or return it from "
                           "solution())")
    value = _number(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value
