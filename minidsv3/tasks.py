"""A verifiable task for reinforcement learning: write the one-line body of a small Python function (report §5.2.1).

The report rewards code by running it: "for LeetCode problems, we can utilize a compiler to generate feedback based on
test cases" (§5.2.1). Here each task is a function whose docstring shows 2-3 doctest examples and whose body is one
`return` line from a small grammar; 3-4 hidden tests, never shown, decide the reward (minidsv3/reward.py). The pairs
have the SFT format of minidsv3/sft.py (prompt: the def line through the end of the docstring; response: the body),
so the same task can be mixed into pre-training and SFT and then sharpened by GRPO:

    def compute(x):                            <- prompt
        \"\"\"Compute a number from x.

        >>> compute(3)
        7
        >>> compute(10)
        14
        \"\"\"
        return x + 4                           <- response (the reference body)

`difficulty` 1 keeps one operation per body (`x + b`, `s[::-1]`, `sorted(xs)`, ...), 2 adds two-operation bodies
(`x * a + b`, `x % m`, `abs(x - b)`), 3 adds compositions (`abs(x * a - b)`, `s[::-1].upper()`, `sum(xs) * a`).
train.py mixes whole task functions into the pre-training stream (`pretraining_tokens`, train.rl_task_tokens ~1 %)
and task pairs into SFT (`mix_pairs`, train.rl_task_pairs 20 %), so that the SFT model solves some tasks and RL has a
success rate to sharpen (a group of all-zero rewards carries no gradient).
The held-out set is the first `n` distinct prompts drawn from a fixed seed; training tasks skip every held-out prompt,
so the two never share a prompt (they may share a body: the grammar is small, and a body seen with other examples is
what the model is meant to generalize from).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from minidsv3.data import EOT, special_id

HELD_OUT_SEED = 16_000  # fixed: the held-out set is the same in every run
NAMES = ("compute", "apply", "convert", "transform", "process", "evaluate", "handle", "solve", "result", "value")


@dataclasses.dataclass(frozen=True)
class Task:
    """One function to complete. `tests` are the hidden (argument, expected result) pairs the reward runs."""

    name: str  # the function's name
    arg: str  # its one parameter: x (int), s (str) or xs (list of int)
    prompt: str  # def line and docstring with the visible examples, ending in a newline
    response: str  # the reference body, one `return` line, indented, ending in a newline
    examples: tuple  # ((argument, result), ...) shown in the docstring
    tests: tuple  # ((argument, result), ...) hidden

    @property
    def source(self) -> str:
        """The whole function with its reference body (pre-training text)."""
        return self.prompt + self.response


# (difficulty, parameter, body): the body grammar. Letters in braces are constants drawn from CONSTANTS.
TEMPLATES = [
    (1, "x", "x + {b}"),
    (1, "x", "max(x, {c})"),
    (2, "x", "x * {a} + {b}"),
    (2, "x", "x % {m}"),
    (2, "x", "abs(x - {c})"),
    (3, "x", "abs(x * {a} - {d})"),
    (3, "x", "x % {m} + {b}"),
    (1, "s", "s[::-1]"),
    (1, "s", "s.upper()"),
    (1, "s", "len(s)"),
    (2, "s", "len(s) + {b}"),
    (3, "s", "s[::-1].upper()"),
    (1, "xs", "sorted(xs)"),
    (1, "xs", "sum(xs)"),
    (1, "xs", "xs[0]"),
    (2, "xs", "xs[-1]"),
    (2, "xs", "max(xs)"),
    (3, "xs", "sum(xs) * {a}"),
    (3, "xs", "sorted(xs)[-1] - xs[0]"),
]
CONSTANTS = {"a": (2, 5), "b": (1, 9), "c": (11, 19), "d": (21, 29), "m": (2, 9)}  # inclusive ranges
SUMMARY = {"x": "Compute a number from x.", "s": "Compute a value from the string s.", "xs": "Compute a value from xs."}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _argument(kind: str, rng: random.Random):
    """A random argument of the kind: an int in [0, 40], a lowercase word of 2-6 letters, a list of 2-4 digits."""
    if kind == "x":
        return rng.randint(0, 40)
    if kind == "s":
        return "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6)))
    return [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]


def make_task(rng: random.Random, difficulty: int) -> Task:
    """One task from the templates of level <= difficulty: 2-3 visible examples and 3-4 hidden tests, all on distinct
    arguments. Both the visible results and all results together take >= 2 values, so a constant body fails."""
    if difficulty not in (1, 2, 3):
        raise ValueError(f"difficulty must be 1, 2 or 3, got {difficulty}")
    _, kind, template = rng.choice([t for t in TEMPLATES if t[0] <= difficulty])
    body = template.format(**{k: rng.randint(lo, hi) for k, (lo, hi) in CONSTANTS.items()})
    fn = eval(f"lambda {kind}: {body}")  # our own grammar's text (never model output): the reference results
    n_visible, n_hidden = rng.randint(2, 3), rng.randint(3, 4)
    while True:
        args = []
        while len(args) < n_visible + n_hidden:
            a = _argument(kind, rng)
            if a not in args:
                args.append(a)
        pairs = [(a, fn(a)) for a in args]
        visible, hidden = pairs[:n_visible], pairs[n_visible:]
        if len({repr(r) for _, r in visible}) >= 2 and len({repr(r) for _, r in pairs}) >= 2:
            break
    name = rng.choice(NAMES)
    lines = [f"def {name}({kind}):", f'    """{SUMMARY[kind]}', ""]
    for a, r in visible:
        lines += [f"    >>> {name}({a!r})", f"    {r!r}"]
    lines.append('    """')
    prompt = "\n".join(lines) + "\n"
    return Task(name, kind, prompt, f"    return {body}\n", tuple(visible), tuple(hidden))


def held_out_tasks(n: int = 300, difficulty: int = 3) -> list[Task]:
    """The first n tasks of distinct prompts drawn from HELD_OUT_SEED: the same list in every run."""
    rng, tasks, seen = random.Random(HELD_OUT_SEED), [], set()
    while len(tasks) < n:
        task = make_task(rng, difficulty)
        if task.prompt not in seen:
            seen.add(task.prompt)
            tasks.append(task)
    return tasks


class TrainingTasks:
    """An endless stream of training tasks from `seed`, skipping every prompt of the held-out set."""

    def __init__(self, seed: int, difficulty: int = 3, held_out: list[Task] | None = None):
        self.rng = random.Random(seed)
        self.difficulty = difficulty
        held_out = held_out_tasks() if held_out is None else held_out  # the evaluation set, whatever the level
        self.excluded = {t.prompt for t in held_out}

    def take(self, n: int) -> list[Task]:
        tasks = []
        while len(tasks) < n:
            task = make_task(self.rng, self.difficulty)
            if task.prompt not in self.excluded:
                tasks.append(task)
        return tasks

    def state_dict(self) -> dict:
        """The generator's position, JSON-friendly (for a checkpoint's meta)."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, d: dict) -> None:
        version, internal, gauss = d["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def sft_pairs(tasks: list[Task]) -> list[tuple[str, str]]:
    """(prompt, response) pairs in the format of minidsv3/sft.py's pairs."""
    return [(t.prompt, t.response) for t in tasks]


# ---------------------------------------------------------------------------------------------------------------
# Mixing the task into pre-training and SFT, so that the SFT model has a success rate for RL to sharpen


def pretraining_tokens(tokenizer, corpus_tokens: int, share: float, seed: int) -> np.ndarray:
    """Whole task functions (reference bodies), each followed by EOT, as a token stream (N,) of about `share` of the
    mixed stream: share / (1 - share) x `corpus_tokens` tokens. No held-out prompt is among them."""
    eot = special_id(tokenizer, EOT)
    want, parts, have = share / (1 - share) * corpus_tokens, [], 0
    stream = TrainingTasks(seed)
    while have < want:
        ids = [e.ids + [eot] for e in tokenizer.encode_batch([t.source for t in stream.take(64)])]
        parts += ids
        have += sum(map(len, ids))
    return np.concatenate([np.array(ids, np.int64) for ids in parts]) if parts else np.zeros(0, np.int64)  # (N,)


def mix_pairs(pairs: list[tuple[str, str]], share: float, seed: int) -> list[tuple[str, str]]:
    """`pairs` plus task pairs making up `share` of the result, in a fixed shuffled order (SFTBatches reshuffles)."""
    n = round(share / (1 - share) * len(pairs))
    mixed = pairs + sft_pairs(TrainingTasks(seed).take(n))
    random.Random(seed).shuffle(mixed)
    return mixed
