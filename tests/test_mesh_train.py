"""train.py on a (data, expert) mesh: a mesh that cannot be built is refused in one line, and two processes on this
host (jax.distributed with CPU collectives, 4 forced devices each) train the same run as one device, with process 0
alone writing the run folder's logs and reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from test_train import ROOT, TINY, train, write_corpus

from minidsv3 import config

# 2 pre-training steps, nothing else: the compiled step is what differs between one device and the mesh
SHORT = [*TINY, "--train.batch_size=8", "--train.pretrain_steps=2", "--train.context_steps=0", "--train.sft_steps=0",
         "--train.rl_steps=0"]  # fmt: skip


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--mesh.expert=3"], "mesh.expert: must divide model.n_routed_experts (4) so that each device holds whole"),
        (
            ["--mesh.data=3"],
            "train.batch_size: must be a multiple of mesh.data x mesh.expert (3) to split over the mesh",
        ),
        (["--mesh.expert=4", "--train.batch_size=4", "--train.context_steps=2"], "context extension's batch"),
        (["--mesh.process_id=2", "--mesh.num_processes=2"], "mesh.process_id: must be in [0, num_processes = 2)"),
    ],
)
def test_a_mesh_that_does_not_fit_the_experts_or_the_batch_is_refused_naming_the_field(overrides, message):
    with pytest.raises(config.ConfigError) as e:
        config.load(ROOT / "configs/tiny.toml", [*TINY, *overrides])
    assert message in str(e.value)


def test_a_mesh_larger_than_the_devices_is_one_line_on_stderr_and_exit_2(tmp_path, jax_cache_env):
    env = {**jax_cache_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = train(*SHORT, "--mesh.expert=4", f"--data.path={tmp_path}", f"--train.out_dir={tmp_path / 'run'}",
                 cwd=tmp_path, env=env)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: mesh.data x mesh.expert = 1 x 4 = 4 does not divide the 2 devices; choose sizes whose product divides 2"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_on_a_2x4_mesh_train_as_one_device_and_process_0_alone_writes_the_logs(tmp_path, jax_cache_env):
    corpus = write_corpus(tmp_path / "corpus")
    common = [*SHORT, f"--data.path={corpus}", f"--data.cache_dir={tmp_path / 'cache'}"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    # the one-device run, alongside the two processes (a train.py keeps about one core busy)
    one = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, f"--train.out_dir={tmp_path / 'one'}"],
                           cwd=tmp_path, env=jax_cache_env, **pipes)  # fmt: skip

    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mesh = [
        "--mesh.data=2",
        "--mesh.expert=4",
        "--mesh.num_processes=2",
        f"--mesh.coordinator_address=127.0.0.1:{port}",
    ]
    # conftest's flags (as the one-device run's), and 4 devices
    flags = f"{jax_cache_env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**jax_cache_env, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, str(ROOT / "train.py"), *common, *mesh, f"--train.out_dir={tmp_path / 'two'}"]
    procs = [subprocess.Popen([*args, f"--mesh.process_id={i}"], cwd=tmp_path, env=env, **pipes) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    one_err = one.communicate(timeout=600)[1]
    assert one.returncode == 0, one_err[-2000:]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "mesh: 2 (data) x 4 (expert) devices of 8, 2 process(es)" in outs[0][0]

    final_one = json.loads((tmp_path / "one" / "final.json").read_text())
    final_two = json.loads((tmp_path / "two" / "final.json").read_text())
    assert final_two["val_loss"] == pytest.approx(final_one["val_loss"], rel=1e-5)
    records = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 3  # 2 steps and the evaluation, written once (process 0)
    assert "final validation loss" in outs[0][0] and "final validation loss" not in outs[1][0]
    assert os.listdir(tmp_path / "two" / "checkpoints") == ["2"]  # saved by both, Orbax's multi-process save
