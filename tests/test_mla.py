"""Multi-head latent attention (report §2.1.1, Eqs. 1-11): invariants, worked examples, and agreement of the
training path with both decode paths (naive and absorbed, notes §1.5) over the latent cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minidsv3.config import RopeScaling
from minidsv3.layers import rope_frequencies
from minidsv3.mla import LatentCache, MultiHeadLatentAttention, init_cache

YARN = RopeScaling(factor=4.0, original_max_position_embeddings=16)  # a small-context YaRN that changes freqs and scale


def make(cfg, seed=0):
    return MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(seed))


def hidden(cfg, batch, length, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, length, cfg.hidden_size))  # (B, T, D)


def decode_token_by_token(attn, x, cache, start, absorb):
    """Feed x (B, T, D) one position at a time through one jitted step whose `start` is traced."""
    traces = []

    @nnx.jit
    def step(attn, x_t, cache, start):
        traces.append(1)  # runs only while tracing
        return attn.decode(x_t, cache, start, absorb=absorb)

    outs = []
    for t in range(x.shape[1]):
        y, cache = step(attn, x[:, t : t + 1], cache, jnp.int32(start + t))
        outs.append(y)
    assert len(traces) == 1, "one compiled step serves every position"
    return jnp.concatenate(outs, axis=1), cache  # (B, T, D)


# ---------------------------------------------------------------------------------------------------------------
# Invariants


def test_output_has_the_input_shape_for_shared_and_per_sequence_positions(cfg):
    attn = make(cfg)
    x = hidden(cfg, 2, 5)  # (2, 5, D)
    y_shared = attn(x, jnp.arange(5))  # positions (T,)
    y_per_row = attn(x, jnp.tile(jnp.arange(5), (2, 1)))  # positions (B, T)
    assert y_shared.shape == (2, 5, cfg.hidden_size) and y_shared.dtype == jnp.float32
    np.testing.assert_allclose(y_per_row, y_shared, atol=1e-6)


def test_perturbing_token_t_changes_no_output_before_t(cfg):
    attn = make(cfg)
    x = hidden(cfg, 1, 8)
    t = 4
    x2 = x.at[:, t].add(3.0 * jax.random.normal(jax.random.key(9), (cfg.hidden_size,)))
    y, y2 = attn(x, jnp.arange(8)), attn(x2, jnp.arange(8))
    np.testing.assert_allclose(y2[:, :t], y[:, :t], atol=1e-6)
    for later in range(t, 8):  # and the perturbation is visible from t on, so the test can fail
        assert np.abs(y2[:, later] - y[:, later]).max() > 1e-4


def test_shifting_all_positions_by_a_constant_leaves_the_output_unchanged_without_yarn(cfg):
    attn = make(cfg)
    x = hidden(cfg, 2, 6)
    y = attn(x, jnp.arange(6))
    np.testing.assert_allclose(attn(x, jnp.arange(6) + 37), y, atol=2e-6)
    assert np.abs(attn(x, 2 * jnp.arange(6)) - y).max() > 1e-4  # other *relative* positions do change it


def test_shifting_all_positions_by_a_constant_leaves_the_output_unchanged_with_yarn(cfg):
    yarn_cfg = dataclasses.replace(cfg, rope_scaling=YARN)
    assert not np.allclose(rope_frequencies(yarn_cfg), rope_frequencies(cfg))  # YaRN is really in play
    attn = make(yarn_cfg)
    x = hidden(yarn_cfg, 2, 6)
    y = attn(x, jnp.arange(6))
    np.testing.assert_allclose(attn(x, jnp.arange(6) + 37), y, atol=2e-6)
    assert np.abs(attn(x, 2 * jnp.arange(6)) - y).max() > 1e-4


def test_yarn_mscale_scales_only_the_rotary_queries_and_keys_and_latent_norms_keep_eps_1e6(cfg):
    # mscale 2 against mscale_all_dim 1 at s = 4: q^R and k^R grow by (0.2 ln 4 + 1) / (0.1 ln 4 + 1) = 1.2772588 /
    # 1.1386294 = 1.121752 (layers.yarn_rope_scale); q^C and the latents c^KV do not change.
    plain = dataclasses.replace(cfg, rope_scaling=YARN, rms_norm_eps=1e-2)
    hot = dataclasses.replace(plain, rope_scaling=dataclasses.replace(YARN, mscale=2.0))
    x, positions = hidden(cfg, 1, 5), jnp.arange(5)
    (q_nope, q_rope), (c_kv, k_rope) = make(plain)._queries(x, positions), make(plain)._latents(x, positions)
    (q_nope2, q_rope2), (c_kv2, k_rope2) = make(hot)._queries(x, positions), make(hot)._latents(x, positions)
    np.testing.assert_allclose(q_nope2, q_nope, rtol=1e-6)
    np.testing.assert_allclose(c_kv2, c_kv, rtol=1e-6)
    np.testing.assert_allclose(q_rope2, 1.121752 * q_rope, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k_rope2, 1.121752 * k_rope, rtol=1e-5, atol=1e-6)
    # The latent norms use [G]'s and [HFt]'s fixed 1e-6, not rms_norm_eps (here 1e-2, which the block norms take).
    attn = make(plain)
    assert attn.q_a_layernorm.eps == 1e-6 and attn.kv_a_layernorm.eps == 1e-6


def test_the_cache_holds_only_kv_lora_rank_plus_qk_rope_head_dim_floats_per_token(cfg):
    batch, max_len = 2, 10
    cache = init_cache(cfg, batch, max_len)
    assert isinstance(cache, LatentCache)
    assert cache.c_kv.shape == (batch, max_len, cfg.kv_lora_rank)  # (2, 10, 16)
    assert cache.k_rope.shape == (batch, max_len, cfg.qk_rope_head_dim)  # (2, 10, 4): one k^R shared by all heads
    _, cache = make(cfg).decode(hidden(cfg, batch, 3), cache, 0)
    leaves = jax.tree.leaves(cache)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    # 16 + 4 = 20 floats per token, where the naive path would keep H·(qk_head_dim + v_head_dim) = 2·(12 + 8) = 40
    assert sum(leaf.size for leaf in leaves) == batch * max_len * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def test_without_query_compression_there_is_a_single_q_proj_and_decode_still_matches(cfg):
    lite = dataclasses.replace(cfg, q_lora_rank=0)  # DeepSeek-V2-Lite's layout
    attn = make(lite)
    for name in ("q_a_proj", "q_a_layernorm", "q_b_proj"):
        assert not hasattr(attn, name)
    assert attn.q_proj.kernel[...].shape == (lite.hidden_size, lite.num_attention_heads * lite.qk_head_dim)
    x = hidden(lite, 2, 5)
    y = attn(x, jnp.arange(5))
    assert y.shape == (2, 5, lite.hidden_size)
    y_dec, _ = attn.decode(x, init_cache(lite, 2, 8), 0)
    np.testing.assert_allclose(y_dec, y, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Agreement: naive vs absorbed decode, and both vs the training path


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["rope", "yarn"])
def test_naive_and_absorbed_decode_agree(cfg, rope_scaling):
    cfg = dataclasses.replace(cfg, rope_scaling=rope_scaling)
    attn = make(cfg)
    x = hidden(cfg, 2, 7)
    cache = init_cache(cfg, 2, 12)
    y_naive, cache_naive = attn.decode(x[:, :4], cache, 0, absorb=False)  # a 4-token prefill, then 3 more at once
    y_absorb, cache_absorb = attn.decode(x[:, :4], cache, 0, absorb=True)
    np.testing.assert_allclose(y_absorb, y_naive, atol=1e-5, rtol=1e-5)
    y_naive, cache_naive = attn.decode(x[:, 4:], cache_naive, 4, absorb=False)
    y_absorb, cache_absorb = attn.decode(x[:, 4:], cache_absorb, 4, absorb=True)
    np.testing.assert_allclose(y_absorb, y_naive, atol=1e-5, rtol=1e-5)
    for a, b in zip(cache_absorb, cache_naive, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "naive"])
def test_decoding_token_by_token_from_the_latent_cache_equals_the_full_forward(cfg, absorb):
    attn = make(cfg)
    x = hidden(cfg, 2, 8)
    y_full = attn(x, jnp.arange(8))  # (2, 8, D)
    y_steps, _ = decode_token_by_token(attn, x, init_cache(cfg, 2, 8), 0, absorb)
    np.testing.assert_allclose(y_steps, y_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "naive"])
def test_prefilling_a_prefix_in_one_call_then_decoding_token_by_token_equals_the_full_forward(cfg, absorb):
    attn = make(cfg)
    x = hidden(cfg, 2, 9)
    y_full = attn(x, jnp.arange(9))  # (2, 9, D)
    y_prefix, cache = attn.decode(x[:, :5], init_cache(cfg, 2, 12), 0, absorb=absorb)  # positions 0..4 at once
    y_rest, cache = decode_token_by_token(attn, x[:, 5:], cache, 5, absorb)  # positions 5..8
    np.testing.assert_allclose(jnp.concatenate([y_prefix, y_rest], axis=1), y_full, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.c_kv[:, 9:], 0.0)  # slots past the sequence were never written


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "naive"])
def test_decode_ignores_whatever_lies_in_unwritten_cache_slots(cfg, absorb):
    attn = make(cfg)
    x = hidden(cfg, 1, 3)
    clean = init_cache(cfg, 1, 8)
    junk = LatentCache(*(100.0 * jax.random.normal(jax.random.key(i), leaf.shape) for i, leaf in enumerate(clean)))
    y_clean, _ = attn.decode(x, clean, 0, absorb=absorb)
    y_junk, _ = attn.decode(x, junk, 0, absorb=absorb)  # slots 3..7 hold large garbage; queries must not see them
    np.testing.assert_allclose(y_junk, y_clean, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Worked examples: one head, every width 2, weights set by hand, RMSNorm eps 0 so the numbers are exact.
#
# Per-head layouts: q_proj's output is [q^C (2) | q^R (2)], kv_a_proj_with_mqa's is [c^KV (2) | k^R (2)], kv_b_proj's
# is [k^C (2) | v^C (2)]. The rope pair rotates at θ^0 = 1 radian per position; softmax scale = (2 + 2)^-0.5 = 0.5.


def hand_model(cfg, q_proj, kv_a, kv_b):
    tiny = dataclasses.replace(
        cfg,
        hidden_size=2,
        num_attention_heads=1,
        q_lora_rank=0,
        kv_lora_rank=2,
        qk_nope_head_dim=2,
        qk_rope_head_dim=2,
        v_head_dim=2,
        rms_norm_eps=0.0,
    )
    attn = make(tiny)
    attn.q_proj.kernel[...] = jnp.array(q_proj, jnp.float32)  # (2, 4)
    attn.kv_a_proj_with_mqa.kernel[...] = jnp.array(kv_a, jnp.float32)  # (2, 4)
    attn.kv_b_proj.kernel[...] = jnp.array(kv_b, jnp.float32)  # (2, 4)
    attn.o_proj.kernel[...] = jnp.eye(2)  # (2, 2): the output is the head's o itself
    return tiny, attn


def run_all_paths(tiny, attn, x):
    """The training path and both decode paths (prefill, then one token) on x (1, 2, 2) at positions 0, 1."""
    ys = {"forward": attn(x, jnp.arange(2))}
    for absorb in (True, False):
        y0, cache = attn.decode(x[:, :1], init_cache(tiny, 1, 4), 0, absorb=absorb)
        y1, _ = attn.decode(x[:, 1:], cache, 1, absorb=absorb)
        ys[f"decode absorb={absorb}"] = jnp.concatenate([y0, y1], axis=1)
    return ys


def test_worked_example_of_the_content_part_of_the_score(cfg):
    # q^C = h, q^R = 0; c^KV = h, k^R = 0; k^C = v^C = RMSNorm(c^KV). Tokens h_0 = [3, 4], h_1 = [1, 0].
    #   c_0 = [3, 4] / sqrt((9 + 16) / 2) = [0.6√2, 0.8√2] = [0.848528, 1.131371]
    #   c_1 = [1, 0] / sqrt(1 / 2)        = [√2, 0]         = [1.414214, 0]
    # Position 0 sees only itself: y_0 = v_0 = c_0.
    # Position 1: scores 0.5·(q_1·k_0) = 0.5·0.6√2 = 0.424264 and 0.5·(q_1·k_1) = 0.5·√2 = 0.707107;
    #   p_0 = 1 / (1 + e^(0.2√2)) = 1 / (1 + 1.326896) = 0.429757, p_1 = 0.570243;
    #   y_1 = p_0·c_0 + p_1·c_1 = [0.364661 + 0.806446, 0.486215] = [1.171106, 0.486215].
    identity_then_zero = [[1, 0, 0, 0], [0, 1, 0, 0]]
    identity_twice = [[1, 0, 1, 0], [0, 1, 0, 1]]
    tiny, attn = hand_model(cfg, q_proj=identity_then_zero, kv_a=identity_then_zero, kv_b=identity_twice)
    x = jnp.array([[[3.0, 4.0], [1.0, 0.0]]])  # (1, 2, 2)
    expected = [[[0.848528, 1.131371], [1.171106, 0.486215]]]
    for path, y in run_all_paths(tiny, attn, x).items():
        np.testing.assert_allclose(y, expected, atol=2e-6, err_msg=path)


def test_worked_example_of_the_rotary_part_of_the_score(cfg):
    # q^C = 0, q^R = h; c^KV = h, k^R = h; v^C = RMSNorm(c^KV). Tokens h_0 = [1, 0], h_1 = [0, 1] at positions 0, 1.
    #   k^R_0 = [1, 0] (no rotation); q^R_1 = k^R_1 = [0, 1] rotated by 1 rad = [-sin 1, cos 1] = [-0.841471, 0.540302]
    #   v_0 = [√2, 0], v_1 = [0, √2] (each token's RMSNorm of a unit basis vector)
    # Position 1: scores 0.5·(q_1·k_0) = -0.5·sin 1 = -0.420735 and 0.5·(q_1·k_1) = 0.5;
    #   p_0 = 1 / (1 + e^(0.920735)) = 1 / (1 + 2.511137) = 0.284808, p_1 = 0.715192;
    #   y_1 = √2·[p_0, p_1] = [0.402779, 1.011434]. Position 0: y_0 = v_0 = [1.414214, 0].
    zero_then_identity = [[0, 0, 1, 0], [0, 0, 0, 1]]
    identity_twice = [[1, 0, 1, 0], [0, 1, 0, 1]]
    tiny, attn = hand_model(cfg, q_proj=zero_then_identity, kv_a=identity_twice, kv_b=identity_twice)
    x = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2)
    expected = [[[1.414214, 0.0], [0.402779, 1.011434]]]
    for path, y in run_all_paths(tiny, attn, x).items():
        np.testing.assert_allclose(y, expected, atol=2e-6, err_msg=path)
