"""The benches' run reuse (bench/train_once.py): a finished run folder stands in for a new run only when train.py
would resolve both argument lists to the same run."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from train_once import train_once


def finished_run(tmp_path: Path, args: list[str]) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / "final.json").write_text("{}")
    (out / "bench_args.json").write_text(json.dumps(args))
    return out


def test_the_same_run_with_reordered_overrides_is_reused(tmp_path):
    asked = ["configs/tiny.toml", "--train.seed=1", "--train.pretrain_steps=1000", "--model.fp8=false"]
    out = finished_run(
        tmp_path, ["configs/tiny.toml", "--train.pretrain_steps=1000", "--model.fp8=false", "--train.seed=1"]
    )
    assert train_once(out, asked) == out  # no training: it would fail here, there is no corpus cache in tmp_path


@pytest.mark.parametrize(
    "asked",
    [
        ["configs/tiny.toml", "--train.pretrain_steps=500", "--model.fp8=false"],  # another value
        ["configs/tiny.toml", "--train.pretrain_steps=1000"],  # an override missing
        ["configs/small.toml", "--train.pretrain_steps=1000", "--model.fp8=false"],  # another config
        ["configs/tiny.toml", "--train.pretrain_steps=1000", "--model.fp8=false", "--model.fp8=true"],  # last wins
    ],
)
def test_a_finished_run_of_other_arguments_is_refused(tmp_path, asked):
    out = finished_run(tmp_path, ["configs/tiny.toml", "--train.pretrain_steps=1000", "--model.fp8=false"])
    with pytest.raises(SystemExit, match="trained with other arguments"):
        train_once(out, asked)
    assert json.loads((out / "bench_args.json").read_text())[1] == "--train.pretrain_steps=1000"  # left as it was
