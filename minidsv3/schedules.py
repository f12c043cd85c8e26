"""The run's schedules: batch size, learning rate, γ and λ over the three stages (report §4.2, §4.3, §5.1; notes §5, §6).

Pre-training counts tokens, as the report states its schedules (14.8T tokens in all):
    batch size     3,072 -> 15,360 sequences over the first 469B tokens, then 15,360     `BatchRamp`
    learning rate  linear 0 -> peak over the first `warmup_steps` steps                  (2K steps: given in steps)
                   peak until `constant_fraction` of the tokens                          (2.2e-4 until 10T)
                   cosine to `min_lr_ratio`·peak until 1 - `tail_fraction` of them       (2.2e-5 at 14.3T)
                   that minimum, then `final_lr_ratio`·peak for the last `final_fraction` (333B; 7.3e-6 for 167B)
    γ              `bias_update_speed`, 0 for the last `bias_freeze_fraction`            (0.001 until 14.3T, then 0)
    λ              `mtp_lambda` until `mtp_lambda_switch`, then `mtp_lambda_late`        (0.3 until 10T, then 0.1)
With a constant batch, tokens are steps x batch x seq_len, so each phase starts at the same step as if counted in
steps; with the ramp, the early steps hold fewer tokens and the phases move to later steps. Context extension and
post-training keep the full batch and count steps: a constant rate (report §4.3), then SFT's cosine (§5.1).

Each function takes the global step, one counter through pre-training [0, P), context extension [P, P+C) and
post-training [P+C, P+C+S), and the run's `BatchRamp`, which knows the pre-training tokens seen before each step.
train.py evaluates them on the host before every step and passes the values to the jitted step as arguments.
"""

from __future__ import annotations

import dataclasses
import math

from minidsv3.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class RampLevel:
    first_step: int  # the global step the level starts at
    tokens_before: int  # pre-training tokens seen before that step
    micro_batches: int  # micro-batches of batch_size sequences in each of its steps


class BatchRamp:
    """The pre-training batch size of each step, and the tokens seen before it (report §4.2).

    The report grows the batch from 3,072 to 15,360 sequences over the first 469B tokens without giving the shape; we
    take it linear in the tokens seen. A step holds whole micro-batches of `batch_size` sequences, so the linear ramp
    is rounded down to a whole number of them: with 3,072-sequence micro-batches, 1, 2, 3 and 4 micro-batches for a
    quarter of the 469B tokens each, then 5. Each level is one shape (micro, B, T) of the jitted step, so the ramp
    compiles it grad_accum_steps - batch_ramp_start/batch_size + 1 times (5 for the report's), not once per batch.
    With no ramp, one level holds every step at grad_accum_steps micro-batches.
    """

    def __init__(self, tc: TrainConfig, seq_len: int):
        self.micro_tokens = tc.batch_size * seq_len  # tokens in one micro-batch (B·T)
        self.full = tc.grad_accum_steps  # micro-batches per step after the ramp, and in the later stages
        self.pretrain_steps = tc.pretrain_steps
        self.levels = self._levels(tc.batch_ramp_start // tc.batch_size, tc.batch_ramp_tokens)
        self.total_tokens = self.tokens_before(tc.pretrain_steps)  # the whole of pre-training

    def _levels(self, start: int, ramp_tokens: int) -> list[RampLevel]:
        """Level a (start <= a < full) holds while the tokens seen are below (a - start + 1)/(full - start) of the
        ramp: there the linear ramp start + (full - start)·tokens/ramp_tokens rounds down to a."""
        levels, step, tokens = [], 0, 0
        for a in range(start if ramp_tokens else self.full, self.full):
            end = ramp_tokens * (a - start + 1) / (self.full - start)
            steps = max(math.ceil((end - tokens) / (a * self.micro_tokens)), 0)  # the last one may pass `end`
            if steps:  # skipped when the previous level's last step already went past `end`
                levels.append(RampLevel(step, tokens, a))
                step, tokens = step + steps, tokens + steps * a * self.micro_tokens
        return [*levels, RampLevel(step, tokens, self.full)]

    def _level(self, step: int) -> RampLevel:
        return [level for level in self.levels if level.first_step <= step][-1]

    def micro_batches(self, step: int) -> int:
        """The number of micro-batches of global step `step`: the ramp's in pre-training, grad_accum_steps after it."""
        return self._level(step).micro_batches if step < self.pretrain_steps else self.full

    def tokens_before(self, step: int) -> int:
        """Pre-training tokens seen before global step `step` (all of them once pre-training is over)."""
        step = min(step, self.pretrain_steps)
        level = self._level(step)
        return level.tokens_before + (step - level.first_step) * level.micro_batches * self.micro_tokens


def learning_rate(step: int, tc: TrainConfig, ramp: BatchRamp) -> float:
    """The learning rate of global step `step`: the pre-training schedule, then context extension's and SFT's."""
    sft_start = tc.pretrain_steps + tc.context_steps
    if step >= sft_start:  # post-training: cosine from sft_learning_rate to min_lr_ratio of it (5e-6 -> 1e-6, §5.1)
        progress = min((step - sft_start) / max(tc.sft_steps - 1, 1), 1.0)
        low = tc.sft_learning_rate * tc.min_lr_ratio
        return low + (tc.sft_learning_rate - low) * 0.5 * (1 + math.cos(math.pi * progress))
    if step >= tc.pretrain_steps:
        return tc.context_learning_rate  # constant, report §4.3 (7.3e-6, the final pre-training rate)
    tokens, total = ramp.tokens_before(step), ramp.total_tokens
    peak, low = tc.learning_rate, tc.learning_rate * tc.min_lr_ratio
    decay_start, decay_end = tc.constant_fraction * total, (1.0 - tc.tail_fraction) * total
    if tokens < decay_start:
        lr = peak
    elif tokens < decay_end:
        progress = (tokens - decay_start) / max(decay_end - decay_start, 1.0)
        lr = low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        lr = low if tokens < (1.0 - tc.final_fraction) * total else tc.learning_rate * tc.final_lr_ratio
    # Warm-up from 0 as the report says: step s (0-based, s updates done before it) gets peak·s/warmup_steps, so the
    # first update has rate 0 (it only starts Adam's moments, and the router biases still move) and step
    # `warmup_steps` is the first at the peak, as in Megatron-LM's scheduler. The minimum lets the warm-up win
    # if it outlasts the constant phase.
    return min(lr, peak * step / tc.warmup_steps) if tc.warmup_steps else lr


def bias_update_speed(step: int, tc: TrainConfig, ramp: BatchRamp) -> float:
    """γ: `bias_update_speed` during pre-training, 0 for its last `bias_freeze_fraction` of tokens (0.001, then 0 for
    the last 500B of 14.8T tokens).

    NOTE: the report says nothing of γ after pre-training; we balance again in context extension and SFT, whose
    data differ from pre-training's, because with no token dropping an imbalance costs throughput.
    """
    frozen = ramp.tokens_before(step) >= (1.0 - tc.bias_freeze_fraction) * ramp.total_tokens
    return 0.0 if step < tc.pretrain_steps and frozen else tc.bias_update_speed


def mtp_lambda(step: int, tc: TrainConfig, ramp: BatchRamp) -> float:
    """λ: 0.3 for the first 10/14.8 of the pre-training tokens, then 0.1, kept for the later stages (report §4.2)."""
    return tc.mtp_lambda if ramp.tokens_before(step) < tc.mtp_lambda_switch * ramp.total_tokens else tc.mtp_lambda_late
