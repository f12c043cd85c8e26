"""The benches' own logic: run reuse (bench/train_once.py), where a finished run folder stands in for a new run
only when the arguments resolve to the config it was trained with; and bench/balance.py's per-file expert loads."""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import balance
import train_once as bench_runs

from minidsv3 import data
from minidsv3.model import Transformer

TINY = str(bench_runs.ROOT / "configs" / "tiny.toml")
TRAINED = [TINY, "--train.pretrain_steps=1000", "--model.fp8=true", "--train.learning_rate=3e-3"]


@pytest.fixture
def finished_run(tmp_path, monkeypatch) -> Path:
    """A run folder as train.py leaves it at the end of a run of TRAINED, where train_once puts it; training a run
    fails the test, and is recorded when allowed."""
    out = tmp_path / f"fp8-{bench_runs.config_key(bench_runs.resolved_config(TRAINED))}"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(bench_runs.resolved_config([*TRAINED, f"--train.out_dir={out}"])))
    (out / "final.json").write_text("{}")

    def no_training(*args, **kwargs):
        raise AssertionError("train.py was started for a run that is already finished")

    monkeypatch.setattr(bench_runs.subprocess, "run", no_training)
    return out


@pytest.mark.parametrize(
    "asked",
    [
        [TINY, "--train.learning_rate=3e-3", "--model.fp8=true", "--train.pretrain_steps=1000"],  # reordered
        [TINY, "--train.pretrain_steps=1000", "--model.fp8=true", "--train.learning_rate=0.003"],  # same number
        [TINY, "--train.pretrain_steps=1000", "--model.fp8=true", "--train.seed=0"],  # a default spelled out
    ],
)
def test_the_same_run_asked_for_differently_is_reused(finished_run, asked):
    assert bench_runs.train_once(finished_run.parent, "fp8", asked) == finished_run


@pytest.mark.parametrize(
    "asked",
    [
        [TINY, "--train.pretrain_steps=500", "--model.fp8=true"],  # another value
        [TINY, "--train.pretrain_steps=1000"],  # an override left out: FP8 off
        [TINY, "--train.pretrain_steps=1000", "--model.fp8=true", "--model.fp8=false"],  # the last value wins
        [str(bench_runs.ROOT / "configs" / "small.toml"), "--train.pretrain_steps=1000", "--model.fp8=true"],
    ],
)
def test_another_config_trains_in_its_own_folder_beside_the_finished_run(finished_run, asked, monkeypatch):
    before = {f.name: f.read_text() for f in finished_run.iterdir()}
    started = []
    monkeypatch.setattr(bench_runs.subprocess, "run", lambda cmd, **kwargs: started.append(cmd))
    out = bench_runs.train_once(finished_run.parent, "fp8", asked)
    assert out != finished_run and out.parent == finished_run.parent and out.name.startswith("fp8-")
    assert len(started) == 1 and started[0][-1] == f"--train.out_dir={out}"
    assert {f.name: f.read_text() for f in finished_run.iterdir()} == before  # nothing overwritten


def test_paths_name_the_same_files_from_any_folder_and_where_to_stop_is_not_part_of_the_key(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    monkeypatch.chdir(tmp_path)
    relative = bench_runs.with_absolute_paths([TINY, "--data.path=corpus"])
    assert bench_runs.resolved_config(relative)["data"]["path"] == str(corpus)
    key = bench_runs.config_key(bench_runs.resolved_config(relative))
    assert bench_runs.config_key(bench_runs.resolved_config([TINY, f"--data.path={corpus}"])) == key
    stopping = bench_runs.resolved_config([*relative, "--train.stop_after_steps=10"])
    assert bench_runs.config_key(stopping) == key  # a run stopped early is continued, as train.py does
    assert bench_runs.config_key(bench_runs.resolved_config([*relative, "--train.seed=1"])) != key


def test_a_run_folder_whose_config_was_changed_is_refused(finished_run):
    changed = bench_runs.resolved_config([*TRAINED, "--train.seed=7"])
    (finished_run / "config.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="error: .*not the config this folder is named after"):
        bench_runs.train_once(finished_run.parent, "fp8", TRAINED)


def test_bad_arguments_are_a_one_line_error(finished_run):
    with pytest.raises(SystemExit, match="error: .*unknown key"):
        bench_runs.train_once(finished_run.parent, "fp8", [TINY, "--train.no_such_field=1"])


def test_file_loads_count_each_file_alone(cfg, tmp_path):
    """Every token of a file is counted top-k times per MoE layer and the padding never; the loads are the model's
    on that file read alone, whichever batches its windows fall in."""
    docs = [data.Document(f"f{i}.py", f"def f{i}(x):\n    return x + {i}\n" * (1 + 12 * i)) for i in range(3)]
    tokenizer = data.load_or_train_tokenizer(docs, 300, tmp_path)
    model = Transformer(dataclasses.replace(cfg, vocab_size=300), rngs=nnx.Rngs(0))
    T = 8
    assert len(data.encode_documents(docs[-1:], tokenizer)) > 4 * T  # the last file spans several batches of 4
    loads = balance.file_loads(model, tokenizer, docs, T, rows=4)  # (F, L_moe, E)
    for doc, got in zip(docs, loads, strict=True):
        ids = data.encode_documents([doc], tokenizer)  # (n,)
        assert np.all(got.sum(-1) == cfg.num_experts_per_tok * len(ids))  # per layer; rows pad to 4 windows of 8
        n_win = -(-len(ids) // T)
        inputs = np.zeros(n_win * T, np.int32)
        inputs[: len(ids)] = ids
        mask = (np.arange(n_win * T) < len(ids)).astype(np.float32)
        _, aux = model(inputs.reshape(n_win, T), token_mask=mask.reshape(n_win, T))  # the file in one batch
        np.testing.assert_array_equal(got, np.asarray(aux["expert_load"]))


def test_maxvio_pools_the_files_then_averages_the_layers():
    loads = np.array([[[3, 1], [2, 2]], [[1, 1], [0, 4]]], float)  # (F=2, L_moe=2, E=2)
    # pooled: layer 0 [4, 2] -> (4 - 3) / 3; layer 1 [2, 6] -> (6 - 4) / 4
    assert balance.maxvio(loads) == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_the_held_out_files_are_those_train_py_holds_out():
    docs = [data.Document(f"pkg/mod{i}.py", f"x = {i}\n") for i in range(60)]
    held = data.hold_out([d.name for d in docs], 0.1, 3)
    _, val = data.split_documents(docs, 0.1, 3)
    assert [d.name for d, h in zip(docs, held, strict=True) if h] == [d.name for d in val]
