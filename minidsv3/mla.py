"""Multi-head latent attention (MLA), report §2.1.1, Eqs. 1-11; notes §1.

Shape legend: B batch · T query positions · S key positions · D hidden_size · H heads · N flattened tokens · V vocab.
Other dims are written by config field name. Einsum letters: b t s h as in the legend, and
k = qk_nope_head_dim · r = qk_rope_head_dim · v = v_head_dim · c = kv_lora_rank.

Each token's hidden state h_t is squeezed into one small latent c_t^KV (kv_lora_rank wide, Eq. 1), from which every
head's key and value are expanded back up (Eqs. 2, 5). Position enters through a separate, small rotary key k_t^R that
all heads share (Eq. 3), so the expansion matrices stay position-free. Queries go through their own bottleneck c_t^Q
(Eqs. 6-8), which saves training activations but no cache. The score of head i concatenates both parts (Eqs. 4, 9):

    q_{t,i}·k_{j,i} = q^C_{t,i}·k^C_{j,i} + q^R_{t,i}·k^R_j        (the "nope" part plus the rotary part)

Absorbed decode: attention inside the latent space
--------------------------------------------------
How it works. At generation time we cache only c^KV (already passed through kv_a_layernorm) and the roped k^R: that is
kv_lora_rank + qk_rope_head_dim floats per token and layer (576 for V3, notes §1.6), against H·(qk_head_dim + v_head_dim)
= 40,960 for the per-head keys and values of the naive path's cache. The naive way to use the latent cache expands it
back, k^C_{j,i} = W^UK_i c_j and v_{j,i} = W^UV_i c_j, for every cached position j at every step: H·(k+v)·c
multiply-adds per cached token per step, and a (B, S, H, k+v) tensor in memory. Matrix products associate, so both
expansions can be moved to the query side instead (notes §1.5, [V2] §2.1.2):

    q^C_{t,i}·(W^UK_i c_j) = (W^UK_iᵀ q^C_{t,i})·c_j                 W^UK is "absorbed" into the query
    Σ_j p_{t,j} (W^UV_i c_j) = W^UV_i (Σ_j p_{t,j} c_j)              W^UV is applied once, after the weighted sum

Each head's query is mapped into latent space once (k -> kv_lora_rank), scored directly against the cached latents,
the attention weights average the latents themselves, and only that average is expanded to the head's value width.
Per cached token and step the work drops from H·(k+v)·c (expansion) + H·(k+r+v) (attention) to H·(2c+r); the
H·(k+v)·c of the two absorbed products is now paid once per query instead. The cache is read as it is, like
multi-query attention with one (kv_lora_rank + qk_rope_head_dim)-wide key and one kv_lora_rank-wide value per token.

Choices made here. `decode(absorb=True)` follows DeepSeek's `attn_impl="absorb"` ([G] inference/model.py): W^UK and
W^UV are sliced out of `kv_b_proj.kernel` per head, and W^UV is applied per head before `o_proj`, not pre-multiplied
into it. `decode(absorb=False)` expands the cached latent through `kv_b_proj` and shares the attention code of the
training path, so the two decode paths are independent implementations that tests compare. The training path
(`__call__`) materializes keys and values: with T queries at once the expansion is paid once per token, not per step,
and the wider per-head dot products keep the matmuls efficient. Scores, softmax and the weighted sum run in float32 at
full precision (the report keeps attention out of FP8, §3.3.1).

How it differs from production. DeepSeek caches in BF16/FP8 and writes fused kernels (FlashMLA) for this loop; we keep
a float32 cache and plain einsums. The absorbed path multiplies by the float32 master kernel of `kv_b_proj` even when
the model runs its linears in bfloat16 or FP8, where [G] dequantizes its FP8 weight first; so with `cfg.fp8` or
`dtype="bfloat16"` the two decode paths agree only to the rounding of those formats.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from minidsv3.config import ModelConfig
from minidsv3.layers import Linear, RMSNorm, apply_rope, rope_frequencies, softmax_scale

QUERY_BLOCK = 128  # queries per block of the causal-blocked training attention (see `__call__`)


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
    """The attention core's einsum, at full float32 precision (on GPUs XLA's default may round inputs to TF32)."""
    return jnp.einsum(spec, *operands, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


class LatentCache(NamedTuple):
    """The compressed KV cache of one MLA layer (a pytree): only the blue-boxed vectors of Eqs. 1 and 3."""

    c_kv: jax.Array  # (B, S_max, kv_lora_rank): kv_a_layernorm(c^KV), Eq. 1 and its RMSNorm
    k_rope: jax.Array  # (B, S_max, qk_rope_head_dim): k^R after RoPE, Eq. 3


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> LatentCache:
    """An empty (zero) cache for `batch` sequences of up to `max_len` positions."""
    return LatentCache(
        c_kv=jnp.zeros((batch, max_len, cfg.kv_lora_rank), jnp.float32),  # (B, S_max, kv_lora_rank)
        k_rope=jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), jnp.float32),  # (B, S_max, qk_rope_head_dim)
    )


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over keys (last axis) of scores (B, H, T, S) where mask (T, S) is True; each row keeps >= 1 key."""
    scores = jnp.where(mask, scores, -jnp.inf)  # (B, H, T, S)
    return jax.nn.softmax(scores, axis=-1)  # (B, H, T, S), Eq. 10's Softmax_j


class MultiHeadLatentAttention(nnx.Module):
    """MLA: low-rank joint compression of keys and values, decoupled RoPE (report §2.1.1, Eqs. 1-11)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.cfg = cfg
        if cfg.q_lora_rank > 0:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, cfg, rngs=rngs)  # W^{DQ}, Eq. 6
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps)  # the RMSNorm on c^Q, report §4.2
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, cfg, rngs=rngs)  # [W^{UQ}; W^{QR}], Eqs. 7-8
        else:  # DeepSeek-V2-Lite: no query compression
            self.q_proj = Linear(D, H * cfg.qk_head_dim, cfg, rngs=rngs)  # [W^{UQ}; W^{QR}] acting on h_t directly
        kv_a_width = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # per token [c^KV | k^R before RoPE]
        kv_b_width = H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # per head [k^C | v^C]
        self.kv_a_proj_with_mqa = Linear(D, kv_a_width, cfg, rngs=rngs)  # [W^{DKV}; W^{KR}], Eqs. 1, 3
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=cfg.rms_norm_eps)  # on c^KV only; k^R is not normalized
        self.kv_b_proj = Linear(cfg.kv_lora_rank, kv_b_width, cfg, rngs=rngs)  # [W^{UK}; W^{UV}], Eqs. 2, 5
        self.o_proj = Linear(H * cfg.v_head_dim, D, cfg, rngs=rngs)  # W^O, Eq. 11
        # NOTE: differs from the report: no "scaling factors at the width bottlenecks" (§4.2). Their values are not
        # published and [G] has none; a constant factor before an RMSNorm or a linear layer is absorbed by its weights.

    def _queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, T, D) -> q^C (B, T, H, k) and roped q^R (B, T, H, r), Eqs. 6-9."""
        cfg = self.cfg
        if cfg.q_lora_rank > 0:
            c_q = self.q_a_layernorm(self.q_a_proj(x))  # (B, T, q_lora_rank), Eq. 6 and its RMSNorm
            q = self.q_b_proj(c_q)  # (B, T, H*qk_head_dim), Eqs. 7-8 before RoPE
        else:
            q = self.q_proj(x)  # (B, T, H*qk_head_dim)
        q = rearrange(q, "b t (h d) -> b t h d", h=cfg.num_attention_heads)  # (B, T, H, qk_head_dim), per head [C | R]
        q_nope, q_rope = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]  # (B, T, H, k), (B, T, H, r)
        q_rope = apply_rope(q_rope, positions, rope_frequencies(cfg))  # (B, T, H, r), Eq. 8: one rope query per head
        return q_nope, q_rope

    def _latents(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, T, D) -> normalized c^KV (B, T, c) and the shared roped key k^R (B, T, r): what the cache holds."""
        cfg = self.cfg
        kv = self.kv_a_proj_with_mqa(x)  # (B, T, kv_lora_rank + qk_rope_head_dim)
        c_kv, k_rope = kv[..., : cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank :]  # (B, T, c), (B, T, r)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, c), Eq. 1 followed by the latent's RMSNorm
        k_rope = apply_rope(k_rope, positions, rope_frequencies(cfg))  # (B, T, r), Eq. 3: one key for all heads
        return c_kv, k_rope

    def _expand(self, c_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalized latents (B, S, c) -> per-head keys k^C (B, S, H, k) and values v^C (B, S, H, v), Eqs. 2, 5."""
        kv = self.kv_b_proj(c_kv)  # (B, S, H*(k + v))
        kv = rearrange(kv, "b s (h d) -> b s h d", h=self.cfg.num_attention_heads)  # (B, S, H, k + v), per head [k | v]
        return kv[..., : self.cfg.qk_nope_head_dim], kv[..., self.cfg.qk_nope_head_dim :]  # (B, S, H, k), (B, S, H, v)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """Eq. 10 on materialized keys and values: q (B, T, H, k+r) already scaled, k (B, S, H, k+r), v (B, S, H, v),
        mask (T, S) -> o (B, T, H, v)."""
        scores = _einsum("bthd,bshd->bhts", q, k)  # (B, H, T, S)
        probs = _masked_softmax(scores, mask)  # (B, H, T, S), Eq. 10
        return _einsum("bhts,bshv->bthv", probs, v.astype(jnp.float32))  # (B, T, H, v), Eq. 10

    def _joint_heads(self, q_nope, q_rope, k_nope, k_rope) -> tuple[jax.Array, jax.Array]:
        """Per head [C | R] queries and keys (Eqs. 4, 9), the queries times the softmax scale: (B,T,H,k), (B,T,H,r),
        (B,S,H,k), (B,S,r) -> q (B, T, H, k+r), k (B, S, H, k+r).

        One product of the concatenations is q^C·k^C + q^R·k^R. Measured on a 2-core CPU (tiny.toml, 8 x 256, forward
        + backward of the attention core): 19.4 ms with two score einsums and the scale applied to (B, H, T, S),
        7.6 ms with one einsum of width k+r and the scale applied to q (B, T, H, k+r), 256/(k+r) times smaller."""
        k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + k_rope.shape[-1:])  # (B, S, H, r) shared
        q = jnp.concatenate([q_nope, q_rope], axis=-1) * softmax_scale(self.cfg)  # (B, T, H, k+r)
        return q, jnp.concatenate([k_nope, k_rope], axis=-1)  # (B, T, H, k+r), (B, S, H, k+r)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Causal self-attention over the whole sequence, x (B, T, D) with positions (T,) or (B, T) -> (B, T, D)."""
        T = x.shape[1]
        q_nope, q_rope = self._queries(x, positions)  # (B, T, H, k), (B, T, H, r)
        c_kv, k_rope = self._latents(x, positions)  # (B, T, c), (B, T, r)
        k_nope, v = self._expand(c_kv)  # (B, T, H, k), (B, T, H, v)
        q, k = self._joint_heads(q_nope, q_rope, k_nope, k_rope)  # (B, T, H, k+r), (B, T, H, k+r)
        causal = jnp.tril(jnp.ones((T, T), bool))  # (T, S=T): Eq. 10 sums over j <= t
        # Causal blocking: queries t in [i, j) never see keys past j, so each block of QUERY_BLOCK queries scores only
        # keys [0, j). That skips the upper-right triangle of the T x T scores; at T = 256 (two blocks) it cut the
        # attention core's forward + backward from 7.6 to 6.1 ms on the tiny model (2-core CPU).
        o = jnp.concatenate(
            [
                self._attend(q[:, i:j], k[:, :j], v[:, :j], causal[i:j, :j])  # (B, j-i, H, v)
                for i in range(0, T, QUERY_BLOCK)
                for j in [min(i + QUERY_BLOCK, T)]
            ],
            axis=1,
        )  # (B, T, H, v)
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)"))  # (B, T, D), Eq. 11

    def decode(
        self, x: jax.Array, cache: LatentCache, start: jax.Array | int, *, absorb: bool = True
    ) -> tuple[jax.Array, LatentCache]:
        """Attend T new tokens x (B, T, D) at positions start..start+T-1 to the cache plus themselves.

        Returns y (B, T, D) and the cache with the new positions written. `start` may be a traced int32 scalar, so
        one jitted function serves every step. The caller keeps start + T <= S_max: `dynamic_update_slice` clamps
        an out-of-range start instead of failing.
        """
        cfg = self.cfg
        T, S_max = x.shape[1], cache.c_kv.shape[1]
        positions = start + jnp.arange(T)  # (T,)
        q_nope, q_rope = self._queries(x, positions)  # (B, T, H, k), (B, T, H, r)
        c_new, k_rope_new = self._latents(x, positions)  # (B, T, c), (B, T, r)
        c_kv = jax.lax.dynamic_update_slice(cache.c_kv, c_new, (0, start, 0))  # (B, S_max, c)
        k_rope = jax.lax.dynamic_update_slice(cache.k_rope, k_rope_new, (0, start, 0))  # (B, S_max, r)
        cache = LatentCache(c_kv=c_kv, k_rope=k_rope)
        # Query t sees cache slots 0..start+t: the earlier tokens, the new ones up to itself; never unwritten slots.
        mask = jnp.arange(S_max)[None, :] <= positions[:, None]  # (T, S_max)

        if not absorb:  # naive: expand every cached latent to per-head keys and values (notes §1.5 "naive")
            k_nope, v = self._expand(c_kv)  # (B, S_max, H, k), (B, S_max, H, v)
            q, k = self._joint_heads(q_nope, q_rope, k_nope, k_rope)  # (B, T, H, k+r), (B, S_max, H, k+r)
            o = self._attend(q, k, v, mask)  # (B, T, H, v)
            return self.o_proj(rearrange(o, "b t h v -> b t (h v)")), cache  # (B, T, D), Eq. 11

        # absorbed: see the module docstring. kv_b_proj's kernel (c, H*(k+v)) holds per head [W^UK | W^UV].
        w_kv = rearrange(self.kv_b_proj.kernel[...], "c (h d) -> h c d", h=cfg.num_attention_heads)  # (H, c, k + v)
        w_uk, w_uv = w_kv[..., : cfg.qk_nope_head_dim], w_kv[..., cfg.qk_nope_head_dim :]  # (H, c, k), (H, c, v)
        q_latent = _einsum("bthk,hck->bthc", q_nope, w_uk)  # (B, T, H, c): W^UKᵀ q^C, Eq. 2 absorbed
        scores = _einsum("bthc,bsc->bhts", q_latent, c_kv)  # (B, H, T, S_max) = q^C·k^C
        scores += _einsum("bthr,bsr->bhts", q_rope, k_rope)  # (B, H, T, S_max): + q^R·k^R, Eq. 9
        probs = _masked_softmax(scores * softmax_scale(cfg), mask)  # (B, H, T, S_max), Eq. 10
        o_latent = _einsum("bhts,bsc->bthc", probs, c_kv)  # (B, T, H, c): Σ_j p_tj c_j
        o = _einsum("bthc,hcv->bthv", o_latent, w_uv)  # (B, T, H, v): W^UV applied after, Eq. 5 absorbed
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)")), cache  # (B, T, D), Eq. 11
