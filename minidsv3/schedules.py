"""The run's schedules, in optimizer steps over the three stages (report §4.2, §4.3, §5.1; notes §5, §6).

One global step counter runs through pre-training [0, P), context extension [P, P+C) and post-training
[P+C, P+C+S). Each function maps it to a value; the optimizer's learning rate is `learning_rate`, while γ and λ are
passed to the train step as arguments (they are not optimizer hyperparameters).

Pre-training learning rate, the report's shape scaled from tokens to steps:
    linear warmup 0 -> peak over `warmup_steps`              (2K steps)
    constant peak until `constant_fraction`·P                (until 10T of 14.8T tokens)
    cosine decay to `min_lr_ratio`·peak until (1-`tail_fraction`)·P   (to 2.2e-5 at 14.3T)
    constant minimum for the tail                            (333B + 167B tokens)
NOTE: differs from the report: its tail has two levels (2.2e-5, then 7.3e-6 for the last 167B tokens); we hold one.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from minidsv3.config import TrainConfig


def learning_rate(step, t: TrainConfig):
    """Learning rate at global step `step` (works on Python ints and traced arrays, as optax calls it)."""
    step = jnp.asarray(step, jnp.float32)
    P, C = t.pretrain_steps, t.context_steps
    peak, low = t.learning_rate, t.learning_rate * t.min_lr_ratio
    decay_start, decay_end = t.constant_fraction * P, (1.0 - t.tail_fraction) * P
    warmup = peak * jnp.minimum((step + 1) / max(t.warmup_steps, 1), 1.0)
    progress = jnp.clip((step - decay_start) / max(decay_end - decay_start, 1.0), 0.0, 1.0)
    cosine = low + (peak - low) * 0.5 * (1 + jnp.cos(math.pi * progress))
    pretrain = jnp.where(step < decay_start, warmup, jnp.where(step < decay_end, cosine, low))
    pretrain = jnp.minimum(pretrain, warmup)  # warmup wins if it outlasts the constant phase
    context = t.context_learning_rate  # constant, report §4.3 (7.3e-6, the final pre-training LR)
    sft_progress = jnp.clip((step - P - C) / max(t.sft_steps - 1, 1), 0.0, 1.0)
    sft_low = t.sft_learning_rate * t.min_lr_ratio
    sft = sft_low + (t.sft_learning_rate - sft_low) * 0.5 * (1 + jnp.cos(math.pi * sft_progress))  # 5e-6 -> 1e-6
    return jnp.where(step < P, pretrain, jnp.where(step < P + C, context, sft))


def bias_update_speed(step: int, t: TrainConfig) -> float:
    """γ: `bias_update_speed` during pre-training, 0 for its last `bias_freeze_fraction` (0.001, then 0 for the
    last 500B of 14.8T tokens).

    NOTE: the report says nothing of γ after pre-training; we balance again in context extension and SFT, whose
    data differ from pre-training's, because with no token dropping an imbalance costs throughput.
    """
    P = t.pretrain_steps
    if step < P:
        return t.bias_update_speed if step < (1.0 - t.bias_freeze_fraction) * P else 0.0
    return t.bias_update_speed


def mtp_lambda(step: int, t: TrainConfig) -> float:
    """λ: 0.3 for the first 10/14.8 of pre-training, then 0.1, kept for the later stages (report §4.2)."""
    return t.mtp_lambda if step < t.mtp_lambda_switch * t.pretrain_steps else t.mtp_lambda_late
