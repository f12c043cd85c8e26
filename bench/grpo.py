"""The RL stage's three costs: rule rewards per second, rollout tokens per second, seconds per GRPO step.

    python bench/grpo.py                       # tiny.toml's model (random weights), P x G = 8 x 8, R = 32
    python bench/grpo.py --prompts 4 --samples 16 --new-tokens 64

1. The reward sandbox (minidsv3/reward.py) on the 300 held-out tasks, each scored with its reference body (r = 1,
   runs every hidden test) and with a wrong one (r = 0 after the tests), through one worker process.
2. The rollout (minidsv3/rollout.py): P prompts x G samples from the latent cache in one compiled loop, prompts of
   40-100 random tokens left-padded to a window of 128, no stop token (every row runs R tokens). Tokens/s counts the
   B·R new tokens over the loop's wall time, the prefill included, compilation apart.
3. One GRPO step (minidsv3/grpo.py) on that batch: the reference model's log-probs plus forward, backward and AdamW.
Each timing is the median of --repeats calls after a warm-up call that compiles.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minidsv3 import config, grpo, rollout, tasks
from minidsv3.model import Transformer
from minidsv3.reward import Sandbox
from minidsv3.step import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, which compiles; median seconds of `repeats` more calls)."""
    tic = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - tic
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - tic)
    return first, statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)

    held = tasks.held_out_tasks()
    wrong = [t.response.replace("return ", "return 1 + ") for t in held]  # parses, allowed, fails the tests
    with Sandbox() as box:
        box.rewards(held[:5], [t.response for t in held[:5]])  # start the worker
        tic = time.perf_counter()
        verdicts = box.rewards(held + held, [t.response for t in held] + wrong)
        seconds = time.perf_counter() - tic
    assert [v.reward for v in verdicts] == [1.0] * len(held) + [0.0] * len(held)
    print(f"rewards: {len(verdicts) / seconds:,.0f} rewards/s ({len(verdicts)} responses, half correct, one worker)")

    cfg = config.load_model_config(a.config)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, cfg.vocab_size, rng.integers(40, 101)).tolist() for _ in range(a.prompts)]
    window, offsets = rollout.left_pad(prompts, a.samples, 128, pad=1)
    B, R = len(window), a.new_tokens

    def sample():
        return rollout.sample(model, window, offsets, jax.random.key(0), -1, 1, max_new_tokens=R)

    compile_s, seconds = timed(sample, a.repeats)
    print(
        f"rollout: {B * R / seconds:,.0f} tokens/s ({a.prompts} x {a.samples} rows x {R} tokens in"
        f" {seconds:.2f} s; first call {compile_s:.1f} s with compilation)"
    )

    batch = rollout.training_batch(sample())
    rewards = jnp.asarray(rng.integers(0, 2, B), jnp.float32)
    batch["advantages"] = grpo.group_advantages(rewards, a.samples)
    reference = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, config.TrainConfig())

    def step():
        batch["ref_logp"] = grpo.reference_logprobs(reference, batch)
        return grpo.grpo_step(model, optimizer, batch, 1e-4)

    compile_s, seconds = timed(step, a.repeats)
    print(f"GRPO step: {seconds:.2f} s ({B} rows x {batch['inputs'].shape[1]} positions; first {compile_s:.1f} s)")


if __name__ == "__main__":
    main()
