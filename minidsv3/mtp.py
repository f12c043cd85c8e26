"""Multi-token prediction (report §2.2, Eqs. 21-25).

How it works. Besides the next token, DeepSeek-V3 trains `num_nextn_predict_layers` sequential modules (depth 1 in V3); module k predicts the token k+1
places ahead of each position. Module k keeps the causal chain: it takes module k-1's representation of token i
(the main model's for k = 1), combines it with the embedding of token i+k (Eq. 21), runs one Transformer block over the
sequence (Eq. 22), and scores token i+k+1 through the *main model's* output head (Eq. 23). The embedding and the head
are shared with the main model; we pass them in at call time instead of holding references to the main model's
modules, so that the module tree stays a tree (one owner per parameter).

Index alignment, in 0-based arrays. `inputs[j]` is token t_{j+1} and `targets[j]` is t_{j+2}. Module k at position j:
    h'^k_j = M_k [RMSNorm(h^{k-1}_j); RMSNorm(Emb(inputs[j+k]))]         Eq. 21 (Emb(t_{i+k}) with i = j+1)
    logits = OutHead(h^k_j), scored against targets[j+k] = t_{j+k+2}   Eqs. 23-24 (t_{i+k+1})
The last k positions have no token to embed or to score; we keep arrays at full length T (static shapes) by shifting
left and padding, and give those slots zero loss weight. Causality makes the padding harmless: position j only ever
sees positions <= j, and every slot <= T-k-1 holds real data.

Choices. The loss of depth k is normalized by the count of scored tokens of the *whole* sequence (1/T for a
pre-training batch with no mask), as Eq. 24 writes, not by T-k. `mtp_loss` returns the mean over depths k of L^k_MTP;
`model.training_loss` multiplies it by λ (Eq. 25), which train.py takes from `schedules.mtp_lambda` at every step.

How it differs from production. NOTE: the concatenation order is [Emb; h] (embedding first), the layout of the
released weights (`eh_proj`, see notes §9 item 6) rather than Eq. 21's [h; Emb], so checkpoints map 1:1. Each module
has its own final RMSNorm before the shared head (the released `shared_head.norm`). h^0 is the main model's last
hidden state before its final norm (the report leaves this unspecified); `hnorm` normalizes it anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minidsv3.block import Block
from minidsv3.config import ModelConfig
from minidsv3.layers import Linear, RMSNorm, token_nll
from minidsv3.mla import LatentCache


def shift_left(x: jax.Array, k: int) -> jax.Array:
    """x (B, T, ...) -> (B, T, ...) with out[:, j] = x[:, j+k] and zeros in the last k slots."""
    pad = [(0, 0), (0, k)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x[:, k:], pad)


class MTPModule(nnx.Module):
    """One depth of MTP: enorm, hnorm, eh_proj (M_k), a Transformer block (TRM_k) and its own final norm."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.enorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, cfg, rngs=rngs)  # M_k ∈ R^{d×2d}, Eq. 21
        self.block = Block(cfg, is_moe=True, rngs=rngs)  # TRM_k, Eq. 22: a MoE layer, as released ([G] README_WEIGHTS)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)  # shared_head.norm of the released weights

    def __call__(
        self, h_prev: jax.Array, emb_ahead: jax.Array, positions: jax.Array, token_mask: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """h_prev (B, T, D) = h^{k-1}, emb_ahead (B, T, D) = Emb(t_{i+k}) -> (h^k, normed h^k, loads (1, E), balance ())."""
        both = jnp.concatenate([self.enorm(emb_ahead), self.hnorm(h_prev)], axis=-1)  # (B, T, 2D), [Emb; h]
        h, load, balance_loss = self.block(self.eh_proj(both), positions, token_mask)  # Eqs. 21-22: (B, T, D)
        return h, self.norm(h), load, balance_loss

    def decode(
        self, h_prev: jax.Array, emb_ahead: jax.Array, cache: LatentCache, start: jax.Array
    ) -> tuple[jax.Array, LatentCache]:
        """The same at positions start..start+T-1, attending through the block's own latent cache: h_prev (B, T, D),
        emb_ahead (B, T, D) -> normed h^k (B, T, D) (the head's input) and the cache. Speculative decoding drafts the
        token after next with it (minidsv3/generate.py, report §5.4.3)."""
        both = jnp.concatenate([self.enorm(emb_ahead), self.hnorm(h_prev)], axis=-1)  # (B, T, 2D), [Emb; h]
        h, cache = self.block.decode(self.eh_proj(both), cache, start)  # (B, T, D)
        return self.norm(h), cache


def mtp_forward(
    modules: nnx.List,
    h_main: jax.Array,
    inputs: jax.Array,
    positions: jax.Array,
    token_mask: jax.Array,
    embed,
    head,
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """Run the modules in sequence, depth k = 1, 2, ...: the logits of each depth (B, T, V), where depth k's row j
    predicts targets[j+k], the MTP blocks' expert loads (depths, E) and their summed balance loss.

    h_main (B, T, D): the main model's last hidden state; inputs (B, T); `embed` maps tokens to (B, T, D) and `head`
    maps normed hidden states to logits (B, T, V): the main model's own (the model's training loss passes the
    identity, to score the normed states through its fused head + cross-entropy).
    """
    h, all_logits, loads, balance = h_main, [], [], jnp.zeros((), jnp.float32)
    for k, module in enumerate(modules, start=1):
        tmask_k = shift_left(token_mask, k)  # (B, T): padding and the k tail slots route nothing into the loads
        h, h_normed, load, bal = module(h, embed(shift_left(inputs, k)), positions, tmask_k)  # (B, T, D)
        all_logits.append(head(h_normed))  # (B, T, V), Eq. 23
        loads.append(load)
        balance += bal
    return all_logits, jnp.concatenate(loads), balance  # [(B, T, V)], (depths, E), ()


def mtp_loss(all_logits: list[jax.Array], targets: jax.Array, loss_mask: jax.Array, nll=token_nll) -> jax.Array:
    """The mean over depths k of L^k_MTP (Eqs. 24-25 without λ). all_logits: one (B, T, V) per depth; targets,
    loss_mask (B, T).

    `nll` maps depth k's output and its targets (B, T) to -log P (B, T); the model passes its fused `head_nll` with
    each depth's normed hidden states (B, T, D) in place of the logits."""
    total = jnp.zeros((), jnp.float32)
    denom = jnp.maximum(loss_mask.sum(), 1.0)  # scored tokens of the whole sequence: the 1/T of Eq. 24
    for k, out in enumerate(all_logits, start=1):
        nll_k = nll(out, shift_left(targets, k))  # (B, T)
        total += (nll_k * shift_left(loss_mask, k)).sum() / denom  # Eq. 24, zero where t_{i+k+1} is off the end
    return total / max(len(all_logits), 1)  # Eq. 25 without λ
