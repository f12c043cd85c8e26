"""The DeepSeek-V3 Transformer: embeddings -> blocks (MLA + dense MLP or DeepSeekMoE) -> norm -> head, plus MTP.

`Transformer.__call__` returns `(logits, aux)`; training scores `features` (the head's input) through the fused
`head_nll` instead, which never stores the logits. `aux` carries the per-layer expert loads, the sequence-wise balance
loss and the MTP loss, so that the training step can act on them in the open (report §2.1.2, §2.2).
Shapes follow the package's legend (README.md): B batch · T positions · D hidden_size · E routed experts · V vocab ·
L_moe MoE layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minidsv3 import moe
from minidsv3.block import Block
from minidsv3.config import ModelConfig
from minidsv3.layers import Linear, RMSNorm, head_nll, matmul, normal_init, token_nll
from minidsv3.mla import LatentCache, init_cache, row_positions
from minidsv3.mtp import MTPModule, mtp_forward, mtp_loss


class Transformer(nnx.Module):
    """The main model (61 layers in V3) and its `num_nextn_predict_layers` MTP modules."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Param(normal_init(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.initializer_range))
        self.layers = nnx.List(
            [Block(cfg, is_moe=cfg.is_moe_layer(i), rngs=rngs) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # The head stays in high precision even with FP8 on (report §3.3.1).
        self.lm_head = (
            None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, cfg, rngs=rngs, quantize=False)
        )
        self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.num_nextn_predict_layers)])

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens (B, T) int -> (B, T, D)."""
        return jnp.take(self.embed_tokens[...], tokens, axis=0)

    def _head_weight(self) -> tuple[jax.Array, str]:
        """The head's matrix (D, V) and its matmul dtype: the embedding's transpose in float32 when tied, else
        lm_head's kernel in cfg.dtype (the head stays out of FP8, report §3.3.1)."""
        if self.lm_head is None:
            return self.embed_tokens[...].T, "float32"
        return self.lm_head.kernel[...], self.cfg.dtype

    def head(self, h_normed: jax.Array) -> jax.Array:
        """OutHead: normed hidden states (B, T, D) -> logits (B, T, V), float32."""
        return matmul(h_normed, *self._head_weight())

    def head_nll(self, h_normed: jax.Array, targets: jax.Array) -> jax.Array:
        """-log P(target) under the head's softmax, normed hidden states (B, T, D), targets (B, T) -> (B, T): the same
        numbers as token_nll(self.head(h_normed), targets), through the fused kernel that never stores the logits."""
        w, dtype = self._head_weight()
        return head_nll(h_normed, w, targets, dtype)

    def __call__(self, tokens: jax.Array, **kwargs) -> tuple[jax.Array, dict]:
        """tokens (B, T) -> logits (B, T, V) and aux; keyword arguments and aux as `features`."""
        h_normed, aux = self.features(tokens, **kwargs)
        return self.head(h_normed), aux  # (B, T, V)

    def features(
        self,
        tokens: jax.Array,
        *,
        targets: jax.Array | None = None,
        loss_mask: jax.Array | None = None,
        token_mask: jax.Array | None = None,
        offsets: jax.Array | None = None,
    ) -> tuple[jax.Array, dict]:
        """tokens (B, T) -> the final normed hidden states (B, T, D), the head's input, and aux.

        targets (B, T) (= tokens shifted by one) switch on the MTP modules; loss_mask (B, T) weights the targets
        (SFT scores responses only); token_mask (B, T) marks real tokens, padding is kept out of the expert loads.
        offsets (B,): left padding (RL rollouts), row b's tokens start at slot offsets[b] at position 0, and no token
        attends to the padding before it; the MTP modules do not take it (RL runs without them).
        aux: expert_load (L_moe, E) · mtp_expert_load (depths, E) · balance_loss () · mtp_loss () (Eq. 25 / λ).
        """
        slots = jnp.arange(tokens.shape[1])  # (T,)
        positions = slots if offsets is None else row_positions(slots, offsets)  # (T,) or (B, T)
        token_mask = jnp.ones(tokens.shape, jnp.float32) if token_mask is None else token_mask  # (B, T)
        h = self.embed(tokens)  # (B, T, D)
        loads, balance_loss = [], jnp.zeros((), jnp.float32)
        for layer in self.layers:
            h, load, bal = layer(h, positions, token_mask, offsets)  # (B, T, D), (1, E) or (0, E) if dense, ()
            loads.append(load)
            balance_loss += bal
        l_mtp, mtp_loads = jnp.zeros((), jnp.float32), jnp.zeros((0, self.cfg.n_routed_experts))  # (), (depths, E)
        if targets is not None and len(self.mtp) > 0:
            if offsets is not None:
                raise ValueError("the MTP modules take no left padding; call features without targets")
            loss_mask = jnp.ones(tokens.shape, jnp.float32) if loss_mask is None else loss_mask
            # head = identity: each depth's normed hidden states, scored through the fused head_nll
            mtp_normed, mtp_loads, mtp_balance = mtp_forward(
                self.mtp, h, tokens, positions, token_mask, self.embed, lambda x: x
            )
            l_mtp = mtp_loss(mtp_normed, targets, loss_mask, nll=self.head_nll)
            balance_loss += mtp_balance
        aux = {
            "expert_load": jnp.concatenate(loads),  # (L_moe, E)
            "mtp_expert_load": mtp_loads,  # (depths, E)
            "balance_loss": balance_loss,  # (), Eq. 17 summed over every MoE layer
            "mtp_loss": l_mtp,  # (), Eq. 25 before λ
        }
        return self.norm(h), aux  # (B, T, D)

    # -- generation from the compressed latent cache (notes §1.5) --------------------------------------------------

    def init_cache(self, batch: int, max_len: int) -> list[LatentCache]:
        """One latent cache per layer: (B, S, kv_lora_rank) + (B, S, qk_rope_head_dim) floats."""
        return [init_cache(self.cfg, batch, max_len) for _ in self.layers]

    def decode(
        self, tokens: jax.Array, caches: list[LatentCache], start: jax.Array, offsets: jax.Array | None = None
    ) -> tuple[jax.Array, list]:
        """tokens (B, T) in cache slots start..start+T-1 -> logits (B, T, V) and the updated caches. offsets (B,): left
        padding as in `features` (slot s of row b holds position s - offsets[b]); None: slot = position."""
        h, caches = self.decode_hidden(tokens, caches, start, offsets)  # (B, T, D)
        return self.head(self.norm(h)), caches

    def decode_hidden(
        self, tokens: jax.Array, caches: list[LatentCache], start: jax.Array, offsets: jax.Array | None = None
    ) -> tuple[jax.Array, list]:
        """As `decode`, but returns the last hidden state (B, T, D) before the final norm: the MTP module's input."""
        h = self.embed(tokens)  # (B, T, D)
        new_caches = []
        for layer, cache in zip(self.layers, caches, strict=True):
            h, cache = layer.decode(h, cache, start, offsets)  # (B, T, D)
            new_caches.append(cache)
        return h, new_caches


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-token NLL in nats over the positions where mask is 1. logits (B, T, V), targets and mask (B, T)."""
    return masked_mean(token_nll(logits, targets), mask)


def masked_mean(nll: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of nll (B, T) over the positions where mask (B, T) is 1."""
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def training_loss(model: Transformer, batch: dict, mtp_lambda: jax.Array) -> tuple[jax.Array, dict]:
    """L = L_main + λ·L_MTP (Eq. 25) + L_Bal (Eq. 17); returns (L, metrics with the expert loads)."""
    h_normed, aux = model.features(
        batch["inputs"], targets=batch["targets"], loss_mask=batch["loss_mask"], token_mask=batch["token_mask"]
    )
    main = masked_mean(model.head_nll(h_normed, batch["targets"]), batch["loss_mask"])  # no (B, T, V) logits kept
    loss = main + mtp_lambda * aux["mtp_loss"] + aux["balance_loss"]
    return loss, {"main_loss": main, "total_loss": loss, **aux}


def routers(model: Transformer) -> list[moe.Router]:
    """The routers in the order of aux's loads: main MoE layers, then the MTP blocks'."""
    blocks = [*model.layers, *(m.block for m in model.mtp)]
    return [b.mlp.gate for b in blocks if b.is_moe]


def update_router_biases(model: Transformer, expert_load: jax.Array, gamma: jax.Array) -> None:
    """The aux-loss-free bias update of every router (report §2.1.2), outside autodiff, once per optimizer step.

    expert_load (L_moe + depths, E): loads summed over all micro-batches of the step (rows as `routers`).
    """
    for router, load in zip(routers(model), expert_load, strict=True):
        router.e_score_correction_bias[...] = moe.update_router_bias(router.e_score_correction_bias[...], load, gamma)


def with_config(model: Transformer, cfg: ModelConfig) -> Transformer:
    """The same parameters under another config with the same shapes (context extension switches YaRN on).

    Why: a module keeps its config (RoPE frequencies and the softmax scale are read from it), and configs are frozen,
    so changing the context length means a new module graph around the same state."""
    fresh = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(fresh)
    return nnx.merge(graphdef, nnx.state(model))
