"""Learning-rate, γ and λ schedules at worked steps (minidsv3/schedules.py; report §4.2, §4.3)."""

import math

import numpy as np
import pytest

from minidsv3.config import TrainConfig
from minidsv3.schedules import bias_update_speed, learning_rate, mtp_lambda

# P = 1000 pre-training steps: warmup 100, constant to 500, cosine to 900, tail to 1000;
# then 100 context-extension steps and 200 SFT steps.
T = TrainConfig(
    learning_rate=1e-3, warmup_steps=100, constant_fraction=0.5, tail_fraction=0.1, min_lr_ratio=0.1,
    pretrain_steps=1000, context_steps=100, context_learning_rate=7e-5, sft_steps=201, sft_learning_rate=2e-4,
    bias_update_speed=0.001, bias_freeze_fraction=0.05, mtp_lambda=0.3, mtp_lambda_late=0.1, mtp_lambda_switch=0.6,
)  # fmt: skip


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1e-5),  # warmup: (0 + 1) / 100 * 1e-3
        (49, 5e-4),  # (49 + 1) / 100 * 1e-3
        (99, 1e-3),  # end of warmup
        (300, 1e-3),  # constant
        (500, 1e-3),  # cosine starts: progress 0
        (700, 1e-4 + 9e-4 * 0.5),  # halfway through the cosine: (1 + cos(pi/2)) / 2 = 0.5 -> 5.5e-4
        (900, 1e-4),  # cosine ends at 10 %
        (999, 1e-4),  # constant tail
        (1000, 7e-5),  # context extension: constant
        (1099, 7e-5),
        (1100, 2e-4),  # SFT: cosine from 2e-4 ...
        (1200, 2e-5 + 1.8e-4 * 0.5),  # ... halfway (progress 100/200) ...
        (1300, 2e-5),  # ... to 10 % at the last step
    ],
)
def test_learning_rate_at_worked_steps(step, expected):
    np.testing.assert_allclose(float(learning_rate(step, T)), expected, rtol=1e-5)


def test_cosine_quarter_point_by_hand():
    # step 600: progress (600 - 500) / 400 = 0.25 -> 1e-4 + 9e-4 * (1 + cos(pi/4)) / 2 = 1e-4 + 9e-4 * 0.853553
    np.testing.assert_allclose(float(learning_rate(600, T)), 1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2, rtol=1e-5)


@pytest.mark.parametrize("step, expected", [(0, 0.001), (949, 0.001), (950, 0.0), (999, 0.0), (1000, 0.001)])
def test_bias_update_speed_is_zero_for_the_last_part_of_pretraining_only(step, expected):
    # freeze from (1 - 0.05) * 1000 = 950 to the end of pre-training (report: the last 500B of 14.8T tokens)
    assert bias_update_speed(step, T) == expected


@pytest.mark.parametrize("step, expected", [(0, 0.3), (599, 0.3), (600, 0.1), (1000, 0.1), (1250, 0.1)])
def test_mtp_lambda_drops_from_0_3_to_0_1_after_the_switch_point(step, expected):
    assert mtp_lambda(step, T) == expected


def test_the_tiny_config_follows_the_reports_lambda_switch_at_10_of_14_8():
    t = TrainConfig(pretrain_steps=148)
    assert mtp_lambda(99, t) == 0.3 and mtp_lambda(100, t) == 0.1  # 10/14.8 * 148 = 100
