"""Multi-head latent attention (MLA), report §2.1.1, Eqs. 1-11; notes §1.

Read `MultiHeadLatentAttention` top-down: `__call__` (training) is `_queries` (Eqs. 6-9), `_latents` (Eqs. 1, 3),
`_expand` (Eqs. 2, 5), `_joint_heads` (Eqs. 4, 9) and `_attend` (Eq. 10), then `o_proj` (Eq. 11); `decode` runs the
same from the latent cache. Shapes follow the package's legend (README.md): B batch · T query positions · S key
positions · D hidden_size · H heads · C kv_lora_rank · P qk_nope_head_dim · R qk_rope_head_dim · X = P + R
(qk_head_dim) · U v_head_dim; einsum strings use the same letters in lower case.

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
back, k^C_{j,i} = W^UK_i c_j and v_{j,i} = W^UV_i c_j, for every cached position j at every step: H·(P+U)·C
multiply-adds per cached token per step, and a (B, S, H, P+U) tensor in memory. Matrix products associate, so both
expansions can be moved to the query side instead (notes §1.5, [V2] §2.1.2):

    q^C_{t,i}·(W^UK_i c_j) = (W^UK_iᵀ q^C_{t,i})·c_j                 W^UK is "absorbed" into the query
    Σ_j p_{t,j} (W^UV_i c_j) = W^UV_i (Σ_j p_{t,j} c_j)              W^UV is applied once, after the weighted sum

Each head's query is mapped into latent space once (P -> C), scored directly against the cached latents,
the attention weights average the latents themselves, and only that average is expanded to the head's value width.
Per cached token and step the work drops from H·(P+U)·C (expansion) + H·(P+R+U) (attention) to H·(2C+R); the
H·(P+U)·C of the two absorbed products is now paid once per query instead. The cache is read as it is, like
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
from minidsv3.layers import Linear, RMSNorm, apply_rope, rope_frequencies, softmax_scale, yarn_rope_scale

QUERY_BLOCK = 128  # queries per block of the causal-blocked training attention (see `__call__`)
# The latent norms' eps: [G] and [HFt] build q_a_layernorm and kv_a_layernorm with their RMSNorm's default 1e-6,
# whatever `rms_norm_eps` says, so a released checkpoint computes the same function here.
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nnx.Module):
    """MLA: low-rank joint compression of keys and values, decoupled RoPE (report §2.1.1, Eqs. 1-11)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.cfg = cfg
        if cfg.q_lora_rank > 0:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, cfg, rngs=rngs)  # W^{DQ}, Eq. 6
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)  # the RMSNorm on c^Q, report §4.2
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, cfg, rngs=rngs)  # [W^{UQ}; W^{QR}], Eqs. 7-8
        else:  # DeepSeek-V2-Lite: no query compression
            self.q_proj = Linear(D, H * cfg.qk_head_dim, cfg, rngs=rngs)  # [W^{UQ}; W^{QR}] acting on h_t directly
        kv_a_width = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # per token [c^KV | k^R before RoPE]
        kv_b_width = H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # per head [k^C | v^C]
        self.kv_a_proj_with_mqa = Linear(D, kv_a_width, cfg, rngs=rngs)  # [W^{DKV}; W^{KR}], Eqs. 1, 3
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS)  # on c^KV only; k^R is not normalized
        self.kv_b_proj = Linear(cfg.kv_lora_rank, kv_b_width, cfg, rngs=rngs)  # [W^{UK}; W^{UV}], Eqs. 2, 5
        self.o_proj = Linear(H * cfg.v_head_dim, D, cfg, rngs=rngs)  # W^O, Eq. 11
        # NOTE: differs from the report: no "scaling factors at the width bottlenecks" (§4.2). Their values are not
        # published and [G] has none; a constant factor before an RMSNorm or a linear layer is absorbed by its weights.

    def __call__(self, x: jax.Array, positions: jax.Array, offsets: jax.Array | None = None) -> jax.Array:
        """Causal self-attention over the whole sequence, x (B, T, D) with positions (T,) or (B, T) -> (B, T, D).

        offsets (B,): left padding, row b's real tokens start at slot offsets[b]; no query attends to a slot before
        it (`visible`). None: no padding."""
        T = x.shape[1]
        q_nope, q_rope = self._queries(x, positions)  # (B, T, H, P), (B, T, H, R)
        c_kv, k_rope = self._latents(x, positions)  # (B, T, C), (B, T, R)
        k_nope, v = self._expand(c_kv)  # (B, T, H, P), (B, T, H, U)
        q, k = self._joint_heads(q_nope, q_rope, k_nope, k_rope)  # (B, T, H, X), (B, T, H, X)
        causal = visible(jnp.arange(T), T, offsets)  # (T, S=T) or (B, 1, T, S): Eq. 10 sums over j <= t
        # Causal blocking: queries t in [i, j) never see keys past j, so each block of QUERY_BLOCK queries scores only
        # keys [0, j). That skips the upper-right triangle of the T x T scores; at T = 256 (two blocks) it cut the
        # attention core's forward + backward from 7.6 to 6.1 ms on the tiny model (2-core CPU).
        o = jnp.concatenate(
            [
                self._attend(q[:, i:j], k[:, :j], v[:, :j], causal[..., i:j, :j])  # (B, j-i, H, U)
                for i in range(0, T, QUERY_BLOCK)
                for j in [min(i + QUERY_BLOCK, T)]
            ],
            axis=1,
        )  # (B, T, H, U)
        return self.o_proj(rearrange(o, "b t h u -> b t (h u)"))  # (B, T, D), Eq. 11

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """RoPE with this config's frequencies and YaRN scale on the decoupled parts q^R, k^R (..., R) (Eqs. 3, 8)."""
        return apply_rope(x, positions, rope_frequencies(self.cfg), yarn_rope_scale(self.cfg))

    def _queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, T, D) -> q^C (B, T, H, P) and roped q^R (B, T, H, R), Eqs. 6-9."""
        cfg = self.cfg
        if cfg.q_lora_rank > 0:
            c_q = self.q_a_layernorm(self.q_a_proj(x))  # (B, T, q_lora_rank), Eq. 6 and its RMSNorm
            q = self.q_b_proj(c_q)  # (B, T, H·X), Eqs. 7-8 before RoPE
        else:
            q = self.q_proj(x)  # (B, T, H·X)
        q = rearrange(q, "b t (h x) -> b t h x", h=cfg.num_attention_heads)  # (B, T, H, X), per head [q^C | q^R]
        q_nope, q_rope = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]  # (B, T, H, P), (B, T, H, R)
        return q_nope, self._rope(q_rope, positions)  # Eq. 8: one rope query per head

    def _latents(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, T, D) -> normalized c^KV (B, T, C) and the shared roped key k^R (B, T, R): what the cache holds."""
        cfg = self.cfg
        kv = self.kv_a_proj_with_mqa(x)  # (B, T, C + R)
        c_kv, k_rope = kv[..., : cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank :]  # (B, T, C), (B, T, R)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, C), Eq. 1 followed by the latent's RMSNorm
        return c_kv, self._rope(k_rope, positions)  # Eq. 3: one key for all heads

    def _expand(self, c_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalized latents (B, S, C) -> per-head keys k^C (B, S, H, P) and values v^C (B, S, H, U), Eqs. 2, 5."""
        kv = self.kv_b_proj(c_kv)  # (B, S, H·(P + U))
        kv = rearrange(kv, "b s (h pu) -> b s h pu", h=self.cfg.num_attention_heads)  # (B, S, H, P + U): [k^C | v^C]
        return kv[..., : self.cfg.qk_nope_head_dim], kv[..., self.cfg.qk_nope_head_dim :]  # (B, S, H, P), (B, S, H, U)

    def _joint_heads(self, q_nope, q_rope, k_nope, k_rope) -> tuple[jax.Array, jax.Array]:
        """Per head [C | R] queries and keys (Eqs. 4, 9), the queries times the softmax scale: (B,T,H,P), (B,T,H,R),
        (B,S,H,P), (B,S,R) -> q (B, T, H, X), k (B, S, H, X) with X = P + R.

        One product of the concatenations is q^C·k^C + q^R·k^R. Measured on a 2-core CPU (tiny.toml, 8 x 256, forward
        + backward of the attention core): 19.4 ms with two score einsums and the scale applied to (B, H, T, S),
        7.6 ms with one einsum of width X and the scale applied to q (B, T, H, X), 256/X times smaller."""
        k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + k_rope.shape[-1:])  # (B, S, H, R) shared
        q = jnp.concatenate([q_nope, q_rope], axis=-1) * softmax_scale(self.cfg)  # (B, T, H, X)
        return q, jnp.concatenate([k_nope, k_rope], axis=-1)  # (B, T, H, X), (B, S, H, X)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """Eq. 10 on materialized keys and values: q (B, T, H, X) already scaled, k (B, S, H, X), v (B, S, H, U),
        mask (T, S) or (B, 1, T, S) -> o (B, T, H, U)."""
        scores = _einsum("bthx,bshx->bhts", q, k)  # (B, H, T, S)
        probs = _masked_softmax(scores, mask)  # (B, H, T, S), Eq. 10
        return _einsum("bhts,bshu->bthu", probs, v.astype(jnp.float32))  # (B, T, H, U), Eq. 10

    def decode(
        self,
        x: jax.Array,
        cache: LatentCache,
        start: jax.Array | int,
        *,
        absorb: bool = True,
        offsets: jax.Array | None = None,
    ) -> tuple[jax.Array, LatentCache]:
        """Attend T new tokens x (B, T, D) in cache slots start..start+T-1 to the cache plus themselves.

        Returns y (B, T, D) and the cache with the new slots written. `start` may be a traced int32 scalar, so
        one jitted function serves every step. The caller keeps start + T <= S_max: `dynamic_update_slice` clamps
        an out-of-range start instead of failing. offsets (B,): left padding as in `__call__`; row b's slot s holds
        position s - offsets[b]. None: slot = position.
        """
        cfg = self.cfg
        T, S_max = x.shape[1], cache.c_kv.shape[1]
        slots = start + jnp.arange(T)  # (T,)
        positions = slots if offsets is None else row_positions(slots, offsets)  # (T,) or (B, T)
        q_nope, q_rope = self._queries(x, positions)  # (B, T, H, P), (B, T, H, R)
        c_new, k_rope_new = self._latents(x, positions)  # (B, T, C), (B, T, R)
        c_kv = jax.lax.dynamic_update_slice(cache.c_kv, c_new, (0, start, 0))  # (B, S_max, C)
        k_rope = jax.lax.dynamic_update_slice(cache.k_rope, k_rope_new, (0, start, 0))  # (B, S_max, R)
        cache = LatentCache(c_kv=c_kv, k_rope=k_rope)
        # Query t sees cache slots 0..start+t: the earlier tokens, the new ones up to itself; never unwritten slots.
        mask = visible(slots, S_max, offsets)  # (T, S_max) or (B, 1, T, S_max)

        if not absorb:  # naive: expand every cached latent to per-head keys and values (notes §1.5 "naive")
            k_nope, v = self._expand(c_kv)  # (B, S_max, H, P), (B, S_max, H, U)
            q, k = self._joint_heads(q_nope, q_rope, k_nope, k_rope)  # (B, T, H, X), (B, S_max, H, X)
            o = self._attend(q, k, v, mask)  # (B, T, H, U)
            return self.o_proj(rearrange(o, "b t h u -> b t (h u)")), cache  # (B, T, D), Eq. 11

        # absorbed: see the module docstring. kv_b_proj's kernel (C, H·(P+U)) holds per head [W^UK | W^UV].
        w_kv = rearrange(self.kv_b_proj.kernel[...], "c (h pu) -> h c pu", h=cfg.num_attention_heads)  # (H, C, P + U)
        w_uk, w_uv = w_kv[..., : cfg.qk_nope_head_dim], w_kv[..., cfg.qk_nope_head_dim :]  # (H, C, P), (H, C, U)
        q_latent = _einsum("bthp,hcp->bthc", q_nope, w_uk)  # (B, T, H, C): W^UKᵀ q^C, Eq. 2 absorbed
        scores = _einsum("bthc,bsc->bhts", q_latent, c_kv)  # (B, H, T, S_max) = q^C·k^C
        scores += _einsum("bthr,bsr->bhts", q_rope, k_rope)  # (B, H, T, S_max): + q^R·k^R, Eq. 9
        probs = _masked_softmax(scores * softmax_scale(cfg), mask)  # (B, H, T, S_max), Eq. 10
        o_latent = _einsum("bhts,bsc->bthc", probs, c_kv)  # (B, T, H, C): Σ_j p_tj c_j
        o = _einsum("bthc,hcu->bthu", o_latent, w_uv)  # (B, T, H, U): W^UV applied after, Eq. 5 absorbed
        return self.o_proj(rearrange(o, "b t h u -> b t (h u)")), cache  # (B, T, D), Eq. 11


class LatentCache(NamedTuple):
    """The compressed KV cache of one MLA layer (a pytree): only the blue-boxed vectors of Eqs. 1 and 3."""

    c_kv: jax.Array  # (B, S_max, C): kv_a_layernorm(c^KV), Eq. 1 and its RMSNorm
    k_rope: jax.Array  # (B, S_max, R): k^R after RoPE, Eq. 3


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> LatentCache:
    """An empty (zero) cache for `batch` sequences of up to `max_len` positions."""
    return LatentCache(
        c_kv=jnp.zeros((batch, max_len, cfg.kv_lora_rank), jnp.float32),  # (B, S_max, C)
        k_rope=jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), jnp.float32),  # (B, S_max, R)
    )


def row_positions(slots: jax.Array, offsets: jax.Array) -> jax.Array:
    """Slots (T,) of left-padded rows starting at offsets (B,) -> positions (B, T): slot - offset, and 0 on padding
    (which no real token attends to, so its position is arbitrary)."""
    return jnp.maximum(slots[None, :] - offsets[:, None], 0)  # (B, T)


def visible(query_slots: jax.Array, n_keys: int, offsets: jax.Array | None) -> jax.Array:
    """Which key slots each query slot (T,) attends to: the causal mask (T, S), and with left padding offsets (B,)
    (B, 1, T, S) without the padding slots s < offsets[b]. A padding query sees only itself, so that its softmax has
    a key (its output is never used)."""
    keys = jnp.arange(n_keys)  # (S,)
    causal = keys[None, :] <= query_slots[:, None]  # (T, S)
    if offsets is None:
        return causal
    real = keys[None, :] >= offsets[:, None]  # (B, S)
    itself = keys[None, :] == query_slots[:, None]  # (T, S)
    return ((causal[None] & real[:, None, :]) | itself[None])[:, None]  # (B, 1, T, S), broadcast over heads


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over keys (last axis) of scores (B, H, T, S) where mask (T, S) or (B, 1, T, S) is True; each row keeps
    >= 1 key."""
    scores = jnp.where(mask, scores, -jnp.inf)  # (B, H, T, S)
    return jax.nn.softmax(scores, axis=-1)  # (B, H, T, S), Eq. 10's Softmax_j


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
    """The attention core's einsum, at full float32 precision (on GPUs XLA's default may round inputs to TF32)."""
    return jnp.einsum(spec, *operands, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
