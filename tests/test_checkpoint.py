"""Checkpoints (minidsv3/checkpoint.py) under damage: a damaged newest checkpoint, a full disk, a state with NaN, and a
training process killed with SIGKILL in the middle of a save."""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import SMALL
from flax import nnx
from test_train import ROOT, TINY, write_corpus

from minidsv3 import checkpoint
from minidsv3.config import TrainConfig
from minidsv3.model import Transformer
from minidsv3.run import read_metrics
from minidsv3.step import make_optimizer


def state(model, optimizer) -> dict:
    """Parameters, router biases and optimizer state, copied to the host."""
    return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state((model, optimizer))))


def bump(model, optimizer) -> None:
    """Add 1 to every floating-point array, so that two checkpoints differ everywhere."""
    for module in (model, optimizer):
        s = nnx.state(module)
        pure = jax.tree.map(lambda x: x + 1 if np.issubdtype(x.dtype, np.floating) else x, nnx.to_pure_dict(s))
        nnx.replace_by_pure_dict(s, pure)
        nnx.update(module, s)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> tuple[Path, dict]:
    """A run folder with checkpoints 2 and 4, whose states differ in every array; and checkpoint 2's state."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    model = Transformer(SMALL, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, TrainConfig())
    checkpoint.save(run, 2, model, optimizer, {"step": 2}, keep=2)
    at_2 = state(model, optimizer)
    bump(model, optimizer)
    checkpoint.save(run, 4, model, optimizer, {"step": 4}, keep=2)
    return run, at_2


def fresh():
    model = Transformer(SMALL, rngs=nnx.Rngs(1))
    return model, make_optimizer(model, TrainConfig())


def damage(folder: Path, how: str) -> None:
    files = [f for f in folder.rglob("*") if f.is_file()]
    if how == "overwritten":  # the array files (not the JSON metadata) replaced by garbage
        for f in files:
            if f.suffix != ".json" and "metadata" not in f.name.lower():
                f.write_bytes(b"garbage")
    elif how == "truncated":  # every file cut to half, as a copy interrupted by a full disk leaves it
        for f in files:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "no_metadata":
        (folder / "meta" / "metadata").unlink()
    elif how == "no_optimizer":
        shutil.rmtree(folder / "optimizer")


@pytest.mark.parametrize(
    "how, problem",
    [
        ("overwritten", "its array files are overwritten or truncated"),
        ("truncated", "a metadata file is not valid JSON: overwritten or truncated"),
        ("no_metadata", "a file is missing: File meta/metadata not found."),
        ("no_optimizer", "its optimizer part is missing"),
    ],
)
def test_a_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_restored(
    tmp_path, two_checkpoints, capsys, how, problem
):
    run = shutil.copytree(two_checkpoints[0], tmp_path / "run")
    damage(run / "checkpoints" / "4", how)
    model, optimizer = fresh()
    meta = checkpoint.restore(run, model, optimizer)
    assert meta == {"step": 2, "restored_step": 2}
    jax.tree.map(np.testing.assert_array_equal, state(model, optimizer), two_checkpoints[1])
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {run}/checkpoints/4: checkpoint is unreadable ({problem}); using the checkpoint of step 2 instead"
    ]
    # train.py then moves it aside, so that the continued run writes step 4 afresh
    assert checkpoint.set_aside_newer(run, 2) == [run / "checkpoints-damaged" / "4"]
    assert checkpoint.latest_step(run) == 2


def test_with_no_intact_checkpoint_restore_raises_one_line_and_changes_nothing(tmp_path, two_checkpoints, capsys):
    run = shutil.copytree(two_checkpoints[0], tmp_path / "run")
    damage(run / "checkpoints" / "4", "overwritten")
    damage(run / "checkpoints" / "2", "no_optimizer")
    model, optimizer = fresh()
    before = state(model, optimizer)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.restore(run, model, optimizer)
    assert str(e.value) == (
        f"{run}/checkpoints/4: checkpoint is unreadable (its array files are overwritten or truncated), and so is the"
        f" older one; delete {run}/checkpoints to start the run over"
    )
    jax.tree.map(np.testing.assert_array_equal, state(model, optimizer), before)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_full_disk_says_so_and_leaves_the_previous_checkpoint_intact(tmp_path, two_checkpoints, monkeypatch, when):
    run = shutil.copytree(two_checkpoints[0], tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "4")
    model, optimizer = fresh()
    if when == "before":  # the free space is known to be too small: nothing is written
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    else:  # the disk fills up while Orbax writes step 6: part of it is on disk when the write fails

        def full(self, step, args):
            partial = run / "checkpoints" / f"{step}{checkpoint.TMP_SUFFIX}" / "model"
            partial.mkdir(parents=True)
            (partial / "half-written").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial / "half-written"))

        monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save(run, 6, model, optimizer, {"step": 6}, keep=2)
    assert f"{run}/checkpoints/6: disk full" in str(e.value) and "the checkpoint of step 2 is intact" in str(e.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]  # nothing partial is left
    monkeypatch.undo()
    assert checkpoint.restore(run, model, optimizer)["restored_step"] == 2
    jax.tree.map(np.testing.assert_array_equal, state(model, optimizer), two_checkpoints[1])


def test_a_state_holding_nan_is_never_saved(tmp_path):
    model, optimizer = fresh()
    model.layers[0].self_attn.o_proj.kernel[...] = model.layers[0].self_attn.o_proj.kernel[...].at[0, 0].set(np.nan)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"not saved, model\.layers\.0\.self_attn\.o_proj\.kernel holds"
    ):
        checkpoint.save(tmp_path, 2, model, optimizer, {"step": 2}, keep=2)
    assert checkpoint.latest_step(tmp_path) is None


def start(args: list, cwd: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, jax_cache_env) -> tuple[list[str], dict]:
    """train.py's arguments for a tiny run, and an environment in which every start after the first loads the
    compiled steps from JAX's cache (seconds, not ~20)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    # Pre-training with a checkpoint after each step; stopping after step 5, before the stage's end, skips its
    # evaluation and the final report (their compilation would double the time), and does not define the run.
    args = [*TINY, "--model.num_nextn_predict_layers=0", "--train.pretrain_steps=100", "--train.context_steps=0",
            "--train.sft_steps=0", "--train.stop_after_steps=5", "--train.ckpt_every=1",
            f"--data.path={write_corpus(tmp / 'corpus', files=4)}", f"--data.cache_dir={tmp / 'cache'}"]  # fmt: skip
    return args, jax_cache_env


def signal_during_a_save(proc: subprocess.Popen, run: Path, signals: tuple, from_step: int) -> int:
    """Send `signals` to `proc` as soon as Orbax writes the checkpoint of a step >= `from_step` (into
    `<step>.orbax-checkpoint-tmp`); return that step."""
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        names = os.listdir(run / "checkpoints") if (run / "checkpoints").is_dir() else []
        saving = [int(n.split(".")[0]) for n in names if checkpoint.TMP_SUFFIX in n]
        if saving and saving[0] >= from_step:
            for sig in signals:
                proc.send_signal(sig)
                time.sleep(0.05)  # apart: Python runs a handler once for signals that arrive before it runs
            return saving[0]
        time.sleep(0.001)
    raise AssertionError(f"the run ended before a save of step {from_step} or later could be interrupted")


@pytest.mark.slow
def test_kill_9_then_ctrl_c_twice_in_the_middle_of_checkpoint_saves_continue_the_uninterrupted_run_bit_for_bit(
    tmp_path, tiny_run
):
    common, env = tiny_run
    common = [*common, "--train.keep_checkpoints=10"]  # a's checkpoint of every step, to compare b's with
    a, b = tmp_path / "a", tmp_path / "b"
    # b: SIGKILL while it writes the checkpoint of step 2 or later: it dies with the save half done
    first = start([*common, f"--train.out_dir={b}"], tmp_path, env)
    killed_at = signal_during_a_save(first, b, (signal.SIGKILL,), from_step=2)
    assert first.wait(timeout=300) == -signal.SIGKILL
    assert f"{killed_at}{checkpoint.TMP_SUFFIX}" in os.listdir(b / "checkpoints")
    # the uninterrupted run a, alongside b's second start, which resumes from the checkpoint before the killed one,
    # and gets Ctrl-C twice while it writes the checkpoint of the second step after: that save completes, exit 130
    straight = start([*common, f"--train.out_dir={a}"], tmp_path, env)
    second = start([*common, f"--train.out_dir={b}"], tmp_path, env)
    signal_during_a_save(second, b, (signal.SIGINT, signal.SIGINT), from_step=killed_at + 1)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 128 + signal.SIGINT and f"resumed from checkpoint at step {killed_at - 1} " in out, err
    stopped_at = int(re.search(r"stopped by signal 2 at step (\d+); checkpoint saved", out).group(1))
    assert stopped_at >= killed_at + 1  # two steps or more after the resume
    assert not any(checkpoint.TMP_SUFFIX in n for n in os.listdir(b / "checkpoints"))  # the leftover is removed
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]

    def records(run):
        return [(r["step"], r["main_loss"], r["router_bias"]) for r in read_metrics(run) if not r.get("eval")]

    assert records(b) == records(a)[:stopped_at]  # losses and biases, exactly
    # parameters, router biases and AdamW state as Orbax wrote them (building a model to restore into takes seconds)
    saved = [
        ocp.CheckpointManager(run / "checkpoints").restore(stopped_at, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(), optimizer=ocp.args.StandardRestore()))
        for run in (a, b)
    ]  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, *[(s.model, s.optimizer) for s in saved])  # bit for bit


@pytest.mark.slow
def test_a_diverging_run_skips_its_non_finite_steps_then_stops_with_one_line_after_max_skipped_steps(
    tmp_path, tiny_run
):
    common, env = tiny_run
    run = tmp_path / "run"
    # a learning rate of 1e30 (after a warm-up step at half of it) makes the next gradients NaN
    diverging = start([*common, "--train.learning_rate=1e30", "--train.max_skipped_steps=2", f"--train.out_dir={run}"],
                      tmp_path, env)  # fmt: skip
    _, err = diverging.communicate(timeout=300)
    assert diverging.returncode == 2
    last = err.splitlines()[-1]
    first, to = map(
        int, re.fullmatch(r"error: training diverged: steps (\d+) to (\d+) all had a NaN .*", last).groups()
    )
    assert to == first + 1 and "skipped 2 (NaN/inf)" in err  # two in a row, counted in the progress bar
    records = [r for r in read_metrics(run) if not r.get("eval")]
    assert [r["step"] for r in records] == list(range(1, to + 1))
    assert all(np.isfinite(r["grad_norm"]) for r in records[: first - 1])
    assert all(np.isnan(r["grad_norm"]) for r in records[first - 1 :])
    assert records[-1]["main_loss"] == records[-2]["main_loss"]  # the skipped step moved nothing
    assert checkpoint.latest_step(run) == to - 1  # no checkpoint after the stop
