"""The benches' own logic, in seconds: bench/fp8_accumulation.py's tensor-core model against hand-worked sums and the
behaviour the report describes; the MaxVio and loss-error arithmetic of bench/balance.py and bench/fp8_vs_bf16.py;
bench/train_once.py's reuse of a finished run."""

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import balance
import fp8_accumulation as acc
import fp8_vs_bf16
import train_once as bench_runs

from minidsv3 import config

TINY = str(bench_runs.ROOT / "configs" / "tiny.toml")


def test_e4m3_rounding_matches_the_float8_e4m3fn_cast():
    rng = np.random.default_rng(0)
    x = np.clip(rng.standard_normal(20_000) * np.exp2(rng.uniform(-12, 8, 20_000)), -447, 447)  # subnormals to 447
    x = np.concatenate([x, [0.0, 1.0625, 1.1875, -(2.0**-10), 3 * 2.0**-10, 440.0, -447.0]])  # ties, subnormal ties
    np.testing.assert_array_equal(acc.to_e4m3(x), x.astype(ml_dtypes.float8_e4m3fn).astype(np.float64))


def test_worked_example_the_running_sum_swallows_small_products_unless_promoted():
    a = np.zeros((1, 64))
    b = np.ones((64, 1))
    a[0, 0], b[0, 0] = 64.0, 128.0  # first MMA: 8192 and 31 zeros
    a[0, 32:] = 0.5  # second MMA: 32 products of 0.5, 16 in all
    # Second MMA, the running sum 8192 = 2^13 aligned with the products: 13 fraction bits below 2^13 end at 1, so each
    # 0.5 is truncated to 0 and the sum stays 8192. With 14 bits the grid is 0.5 and nothing is lost.
    assert acc.tensor_core_dot(a, b, 13)[0, 0] == 8192.0
    assert acc.tensor_core_dot(a, b, 14)[0, 0] == 8208.0
    # Promoted after every MMA, the second starts from 0: the 0.5s align among themselves, exactly.
    assert acc.tensor_core_dot(a, b, 13, promotion_interval=32)[0, 0] == 8208.0
    # Products aligned without the running sum: 16 exactly, then 8192 + 16 = 8208 fits 13 fraction bits.
    assert acc.tensor_core_dot(a, b, 13, products_only=True)[0, 0] == 8208.0


@pytest.mark.parametrize("promotion_interval", [None, 64])
def test_exact_when_every_partial_sum_fits_the_accumulator(promotion_interval):
    rng = np.random.default_rng(1)
    a = rng.integers(-7, 8, (4, 100)).astype(float)  # small integers are E4M3 values; K = 100 ends mid-MMA
    b = rng.integers(-7, 8, (100, 5)).astype(float)
    # |every partial sum| <= 49 · 100 < 2^13: 13 fraction bits below the largest exponent reach below 1
    np.testing.assert_array_equal(acc.tensor_core_dot(a, b, 13, promotion_interval), a @ b)


def max_error(k: int, bits: int, promotion_interval: int | None = None) -> float:
    rng = np.random.default_rng(k)
    a, b = acc.to_e4m3(rng.random((8, k))), acc.to_e4m3(rng.random((k, 8)))  # (8, K), (K, 8)
    exact = a @ b  # (8, 8) exact in float64, positive
    return acc.relative_errors(acc.tensor_core_dot(a, b, bits, promotion_interval), exact, exact)[0]


def test_each_fraction_bit_less_about_doubles_the_error():
    errors = [max_error(1024, bits) for bits in (14, 13, 12, 11, 10)]
    ratios = np.array(errors[1:]) / np.array(errors[:-1])
    # 2x from the grid; a little more at the wider widths, where more products of 4-bit significands fit exactly
    assert np.all((1.8 < ratios) & (ratios < 3)), ratios


def test_without_promotion_the_error_grows_like_k_and_promotion_every_128_holds_it_flat_and_small():
    short, long = max_error(512, 13), max_error(4096, 13)
    assert 5 < long / short < 12  # biased truncation: K 8x longer, error ~8x larger (not ~2.8x as random rounding)
    promoted_short, promoted_long = max_error(512, 13, 128), max_error(4096, 13, 128)
    assert promoted_long < long / 50
    assert 0.5 < promoted_long / promoted_short < 2  # each interval sees 128 products, whatever K is


def test_stream_maxvio_sums_the_last_steps_loads_then_takes_the_max():
    def step(stage, load):
        return {"stage": stage, "expert_load": load}

    records = [
        step("pretrain", [[4, 0], [0, 4]]),  # older than the last 2 steps
        step("pretrain", [[3, 1], [3, 1]]),
        {"stage": "pretrain", "eval": True, "val_loss": 5.0},  # evaluations carry no loads
        step("pretrain", [[1, 3], [3, 1]]),
        step("sft", [[0, 4], [0, 4]]),  # after pre-training
    ]
    # summed: layer 0 [4, 4] -> 0; layer 1 [6, 2] -> (6 - 4) / 4 = 0.5; mean over layers 0.25
    # (per step and then averaged it would be 0.5: the experts that peak differ from step to step)
    assert balance.stream_maxvio(records, steps=2) == pytest.approx(0.25)


def test_relative_loss_error_smooths_both_losses_first():
    # EMA 0.9 from the first value: [2, 2, 2] stays; [2, 2.2, 2.2] -> 2, 2.02, 0.9·2.02 + 0.22 = 2.038
    rel = fp8_vs_bf16.relative_error([2.0, 2.0, 2.0], [2.0, 2.2, 2.2])
    np.testing.assert_allclose(rel, [0.0, 0.01, 0.019], atol=1e-12)


def test_a_finished_run_is_reused_only_for_the_config_it_was_trained_with(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_runs, "ROOT", tmp_path)
    out = tmp_path / "runs" / "bench" / "fp8"
    out.mkdir(parents=True)
    trained = [TINY, "--train.pretrain_steps=100", "--model.fp8=true", f"--train.out_dir={out}"]
    (out / "config.json").write_text(json.dumps(config.to_dict(config.load(trained[0], trained[1:]))))  # as train.py
    (out / "final.json").write_text("{}")
    started = []

    def fake_train_py(cmd, **kwargs):
        started.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_runs.subprocess, "run", fake_train_py)
    assert bench_runs.train_once("fp8", [TINY, "--model.fp8=true", "--train.pretrain_steps=100"]) == out
    assert started == []  # the same config, its overrides in another order: reused
    bench_runs.train_once("fp8", [TINY, "--train.pretrain_steps=200", "--model.fp8=true"])
    assert len(started) == 1 and started[0][-1] == f"--train.out_dir={out}"  # train.py decides (it refuses)
    (out / "final.json").unlink()
    bench_runs.train_once("fp8", [TINY, "--train.pretrain_steps=100", "--model.fp8=true"])
    assert len(started) == 2  # not finished: train.py resumes it
