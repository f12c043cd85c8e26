"""Evaluation of the RL task on held-out prompts: pass@1 greedy and sampled, pass@k, parse rate, response length.

Every figure comes with its standard error over prompts, sqrt(var / N) of the per-prompt values: for a 0/1 outcome
per prompt (greedy pass@1) that is the binomial sqrt(p (1 - p) / N); for per-prompt fractions (sampled pass@1, pass@k,
parse rate) it also carries the spread between prompts, the uncertainty of a fresh held-out draw.
pass@k uses the unbiased estimator of Chen et al. (arXiv:2107.03374, §2.1) from n >= k samples per prompt with c
correct: 1 - C(n - c, k) / C(n, k), the chance that k of the n samples, drawn without replacement, include a correct
one.
"""

from __future__ import annotations

import ast
import math
import warnings

import jax
import numpy as np
from tokenizers import Tokenizer

from minidsv3 import rollout
from minidsv3.data import EOT, PAD, special_id
from minidsv3.model import Transformer
from minidsv3.reward import Sandbox
from minidsv3.tasks import Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., arXiv:2107.03374 §2.1)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_and_error(values) -> tuple[float, float]:
    """Mean of per-prompt values and its standard error sqrt(var / N) (population variance: binomial for 0/1)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(np.sqrt(v.var() / len(v)))


def paired_change(before: dict, after: dict, name: str) -> tuple[float, float]:
    """The change of figure `name` between two evaluations of the same prompts, and its standard error: the mean and
    sqrt(var / N) of the per-prompt differences (a paired comparison, which the prompts' spread in difficulty does not
    inflate, unlike sqrt(se_before² + se_after²))."""
    diff = np.asarray(after["per_prompt"][name]) - np.asarray(before["per_prompt"][name])  # (prompts,)
    return mean_and_error(diff)


def decode_responses(tokenizer: Tokenizer, tokens: np.ndarray, lengths: np.ndarray, eos: int) -> list[str]:
    """Rollout tokens (B, R) and lengths (B,) -> each row's response text, EOS cut."""
    return [tokenizer.decode([int(x) for x in row[:n] if x != eos]) for row, n in zip(tokens, lengths, strict=True)]


def responses(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    samples: int,
    max_new_tokens: int,
    window: int,
    key: jax.Array,
    greedy: bool,
    rows: int = 64,
) -> tuple[list[list[str]], np.ndarray]:
    """`samples` responses per prompt, `rows` // `samples` prompts per rollout (B = rows, one compiled loop for greedy
    and sampled alike; the last call is filled with copies of its first prompt, dropped after). Returns texts
    [prompt][sample] (EOS cut) and lengths (prompts, samples)."""
    if rows % samples:
        raise ValueError(f"rows ({rows}) must be a multiple of samples ({samples})")
    eos, pad = special_id(tokenizer, EOT), special_id(tokenizer, PAD)
    chunk = rows // samples
    texts, lengths = [], []
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        ids = [tokenizer.encode(p).ids for p in part]
        ids += [ids[0]] * (chunk - len(ids))
        win, offsets = rollout.left_pad(ids, samples, window, pad)
        key, sub = jax.random.split(key)
        out = rollout.sample(model, win, offsets, sub, eos, pad, greedy, max_new_tokens=max_new_tokens)
        n = np.asarray(out["lengths"])  # (B,)
        decoded = decode_responses(tokenizer, np.asarray(out["tokens"]), n, eos)  # B texts
        for p in range(len(part)):
            texts.append(decoded[p * samples : (p + 1) * samples])
            lengths.append(n[p * samples : (p + 1) * samples].tolist())
    return texts, np.array(lengths)


def evaluate(
    model: Transformer,
    tokenizer: Tokenizer,
    tasks: list[Task],
    sandbox: Sandbox,
    *,
    samples: int = 8,
    k: int = 8,
    max_new_tokens: int = 32,
    window: int = 128,
    seed: int = 0,
    rows: int = 64,
    n_examples: int = 3,
) -> dict:
    """Greedy pass@1, sampled pass@1 (T = 1), pass@k from `samples` samples, parse rate and mean response length (in
    tokens, EOS included) of the samples, each with `<name>_se`; `per_prompt`: each figure's value for each task (for
    `paired_change`); `examples`: the first greedy (prompt, response) pairs with their rewards."""
    if samples < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got samples={samples}")
    common = {"max_new_tokens": max_new_tokens, "window": window, "rows": rows}
    prompts = [t.prompt for t in tasks]
    greedy, _ = responses(model, tokenizer, prompts, samples=1, key=jax.random.key(seed), greedy=True, **common)
    sampled, lengths = responses(
        model, tokenizer, prompts, samples=samples, key=jax.random.key(seed + 1), greedy=False, **common
    )
    greedy_verdicts = sandbox.rewards(tasks, [g[0] for g in greedy])
    flat = sandbox.rewards([t for t in tasks for _ in range(samples)], [r for rs in sampled for r in rs])
    correct = np.array([v.passed for v in flat]).reshape(len(tasks), samples)  # (tasks, samples)
    parsed = np.array([v.parsed for v in flat]).reshape(len(tasks), samples)
    figures = {
        "greedy_pass@1": [v.reward for v in greedy_verdicts],
        "pass@1": correct.mean(axis=1),
        f"pass@{k}": [pass_at_k(samples, int(c), k) for c in correct.sum(axis=1)],
        "parse_rate": parsed.mean(axis=1),
        "response_length": lengths.mean(axis=1),
    }
    result = {"per_prompt": {name: np.asarray(v, np.float64).tolist() for name, v in figures.items()}}
    for name, per_prompt in figures.items():
        result[name], result[f"{name}_se"] = mean_and_error(per_prompt)
    result["examples"] = [
        {"prompt": t.prompt, "response": g[0], "reward": v.reward}
        for t, g, v in list(zip(tasks, greedy, greedy_verdicts))[:n_examples]
    ]
    return result


def parse_rate(
    model: Transformer, tokenizer: Tokenizer, pairs: list[tuple[str, str]], *, max_new_tokens: int, window: int,
    rows: int = 64,
) -> tuple[float, float, list[str]]:  # fmt: skip
    """Non-regression on real code: the share (and its binomial standard error) of greedy bodies that make the prompt
    a function that parses as Python, over stdlib SFT prompts (signature + docstring) held out of SFT. A body whose EOS
    has not come within `max_new_tokens` - 1 tokens counts as not parsed. Returns (rate, se, the bodies)."""
    prompts = [p for p, _ in pairs]
    texts, lengths = responses(
        model, tokenizer, prompts, samples=1, max_new_tokens=max_new_tokens, window=window, key=jax.random.key(0),
        greedy=True, rows=rows,
    )  # fmt: skip
    bodies = [t[0] for t in texts]
    ok = []
    for prompt, body, n in zip(prompts, bodies, lengths[:, 0], strict=True):
        ended = n < max_new_tokens  # EOS came before the budget ran out (a body cut short rarely parses anyway)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in generated strings
                ast.parse(prompt + body)
            ok.append(ended)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            ok.append(False)
    rate, se = mean_and_error(ok)
    return rate, se, bodies
