"""Sampling from the latent KV cache (minidsv3/generate.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minidsv3.generate import GenerationError, bucket, generate, pick, run
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


def test_speculative_greedy_decoding_with_the_mtp_draft_gives_the_same_tokens(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    for prompt, n in [([5, 17, 42], 23), ([9], 2), (list(range(1, 40)), 30)]:
        plain = run(model, prompt, n)
        fast = run(model, prompt, n, speculative=True)
        assert fast.tokens == plain.tokens and len(fast.tokens) == n
        assert 0.0 <= fast.drafts_accepted <= 1.0


def test_speculative_decoding_emits_two_tokens_per_round_when_every_draft_is_right(cfg):
    # Zero final-norm gains make every logit 0, for the main model and the MTP module alike: both always pick token
    # 0, so every draft is confirmed and each round emits two tokens.
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.norm.weight[...] = jnp.zeros_like(model.norm.weight[...])
    model.mtp[0].norm.weight[...] = jnp.zeros_like(model.mtp[0].norm.weight[...])
    plain = run(model, [1, 2, 3], 12)
    fast = run(model, [1, 2, 3], 12, speculative=True)
    assert fast.tokens == plain.tokens == [0] * 12
    assert fast.drafts_accepted == 1.0


def test_one_compiled_loop_serves_every_prompt_and_length_of_a_bucket(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    run(model, [1, 2, 3], 5)
    again = run(model, [4, 5, 6, 7, 8], 9)  # same buckets: prompt <= 64, cache <= 64, output <= 64
    assert again.compile_s == 0.0 and len(again.tokens) == 9
    assert bucket(1) == 64 and bucket(65) == 128 and bucket(128) == 128


def test_sampling_is_reproducible_from_the_seed_and_differs_across_seeds(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    a, b, c = (run(model, [3], 16, temperature=1.5, seed=s).tokens for s in (0, 0, 1))
    assert a == b and a != c


def test_run_refuses_sampling_options_out_of_range_instead_of_sampling_garbage(cfg):
    # top_p = 0 would mask every token (all logits -inf) and a negative temperature would silently mean greedy
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # no weights: every check comes first
    for options, message in [
        ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"), ({"top_k": -1}, "top_k"), ({"seed": -1}, "seed"),
    ]:  # fmt: skip
        with pytest.raises(GenerationError, match=message):
            run(model, [1, 2], 4, **options)
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        run(model, [1, 2], cfg.max_position_embeddings)
