"""The rule-based reward of RL: 1 if the model's body is allowed code and passes every hidden test, else 0.

The report's rule-based rewards check answers by rules, and code by running it: "for LeetCode problems, we can utilize
a compiler to generate feedback based on test cases" (§5.2.1). Here the answer is the one-line body of a function of
minidsv3/tasks.py, and r = 1 only if all three hold:

1. it parses: the prompt plus the response is one `def` of the task's name and parameter, whose body is the docstring
   and one `return` statement, and nothing else;
2. every node of the returned expression is on a whitelist (`allowed`): arithmetic (+ - * // %), comparisons, and/or,
   `a if c else b`, the parameter, small int/str constants, subscripts and slices, list/tuple displays, and calls to
   abs, max, min, len, sorted, sum and the str methods upper and lower;
3. every hidden test passes when the function runs in a separate worker process with no builtins but those six, a
   time limit and resource limits (`Sandbox`), with a result of the expected type and value.

There is no format reward: parsing or returning something earns nothing by itself (both are easy to hack).

Threat model. The response is untrusted text from a language model being optimized to make r = 1: it may try
anything the grammar of Python allows, by chance or because the reward pushed it there. The whitelist is the first
defence: no import, no name but the parameter and the six builtins (so no open, exec, eval, getattr, __import__), no
attribute but upper/lower (so no dunder walk like ().__class__.__bases__), no def, lambda, comprehension, loop, **,
<< or walrus, so a whitelisted body cannot loop, recurse or build a huge number. The worker is the second defence, for
whatever the whitelist misses: it runs each body with a builtins dict of the six functions (no barrier on its own:
attribute walks reach everything from any object, which is why the whitelist allows no attribute), under an alarm (pure-Python
loops stop at `time_limit`), an address-space limit (huge strings or lists raise MemoryError), no file writes
(RLIMIT_FSIZE 0), no child processes (RLIMIT_NPROC 0) and no core dumps; a body stuck inside one C call, which the
alarm cannot interrupt, is killed by the parent after `time_limit` + `KILL_GRACE_S` and the worker restarted. The
worker is a fresh interpreter (`python -I -S`), never a fork of the JAX process. What this does not defend against is
an attacker with an exploit of CPython itself (a memory-corruption bug reachable from the whitelisted operations): the
worker runs as the same user, with no seccomp filter or namespace. For a model's samples scored by rules, the
whitelist alone already admits only side-effect-free expressions; the process is there so that a mistake in it costs
a zero, not the training run.

Batching: one worker serves every reward of a run, one request (a JSON line) at a time, so process start-up is paid
once, not per sample.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
from typing import Self

ALLOWED_CALLS = ("abs", "max", "min", "len", "sorted", "sum")  # the only builtins the worker provides
ALLOWED_METHODS = ("upper", "lower")
ALLOWED_KEYWORDS = ("reverse",)  # sorted(xs, reverse=True)
ALLOWED_NODES = (
    ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.IfExp, ast.Call, ast.keyword, ast.Attribute, ast.Name,
    ast.Constant, ast.Subscript, ast.Slice, ast.List, ast.Tuple, ast.Load,
    ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or,
    ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip
MAX_INT, MAX_STR = 10**6, 100  # the largest constants allowed
KILL_GRACE_S = 0.5  # beyond the time limit, how long the parent waits before killing a worker stuck in a C call


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the checks found for one response; each flag implies the one before it."""

    parsed: bool  # prompt + response is one def of the task's name and parameter, its body docstring + one return
    allowed: bool  # every node of the returned expression is on the whitelist
    passed: bool  # every hidden test returned the expected value and type in the worker

    @property
    def reward(self) -> float:
        return float(self.passed)


def returned_expression(prompt: str, response: str, name: str, parameter: str) -> ast.expr | None:
    """The expression the response returns, if prompt + response is exactly `def name(parameter):`, its docstring and
    one `return <expression>`; else None."""
    try:
        tree = ast.parse(prompt + response)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL byte in the text
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    f = tree.body[0]
    a = f.args
    plain = not (a.posonlyargs or a.kwonlyargs or a.vararg or a.kwarg or a.defaults or a.args[0].annotation)
    if f.name != name or len(a.args) != 1 or a.args[0].arg != parameter or not plain or f.decorator_list or f.returns:
        return None
    docstring, body = f.body[0], f.body[1:]
    if not (isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)):
        return None
    if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
        return None
    return body[0].value


def allowed(expression: ast.expr, parameter: str) -> bool:
    """Every node on the whitelist; names are the parameter or a called builtin; attributes only called methods."""
    called = set()  # Name and Attribute nodes in the function position of a call
    for node in ast.walk(expression):
        if not isinstance(node, ALLOWED_NODES):
            return False
        if isinstance(node, ast.Call):
            builtin = isinstance(node.func, ast.Name) and node.func.id in ALLOWED_CALLS
            method = isinstance(node.func, ast.Attribute) and node.func.attr in ALLOWED_METHODS
            if not (builtin or method):
                return False
            called.add(node.func)
            if any(k.arg not in ALLOWED_KEYWORDS for k in node.keywords):  # k.arg is None for **kwargs
                return False
        if isinstance(node, ast.Name) and not (node.id == parameter or node in called):
            return False
        if isinstance(node, ast.Attribute) and node not in called:
            return False
        if isinstance(node, ast.Constant) and not _small_constant(node.value):
            return False
    return True


def _small_constant(value) -> bool:
    if type(value) in (int, bool):
        return abs(value) <= MAX_INT
    return type(value) is str and len(value) <= MAX_STR


class Sandbox:
    """The worker process that runs candidate functions on their tests; use as a context manager.

    `rewards` scores many responses with one worker; `execute` runs one function source without the parse and
    whitelist checks (the second line of defence, tested on its own).
    """

    def __init__(self, time_limit: float = 1.0, memory_mb: int = 512):
        self.time_limit, self.memory_mb = time_limit, memory_mb
        self.process: subprocess.Popen | None = None
        self.restarts = 0  # workers killed for overrunning the time limit (or lost otherwise)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rewards(self, tasks: list, responses: list[str]) -> list[Verdict]:
        """One verdict per (task, response); tasks are minidsv3.tasks.Task."""
        verdicts = []
        for task, response in zip(tasks, responses, strict=True):
            expression = returned_expression(task.prompt, response, task.name, task.arg)
            if expression is None:
                verdicts.append(Verdict(False, False, False))
            elif not allowed(expression, task.arg):
                verdicts.append(Verdict(True, False, False))
            else:
                verdicts.append(Verdict(True, True, self.execute(task.prompt + response, task.name, task.tests)))
        return verdicts

    def execute(self, source: str, name: str, tests) -> bool:
        """True if the function `name` defined by `source` returns the expected value, of the expected type, on every
        (argument, expected) test, in the worker, within the time limit. Arguments and results are JSON values."""
        request = json.dumps({"source": source, "name": name, "tests": [list(t) for t in tests]}) + "\n"
        if self.process is None or self.process.poll() is not None:
            self._start()
        try:
            self.process.stdin.write(request.encode())
            self.process.stdin.flush()
            ready, _, _ = select.select([self.process.stdout], [], [], self.time_limit + KILL_GRACE_S)
            line = self.process.stdout.readline() if ready else b""
        except (BrokenPipeError, OSError):
            line = b""
        if line.strip() in (b"0", b"1"):
            return line.strip() == b"1"
        self._kill()  # overran the limit inside a C call, or the worker died (e.g. MemoryError while replying)
        self.restarts += 1
        return False

    def _start(self) -> None:
        """A fresh interpreter (-I: no environment or user site, -S: no site) running this file's `_serve`."""
        args = [sys.executable, "-I", "-S", os.path.abspath(__file__), str(self.time_limit), str(self.memory_mb)]
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={}, close_fds=True
        )

    def _kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for pipe in (self.process.stdin, self.process.stdout):
                pipe.close()
            self.process = None

    def close(self) -> None:
        """Stop the worker (it also exits by itself when its input closes)."""
        self._kill()


# -- the worker: runs in its own interpreter, reading one JSON request per line ----------------------------------------


def _serve(time_limit: float, memory_mb: int) -> None:
    """Limit this process, then answer each request line with 1 (all tests pass) or 0."""
    import resource  # here, not at the top: the parent never needs it

    memory = memory_mb * 2**20
    for limit, value in [
        (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_NPROC, 0),
        (resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, 3600),  # the last a backstop for an orphaned worker
    ]:  # fmt: skip
        resource.setrlimit(limit, (value, value))
    allowed_builtins = {n: getattr(builtins, n) for n in ALLOWED_CALLS}

    def overrun(signum, frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, overrun)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.write("1\n" if _passes(request, allowed_builtins, time_limit) else "0\n")
        sys.stdout.flush()


def _passes(request: dict, allowed_builtins: dict, time_limit: float) -> bool:
    namespace = {"__builtins__": dict(allowed_builtins)}
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        exec(compile(request["source"], "<response>", "exec"), namespace)  # noqa: S102 (the point of this process)
        function = namespace[request["name"]]
        for argument, expected in request["tests"]:
            result = function(argument)
            if type(result) is not type(expected) or result != expected:
                return False
        return True
    except Exception:  # noqa: BLE001 SyntaxError, NameError, TypeError, MemoryError, RecursionError, TimeoutError, ...
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


if __name__ == "__main__":
    _serve(float(sys.argv[1]), int(sys.argv[2]))
