"""One Transformer layer of DeepSeek-V3: pre-norm MLA, then a pre-norm dense MLP or DeepSeekMoE (report Fig. 2).

Shared by the main model (minidsv3/model.py) and each MTP module (minidsv3/mtp.py, TRM_k of Eq. 22).
Shapes follow the package's legend (README.md): B batch · T positions · D hidden_size · E routed experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minidsv3.config import ModelConfig
from minidsv3.layers import MLP, RMSNorm
from minidsv3.mla import LatentCache, MultiHeadLatentAttention
from minidsv3.moe import MoE


class Block(nnx.Module):
    """h = x + MLA(norm(x)); out = h + FFN(norm(h)), FFN = SwiGLU for the first `first_k_dense_replace` layers, else
    DeepSeekMoE (Eq. 12; its residual u_t is the `h +` here)."""

    def __init__(self, cfg: ModelConfig, *, is_moe: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.is_moe = is_moe
        self.mlp = MoE(cfg, rngs=rngs) if self.is_moe else MLP(cfg, cfg.intermediate_size, rngs=rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, token_mask: jax.Array | None = None, offsets: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, T, D) -> out (B, T, D), expert loads (1, E) for a MoE layer or (0, E) for a dense one (so that the
        model concatenates every layer's into (L_moe, E)), balance loss () (0 for a dense layer). offsets (B,): left
        padding (see `MultiHeadLatentAttention.__call__`)."""
        h = x + self.self_attn(self.input_layernorm(x), positions, offsets)  # (B, T, D)
        if not self.is_moe:
            no_load = jnp.zeros((0, self.cfg.n_routed_experts), jnp.float32)  # (0, E)
            return h + self.mlp(self.post_attention_layernorm(h)), no_load, jnp.zeros((), jnp.float32)
        y, load, balance_loss = self.mlp(self.post_attention_layernorm(h), token_mask)  # (B, T, D), (E,), ()
        return h + y, load[None], balance_loss  # (B, T, D), (1, E), ()

    def decode(
        self, x: jax.Array, cache: LatentCache, start: jax.Array, offsets: jax.Array | None = None
    ) -> tuple[jax.Array, LatentCache]:
        """x (B, T, D) in cache slots start..start+T-1, attending through the latent cache (absorbed MLA); offsets (B,)
        left padding."""
        a, cache = self.self_attn.decode(self.input_layernorm(x), cache, start, offsets=offsets)  # (B, T, D)
        h = x + a
        if not self.is_moe:
            return h + self.mlp(self.post_attention_layernorm(h)), cache
        y, _, _ = self.mlp(self.post_attention_layernorm(h))  # (B, T, D)
        return h + y, cache
