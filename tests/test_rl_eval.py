"""Evaluation of the RL task (minidsv3/rl_eval.py): the pass@k estimator by hand and by enumeration, and one
evaluation of a tiny random model for shapes and ranges."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
from conftest import SMALL
from flax import nnx

from minidsv3 import data, rl_eval, tasks
from minidsv3.model import Transformer
from minidsv3.reward import Sandbox


def test_pass_at_k_worked_examples_and_enumeration():
    # n = 10 samples, c = 3 correct, k = 2: 1 - C(7, 2) / C(10, 2) = 1 - 21/45 = 0.5333
    assert rl_eval.pass_at_k(10, 3, 2) == pytest.approx(24 / 45)
    assert rl_eval.pass_at_k(8, 0, 8) == 0.0 and rl_eval.pass_at_k(8, 1, 8) == 1.0
    assert rl_eval.pass_at_k(8, 5, 1) == pytest.approx(5 / 8)  # pass@1 is the fraction correct
    for n, c, k in [(6, 2, 3), (7, 4, 2), (5, 1, 5)]:  # the share of k-subsets of the n samples with a correct one
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert rl_eval.pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))
    with pytest.raises(ValueError, match="k <= n"):
        rl_eval.pass_at_k(4, 1, 8)


def test_standard_error_of_a_0_1_outcome_is_binomial():
    mean, se = rl_eval.mean_and_error([1, 0, 1, 1])
    assert mean == 0.75 and se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))


def test_a_change_is_judged_by_the_standard_error_of_the_per_prompt_differences():
    # Prompts of very different difficulty, each a little better after RL: the paired SE sees a steady gain that
    # sqrt(se_before² + se_after²), which carries the spread between prompts, would call noise.
    before = {"per_prompt": {"pass@1": [0.0, 0.5, 0.875, 0.25]}}
    after = {"per_prompt": {"pass@1": [0.125, 0.625, 0.875, 0.375]}}
    change, se = rl_eval.paired_change(before, after, "pass@1")
    assert change == pytest.approx(0.375 / 4)
    assert se == pytest.approx(math.sqrt(np.var([0.125, 0.125, 0.0, 0.125]) / 4))
    unpaired = math.hypot(rl_eval.mean_and_error(before["per_prompt"]["pass@1"])[1],
                          rl_eval.mean_and_error(after["per_prompt"]["pass@1"])[1])  # fmt: skip
    assert change / unpaired < 1 and change / se > 3


@pytest.mark.slow
def test_evaluation_of_a_random_model_gives_figures_in_range(tmp_path):
    held = tasks.held_out_tasks()[:3]
    docs = [data.Document(f"{i}.py", t.source) for i, t in enumerate(tasks.held_out_tasks()[:40])]
    tokenizer = data.load_or_train_tokenizer(docs, 300, tmp_path)
    model = Transformer(dataclasses.replace(SMALL, vocab_size=300), rngs=nnx.Rngs(0))
    with Sandbox(time_limit=0.5) as box:
        kwargs = {"samples": 2, "k": 2, "max_new_tokens": 4, "window": 128, "rows": 4}
        result = rl_eval.evaluate(model, tokenizer, held, box, **kwargs)
        again = rl_eval.evaluate(model, tokenizer, held, box, **kwargs)
    for name in ["greedy_pass@1", "pass@1", "pass@2", "parse_rate"]:
        assert 0.0 <= result[name] <= 1.0 and 0.0 <= result[f"{name}_se"] <= 0.5
    assert 1.0 <= result["response_length"] <= 4.0
    assert result["pass@1"] <= result["pass@2"]
    assert result == again  # seeded: the same figures and examples
    for name in ["greedy_pass@1", "pass@1", "pass@2", "parse_rate", "response_length"]:  # one value per task
        assert len(result["per_prompt"][name]) == len(held)
        assert np.mean(result["per_prompt"][name]) == pytest.approx(result[name])
    assert [e["prompt"] for e in result["examples"]] == [t.prompt for t in held]
