"""Building blocks shared by attention, experts and the model. In file order: the matmul every layer runs (`matmul`,
`grouped_matmul` for the experts, `linear`: FP8 or not), `swiglu`, `Linear`, the output head's loss (`token_nll`,
`head_nll`), `RMSNorm`, `MLP`, and RoPE with YaRN (`rope_frequencies`, `softmax_scale`, `yarn_rope_scale`,
`apply_rope`).

Report §2.1 (RMSNorm, SwiGLU experts), §4.3 and notes §1.4, §6 (YaRN). Shapes follow the package's legend
(README.md): B batch · T positions · N tokens · D hidden_size · V vocab · F an FFN's width · J groups · M rows per
group · I and O a matmul's input and output features.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from minidsv3 import fp8
from minidsv3.config import ModelConfig


def matmul(x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:
    """x (..., I) @ w (I, O) -> (..., O) float32, inputs cast to `dtype` (bf16 inputs run ~3x faster on CPU/GPU).

    The backward pass is written out (`_matmul_bwd`) so that both gradient GEMMs also run on `dtype` inputs."""
    return _matmul(x.astype(jnp.float32), w.astype(jnp.float32), dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:  # float32 (..., I), (I, O) -> (..., O)
    return jnp.einsum("...i,io->...o", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _matmul_fwd(x: jax.Array, w: jax.Array, dtype: str) -> tuple[jax.Array, tuple]:
    xc, wc = x.astype(dtype), w.astype(dtype)  # saved in `dtype`: half the activation memory in bf16
    return jnp.einsum("...i,io->...o", xc, wc, preferred_element_type=jnp.float32), (xc, wc)


def _matmul_bwd(dtype: str, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """g (..., O) float32 -> dx = g wᵀ (..., I), dw = Σ xᵀ g (I, O), both on `dtype` inputs with float32 sums.

    Why not autodiff: it differentiates the float32-accumulating product into GEMMs of the float32 cotangent with a
    bf16 operand, which XLA's CPU backend runs by upcasting both to float32 (2-3x slower than bf16), and into
    transposed layouts it copies first. Casting g to `dtype`, as mixed-precision training does (report §3.3: the
    backward GEMMs take low-precision inputs too), and writing both products as einsums in the forward's layout, one
    Linear of the tiny model (8 x 256 tokens, 256 -> 512) ran forward + backward in 10.4 ms instead of 21.4 in bf16,
    and 12.2 instead of 18.3 in float32 (2-core CPU)."""
    xc, wc = res
    gc = g.astype(dtype)
    dx = jnp.einsum("...o,io->...i", gc, wc, preferred_element_type=jnp.float32)  # (..., I)
    # dw sums over every leading axis; XLA:CPU runs the bf16 product at full speed with two of them, (B, T).
    x3, g3 = (a.reshape((-1,) + a.shape[-2:]) if a.ndim >= 3 else a[None] for a in (xc, gc))  # (B', T', I|O)
    dw = jnp.einsum("bti,bto->io", x3, g3, preferred_element_type=jnp.float32)  # (I, O)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:
    """x (J, M, I) @ w (J, I, O) -> (J, M, O) float32: `matmul` group by group (the expert groups of dispatch.py),
    its hand-written backward included."""
    return jax.vmap(lambda xj, wj: matmul(xj, wj, dtype))(x, w)  # (J, M, O)


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    """N(0, std²) in float32: every learnable matrix starts this way (std 0.006, report §4.2)."""
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def linear(x: jax.Array, w: jax.Array, cfg: ModelConfig, *, quantize: bool = True) -> jax.Array:
    """x (..., in) @ w (in, out) -> (..., out) float32: through the FP8 recipe when `cfg.fp8` and `quantize` (report
    §3.3), else `matmul` with cfg.dtype inputs. The one place that chooses between them: Linear and the per-expert
    reference loop of moe.py call it."""
    if quantize and cfg.fp8:
        return fp8.fp8_matmul(x, w, cfg)
    return matmul(x, w, cfg.dtype)


def swiglu(x: jax.Array, gate, up, down) -> jax.Array:
    """down(silu(gate(x)) ⊙ up(x)), the SwiGLU FFN of every dense layer and expert (report §2.1); gate, up and down
    are the three projections as functions, so dense MLPs, shared and routed experts all share this one line."""
    return down(jax.nn.silu(gate(x)) * up(x))


class Linear(nnx.Module):
    """y = x W, no bias (DeepSeek-V3 has none). Runs through the FP8 recipe when `cfg.fp8` and `quantize` are set.

    `kernel` is stored (in, out) as Flax does; DeepSeek's checkpoints store `weight` as (out, in).
    """

    def __init__(self, in_features: int, out_features: int, cfg: ModelConfig, *, rngs: nnx.Rngs, quantize: bool = True):
        self.kernel = nnx.Param(normal_init(rngs, (in_features, out_features), cfg.initializer_range))  # (in, out)
        self.cfg = cfg
        self.quantize = quantize and cfg.fp8  # the report keeps embedding, head and router in high precision

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., in) -> (..., out)
        return linear(x, self.kernel[...], self.cfg, quantize=self.quantize)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position: logits (B, T, V), targets (B, T) -> (B, T).

    Written as logsumexp minus the target logit picked by a one-hot product: its gradient is elementwise, where
    `take_along_axis` would backpropagate through a scatter that XLA's CPU backend runs slowly."""
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit  # (B, T)


LOSS_CHUNK = 512  # tokens per chunk of the fused head + cross-entropy (`head_nll`)


def head_nll(h: jax.Array, w: jax.Array, targets: jax.Array, dtype: str) -> jax.Array:
    """token_nll(matmul(h, w, dtype), targets) without keeping the logits: h (B, T, D), w (D, V), targets (B, T) ->
    (B, T) float32.

    Why: the (B·T, V) logits are the largest tensor of a small model (4,096-way for the tiny one, 8 MB per 512 tokens
    in float32), and plain autodiff writes them, their softmax and its gradient to memory in full. Here the tokens
    are processed LOSS_CHUNK at a time; the forward keeps only each token's logsumexp, and the backward recomputes a
    chunk's logits, forms its gradient softmax − onehot(target) in place and folds it into dh and dw at once. On the
    tiny model (8 x 256 tokens, D 256, V 4,096, 2-core CPU) head + cross-entropy forward + backward took 46.6 ms
    instead of 62.7 in float32, and 26.3 instead of 46.5 in bf16.
    """
    b, t, d = h.shape
    n = b * t
    chunk = min(LOSS_CHUNK, n)
    pad = -n % chunk  # padded rows get a zero cotangent below, so they add nothing to dh or dw
    h = jnp.pad(h.reshape(n, d).astype(jnp.float32), ((0, pad), (0, 0))).reshape(-1, chunk, d)  # (chunks, N, D)
    targets = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)  # (chunks, N)
    nll = _chunked_nll(h, w.astype(jnp.float32), targets, dtype)  # (chunks, N)
    return nll.reshape(-1)[:n].reshape(b, t)  # (B, T)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_nll(h: jax.Array, w: jax.Array, targets: jax.Array, dtype: str) -> jax.Array:
    return _chunked_nll_fwd(h, w, targets, dtype)[0]  # (chunks, N)


def _chunked_nll_fwd(h: jax.Array, w: jax.Array, targets: jax.Array, dtype: str) -> tuple[jax.Array, tuple]:
    """h (chunks, N, D), w (D, V), targets (chunks, N) -> nll (chunks, N) and what the backward needs."""
    wc = w.astype(dtype)  # (D, V)

    def one_chunk(_, xs):
        h_chunk, t_chunk = xs  # (N, D), (N,)
        logits = jnp.einsum("nd,dv->nv", h_chunk.astype(dtype), wc, preferred_element_type=jnp.float32)  # (N, V)
        lse = jax.nn.logsumexp(logits, axis=-1)  # (N,)
        return None, (lse - jnp.take_along_axis(logits, t_chunk[:, None], axis=-1)[:, 0], lse)  # (N,), (N,)

    _, (nll, lse) = jax.lax.scan(one_chunk, None, (h, targets))  # (chunks, N) each
    return nll, (h, wc, targets, lse)


def _chunked_nll_bwd(dtype: str, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array, None]:
    """g (chunks, N): d nll -> dh (chunks, N, D), dw (D, V); dnll/dlogits = softmax(logits) − onehot(target)."""
    h, wc, targets, lse = res

    def one_chunk(dw, xs):
        h_chunk, t_chunk, lse_c, g_c = xs  # (N, D), (N,), (N,), (N,)
        h_chunk = h_chunk.astype(dtype)
        logits = jnp.einsum("nd,dv->nv", h_chunk, wc, preferred_element_type=jnp.float32)  # (N, V), recomputed
        dlogits = (jnp.exp(logits - lse_c[:, None]) - jax.nn.one_hot(t_chunk, wc.shape[1])) * g_c[:, None]  # (N, V)
        dlogits = dlogits.astype(dtype)  # the backward GEMMs on `dtype` inputs, as `matmul`'s
        dh = jnp.einsum("nv,dv->nd", dlogits, wc, preferred_element_type=jnp.float32)  # (N, D)
        dw = dw + jnp.einsum("bnd,bnv->dv", h_chunk[None], dlogits[None], preferred_element_type=jnp.float32)  # (D, V)
        return dw, dh

    dw, dh = jax.lax.scan(one_chunk, jnp.zeros(wc.shape, jnp.float32), (h, targets, lse, g))
    return dh, dw, None  # integer targets have no cotangent


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


class RMSNorm(nnx.Module):
    """RMSNorm(x) = x / sqrt(mean(x²) + eps) · weight, computed in float32 (the report keeps norms in high precision)."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))  # (dim,)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., dim) -> (..., dim)
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.weight[...]


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) ⊙ up(x)). Dense layers, and each shared expert (Eq. 12, FFN^(s))."""

    def __init__(self, cfg: ModelConfig, intermediate_size: int, *, rngs: nnx.Rngs):
        self.gate_proj = Linear(cfg.hidden_size, intermediate_size, cfg, rngs=rngs)  # W1
        self.up_proj = Linear(cfg.hidden_size, intermediate_size, cfg, rngs=rngs)  # W3
        self.down_proj = Linear(intermediate_size, cfg.hidden_size, cfg, rngs=rngs)  # W2

    def __call__(self, x: jax.Array) -> jax.Array:  # (..., D) -> (..., D)
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)  # (..., F) -> (..., D)


# ---------------------------------------------------------------------------------------------------------------
# RoPE with YaRN (notes §6). Only the decoupled parts q^R and k^R are rotated (Eqs. 3, 8).


def yarn_get_mscale(factor: float, mscale: float) -> float:
    """√t = 0.1·mscale·ln(s) + 1 for s > 1 (report §4.3; V2 used 0.0707)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse wavelengths θ^(-2j/d) for j < d/2 (d = qk_rope_head_dim), with YaRN's ramp when rope_scaling is set.

    YaRN leaves short wavelengths alone (dims j < low rotate many times within the original context), divides long
    ones by s (j > high), and blends linearly in between. low/high are the dims whose wavelength fits β_fast and
    β_slow rotations into the original context. For V3 (d=64, θ=1e4, 4096, β=32/1): low=10, high=23 (notes §6).
    """
    dim = cfg.qk_rope_head_dim
    freqs = cfg.rope_theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # (d/2,)
    r = cfg.rope_scaling
    if r is None or r.factor <= 1:
        return freqs

    def correction_dim(rotations: float) -> float:  # the dim j whose wavelength fits `rotations` turns in the context
        return (
            dim
            * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(cfg.rope_theta))
        )

    low = max(math.floor(correction_dim(r.beta_fast)), 0)
    high = min(math.ceil(correction_dim(r.beta_slow)), dim - 1)
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / max(high - low, 1e-3), 0.0, 1.0)  # (d/2,)
    return freqs / r.factor * ramp + freqs * (1.0 - ramp)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_h + d_h^R) (Eq. 10), times mscale² under YaRN (notes §1.4: 0.0722 -> 0.1352 for V3 at s=40)."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope_scaling is not None:
        scale *= yarn_get_mscale(cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim) ** 2
    return scale


def yarn_rope_scale(cfg: ModelConfig) -> float:
    """The factor on the rotated q^R and k^R under YaRN: mscale(s, mscale) / mscale(s, mscale_all_dim).

    The two fields of `rope_scaling` split YaRN's temperature as [HFt] does: `mscale_all_dim` scales every logit
    (through `softmax_scale`), and this ratio moves the rope part's share to `mscale`, so q^R·k^R is scaled by
    mscale(s, mscale)² in all. DeepSeek-V3's config sets both to 1.0, where this is 1 and [G] (which reads only
    `mscale`, in the softmax scale) computes the same function; following [HFt] keeps other values faithful to
    checkpoints in the Hugging Face layout."""
    r = cfg.rope_scaling
    if r is None:
        return 1.0
    return yarn_get_mscale(r.factor, r.mscale) / yarn_get_mscale(r.factor, r.mscale_all_dim)


def apply_rope(x: jax.Array, positions: jax.Array, freqs: jax.Array, scale: float = 1.0) -> jax.Array:
    """Rotate adjacent pairs (x_2j, x_2j+1) by angle pos·freq_j, the interleaved layout of DeepSeek's code (notes §1.3),
    and multiply by `scale` (YaRN's `yarn_rope_scale`).

    x: (B, T, ..., d) with `positions` (B, T) or (T,); any axes between T and d (heads) share the rotation.
    """
    positions = jnp.atleast_2d(positions)  # (B or 1, T)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # (B, T, d/2)
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])  # (B, T, 1.., d/2) over heads
    cos, sin = scale * jnp.cos(angles), scale * jnp.sin(angles)
    pairs = rearrange(x.astype(jnp.float32), "... (pairs two) -> ... pairs two", two=2)  # (..., d/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)  # (..., d/2, 2)
    return rearrange(rotated, "... pairs two -> ... (pairs two)")  # (..., d)
