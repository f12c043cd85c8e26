"""DeepSeekMoE with auxiliary-loss-free load balancing: report §2.1.2, Eqs. 12-20 (notes §2).

Read in this order: `MoE` (Eq. 12), `experts_loop` (the routed sum as a loop, by definition), `Router` (Eqs. 13-16),
then the balance: `update_router_bias` ([LF]), `sequence_balance_loss` (Eqs. 17-20), `max_violation`. The fast jitted
form of the loop is `minidsv3/dispatch.py`. Shapes follow the package's legend (README.md): B batch · T positions ·
N = B·T tokens · D hidden_size · E routed experts · K experts per token · G expert groups · F moe_intermediate_size.

How it works
------------
Each token u_t goes through one always-on shared expert and K of E small routed SwiGLU experts (Eq. 12). The
router scores every expert with a sigmoid affinity s_{i,t} = σ(u_tᵀ e_i) (Eq. 15), picks K of them, and weights each
chosen expert's output by its affinity renormalized over the chosen K (Eq. 13), times `routed_scaling_factor`.

A router left alone collapses: a few experts win early, get trained more, and win more. DeepSeek-V2 fought this with
auxiliary losses that pull the router toward balance, at the price of a gradient that fights the language-model loss.
V3 balances without that gradient ([LF]): each expert carries a bias b_i that is added to its score *only to choose*
(Eq. 16), never to weight the output. After every optimizer step the bias of an overloaded expert drops by γ and that
of an underloaded one rises by γ (`update_router_bias`, [LF] Algorithm 1). The bias is state, not a parameter: it
lives in `RouterBias`, outside the gradient and the optimizer, and inside checkpoints. Since it only reorders the
competition, the model's function is changed only through *which* experts run, and the LM loss stays the sole
gradient on the router weights, apart from a tiny (α = 1e-4) sequence-wise balance loss (Eqs. 17-20) that guards
against one sequence sending all its tokens to the same few experts.

Routing is group-limited (notes §2.2, following the released code [G]): the E experts are split into G groups (one per
node in production), each group is scored by the sum of its two highest *biased* scores, only the best `topk_group`
groups stay eligible, and the top-K is taken among their experts. That bounds how many nodes a token's activations
are sent to.

Choices made here
-----------------
- Routing follows [G] exactly (notes §9): top-2-sum group scores over biased scores, dropped groups masked with −inf
  (HF's 0.0 would let a dropped group win once biases go negative), gates from the unbiased scores.
- The router runs in float32 at HIGHEST matmul precision (no TF32 on GPUs, never FP8): the report keeps the gating
  module in high precision (§3.3), and a sigmoid's small differences decide the top-K.
- No token is ever dropped (§2.1.2): `dispatch` gives every (token, expert) assignment a row, whatever the routing.
- The load counted for the bias update is the number of (token, expert) assignments per expert over the valid
  (unpadded) tokens of the batch; the train step sums it over micro-batches and applies one update per optimizer
  step.

How it differs from production
------------------------------
DeepSeek spreads 256 experts over 64 GPUs with expert parallelism, all-to-all dispatch over NVLink/InfiniBand and
custom kernels (DeepEP, DeepGEMM); we run the experts with two gathers and three batched matmuls, on one device or,
on a mesh with an 'expert' axis, spread over it with fixed-size all-to-alls (minidsv3/expert_parallel.py). The
report does not publish its training-time router code (the released one is inference-only, notes §2.2), so the bias
update here is [LF]'s Algorithm 1 as the report describes it, with γ and its freeze schedule from TrainConfig.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange, repeat
from flax import nnx

from minidsv3 import expert_parallel
from minidsv3.config import ModelConfig
from minidsv3.dispatch import dispatch
from minidsv3.layers import MLP, linear, normal_init, swiglu


class MoE(nnx.Module):
    """DeepSeekMoE layer: shared experts + gated routed experts (Eq. 12, without the residual u_t the Block adds)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.gate = Router(cfg, rngs=rngs)  # Eqs. 13-16
        self.experts = RoutedExperts(cfg, rngs=rngs)  # FFN_i^(r), i = 1..N_r
        # The N_s shared experts are summed, so they are one MLP of N_s times the width (as [G] builds them).
        self.shared_experts = (
            MLP(cfg, cfg.n_shared_experts * cfg.moe_intermediate_size, rngs=rngs) if cfg.n_shared_experts > 0 else None
        )  # Σ FFN_i^(s)
        self.cfg = cfg

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, T, D), token_mask (B, T) (0 = padding) -> y (B, T, D), load (E,) float32, balance_loss ().

        Padding tokens are routed and computed like any other (shapes stay static); they are only left out of the
        load and the balance loss.
        """
        b, t, _ = x.shape
        cfg = self.cfg
        tokens = rearrange(x, "b t d -> (b t) d")  # (N, D)
        topk_idx, gates, scores = self.gate(tokens)  # (N, K), (N, K), (N, E)
        mesh = jax.sharding.get_abstract_mesh()  # the devices `jax.set_mesh` put in use (none: one device)
        if expert_parallel.applies(mesh, tokens.shape[0]):  # experts split over the mesh: all-to-all exchange
            y = expert_parallel.dispatch(tokens, topk_idx, gates, self.experts, cfg, mesh)  # (N, D)
        else:
            y = dispatch(tokens, topk_idx, gates, self.experts, cfg)  # (N, D): experts_loop's sum, jitted
        if self.shared_experts is not None:
            y = y + self.shared_experts(tokens)  # (N, D) Eq. 12
        valid = jnp.ones((b, t), jnp.float32) if token_mask is None else (token_mask != 0).astype(jnp.float32)  # (B, T)
        load = expert_load(topk_idx, rearrange(valid, "b t -> (b t)"), cfg.n_routed_experts)  # (E,)
        balance_loss = sequence_balance_loss(
            rearrange(scores, "(b t) e -> b t e", b=b),  # (B, T, E)
            rearrange(topk_idx, "(b t) k -> b t k", b=b),  # (B, T, K)
            cfg,
            valid,
        )
        return rearrange(y, "(b t) d -> b t d", b=b), load, balance_loss


class RoutedExperts(nnx.Module):
    """E SwiGLU experts FFN_i^(r) of Eq. 12, their weights stacked on a leading expert axis for grouped matmuls."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, d, f, std = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.initializer_range
        self.gate_proj = nnx.Param(normal_init(rngs, (e, d, f), std))  # W1 per expert (E, D, F)
        self.up_proj = nnx.Param(normal_init(rngs, (e, d, f), std))  # W3 per expert (E, D, F)
        self.down_proj = nnx.Param(normal_init(rngs, (e, f, d), std))  # W2 per expert (E, F, D)


def experts_loop(
    x: jax.Array, topk_idx: jax.Array, gates: jax.Array, experts: RoutedExperts, cfg: ModelConfig
) -> jax.Array:
    """x (N, D), topk_idx (N, K), gates (N, K) -> Σ_k g_k FFN_k^(r)(x) (N, D): the routed sum of Eq. 12, one expert at
    a time, as DeepSeek's inference code writes it ([G] `MoE.forward`): each expert takes the tokens routed to it, and
    its output is added to theirs, weighted by the gate.

    Eager only: how many tokens an expert gets is data, and jit needs static shapes. `dispatch` computes the same sum
    under jit, and the tests hold the two equal (values and gradients)."""
    idx = np.asarray(topk_idx)  # (N, K) on the host, to find each expert's tokens
    y = jnp.zeros(x.shape, jnp.float32)  # (N, D)
    for i in range(cfg.n_routed_experts):
        tokens, slots = (idx == i).nonzero()  # (n_i,), (n_i,): the tokens routed to expert i, and in which slot of K
        if tokens.size == 0:
            continue
        w1, w3, w2 = experts.gate_proj[i], experts.up_proj[i], experts.down_proj[i]  # (D, F), (D, F), (F, D)
        out = _expert_ffn(x[tokens], w1, w3, w2, cfg)  # (n_i, D) FFN_i^(r)(u_t)
        y = y.at[tokens].add(gates[tokens, slots][:, None] * out)  # (N, D) += g_{i,t} FFN_i^(r)(u_t)
    return y


@partial(jax.jit, static_argnames="cfg")
def _expert_ffn(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, cfg: ModelConfig) -> jax.Array:
    """One SwiGLU expert: x (n_i, D) -> (n_i, D), FP8 when cfg.fp8 (as a Linear would be)."""
    return swiglu(x, *(partial(linear, w=w, cfg=cfg) for w in (w1, w3, w2)))  # (n_i, F) -> (n_i, D)


class RouterBias(nnx.Variable):
    """The per-expert routing bias b_i of Eq. 16 (`e_score_correction_bias` in DeepSeek's checkpoints), float32 (E,).

    Not an `nnx.Param`: it gets no gradient and no optimizer state (`nnx.Optimizer(model, tx, wrt=nnx.Param)` skips
    it). It changes only through `update_router_bias`, once per optimizer step, and is still part of
    `nnx.state(model)`, so checkpoints carry it.
    """


class Router(nnx.Module):
    """Sigmoid affinities (Eq. 15), group-limited top-K on biased scores (Eq. 16), normalized gates (Eq. 13)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, d = cfg.n_routed_experts, cfg.hidden_size
        self.weight = nnx.Param(normal_init(rngs, (e, d), cfg.initializer_range))  # centroids e_i (E, D), Eq. 15
        self.e_score_correction_bias = RouterBias(jnp.zeros((e,), jnp.float32))  # b_i (E,), Eq. 16
        self.cfg = cfg

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (N, D) -> topk_idx (N, K) int32, gates (N, K) float32, scores (N, E) float32."""
        logits = jnp.einsum(
            "nd,ed->ne", x.astype(jnp.float32), self.weight[...], precision=jax.lax.Precision.HIGHEST
        )  # (N, E) u_tᵀ e_i
        scores = jax.nn.sigmoid(logits)  # (N, E) s_{i,t}, Eq. 15
        topk_idx = select_experts(scores, self.e_score_correction_bias[...], self.cfg)  # (N, K)
        gates = gate_values(scores, topk_idx, self.cfg)  # (N, K)
        return topk_idx, gates, scores


def group_scores(biased: jax.Array, n_group: int) -> jax.Array:
    """biased (N, E) -> (N, G): each group's sum of its two highest biased scores (notes §2.2; [R]'s K_r/M = 8/4 = 2).

    A group of a single expert is scored by that expert alone.
    """
    grouped = rearrange(biased, "n (g e) -> n g e", g=n_group)  # (N, G, E/G)
    top2, _ = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))  # (N, G, 2)
    return top2.sum(axis=-1)  # (N, G)


def select_experts(scores: jax.Array, bias: jax.Array, cfg: ModelConfig) -> jax.Array:
    """scores (N, E), bias (E,) -> topk_idx (N, K) int32: group-limited top-K over s + b (Eq. 16, notes §2.2).

    The selection is a discrete choice: no gradient flows through it, and none reaches the bias.
    """
    biased = jax.lax.stop_gradient(scores) + jax.lax.stop_gradient(bias)  # (N, E) s_{i,t} + b_i, for choosing only
    _, kept = jax.lax.top_k(group_scores(biased, cfg.n_group), cfg.topk_group)  # (N, topk_group)
    group_kept = jax.nn.one_hot(kept, cfg.n_group, dtype=jnp.bool_).any(axis=-2)  # (N, G)
    expert_kept = repeat(group_kept, "n g -> n (g e)", e=cfg.n_routed_experts // cfg.n_group)  # (N, E)
    # −inf, not 0: with negative biases a 0 would beat every kept expert whose biased score is below 0 ([G] 1398800)
    masked = jnp.where(expert_kept, biased, -jnp.inf)  # (N, E)
    _, topk_idx = jax.lax.top_k(masked, cfg.num_experts_per_tok)  # (N, K)
    return topk_idx.astype(jnp.int32)


def gate_values(scores: jax.Array, topk_idx: jax.Array, cfg: ModelConfig) -> jax.Array:
    """scores (N, E), topk_idx (N, K) -> gates (N, K): unbiased s at the chosen experts (Eq. 16), renormalized over
    them (Eq. 13), times routed_scaling_factor (notes §2.2). Differentiable w.r.t. the scores."""
    gates = jnp.take_along_axis(scores, topk_idx, axis=-1)  # (N, K) g'_{i,t}, Eq. 16
    if cfg.norm_topk_prob:
        gates = gates / (gates.sum(axis=-1, keepdims=True) + 1e-20)  # (N, K) Eq. 13; 1e-20 as [HFt], if all underflow
    return gates * cfg.routed_scaling_factor  # (N, K)


def expert_load(topk_idx: jax.Array, valid: jax.Array, n_experts: int) -> jax.Array:
    """topk_idx (N, K), valid (N,) -> (E,) float32: (token, expert) assignments per expert over valid tokens."""
    weights = repeat(valid.astype(jnp.float32), "n -> (n k)", k=topk_idx.shape[-1])  # (N*K,)
    return jnp.bincount(rearrange(topk_idx, "n k -> (n k)"), weights=weights, length=n_experts)  # (E,)


def sequence_balance_loss(
    scores: jax.Array, topk_idx: jax.Array, cfg: ModelConfig, token_mask: jax.Array | None = None
) -> jax.Array:
    """scores (B, T, E), topk_idx (B, T, K) -> α Σ_i f_i P_i per sequence, averaged over sequences (Eqs. 17-20).

    T of Eqs. 18 and 20 is the number of valid tokens of each sequence; sequences with none are left out of the
    average. Perfect balance gives Σ_i f_i P_i = 1 (every f_i = 1, Σ_i P_i = 1), so the loss is about α at its minimum.
    """
    b, t, e = scores.shape
    k = topk_idx.shape[-1]
    valid = jnp.ones((b, t), jnp.float32) if token_mask is None else (token_mask != 0).astype(jnp.float32)  # (B, T)
    n_valid = valid.sum(axis=-1)  # (B,) T of Eqs. 18, 20
    denom = jnp.maximum(n_valid, 1.0)[:, None]  # (B, 1)
    # NOTE: Eq. 18 writes f_i with the Topk of the *unbiased* s; we count the actual routing decision (biased,
    # group-limited), which the caller passes as topk_idx. The report leaves this open (notes §2.4); the loss exists to
    # curb imbalance within a sequence, and the imbalance that costs is the one the tokens are really routed with.
    chosen = jax.nn.one_hot(topk_idx, e, dtype=jnp.float32).sum(axis=-2)  # (B, T, E) 1(expert i chosen for t)
    f = e / (k * denom) * jnp.einsum("bte,bt->be", chosen, valid)  # (B, E) Eq. 18; no gradient (a count)
    s_norm = scores / scores.sum(axis=-1, keepdims=True)  # (B, T, E) s'_{i,t}, Eq. 19: over all routed experts
    p = jnp.einsum("bte,bt->be", s_norm, valid) / denom  # (B, E) P_i, Eq. 20
    per_sequence = cfg.aux_loss_alpha * jnp.einsum("be,be->b", f, p)  # (B,) L_Bal, Eq. 17
    has_tokens = (n_valid > 0).astype(jnp.float32)  # (B,)
    return (per_sequence * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)  # ()


def update_router_bias(bias: jax.Array, load: jax.Array, gamma: float) -> jax.Array:
    """bias (E,), load (E,) -> (E,): b_i <- b_i + γ·sign(mean(load) − load_i) ([LF] Algorithm 1, report §2.1.2).

    Overloaded experts (above the mean) lose γ, underloaded ones gain γ, exactly balanced ones stay. Called by the
    train step once per optimizer step, after the optimizer update and outside autodiff.
    """
    return bias + gamma * jnp.sign(load.mean(axis=-1, keepdims=True) - load)  # (E,)


def max_violation(load: jax.Array) -> jax.Array:
    """load (..., E) -> (...): MaxVio = (max_i load_i − mean load) / mean load ([LF] Eq. 4); 0 is perfect balance."""
    mean = load.mean(axis=-1)  # (...)
    return (load.max(axis=-1) - mean) / mean  # (...)
