"""Sampling from the latent KV cache (minidsv3/generate.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minidsv3.generate import generate, pick
from minidsv3.model import Transformer


def test_cached_greedy_generation_equals_greedy_decoding_by_full_recompute(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    prompt = [5, 17, 42]
    out, speed = generate(model, prompt, 4)
    seq = list(prompt)
    forward = nnx.jit(lambda m, x: m(x)[0])
    for _ in range(4):  # no cache: run the whole sequence again for every new token
        logits = forward(model, jnp.asarray([seq]))
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert out == seq[len(prompt) :] and speed > 0


def test_generation_stops_at_the_stop_token(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    greedy, _ = generate(model, [1, 2], 5)
    out, _ = generate(model, [1, 2], 5, stop_token=greedy[1])
    assert out == greedy[: greedy.index(greedy[1]) + 1]


def test_top_k_samples_only_among_the_k_most_likely_tokens():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))  # top-2: tokens 1 and 3
    draws = {int(pick(logits, jax.random.key(i), 1.0, 2, 1.0)[0]) for i in range(200)}
    assert draws == {1, 3}


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    # sorted: 0.4 (token 1), 0.3 (token 3), 0.15 (token 4) ... mass before token 4 is 0.7 < 0.75, so it stays;
    # mass before token 2 is 0.85 >= 0.75, so tokens 2 and 0 go
    draws = {int(pick(logits, jax.random.key(i), 1.0, 0, 0.75)[0]) for i in range(300)}
    assert draws == {1, 3, 4}


def test_temperature_zero_is_argmax_and_top_k_one_is_argmax_too():
    logits = jax.random.normal(jax.random.key(0), (3, 11))
    np.testing.assert_array_equal(pick(logits, jax.random.key(1), 0.0, 0, 1.0), jnp.argmax(logits, -1))
    np.testing.assert_array_equal(pick(logits, jax.random.key(1), 1.0, 1, 1.0), jnp.argmax(logits, -1))
