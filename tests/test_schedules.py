"""Batch-size ramp, learning-rate, γ and λ schedules at worked steps (minidsv3/schedules.py; report §4.2, §4.3)."""

import bisect
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from minidsv3 import config
from minidsv3.config import TrainConfig
from minidsv3.schedules import BatchRamp, RampLevel, bias_update_speed, learning_rate, mtp_lambda

ROOT = Path(__file__).resolve().parents[1]

# P = 1000 pre-training steps of a constant batch: warmup 100, constant to 500, cosine to 900, minimum to 960, the
# final level to 1000; then 100 context-extension steps and 201 SFT steps.
TC = TrainConfig(
    learning_rate=1e-3, warmup_steps=100, constant_fraction=0.5, tail_fraction=0.1, min_lr_ratio=0.1,
    final_fraction=0.04, final_lr_ratio=0.05,
    pretrain_steps=1000, context_steps=100, context_learning_rate=7e-5, sft_steps=201, sft_learning_rate=2e-4,
    bias_update_speed=0.001, bias_freeze_fraction=0.05, mtp_lambda=0.3, mtp_lambda_late=0.1, mtp_lambda_switch=0.6,
)  # fmt: skip
RAMP = BatchRamp(TC, seq_len=128)  # no ramp: 16 x 128 = 2048 tokens every step


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),  # warmup from 0: 0 / 100 * 1e-3, the first update only starts Adam's moments
        (1, 1e-5),  # 1 / 100 * 1e-3
        (25, 2.5e-4),  # 25 / 100 * 1e-3
        (99, 9.9e-4),
        (100, 1e-3),  # the first step at the peak
        (300, 1e-3),  # constant
        (500, 1e-3),  # cosine starts: progress 0
        (700, 1e-4 + 9e-4 * 0.5),  # halfway through the cosine: (1 + cos(pi/2)) / 2 = 0.5 -> 5.5e-4
        (900, 1e-4),  # cosine ends at 10 %
        (959, 1e-4),  # constant minimum
        (960, 5e-5),  # the final level: 0.05 * 1e-3 for the last 4 % (7.3e-6 for the last 167B in the report)
        (999, 5e-5),
        (1000, 7e-5),  # context extension: constant
        (1099, 7e-5),
        (1100, 2e-4),  # SFT: cosine from 2e-4 ...
        (1200, 2e-5 + 1.8e-4 * 0.5),  # ... halfway (progress 100/200) ...
        (1300, 2e-5),  # ... to 10 % at the last step
    ],
)
def test_learning_rate_at_worked_steps(step, expected):
    np.testing.assert_allclose(learning_rate(step, TC, RAMP), expected, rtol=1e-9, atol=1e-15)


def test_cosine_quarter_point_by_hand():
    # step 600: progress (600 - 500) / 400 = 0.25 -> 1e-4 + 9e-4 * (1 + cos(pi/4)) / 2 = 1e-4 + 9e-4 * 0.853553
    np.testing.assert_allclose(learning_rate(600, TC, RAMP), 1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2, rtol=1e-9)


@pytest.mark.parametrize("step, expected", [(0, 0.001), (949, 0.001), (950, 0.0), (999, 0.0), (1000, 0.001)])
def test_bias_update_speed_is_zero_for_the_last_part_of_pretraining_only(step, expected):
    # freeze from (1 - 0.05) * 1000 = 950 to the end of pre-training (report: the last 500B of 14.8T tokens)
    assert bias_update_speed(step, TC, RAMP) == expected


@pytest.mark.parametrize("step, expected", [(0, 0.3), (599, 0.3), (600, 0.1), (1000, 0.1), (1250, 0.1)])
def test_mtp_lambda_drops_from_0_3_to_0_1_after_the_switch_point(step, expected):
    assert mtp_lambda(step, TC, RAMP) == expected


def test_the_tiny_config_follows_the_reports_lambda_switch_at_10_of_14_8():
    tc = TrainConfig(pretrain_steps=148)
    ramp = BatchRamp(tc, seq_len=64)
    assert mtp_lambda(99, tc, ramp) == 0.3 and mtp_lambda(100, tc, ramp) == 0.1  # 10/14.8 * 148 = 100


def test_with_a_constant_batch_every_schedule_is_the_same_per_step_whatever_the_batch():
    # Counting tokens instead of steps changes nothing while the batch is constant: 4 x 8 tokens a step (a scale that
    # is not a power of two: 3 x 7) gives the worked steps above at every step of all three stages.
    for batch_size, seq_len in ((4, 8), (3, 7)):
        other = dataclasses.replace(TC, batch_size=batch_size)
        ramp = BatchRamp(other, seq_len)
        for schedule in (learning_rate, bias_update_speed, mtp_lambda):
            ours = [schedule(s, TC, RAMP) for s in range(1301)]
            theirs = [schedule(s, other, ramp) for s in range(1301)]
            np.testing.assert_allclose(
                theirs, ours, rtol=1e-12, err_msg=f"{schedule.__name__} at {batch_size}x{seq_len}"
            )


# A ramp from 1 to 4 micro-batches of 4 x 8 = 32 tokens over the first 960 tokens, then 30 - 19 = 11 full steps.
RAMPED = TrainConfig(
    batch_size=4, grad_accum_steps=4, batch_ramp_start=4, batch_ramp_tokens=960, pretrain_steps=30, warmup_steps=0,
    learning_rate=1e-3, constant_fraction=0.5, tail_fraction=0.25, min_lr_ratio=0.1, bias_freeze_fraction=0.25,
    mtp_lambda_switch=0.5, context_steps=2,
)  # fmt: skip


def test_the_batch_ramp_rounds_the_linear_ramp_down_to_whole_micro_batches():
    ramp = BatchRamp(RAMPED, seq_len=8)
    # Level a holds while tokens < 960 * a / 3 (the linear ramp 1 + 3 * tokens / 960 rounds down to a):
    #   a = 1 until 320 tokens: ceil(320 / 32) = 10 steps -> 320 tokens at step 10
    #   a = 2 until 640: ceil((640 - 320) / 64) = 5 steps -> 640 at step 15
    #   a = 3 until 960: ceil((960 - 640) / 96) = 4 steps -> 1024 at step 19 (its last step passes 960)
    #   a = 4 from step 19 on
    assert ramp.levels == [RampLevel(0, 0, 1), RampLevel(10, 320, 2), RampLevel(15, 640, 3), RampLevel(19, 1024, 4)]
    assert [ramp.micro_batches(s) for s in (0, 9, 10, 14, 15, 18, 19, 29, 30, 31)] == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    assert ramp.tokens_before(25) == 1024 + 6 * 128
    assert ramp.total_tokens == 1024 + 11 * 128 == ramp.tokens_before(31)  # 2432, unchanged after pre-training


def test_under_the_ramp_the_schedules_count_tokens_not_steps():
    ramp = BatchRamp(RAMPED, seq_len=8)  # tokens before step s >= 19: 1024 + (s - 19) * 128, of 2432 in all
    # λ drops once half the tokens are seen: 1216 -> step 21 (1280 tokens), not half the steps (15)
    assert [mtp_lambda(s, RAMPED, ramp) for s in (15, 20, 21)] == [0.3, 0.3, 0.1]
    # γ freezes for the last quarter of the tokens: from 1824 -> step 26 (1920 tokens), not step 23
    assert [bias_update_speed(s, RAMPED, ramp) for s in (23, 25, 26, 29, 30)] == [0.001, 0.001, 0.0, 0.0, 0.001]
    # the cosine runs from 1216 to 1824 tokens: at step 23 (1536 tokens) its progress is 320 / 608
    assert learning_rate(20, RAMPED, ramp) == 1e-3
    expected = 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 320 / 608))
    np.testing.assert_allclose(learning_rate(23, RAMPED, ramp), expected, rtol=1e-12)


def test_deepseek_v3_toml_gives_the_reports_pretraining_schedules_in_tokens():
    cfg = config.load(ROOT / "configs/deepseek_v3.toml")
    tc = cfg.train
    ramp = BatchRamp(tc, cfg.data.seq_len)
    full_step = tc.batch_size * tc.grad_accum_steps * cfg.data.seq_len  # 15,360 x 4,096 tokens

    def at(tokens: float) -> int:  # the first step with at least `tokens` pre-training tokens before it
        return bisect.bisect_left(range(tc.pretrain_steps), tokens, key=ramp.tokens_before)

    # 3,072 -> 15,360 sequences over the first 469B tokens, in 5 levels (5 compilations of the step)
    assert [level.micro_batches * tc.batch_size for level in ramp.levels] == [3072, 6144, 9216, 12288, 15360]
    assert 469e9 <= ramp.levels[-1].tokens_before < 469e9 + full_step
    assert 14.8e12 <= ramp.total_tokens < 14.8e12 + full_step
    np.testing.assert_allclose(learning_rate(1000, tc, ramp), 1.1e-4)  # halfway through the 2K warm-up steps
    for tokens, lr, gamma, lam in (
        (1e12, 2.2e-4, 0.001, 0.3),
        (9.99e12, 2.2e-4, 0.001, 0.3),
        (10.01e12, 2.2e-4, 0.001, 0.1),  # λ drops at 10T; the cosine has just started
        (12.15e12, (2.2e-4 + 2.2e-5) / 2, 0.001, 0.1),  # halfway through the cosine (10T -> 14.3T)
        (14.31e12, 2.2e-5, 0.0, 0.1),  # γ = 0 from 14.3T
        (14.65e12, 7.3e-6, 0.0, 0.1),  # the last 167B
    ):
        step = at(tokens)
        np.testing.assert_allclose(learning_rate(step, tc, ramp), lr, rtol=1e-3, err_msg=f"{tokens:.4g} tokens")
        assert (bias_update_speed(step, tc, ramp), mtp_lambda(step, tc, ramp)) == (gamma, lam), f"{tokens:.4g}"
