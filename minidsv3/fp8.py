"""FP8 training, simulated: fine-grained E4M3 quantization and limited-precision accumulation (report §3.3, App. B;
[ISCA] §3.1; notes §4).

How the recipe works
--------------------
DeepSeek-V3 runs all three GEMMs of a Linear in FP8: Fprop y = x W, Dgrad dx = dy Wᵀ and Wgrad dW = xᵀ dy. Both
inputs are E4M3 (4 exponent bits, 3 mantissa bits, largest finite value 448) for every tensor, gradients included.
E4M3 keeps ~2 significant digits over 2^-9..448, far too little for a whole tensor with outliers, so each tensor is
cut into small tiles along the GEMM's contraction dimension I and every tile gets its own scale, computed online
from the tile itself (no amax history):

    activations  1×B tiles: per token, B consecutive channels            (report §3.3.1, Fig. 7a)
    weights      B×B blocks: B input × B output channels
    s = max(amax(tile), 1e-30) / 448,  q = e4m3(clip(x / s, ±448)),   x ≈ q·s

B = 128 in the report (`cfg.fp8_block_size`). Square weight blocks serve Fprop (contracting input channels) and
Dgrad (contracting output channels) alike. Wgrad contracts over *tokens*, so the cached 1×B input tiles are
dequantized, transposed and re-quantized as B×1 tiles (B tokens of one channel, report §3.5.2); dy is quantized
1×B along the output channels for Dgrad (B×B blocks of dy diverged on a 16B MoE, App. B.2) and B×1 for Wgrad.

The second half is accumulation. Hopper's FP8 tensor cores add an MMA's products into an accumulator that keeps only
the highest ~13 fraction bits ([ISCA] §3.1.1: FP22, 1 sign + 8 exponent + 13 mantissa bits; the report says "around
14 bits"), which over a contraction of 4096 loses up to ~2% (report §3.3.2). DeepSeek's fix: every N_C = 128
elements of the contraction (4
WGMMAs) the partial sum is copied to FP32 registers on the CUDA cores, multiplied by the two tiles' scales and added
to an FP32 accumulator ("promotion").

What is simulated, and what is not
----------------------------------
All arithmetic is float32 on whatever backend; nothing runs faster (on a 2-core CPU a (2048, 256) x (256, 512)
Linear takes ~8x as long as in float32, forward and backward). What this module reproduces is the *numerics*:
  * quantization is real: values go through `jnp.float8_e4m3fn` and back, so each operand carries exactly the
    rounding, clipping and underflow that an FP8 tensor would;
  * limited accumulation is emulated: the contraction is cut into chunks of one MMA's depth (MMA_K = 32), each chunk's dot product
    is computed in float32, added into a running accumulator that is truncated to `fp8_accum_mantissa_bits` fraction
    bits after every chunk, and that accumulator is flushed into a float32 sum every `fp8_promotion_interval`
    elements of it. Truncation, not rounding to nearest: [R] §3.5.2 says the tensor core aligns the products and
    keeps only their "highest 14 bits" (notes §4), the rest cut off; [ISCA] calls the register FP22. We drop the low
    bits of the magnitude (toward zero); a two's-complement (sign-fill) shift would send negative sums toward -inf
    instead. Either way the error is biased, so without promotion it grows like I, not √I.
  * the routed experts' GEMMs use the same `fp8_matmul`, vmapped over dispatch.py's groups of rows, each block
    holding tokens of a single expert: weight blocks are per expert, and Wgrad's token tiles never mix experts.

How it differs from the production kernels (DeepGEMM; [G] inference/kernel.py `fp8_gemm_kernel`)
----------------------------------------------------------------------------------------------
  * Hardware aligns an MMA's products *and the running sum* to the largest exponent and truncates each ([ISCA]
    §3.1.1); we add an exact chunk dot and truncate the sum once per MMA, which is cheap under jit (a faithful
    version ran a (2048, 256) x (256, 512) GEMM 200x slower). Ours is the milder error: with uniform [0, 1) inputs
    at I = 4096 and 13 bits, the maximum relative error is 0.31 % without promotion and 0.013 % promoted every 128,
    where the hardware model of bench/fp8_accumulation.py loses 6.9 % and 0.06 % (ours equals its
    `--products-only` setting; the figures and which setting matches which paper are in docs/results.md).
  * Our accumulator holds dequantized values q·s rather than raw q products with the scales applied at promotion.
    The two are equal in exact arithmetic, and their truncation errors are of the same relative size; ours also
    covers the tiny models' B = 32 or 64 under N_C = 128, where scales change inside a promotion interval.
  * Only the Linear's input stays in FP8 between ops (the custom VJP caches q and s); the GEMMs' outputs are float32,
    not BF16. Power-of-two scales are one switch (`cfg.fp8_pow2_scales`) rather than the report's three places, and
    E5M6 caching, FP8 dispatch and BF16 optimizer moments are not reproduced.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from einops import rearrange, repeat

from minidsv3.config import ModelConfig

E4M3_MAX = 448.0  # largest finite float8_e4m3fn, 1.75·2^8; it has no inf, and an out-of-range cast becomes NaN
# Keeps an all-zero tile's scale finite, and nothing else: it must sit below every real amax. [G]'s inference kernel
# clamps at 1e-4, which suits activations of order 1, but a small model's gradients reach 1e-8, and a floor above them
# freezes their scale and pushes them into E4M3's subnormals (measured with bench/fp8_vs_bf16.py: docs/results.md).
AMAX_FLOOR = 1e-30
MMA_K = 32  # contraction depth of one Hopper FP8 WGMMA (wgmma.m64nNk32 for e4m3); 4 of them make the report's N_C = 128
HIGHEST = jax.lax.Precision.HIGHEST  # float32 dots must stay float32 on GPU too (TF32 would swamp a 13-bit effect)


# ---------------------------------------------------------------------------------------------------------------
# Quantization: one scale per tile, computed online (report §3.3.1-3.3.2)


def _scales(amax: jax.Array, pow2: bool) -> jax.Array:
    """s = max(amax, AMAX_FLOOR)/448, or the next power of two above it (UE8M0 scales, notes §4) when `pow2`."""
    s = jnp.maximum(amax, AMAX_FLOOR) / E4M3_MAX
    if pow2:
        mantissa, exponent = jnp.frexp(s)  # s = mantissa·2^exponent, mantissa in [0.5, 1): exact, unlike log2
        s = jnp.ldexp(jnp.ones_like(s), jnp.where(mantissa == 0.5, exponent - 1, exponent))  # 2^ceil(log2 s)
    return s


def _to_e4m3(x: jax.Array) -> jax.Array:
    """Cast already-scaled values to E4M3 (round to nearest even), clipping first so 448.5 cannot become NaN."""
    return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


def quantize_tiles(x: jax.Array, tile: tuple[int, int], pow2: bool = False) -> tuple[jax.Array, jax.Array]:
    """Quantize the last two axes of x (..., rows, cols) to E4M3 with one scale per tile[0]×tile[1] tile.

    Returns q (..., rows, cols) float8_e4m3fn and scales (..., ceil(rows/tile[0]), ceil(cols/tile[1])) float32, x ≈ q·s.
    Ragged edges are zero-padded to whole tiles (zeros never raise an amax), as [G] does for weight blocks.
    """
    tr, tc = tile
    *lead, rows, cols = x.shape
    padding = [(0, 0)] * len(lead) + [(0, -rows % tr), (0, -cols % tc)]
    tiles = rearrange(
        jnp.pad(x.astype(jnp.float32), padding),
        "... (row_tiles tr) (col_tiles tc) -> ... row_tiles col_tiles tr tc",
        tr=tr,
        tc=tc,
    )
    scales = _scales(jnp.max(jnp.abs(tiles), axis=(-2, -1)), pow2)  # (..., rows/tr, cols/tc)
    q = _to_e4m3(tiles / scales[..., None, None])  # (..., rows/tr, cols/tc, tr, tc)
    q = rearrange(q, "... row_tiles col_tiles tr tc -> ... (row_tiles tr) (col_tiles tc)")[
        ..., :rows, :cols
    ]  # (..., rows, cols)
    return q, scales


def dequantize(q: jax.Array, scales: jax.Array, tile: tuple[int, int]) -> jax.Array:
    """q (..., rows, cols) times its tile's scale -> (..., rows, cols) float32: the inverse of `quantize_tiles` up to rounding."""
    rows, cols = q.shape[-2:]
    s = repeat(scales, "... row_tiles col_tiles -> ... (row_tiles tr) (col_tiles tc)", tr=tile[0], tc=tile[1])[
        ..., :rows, :cols
    ]  # (..., rows, cols)
    return q.astype(jnp.float32) * s


def quantize_dequantize(x: jax.Array, tile: tuple[int, int], pow2: bool = False) -> jax.Array:
    """x (..., rows, cols) -> the float32 values an FP8 tensor with this tiling represents (x + quantization error)."""
    return dequantize(*quantize_tiles(x, tile, pow2), tile)


# ---------------------------------------------------------------------------------------------------------------
# Limited-precision accumulation and promotion (report §3.3.2)


def truncate_mantissa(x: jax.Array, bits: int) -> jax.Array:
    """Keep the sign, the exponent and the highest `bits` of float32's 23 fraction bits; drop the rest (toward 0)."""
    mask = (0xFFFFFFFF << (23 - bits)) & 0xFFFFFFFF  # e.g. bits=13: the low 10 bits are cleared
    raw = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jax.lax.bitcast_convert_type(raw & jnp.uint32(mask), jnp.float32)


def _accumulate(chunk_dot, chunks, promote: jax.Array, target: jax.Array, out: jax.Array, mantissa_bits: int):
    """Run a GEMM's MMA chunks in contraction order the tensor-core way and return `out` with the promoted sums added.

    For chunk j: acc <- truncate(acc + chunk_dot(*chunks[j])); where promote[j], out[target[j]] += acc in float32 and
    acc <- 0. Each chunk's dot is computed inside the loop: materializing all I/MMA_K partial products up front made
    a (2048, 256) x (256, 512) GEMM 3.5x slower on CPU (memory traffic), for the same result.
    """

    def step(carry, inputs):
        acc, out = carry
        chunk, flush, t = inputs
        acc = truncate_mantissa(acc + chunk_dot(*chunk), mantissa_bits)  # the limited-precision accumulator
        out = out.at[t].add(jnp.where(flush, acc, 0.0), mode="drop")  # promotion: float32 add on the CUDA cores
        return (jnp.where(flush, 0.0, acc), out), None

    (_, out), _ = jax.lax.scan(step, (jnp.zeros(out.shape[1:], jnp.float32), out), (chunks, promote, target))
    return out


def _promotion_flags(chunk: jax.Array, last: jax.Array, promotion_interval: int | None, mma_k: int) -> jax.Array:
    """(chunks,) bool: promote after every promotion_interval/mma_k-th chunk and after the last; None = only the last."""
    if promotion_interval is None:
        return last
    if promotion_interval % mma_k:
        raise ValueError(f"promotion_interval must be a multiple of mma_k={mma_k}, got {promotion_interval}")
    return last | ((chunk + 1) % (promotion_interval // mma_k) == 0)


def limited_precision_dot(
    a: jax.Array, b: jax.Array, mantissa_bits: int, promotion_interval: int | None, mma_k: int = MMA_K
) -> jax.Array:
    """a (rows, I) @ b (I, O) -> (rows, O) float32 with an FP22-like accumulator promoted every `promotion_interval`
    elements of I (None: never, as a plain FP8 GEMM on Hopper). Inputs are used as given; no quantization here."""
    pad = -a.shape[1] % mma_k  # zero products leave every partial sum unchanged
    a_chunks = rearrange(
        jnp.pad(a.astype(jnp.float32), ((0, 0), (0, pad))), "r (j i) -> j r i", i=mma_k
    )  # (chunks, rows, mma_k)
    b_chunks = rearrange(
        jnp.pad(b.astype(jnp.float32), ((0, pad), (0, 0))), "(j i) o -> j i o", i=mma_k
    )  # (chunks, mma_k, O)
    chunk = jnp.arange(a_chunks.shape[0])  # (chunks,): ceil(I / mma_k) MMA instructions
    promote = _promotion_flags(chunk, chunk == chunk.shape[0] - 1, promotion_interval, mma_k)  # (chunks,)
    out = jnp.zeros((1, a.shape[0], b.shape[1]), jnp.float32)  # (1, rows, O)
    dot = partial(jnp.dot, precision=HIGHEST)  # (rows, mma_k) @ (mma_k, O)
    return _accumulate(dot, (a_chunks, b_chunks), promote, jnp.zeros_like(chunk), out, mantissa_bits)[0]


def _gemm(a: jax.Array, b: jax.Array, cfg: ModelConfig) -> jax.Array:
    return limited_precision_dot(a, b, cfg.fp8_accum_mantissa_bits, cfg.fp8_promotion_interval)


# ---------------------------------------------------------------------------------------------------------------
# The FP8 Linear: Fprop, Dgrad and Wgrad, each with its own tiling (report §3.3, Fig. 6)


def fp8_matmul(x: jax.Array, w: jax.Array, cfg: ModelConfig) -> jax.Array:
    """x (..., I) @ w (I, O) -> (..., O) float32 through the FP8 recipe, forward and backward."""
    tokens = rearrange(x.astype(jnp.float32), "... i -> (...) i")  # (N, I); the cast's VJP restores x's dtype
    return _fp8_linear(tokens, w.astype(jnp.float32), cfg).reshape(*x.shape[:-1], w.shape[1])  # (..., O)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_linear(x: jax.Array, w: jax.Array, cfg: ModelConfig) -> jax.Array:
    return _fp8_linear_fwd(x, w, cfg)[0]


def _fp8_linear_fwd(x, w, cfg):  # x (N, I), w (I, O)
    b, pow2 = cfg.fp8_block_size, cfg.fp8_pow2_scales
    qx, sx = quantize_tiles(x, (1, b), pow2)  # (N, I) e4m3, (N, I/b): per token, b channels along I
    qw, sw = quantize_tiles(w, (b, b), pow2)  # (I, O) e4m3, (I/b, O/b)
    y = _gemm(dequantize(qx, sx, (1, b)), dequantize(qw, sw, (b, b)), cfg)  # (N, O) Fprop
    return y, (qx, sx, qw, sw)  # the input is cached in FP8 for backward (report §3.3.1)


def _fp8_linear_bwd(cfg, residuals, dy):  # dy (N, O)
    b, pow2 = cfg.fp8_block_size, cfg.fp8_pow2_scales
    qx, sx, qw, sw = residuals
    w_hat = dequantize(qw, sw, (b, b))  # (I, O): a b×b block of W is a b×b block of Wᵀ
    dy_rows = quantize_dequantize(dy, (1, b), pow2)  # (N, O): 1×b tiles along O, Dgrad's contraction
    dx = _gemm(dy_rows, rearrange(w_hat, "i o -> o i"), cfg)  # (N, I) Dgrad
    x_cols = quantize_dequantize(dequantize(qx, sx, (1, b)), (b, 1), pow2)  # (N, I): FP8 1×b re-tiled to b×1
    # NOTE: dy is quantized twice from float32 (1×b and b×1); the report's "similar process is also required for the
    # activation gradient" (App. B.2) may mean dy is re-tiled from its FP8 1×b copy like x, one rounding more
    dy_cols = quantize_dequantize(dy, (b, 1), pow2)  # (N, O): b tokens of one channel
    dw = _gemm(rearrange(x_cols, "n i -> i n"), dy_cols, cfg)  # (I, O) Wgrad, contracting over tokens
    return dx, dw  # float32, like the master weights


_fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)
