"""FP8 recipe (report §3.3, App. B; notes §4): tile-wise E4M3 quantization, limited accumulation with promotion,
and the FP8 Linear against float32 and against an independent numpy reference of the same recipe.

Bounds used below, derived once:
  * E4M3 keeps 3 fraction bits, so rounding to nearest moves a normal value (|x/s| >= 2^-6) by at most half an ulp,
    a relative 2^-4.
  * One E4M3 rounding has a relative RMS error of 2^-3·sqrt(0.541/12) ≈ 0.0265: for x = 2^e·m, m in [1, 2), the
    ulp is 2^(e-3) and the error uniform in ±ulp/2, so E[(err/x)²] = 2^-6/12·E[1/m²], and E[1/m²] = 0.541 for m
    log-uniform. Two independent operands give √2·0.0265 ≈ 0.037 on a product, and a GEMM's output on random
    inputs has the same relative RMS error (errors and signal add up alike). Wgrad's input is rounded twice (1×B
    tiles, then B×1): three roundings, at most √3·0.0265 ≈ 0.046.
  * A truncating accumulator loses less than 2^-m·|acc| per add (m fraction bits), and |acc| never exceeds the sum of
    |products| seen so far; with C adds per promotion interval the error is < C·2^-m·(|a| @ |b|) elementwise.
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from minidsv3 import fp8

B = 32  # tile size used in these tests: the tiny models' block size, so that small matrices hold several tiles
U = 2.0**-4  # E4M3's relative rounding bound for normal values
ACC_BOUND = 4 * 2.0**-13 + 1e-6  # 4 MMA chunks of 32 per 128-element interval, 13 bits; plus float32 rounding


@pytest.fixture
def fp8_cfg(cfg):
    return dataclasses.replace(cfg, fp8=True, fp8_block_size=B)


def np_quantize_dequantize(x, tile):
    """Independent reference of notes §4's recipe: a loop over tiles in numpy with ml_dtypes' E4M3."""
    x = np.asarray(x, np.float32)
    out = np.empty_like(x)
    for i in range(0, x.shape[0], tile[0]):
        for j in range(0, x.shape[1], tile[1]):
            block = x[i : i + tile[0], j : j + tile[1]]
            s = np.float32(max(np.abs(block).max(), np.float32(fp8.AMAX_FLOOR))) / np.float32(448.0)
            q = np.clip(block / s, -448, 448).astype(ml_dtypes.float8_e4m3fn)
            out[i : i + tile[0], j : j + tile[1]] = q.astype(np.float32) * s
    return out


def relative_rms(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def random(seed, *shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Quantization


@pytest.mark.parametrize("tile", [(1, B), (B, B), (B, 1)])
def test_quantize_tiles_matches_a_per_tile_numpy_loop(tile):
    x = random(0, 70, 90) * np.exp(random(1, 70, 90))  # ragged in both axes, magnitudes spread over decades
    q, scales = fp8.quantize_tiles(jnp.asarray(x, jnp.float32), tile)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (70, 90)
    assert scales.shape == (-(-70 // tile[0]), -(-90 // tile[1]))
    # rtol 1e-6, not equality: XLA computes amax/448 as amax·(1/448), which can differ in the last float32 bit
    np.testing.assert_allclose(fp8.dequantize(q, scales, tile), np_quantize_dequantize(x, tile), rtol=1e-6)


@pytest.mark.parametrize("tile", [(1, B), (B, B)])
def test_an_outlier_in_one_tile_leaves_every_other_tiles_quantization_error_unchanged(tile):
    x = random(2, 64, 64).astype(np.float32)
    spiked = x.copy()
    spiked[5, 40] = 1e6  # lands in the tile of row 5 (or rows 0-31) and columns 32-63
    err = np.asarray(fp8.quantize_dequantize(jnp.asarray(x), tile)) - x
    err_spiked = np.asarray(fp8.quantize_dequantize(jnp.asarray(spiked), tile)) - spiked
    in_tile = np.zeros_like(x, bool)
    in_tile[5 // tile[0] * tile[0] : (5 // tile[0] + 1) * tile[0], 32:64] = True
    np.testing.assert_array_equal(err_spiked[~in_tile], err[~in_tile])  # other tiles: bit-identical
    # the outlier's own tile shares its scale, 1e6/448: the E4M3 grid there is 2^-9·1e6/448 ≈ 4.4 apart, so its
    # N(0, 1) values are rounded to 0 or ±4.4 (errors ~0.8) instead of ~3% of themselves
    assert np.abs(err_spiked[in_tile]).mean() > 10 * np.abs(err[in_tile]).mean()


def test_quantize_dequantize_relative_error_is_at_most_2_to_the_minus_4_for_normal_values():
    x = (random(3, 64, 128) * np.exp(2 * random(4, 64, 128))).astype(np.float32)
    q, scales = fp8.quantize_tiles(jnp.asarray(x), (1, B))
    x_hat = np.asarray(fp8.dequantize(q, scales, (1, B)))
    s = np.repeat(np.asarray(scales), B, axis=1)  # (64, 128): each element's scale
    normal = np.abs(x) / s >= 2.0**-6  # E4M3's smallest normal is 2^-6; below it the spacing is fixed at 2^-9
    rel = np.abs(x_hat[normal] - x[normal]) / np.abs(x[normal])
    assert normal.mean() > 0.5
    assert rel.max() <= U * (1 + 1e-6)  # half an ulp of a 3-fraction-bit significand
    assert rel.max() > U / 2  # and the bound is nearly reached: the values really went through 3 bits


def test_a_tile_quantizes_the_same_at_any_magnitude_from_gradients_to_outliers():
    """Only the tile's own amax sets its scale: scaling a tensor by a power of two scales its FP8 copy exactly. Small
    gradients (1e-9 here) keep all of E4M3's precision; a fixed floor on amax would cost them their low bits."""
    x = jnp.asarray(random(3, 4, 2 * B), jnp.float32)
    for pow2 in (False, True):
        base = np.asarray(fp8.quantize_dequantize(x, (1, B), pow2))
        for e in (-30, -20, -10, 10, 19):  # 2^-30 ≈ 9e-10 ... 2^19 ≈ 5e5
            scaled = np.asarray(fp8.quantize_dequantize(x * 2.0**e, (1, B), pow2))
            np.testing.assert_array_equal(scaled, base * 2.0**e)


def test_no_nan_or_inf_for_inputs_up_to_1e6_and_all_zero_tiles():
    x = np.zeros((4, 2 * B), np.float32)
    x[0, :B] = np.linspace(-1e6, 1e6, B)  # huge values
    x[1, :B] = 1e6  # a tile of equal maxima: x/s = 448 exactly
    x[2, :B] = 1e-35  # below the amax floor: quantized against the floor's scale, finite
    for pow2 in (False, True):
        q, scales = fp8.quantize_tiles(jnp.asarray(x), (1, B), pow2)
        x_hat = np.asarray(fp8.dequantize(q, scales, (1, B)))
        assert np.isfinite(x_hat).all() and np.isfinite(np.asarray(scales)).all()
        np.testing.assert_allclose(x_hat[1, :B], 1e6, rtol=U)
        np.testing.assert_array_equal(x_hat[3], 0.0)  # an all-zero row of tiles stays zero
    # with online scales x/s never exceeds 448 by more than float32 rounding, so the clip before the cast is a guard;
    # without it 500 would cast to NaN (e4m3fn has no inf)
    clipped = fp8._to_e4m3(jnp.asarray([500.0, -1e9, 448.0])).astype(jnp.float32)
    np.testing.assert_array_equal(clipped, [448.0, -448.0, 448.0])


def test_pow2_scales_are_powers_of_two_and_at_least_the_plain_scale():
    x = jnp.asarray(random(5, 16, 4 * B) * np.exp(3 * random(6, 16, 4 * B)), jnp.float32)
    _, plain = fp8.quantize_tiles(x, (1, B), pow2=False)
    _, pow2 = fp8.quantize_tiles(x, (1, B), pow2=True)
    mantissa, _ = np.frexp(np.asarray(pow2))
    np.testing.assert_array_equal(mantissa, 0.5)  # exactly 2^e
    assert (np.asarray(pow2) >= np.asarray(plain)).all()  # rounded up, so x/s never exceeds 448
    assert (np.asarray(pow2) < 2 * np.asarray(plain)).all()  # ... by less than a factor of two
    # worked example: amax 448·3 = 1344 gives s = 3, rounded up to 4; amax 448·2 gives s = 2, already a power of two
    _, s = fp8.quantize_tiles(jnp.asarray([[1344.0, 1.0], [896.0, 1.0]]), (1, 2), pow2=True)
    np.testing.assert_array_equal(s, [[4.0], [2.0]])


# ---------------------------------------------------------------------------------------------------------------
# Limited-precision accumulation (report §3.3.2)


def test_truncate_mantissa_worked_examples_at_13_bits():
    cases = [
        (1 + 2**-13, 1 + 2**-13),  # the 13th fraction bit is kept
        (1 + 2**-14, 1.0),  # the 14th is dropped
        (1 + 2**-13 + 2**-14, 1 + 2**-13),  # truncation: round-to-nearest-even would give 1 + 2^-12
        (-(1 + 2**-14), -1.0),  # toward zero for negatives too
        (3 * 2**20 + 255, 3 * 2**20),  # 3·2^20 = 1.5·2^21: the ulp is 2^(21-13) = 256, so +255 vanishes
        (0.0, 0.0),
    ]
    x = jnp.asarray([c[0] for c in cases], jnp.float32)
    np.testing.assert_array_equal(fp8.truncate_mantissa(x, 13), [c[1] for c in cases])


def test_promotion_keeps_a_small_late_chunk_that_the_limited_accumulator_drops():
    # a = ones; b's first 32 entries sum to 32·256 = 8192 = 2^13, the next 32 to 32/64 = 0.5.
    # At 13 fraction bits the ulp of 8192 is 2^(13-13) = 1, so 8192 + 0.5 truncates to 8192 in one accumulator;
    # promoting every 32 elements adds 8192 and 0.5 in float32: 8192.5.
    a = jnp.ones((1, 64))
    b = jnp.concatenate([jnp.full((32, 1), 256.0), jnp.full((32, 1), 1 / 64)])
    assert float(fp8.limited_precision_dot(a, b, 13, None)[0, 0]) == 8192.0
    assert float(fp8.limited_precision_dot(a, b, 13, 32)[0, 0]) == 8192.5


def test_a_promotion_interval_of_at_least_k_is_the_same_as_no_promotion():
    a, b = jnp.asarray(random(7, 8, 200), jnp.float32), jnp.asarray(random(8, 200, 8), jnp.float32)
    np.testing.assert_array_equal(fp8.limited_precision_dot(a, b, 13, 224), fp8.limited_precision_dot(a, b, 13, None))
    with pytest.raises(ValueError, match="multiple of mma_k"):
        fp8.limited_precision_dot(a, b, 13, 48)


def test_accumulating_k_4096_in_13_bits_loses_about_0_3_percent_and_promotion_every_128_fixes_it():
    # Report §3.3.2: K = 4096 random inputs lose up to ~2% on H800 without promotion. Inputs uniform in [0, 1) so
    # every product is positive, the accumulator grows steadily and the truncation bias adds up (the worst case);
    # the error is then relative to the exact float64 result. Per-MMA truncation (ours) is milder than per-product
    # (hardware): measured ~3.2e-3 max, ~2.6e-3 mean for this seed; 2e-3 is below the mean of the error over
    # 4096 outputs, and 128 adds·2^-13 = 1.6e-2 is the rigorous upper bound.
    rng = np.random.default_rng(0)
    a, b = rng.random((64, 4096)), rng.random((4096, 64))
    exact = a @ b  # (64, 64) float64
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    no_promotion = np.abs(np.asarray(fp8.limited_precision_dot(a32, b32, 13, None), np.float64) - exact) / exact
    promoted = np.abs(np.asarray(fp8.limited_precision_dot(a32, b32, 13, 128), np.float64) - exact) / exact
    assert 2e-3 < no_promotion.max() < 128 * 2.0**-13
    assert promoted.max() < ACC_BOUND  # 4 adds per interval
    assert no_promotion.max() > 10 * promoted.max()


# ---------------------------------------------------------------------------------------------------------------
# The FP8 Linear: Fprop, Dgrad, Wgrad


def linear_case(seed, tokens=96, k=80, m=72):
    x, w, g = random(seed, tokens, k), random(seed + 1, k, m), random(seed + 2, tokens, m)
    return x, w, g


@partial(jax.jit, static_argnums=3)
def linear_forward_backward(x, w, g, cfg):
    y, vjp = jax.vjp(lambda x, w: fp8.fp8_matmul(x, w, cfg), x, w)
    return y, *vjp(g)


def run_linear(x, w, g, cfg):
    """y = fp8_matmul(x, w) and its VJP with cotangent g, as float64 (jitted: eager dispatch is ~5x slower)."""
    outputs = linear_forward_backward(*(jnp.asarray(t, jnp.float32) for t in (x, w, g)), cfg)
    return [np.asarray(t, np.float64) for t in outputs]


def test_fp8_matmul_and_its_gradients_match_the_numpy_recipe_within_the_accumulation_bound(fp8_cfg):
    # Fprop X 1×B · W B×B; Dgrad dY 1×B · Wᵀ B×B; Wgrad (X 1×B re-tiled B×1)ᵀ · dY B×1 (notes §4 [derived] tiling)
    x, w, g = linear_case(10)
    y, dx, dw = run_linear(x, w, g, fp8_cfg)
    xq, wq = np_quantize_dequantize(x, (1, B)), np_quantize_dequantize(w, (B, B))
    gq_rows, gq_cols = np_quantize_dequantize(g, (1, B)), np_quantize_dequantize(g, (B, 1))
    x_cols = np_quantize_dequantize(xq, (B, 1))
    for got, (left, right) in [(y, (xq, wq)), (dx, (gq_rows, wq.T)), (dw, (x_cols.T, gq_cols))]:
        left, right = left.astype(np.float64), right.astype(np.float64)
        err = np.abs(np.asarray(got, np.float64) - left @ right)
        assert (err <= ACC_BOUND * (np.abs(left) @ np.abs(right))).all()


def test_fp8_matmul_and_its_gradients_are_within_e4m3_rounding_of_float32(fp8_cfg):
    # relative RMS ≈ 0.037 for two roundings, ≈ 0.046 at most for Wgrad's three (module docstring); the lower
    # bound shows the operands really were quantized
    x, w, g = linear_case(20)
    y, dx, dw = run_linear(x, w, g, fp8_cfg)
    assert 0.025 < relative_rms(y, x @ w) < 0.05
    assert 0.025 < relative_rms(dx, g @ w.T) < 0.05
    assert 0.025 < relative_rms(dw, x.T @ g) < 0.06


def test_fp8_matmul_keeps_leading_axes_jits_and_returns_gradients_in_the_inputs_dtypes(fp8_cfg):
    x = jnp.asarray(random(30, 2, 5, 40), jnp.bfloat16)  # (B, T, K)
    w = jnp.asarray(random(31, 40, 24), jnp.float32)  # (K, M): float32 master weights

    def loss(x, w):
        return jnp.sum(fp8.fp8_matmul(x, w, fp8_cfg) ** 2)

    y = jax.jit(fp8.fp8_matmul, static_argnums=2)(x, w, fp8_cfg)
    assert y.shape == (2, 5, 24) and y.dtype == jnp.float32
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert np.isfinite(np.asarray(dw)).all() and np.abs(np.asarray(dw)).max() > 0
