"""The verifiable task generator (minidsv3/tasks.py): SFT format, true doctests, hidden tests, a disjoint held-out set."""

import doctest
import json

import pytest

from minidsv3 import sft, tasks
from minidsv3.data import Document


def test_held_out_set_is_deterministic_distinct_and_at_least_300_prompts():
    first, again = tasks.held_out_tasks(), tasks.held_out_tasks()
    assert first == again
    assert len(first) >= 300 and len({t.prompt for t in first}) == len(first)


def test_training_tasks_never_share_a_prompt_with_the_held_out_set_even_from_its_seed():
    held = {t.prompt for t in tasks.held_out_tasks()}
    stream = tasks.TrainingTasks(seed=tasks.HELD_OUT_SEED)  # the same generator state the held-out set came from
    train = stream.take(600)
    assert held.isdisjoint(t.prompt for t in train)
    assert len({t.response for t in train}) > 50  # still a varied stream, not an empty or stuck one


def test_pairs_are_what_sft_extracts_from_the_function_source():
    for task in tasks.TrainingTasks(seed=1).take(40):
        assert sft.extract_pairs([Document("t.py", task.source)], min_chars=0) == [(task.prompt, task.response)]
    assert tasks.sft_pairs(tasks.held_out_tasks()[:2]) == [(t.prompt, t.response) for t in tasks.held_out_tasks()[:2]]


def test_docstring_examples_are_true_doctests_and_hidden_tests_hold_for_the_reference_body():
    for task in tasks.TrainingTasks(seed=2).take(60):
        namespace = {}
        exec(task.source, namespace)  # noqa: S102 (our own generated text)
        function = namespace[task.name]
        found = doctest.DocTestFinder().find(function, task.name, globs=namespace)
        runner = doctest.DocTestRunner()
        for test in found:
            runner.run(test, out=lambda _: None)
        assert runner.failures == 0 and runner.tries == len(task.examples) >= 2
        assert 3 <= len(task.tests) <= 4 and all(function(a) == r for a, r in task.tests)
        arguments = [repr(a) for a, _ in task.examples + task.tests]
        assert len(set(arguments)) == len(arguments)  # hidden tests use arguments the docstring never shows
        assert len({repr(r) for _, r in task.examples}) >= 2  # a constant body cannot pass the doctests


def test_difficulty_one_uses_only_single_operation_bodies():
    level_one = {body.format(a=0, b=0, c=0, d=0, m=0) for d, _, body in tasks.TEMPLATES if d == 1}
    bodies = {t.response.strip().removeprefix("return ") for t in tasks.TrainingTasks(seed=3, difficulty=1).take(200)}
    templates = {b.split(" + ")[0].split(", ")[0] for b in bodies}  # x + 7 -> x, max(x, 13) -> max(x
    assert templates <= {b.split(" + ")[0].split(", ")[0] for b in level_one}
    with pytest.raises(ValueError, match="difficulty"):
        tasks.TrainingTasks(seed=0, difficulty=4).take(1)


def test_training_stream_resumes_exactly_from_its_state():
    stream = tasks.TrainingTasks(seed=7)
    stream.take(5)
    saved = json.loads(json.dumps(stream.state_dict()))
    expected = stream.take(4)
    restored = tasks.TrainingTasks(seed=99)
    restored.load_state_dict(saved)
    assert restored.take(4) == expected
