"""Building blocks (minidsv3/layers.py): RMSNorm, RoPE and YaRN (report §4.3, notes §1.4, §6), SwiGLU, Linear."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minidsv3.config import ModelConfig, RopeScaling
from minidsv3.layers import MLP, Linear, RMSNorm, apply_rope, rope_frequencies, softmax_scale, yarn_rope_scale

# DeepSeek-V3's attention widths and rope (notes §1.3, §6).
V3_ROPE = ModelConfig(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0)
V3_YARN = dataclasses.replace(
    V3_ROPE,
    rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0),
)


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm


def test_rmsnorm_worked_example():
    # x = [3, 4]: mean(x²) = (9 + 16) / 2 = 12.5, rms = sqrt(12.5) = 3.535534
    #   x / rms = [0.848528, 1.131371]; times weight [2, 0.5] = [1.697056, 0.565685]
    norm = RMSNorm(2, eps=0.0)
    np.testing.assert_allclose(norm(jnp.array([3.0, 4.0])), [0.848528, 1.131371], atol=1e-6)
    norm.weight[...] = jnp.array([2.0, 0.5])
    np.testing.assert_allclose(norm(jnp.array([[3.0, 4.0]])), [[1.697056, 0.565685]], atol=1e-6)


def test_rmsnorm_eps_sits_inside_the_square_root():
    # x = [1, 1], eps = 1: rms = sqrt(1 + 1) = 1.414214, so the output is [0.707107, 0.707107]
    np.testing.assert_allclose(RMSNorm(2, eps=1.0)(jnp.array([1.0, 1.0])), [0.707107, 0.707107], atol=1e-6)


def test_rmsnorm_computes_in_float32_from_bfloat16_input():
    y = RMSNorm(2, eps=0.0)(jnp.array([3.0, 4.0], jnp.bfloat16))
    assert y.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------------------
# RoPE


def test_apply_rope_rotates_adjacent_pairs_by_position_times_frequency():
    # x = [1, 0, 0, 1] at position 2 with freqs [0.5, 0.25]; pairs are (x0, x1) and (x2, x3) (interleaved layout):
    #   pair 0: angle 2·0.5 = 1 rad, [1, 0] -> [cos 1, sin 1] = [0.540302, 0.841471]
    #   pair 1: angle 2·0.25 = 0.5 rad, [0, 1] -> [-sin 0.5, cos 0.5] = [-0.479426, 0.877583]
    x = jnp.array([[[1.0, 0.0, 0.0, 1.0]]])  # (B=1, T=1, d=4)
    y = apply_rope(x, jnp.array([2]), jnp.array([0.5, 0.25]))
    np.testing.assert_allclose(y, [[[0.540302, 0.841471, -0.479426, 0.877583]]], atol=1e-6)


def test_rope_at_position_zero_is_the_identity():
    x = jax.random.normal(jax.random.key(0), (2, 1, 3, 8))  # (B, T=1, H, d)
    np.testing.assert_allclose(apply_rope(x, jnp.array([0]), jnp.array([1.0, 0.1, 0.01, 0.001])), x, atol=0)


def test_rope_preserves_the_norm_of_each_pair():
    x = jax.random.normal(jax.random.key(0), (1, 5, 8))  # (B, T, d)
    y = apply_rope(x, jnp.arange(5) * 7, jnp.array([1.0, 0.3, 0.01, 0.001]))

    def pair_norms(v):  # (1, 5, 8) -> (1, 5, 4): the length of each rotated pair
        return np.linalg.norm(np.asarray(v).reshape(1, 5, 4, 2), axis=-1)

    np.testing.assert_allclose(pair_norms(y), pair_norms(x), rtol=1e-5)


def test_rotated_q_dot_k_depends_only_on_the_position_difference():
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 8))  # two (B=1, T=1, d=8) vectors
    freqs = rope_frequencies(dataclasses.replace(V3_ROPE, qk_rope_head_dim=8))  # [1, 0.1, 0.01, 0.001]

    def score(m, n):
        return float(jnp.sum(apply_rope(q, jnp.array([m]), freqs) * apply_rope(k, jnp.array([n]), freqs)))

    np.testing.assert_allclose(score(5, 2), score(0, -3), atol=1e-5)
    np.testing.assert_allclose(score(5, 2), score(13, 10), atol=1e-5)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # a different difference gives a different score


def test_rope_shares_one_rotation_across_heads_and_accepts_per_sequence_positions():
    x = jax.random.normal(jax.random.key(2), (2, 3, 4, 8))  # (B, T, H, d)
    freqs = jnp.array([1.0, 0.5, 0.1, 0.01])
    positions = jnp.array([[0, 1, 2], [5, 6, 7]])  # (B, T)
    y = apply_rope(x, positions, freqs)
    for b in range(2):
        for h in range(4):  # each head of each sequence, rotated alone with its own (T,) positions
            alone = apply_rope(x[b : b + 1, :, h], positions[b], freqs)  # (1, T, d)
            np.testing.assert_allclose(y[b : b + 1, :, h], alone, atol=1e-6)


def test_rope_frequencies_without_yarn_are_theta_to_the_minus_2j_over_d():
    # d = 8, θ = 1e4: θ^(-0/8), θ^(-2/8), θ^(-4/8), θ^(-6/8) = 1, 0.1, 0.01, 0.001
    freqs = rope_frequencies(dataclasses.replace(V3_ROPE, qk_rope_head_dim=8))
    np.testing.assert_allclose(freqs, [1.0, 0.1, 0.01, 0.001], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# YaRN with DeepSeek-V3's parameters: low = 10, high = 23 (notes §6)


def test_yarn_keeps_high_frequencies_and_divides_low_ones_by_the_factor():
    base = 1e4 ** (-np.arange(0, 64, 2) / 64)  # θ^(-2j/64), j = 0..31
    yarn = np.asarray(rope_frequencies(V3_YARN))
    np.testing.assert_allclose(rope_frequencies(V3_ROPE), base, rtol=1e-6)
    # ramp_j = clamp((j - 10) / 13, 0, 1) is 0 for j <= 10 and 1 for j >= 23 (notes §6 states j < 10 and j > 23;
    # the boundary dims 10 and 23 sit exactly at the ramp's ends)
    np.testing.assert_allclose(yarn[:11], base[:11], rtol=1e-6)
    np.testing.assert_allclose(yarn[23:], base[23:] / 40, rtol=1e-6)
    assert np.all(yarn[11:23] < base[11:23]) and np.all(yarn[11:23] > base[11:23] / 40)


def test_yarn_ramp_at_an_intermediate_dim_by_hand():
    # j = 15: ramp = (15 - 10) / 13 = 5/13; freq' = freq·(1 - ramp) + freq/40·ramp = freq·(1 - (5/13)·(39/40))
    #   = freq·(1 - 0.375) = 0.625·freq; freq_15 = 1e4^(-30/64) = 10^(-1.875) = 0.0133352, so freq'_15 = 0.00833452
    np.testing.assert_allclose(rope_frequencies(V3_YARN)[15], 0.00833452, rtol=1e-5)


def test_softmax_scale_is_one_over_sqrt_192_and_grows_by_mscale_squared_under_yarn():
    # 192^-0.5 = 0.0721688; mscale = 0.1·ln 40 + 1 = 1.368888, mscale² = 1.873854; 0.0721688·1.873854 = 0.135234
    assert math.isclose(softmax_scale(V3_ROPE), 0.0721688, rel_tol=1e-6)
    assert math.isclose(softmax_scale(V3_YARN), 0.135234, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU MLP and Linear


def test_yarn_splits_its_temperature_between_mscale_and_mscale_all_dim_as_hugging_face_does():
    # s = 40: mscale(s, m) = 0.1·m·ln 40 + 1, ln 40 = 3.688879. With mscale 2 and mscale_all_dim 1:
    #   every logit gets (0.1·ln 40 + 1)² = 1.368888² = 1.873854 through the softmax scale (mscale_all_dim),
    #   q^R and k^R each get (0.2·ln 40 + 1) / 1.368888 = 1.737776 / 1.368888 = 1.269480 on their rotation,
    #   so q^R·k^R is scaled by 1.873854 · 1.269480² = 3.019865 = 1.737776², the square of mscale(s, 2).
    cfg = dataclasses.replace(V3_YARN, rope_scaling=dataclasses.replace(V3_YARN.rope_scaling, mscale=2.0))
    np.testing.assert_allclose(yarn_rope_scale(cfg), 1.269480, rtol=1e-6)
    np.testing.assert_allclose(softmax_scale(cfg), 192**-0.5 * 1.873854, rtol=1e-6)
    x = jnp.array([[[3.0, 4.0]]])  # (B, T, d): one pair of norm 5
    rotated = apply_rope(x, jnp.array([7]), jnp.array([0.3]), yarn_rope_scale(cfg))
    np.testing.assert_allclose(jnp.linalg.norm(rotated), 5 * 1.269480, rtol=1e-6)
    assert yarn_rope_scale(V3_YARN) == 1.0 and yarn_rope_scale(V3_ROPE) == 1.0  # DeepSeek-V3: mscale = all_dim = 1


def test_swiglu_mlp_worked_example():
    # one hidden unit, one intermediate unit; gate = 1, up = 2, down = 3, x = 1:
    #   silu(1) = 1 / (1 + e^-1) = 0.731059; y = 3·(0.731059·2) = 4.386352
    one = ModelConfig(hidden_size=1)
    mlp = MLP(one, 1, rngs=nnx.Rngs(0))
    mlp.gate_proj.kernel[...] = jnp.array([[1.0]])
    mlp.up_proj.kernel[...] = jnp.array([[2.0]])
    mlp.down_proj.kernel[...] = jnp.array([[3.0]])
    np.testing.assert_allclose(mlp(jnp.array([[1.0]])), [[4.386352]], rtol=1e-6)


def test_swiglu_mlp_matches_the_formula_in_numpy(cfg):
    mlp = MLP(cfg, cfg.intermediate_size, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, cfg.hidden_size)))  # (B, T, D)
    w1, w3, w2 = (np.asarray(m.kernel[...], np.float64) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    gate = x @ w1  # (B, T, F)
    expected = (gate / (1 + np.exp(-gate)) * (x @ w3)) @ w2  # silu(x W1) ⊙ (x W3), then W2
    y = mlp(jnp.asarray(x))
    assert y.shape == (2, 5, cfg.hidden_size)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-6)


def test_linear_has_an_in_by_out_kernel_and_stays_float32_when_fp8_is_off(cfg):
    assert not cfg.fp8
    layer = Linear(cfg.hidden_size, 7, cfg, rngs=nnx.Rngs(0))  # quantize=True by default, but fp8 is off
    assert layer.kernel[...].shape == (cfg.hidden_size, 7)
    assert not layer.quantize
    x = jax.random.normal(jax.random.key(4), (3, 2, cfg.hidden_size))  # (B, T, D)
    y = layer(x)
    assert y.shape == (3, 2, 7) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ np.asarray(layer.kernel[...], np.float64), rtol=1e-5)


def test_linear_quantizes_only_when_both_fp8_and_the_quantize_flag_are_set(cfg):
    fp8_cfg = dataclasses.replace(cfg, fp8=True)
    assert Linear(4, 4, fp8_cfg, rngs=nnx.Rngs(0)).quantize
    high_precision = Linear(4, 4, fp8_cfg, rngs=nnx.Rngs(0), quantize=False)  # as the embedding, head and router
    assert not high_precision.quantize
    x = jnp.arange(8.0).reshape(2, 4)  # (2, 4)
    np.testing.assert_allclose(high_precision(x), x @ high_precision.kernel[...], rtol=1e-6)


def test_linear_with_bfloat16_inputs_returns_float32_close_to_the_float32_product(cfg):
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    layer = Linear(cfg.hidden_size, 16, bf16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (4, cfg.hidden_size))  # (N, D)
    y = layer(x)
    assert y.dtype == jnp.float32
    exact = np.asarray(x, np.float64) @ np.asarray(layer.kernel[...], np.float64)
    # bf16 keeps 8 significant bits: each input is off by <= 2^-9 relative, so the product by about 2^-8 of the
    # sum of |terms|
    bound = 2**-7 * (np.abs(np.asarray(x))[:, :, None] * np.abs(np.asarray(layer.kernel[...]))[None]).sum(1)
    assert np.all(np.abs(np.asarray(y) - exact) <= bound)
    assert not np.allclose(y, exact, rtol=1e-6, atol=0)  # the inputs really went through bfloat16
