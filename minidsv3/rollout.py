"""Rollouts for GRPO: G samples of each of P prompts from the current policy, in one compiled loop (report §5.2.2).

GRPO samples a group of G outputs {o_1..o_G} per question from the old policy π_θold (Eq. 26). Here the sampler is the
policy itself: temperature 1 and no top-k or top-p cut, so a sampled token has exactly the probability the loss's
log-ratio uses. The P·G rows decode together from the latent cache (minidsv3/mla.py, absorbed MLA), prefill and the
token loop inside one `nnx.jit` (`lax.while_loop` on the device, no host round trip per token).

Left padding. Prompts of different lengths are right-aligned in a window of W slots, so that every row's last prompt
token sits in slot W-1 and the rows generate in lockstep, response token i in slot W+i. Row b's real tokens start at
slot offsets[b] with position 0 (RoPE sees slot - offset), and no token attends to the padding before them; the
training forward (`Transformer.features(offsets=...)`) takes the same offsets, so both see identical positions.

Row b of a rollout holds prompt b // G (its group): rows of a group are adjacent, as `grpo.group_advantages` expects.
Shapes: P prompts · G samples per prompt · B = P·G rows · W prompt window · R max_new_tokens · T = W + R - 1 · V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minidsv3.model import Transformer


def left_pad(prompts: list[list[int]], samples: int, width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of P prompts -> the window (B, W), each prompt `samples` times in adjacent rows (row b holds prompt
    b // samples) at the right end, and offsets (B,): where each row's prompt starts."""
    if not prompts or min(map(len, prompts)) == 0 or max(map(len, prompts)) > width:
        raise ValueError(f"prompts must hold 1 to {width} tokens each; raise the prompt window or shorten them")
    rows = [p for p in prompts for _ in range(samples)]
    window = np.full((len(rows), width), pad, np.int32)  # (B, W)
    offsets = np.array([width - len(p) for p in rows], np.int32)  # (B,)
    for row, (p, start) in enumerate(zip(rows, offsets, strict=True)):
        window[row, start:] = p
    return window, offsets


@functools.partial(nnx.jit, static_argnames=("max_new_tokens",))
def sample(
    model: Transformer,
    window: jax.Array,
    offsets: jax.Array,
    key: jax.Array,
    eos: int,
    pad: int,
    greedy: bool = False,
    *,
    max_new_tokens: int,
) -> dict:
    """A continuation of every row of window (B, W) (`left_pad`), offsets (B,): sampled at temperature 1, or the
    argmax with `greedy` (a traced flag: both share one compiled loop), until EOS or R = max_new_tokens.

    Returns window and offsets; tokens (B, R), the response, EOS included when it came, `pad` after it; lengths (B,),
    response tokens up to and with EOS; logp (B, R), the log-probability the policy gave each token (0 after the
    end)."""
    B, W = window.shape
    caches = model.init_cache(B, W + max_new_tokens)
    h, caches = model.decode_hidden(window, caches, jnp.int32(0), offsets)  # (B, W, D): the prompts in one pass
    logits = model.head(model.norm(h[:, -1:]))[:, 0]  # (B, V) after each row's last prompt token, slot W-1

    def running(s):
        i, _, _, _, done, *_ = s
        return (i < max_new_tokens) & ~done.all()

    def step(s):
        i, tokens, logp, lengths, done, logits, caches, key = s
        key, sub = jax.random.split(key)
        log_probs = jax.nn.log_softmax(logits, axis=-1)  # (B, V): temperature 1, the policy itself
        token = jnp.where(greedy, jnp.argmax(logits, axis=-1), jax.random.categorical(sub, logits, axis=-1))  # (B,)
        token = jnp.where(done, pad, token).astype(jnp.int32)  # (B,)
        chosen = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]  # (B,)
        tokens = tokens.at[:, i].set(token)
        logp = logp.at[:, i].set(jnp.where(done, 0.0, chosen))
        lengths = jnp.where(done, lengths, i + 1)  # (B,)
        done = done | (token == eos)
        logits, caches = model.decode(token[:, None], caches, W + i, offsets)  # (B, 1, V) for response token i+1
        return i + 1, tokens, logp, lengths, done, logits[:, 0], caches, key

    init = (
        jnp.int32(0),
        jnp.full((B, max_new_tokens), pad, jnp.int32),  # (B, R)
        jnp.zeros((B, max_new_tokens), jnp.float32),  # (B, R)
        jnp.zeros((B,), jnp.int32),
        jnp.zeros((B,), bool),
        logits,
        caches,
        key,
    )
    _, tokens, logp, lengths, *_ = jax.lax.while_loop(running, step, init)
    return {"window": window, "offsets": offsets, "tokens": tokens, "lengths": lengths, "logp": logp}


def training_batch(rollout: dict) -> dict:
    """The rows of a rollout as the training forward takes them, T = W + R - 1 positions:
    inputs, targets (B, T) int32 (the window then the response, shifted by one); offsets (B,);
    loss_mask (B, T): 1 on the targets that are response tokens, EOS included, built from positions (never from
    token ids, which a sample may share with padding); token_mask (B, T): real input tokens;
    old_logp (B, T): the sampler's log-probabilities, aligned with the targets (0 off the mask)."""
    window, tokens, lengths, offsets = rollout["window"], rollout["tokens"], rollout["lengths"], rollout["offsets"]
    W = window.shape[1]
    rows = jnp.concatenate([window, tokens], axis=1)  # (B, W + R)
    t = jnp.arange(rows.shape[1] - 1)[None, :]  # (1, T): target t is rows[:, t + 1]
    # Response token i is rows[:, W + i], target W - 1 + i: the mask covers i = 0 .. lengths - 1 (the last is EOS).
    loss_mask = ((t >= W - 1) & (t < W - 1 + lengths[:, None])).astype(jnp.float32)  # (B, T)
    token_mask = ((t >= offsets[:, None]) & (t < W + lengths[:, None])).astype(jnp.float32)  # (B, T)
    old_logp = jnp.zeros(loss_mask.shape, jnp.float32).at[:, W - 1 :].set(rollout["logp"])  # (B, T)
    return {
        "inputs": rows[:, :-1],
        "targets": rows[:, 1:],
        "offsets": offsets,
        "loss_mask": loss_mask,
        "token_mask": token_mask,
        "old_logp": old_logp * loss_mask,
    }
