"""The rule reward and its sandbox (minidsv3/reward.py): what it accepts, what it rejects, and that nothing escapes."""

import os
import time

import pytest

from minidsv3 import reward, tasks

LIMIT = 0.3  # seconds per candidate in these tests
TASK = tasks.Task(
    name="shift",
    arg="x",
    prompt='def shift(x):\n    """Compute a number from x.\n\n    >>> shift(3)\n    7\n    >>> shift(10)\n    14\n    """\n',
    response="    return x + 4\n",
    examples=((3, 7), (10, 14)),
    tests=((0, 4), (25, 29), (7, 11)),
)


@pytest.fixture(scope="module")
def box():
    with reward.Sandbox(time_limit=LIMIT) as sandbox:
        yield sandbox


def score(box, response: str, task=TASK) -> reward.Verdict:
    return box.rewards([task], [response])[0]


def test_every_reference_body_of_the_held_out_set_earns_1(box):
    held = tasks.held_out_tasks()
    assert [v.reward for v in box.rewards(held, [t.response for t in held])] == [1.0] * len(held)


def test_a_body_that_passes_the_visible_doctests_but_not_the_hidden_tests_earns_0(box):
    memorized = "    return 7 if x == 3 else 14\n"  # the two docstring examples, looked up
    namespace = {}
    exec(TASK.prompt + memorized, namespace)  # noqa: S102 (our own text)
    assert all(namespace["shift"](a) == r for a, r in TASK.examples)
    assert score(box, memorized) == reward.Verdict(parsed=True, allowed=True, passed=False)
    assert score(box, "    return x + 4\n") == reward.Verdict(parsed=True, allowed=True, passed=True)
    assert score(box, "    return x + 4.0\n").reward == 0.0  # a float constant: not allowed, and the wrong type


@pytest.mark.parametrize(
    "body",
    [
        "    import os\n    return x\n",
        "    return __import__('os').getcwd()\n",
        "    return x.__class__.__bases__[0].__subclasses__()\n",
        "    return (lambda y: y + 4)(x)\n",
        "    return [y for y in [x]][0] + 4\n",
        "    return sum(y for y in [4]) + x\n",
        "    for y in [4]:\n        return x + y\n",
        "    while True:\n        pass\n",
        "    return open('/etc/passwd').read()\n",
        "    return exec('x = 1')\n",
        "    return eval('x + 4')\n",
        "    return 9**9**9\n",
        "    return 1 << 10**9\n",
        "    return shift(x)\n",
        "    return (y := x + 4)\n",
        "    return getattr(x, 'real') + 4\n",
        "    return x + 4\nimport os\n",
        "    return x + 10000000\n",
    ],
)
def test_hostile_bodies_earn_0_quickly_and_leave_the_sandbox_working(box, body):
    tic = time.perf_counter()
    verdict = score(box, body)
    assert verdict.reward == 0.0 and not verdict.allowed  # refused before any of it runs
    assert time.perf_counter() - tic < LIMIT + reward.KILL_GRACE_S
    assert score(box, TASK.response).reward == 1.0


def test_flags_say_which_check_failed(box):
    assert score(box, "    return x +\n") == reward.Verdict(False, False, False)
    assert score(box, "    return x + 4\n    return x\n") == reward.Verdict(False, False, False)
    assert score(box, "    return abs\n") == reward.Verdict(True, False, False)  # a builtin only when called
    assert score(box, "    return s.upper()\n") == reward.Verdict(True, False, False)  # not the parameter
    assert score(box, "    return [x][1]\n") == reward.Verdict(True, True, False)  # IndexError in the worker


# The worker on its own, without the parse and whitelist checks: the second line of defence.


def test_worker_stops_loops_and_recursion_within_the_time_limit(box):
    for source in ["def f(x):\n    while True:\n        pass\n", "def f(x):\n    return f(x)\n"]:
        tic = time.perf_counter()
        assert box.execute(source, "f", [[1, 1]]) is False
        assert time.perf_counter() - tic < LIMIT + reward.KILL_GRACE_S


def test_worker_has_no_open_no_import_no_file_writes_and_bounded_memory(box, tmp_path):
    target = tmp_path / "written"
    for source in [
        f"def f(x):\n    open({str(target)!r}, 'w').write('x')\n    return 1\n",
        "def f(x):\n    import os\n    return 1\n",
        "def f(x):\n    return len('a' * 10**10)\n",
    ]:
        assert box.execute(source, "f", [[1, 1]]) is False
    assert not target.exists()
    assert box.execute("def f(x):\n    return x\n", "f", [[1, 1]]) is True


def test_a_hang_the_alarm_cannot_stop_is_killed_and_the_worker_restarted(box):
    # Reaching the signal module by an attribute walk (what the whitelist forbids) and ignoring SIGALRM: only the
    # parent's kill can end this loop.
    escape = (
        "def f(x):\n"
        "    for c in ().__class__.__base__.__subclasses__():\n"
        "        if c.__name__ == '_wrap_close':\n"
        "            c.__init__.__globals__['sys'].modules['signal'].signal(14, 1)\n"
        "    while True:\n"
        "        pass\n"
    )
    before, pid = box.restarts, box.process.pid if box.process else None
    tic = time.perf_counter()
    assert box.execute(escape, "f", [[1, 1]]) is False
    assert LIMIT + reward.KILL_GRACE_S <= time.perf_counter() - tic < LIMIT + reward.KILL_GRACE_S + 2.0
    assert box.restarts == before + 1
    if pid is not None:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the old worker is gone, not a zombie or orphan
    assert box.execute("def f(x):\n    return x\n", "f", [[1, 1]]) is True
