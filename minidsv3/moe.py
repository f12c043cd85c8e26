"""DeepSeekMoE with auxiliary-loss-free load balancing: report §2.1.2, Eqs. 12-20 (notes §2).

Shape legend: B batch · T positions · D hidden_size · E routed experts · K experts per token · G groups ·
N flattened tokens · F moe_intermediate_size.

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
- Dispatch places the N·K (token, expert) assignments in one buffer per expert when a static capacity (1.25x or 2x
  the average load) holds the busiest expert, else in blocks of rows padded per expert, and runs three batched
  matmuls: every expert sees exactly the tokens routed to it, and no token is ever dropped (§2.1.2).
- The load counted for the bias update is the number of (token, expert) assignments per expert over the valid
  (unpadded) tokens of the batch; the train step sums it over micro-batches and applies one update per optimizer
  step.

How it differs from production
------------------------------
DeepSeek spreads 256 experts over 64 GPUs with expert parallelism, all-to-all dispatch over NVLink/InfiniBand and
custom kernels (DeepEP, DeepGEMM); we run all experts on one device with two gathers and three batched matmuls. The report
does not publish its training-time router code (the released one is inference-only, notes §2.2), so the bias update
here is [LF]'s Algorithm 1 as the report describes it, with γ and its freeze schedule from TrainConfig.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from einops import rearrange, repeat
from flax import nnx

from minidsv3 import fp8
from minidsv3.config import ModelConfig
from minidsv3.layers import MLP, grouped_matmul, linear, normal_init, swiglu


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


class RoutedExperts(nnx.Module):
    """E SwiGLU experts FFN_i^(r) of Eq. 12, their weights stacked on a leading expert axis for grouped matmuls."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, d, f, std = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.initializer_range
        self.gate_proj = nnx.Param(normal_init(rngs, (e, d, f), std))  # W1 per expert (E, D, F)
        self.up_proj = nnx.Param(normal_init(rngs, (e, d, f), std))  # W3 per expert (E, D, F)
        self.down_proj = nnx.Param(normal_init(rngs, (e, f, d), std))  # W2 per expert (E, F, D)


CAPACITY_FACTORS = (1.25, 2.0)  # the expert capacities tried, x the average load, before the block layout


def capacities(n_tokens: int, k: int, n_experts: int) -> list[int]:
    """The static expert capacities `dispatch` tries, ascending: CAPACITY_FACTORS x the average load N·K/E rounded up
    to a multiple of 8 (at most N: top-K picks K distinct experts, so no expert ever gets more than N rows)."""
    average = n_tokens * k / n_experts
    return sorted({min(n_tokens, 8 * math.ceil(f * average / 8)) for f in CAPACITY_FACTORS})


def block_size(n_assignments: int, n_experts: int) -> int:
    """Rows per block of the block layout: a power of two near a quarter of an expert's average share, in [8, 128].

    Smaller blocks waste less padding (at most E·(block-1) rows), larger ones make better matmuls."""
    target = max(n_assignments // (4 * n_experts), 1)
    return int(min(128, max(8, 2 ** math.floor(math.log2(target)))))


def dispatch(
    x: jax.Array, topk_idx: jax.Array, gates: jax.Array, experts: RoutedExperts, cfg: ModelConfig
) -> jax.Array:
    """x (N, D), topk_idx (N, K), gates (N, K) -> Σ_k g_k FFN_k^(r)(x) (N, D) float32, the routed sum of Eq. 12.

    Every (token, expert) assignment gets one row of a buffer cut into groups of rows that each belong to one expert;
    each group runs through its expert's weights as one batched matmul `(groups, rows, D) @ (groups, D, F)`. Two
    layouts of that buffer, both dropless (report §2.1.2: no token is ever dropped):

    - capacity: one group of C rows per expert, the a-th token routed to expert e at row a of e's group, and the
      weights used in place, `(E, C, D) @ (E, D, F)`. C is static (shapes are fixed under jit), so it must hold the
      busiest expert: 1.25x or 2x the average load (`capacities`), whichever is the smallest that does.
    - blocks, when even 2x is too small (early training, before the bias update has balanced the routers): the
      assignments of each expert fill whole blocks of `block_size` rows, at most E·(block-1) of them padding, and
      each block multiplies its own gathered copy of its expert's weights (the layout of MegaBlocks, Gale et al.
      2022). Any routing fits.

    `lax.switch` picks the layout at run time from the batch's largest load; only that branch runs.
    Measured on a 2-core CPU, tiny dims (8 x 256 tokens, D 256, E 16, K 2, F 128), float32 forward + backward: 27 ms
    at 1.25x, 54 ms at 2x and 68 ms in blocks (copying the weights per block and scatter-adding their gradients cost
    more than the matmuls). NOTE: `jax.lax.ragged_dot` expresses the same grouped GEMM, but XLA's CPU backend lowers
    it to a masked matmul against every expert (E times the work).
    """
    n, k = topk_idx.shape
    e = cfg.n_routed_experts
    flat_expert = rearrange(topk_idx, "n k -> (n k)")  # (N*K,) assignment a = n*K + k goes to expert flat_expert[a]
    chosen = jax.nn.one_hot(flat_expert, e, dtype=jnp.int32)  # (N*K, E)
    rank = jnp.sum((jnp.cumsum(chosen, axis=0) - chosen) * chosen, axis=-1)  # (N*K,) earlier rows of the same expert
    sizes = chosen.sum(axis=0)  # (E,) the loads of this batch
    weights = (experts.gate_proj[...], experts.up_proj[...], experts.down_proj[...])  # (E, D, F), (E, D, F), (E, F, D)
    caps = capacities(n, k, e)
    layouts = [partial(_capacity_layout, capacity=c) for c in caps] + [_block_layout]
    # Each branch is rematerialized in the backward pass (jax.checkpoint): differentiating a switch otherwise makes
    # every branch return the saved activations of all branches, zero-filled, and writing those zeros cost more than
    # the experts themselves (tiny dims, float32: 109 ms instead of 45 forward + backward).
    branches = [
        jax.checkpoint(lambda x, g, w, fe, r, sz, layout=layout: _run_experts(x, g, w, *layout(fe, r, sz, w), cfg))
        for layout in layouts
    ]
    level = jnp.sum(sizes.max() > jnp.asarray(caps))  # () the first layout that holds the busiest expert
    return jax.lax.switch(level, branches, x, gates, weights, flat_expert, rank, sizes)


def _capacity_layout(flat_expert, rank, sizes, weights, *, capacity: int):
    """Row of each assignment (N*K,), rows per group, and the weights of each group: one group of `capacity` rows per
    expert, which must hold its load."""
    return flat_expert * capacity + rank, capacity, weights


def _block_layout(flat_expert, rank, sizes, weights):
    """Row of each assignment (N*K,), rows per group, and the weights of each group: blocks of C rows, each expert's
    rows padded up to whole blocks, so any routing fits in (N*K + E*(C-1)) // C blocks."""
    e = sizes.shape[0]
    c = block_size(flat_expert.shape[0], e)
    n_blocks = (flat_expert.shape[0] + e * (c - 1)) // c  # static bound on the blocks any routing can need
    padded = (sizes + c - 1) // c * c  # (E,) rows per expert, rounded up to whole blocks
    start = jnp.cumsum(padded) - padded  # (E,) first row of each expert
    block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_blocks) * c, side="right")  # (blocks,)
    block_expert = jnp.minimum(block_expert, e - 1)  # unused tail blocks borrow the last expert (their rows are 0)
    return start[flat_expert] + rank, c, tuple(w[block_expert] for w in weights)  # weights (blocks, in, out)


def _run_experts(x, gates, weights, slot, rows, group_weights, cfg: ModelConfig) -> jax.Array:
    """x (N, D), gates (N, K), slot (N*K,): each assignment's row in a buffer of groups of `rows` rows, group_weights
    (G, D, F), (G, D, F), (G, F, D) for each group -> Σ_k g_k FFN_k(x) (N, D)."""
    n, k = gates.shape
    n_rows = group_weights[0].shape[0] * rows
    empty = jnp.full((n_rows,), n * k, jnp.int32)  # N*K marks an unused row
    assignment_of_row = empty.at[slot].set(jnp.arange(n * k, dtype=jnp.int32))  # (G*R,)
    token_of_row = jnp.where(assignment_of_row < n * k, assignment_of_row // k, n)  # (G*R,) N = unused row
    x_buf = gather_rows(x, token_of_row, rearrange(slot, "(n k) -> n k", k=k))  # (G*R, D), zero rows unused
    x_buf = rearrange(x_buf, "(g r) d -> g r d", r=rows)  # (G, R, D)

    def expert_matmul(a: jax.Array, w: jax.Array) -> jax.Array:  # (G, R, in), (G, in, out) -> (G, R, out)
        if cfg.fp8:  # the report runs the expert GEMMs in FP8 too (§3.3)
            return jax.vmap(lambda ag, wg: fp8.fp8_matmul(ag, wg, cfg))(a, w)
        return grouped_matmul(a.astype(jnp.float32), w, cfg.dtype)

    w1, w3, w2 = group_weights
    out = swiglu(x_buf, *(partial(expert_matmul, w=w) for w in (w1, w3, w2)))  # (G, R, D) FFN^(r)(x), via (G, R, F)
    out = rearrange(out, "g r d -> (g r) d")  # (G*R, D) per used row
    out = gather_rows(out, slot, assignment_of_row[:, None])  # (N*K, D) back in (token, slot) order
    out = rearrange(out, "(n k) d -> n k d", k=k)  # (N, K, D)
    return jnp.einsum("nkd,nk->nd", out, gates.astype(jnp.float32))  # (N, D) Σ_k g_{k,t} FFN_k(u_t), Eq. 12


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """y[i] = x[index[i]], zero where index[i] = len(x): x (R, D), index (S,) -> y (S, D).

    `inverse` (R, J) lists the rows of y that read each row of x (len(y) pads a short list), so the gradient
    dx[r] = Σ_j dy[inverse[r, j]] is a gather too. Plain autodiff would scatter-add dy into dx: XLA's CPU backend runs
    scatters one row at a time, and on GPUs a scatter-add sums in whatever order its atomics land (not
    deterministic); the permutations of `dispatch` know their inverses, so neither is needed."""
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x, index, inverse):
    return gather_rows(x, index, inverse), inverse


def _gather_rows_bwd(inverse, dy):
    dx = jnp.take(dy, inverse, axis=0, mode="fill", fill_value=0).sum(axis=1)  # (R, D)
    return dx, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@partial(jax.jit, static_argnames="cfg")
def _expert_ffn(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, cfg: ModelConfig) -> jax.Array:
    """One SwiGLU expert on the tokens routed to it: x (M, D) -> (M, D), FP8 when cfg.fp8 (as a Linear would be)."""
    return swiglu(x, *(partial(linear, w=w, cfg=cfg) for w in (w1, w3, w2)))  # (M, F) -> (M, D)


def dispatch_reference(
    x: jax.Array, topk_idx: jax.Array, gates: jax.Array, experts: RoutedExperts, cfg: ModelConfig
) -> jax.Array:
    """The same sum as `dispatch`, one expert at a time in a Python loop (eager only): the tests' reference."""
    idx = jax.device_get(topk_idx)  # (N, K) numpy, to find each expert's tokens on the host
    y = jnp.zeros(x.shape, jnp.float32)  # (N, D)
    for i in range(cfg.n_routed_experts):
        rows, slots = (idx == i).nonzero()  # (M_i,), (M_i,) the tokens routed to expert i and in which slot
        if rows.size == 0:
            continue
        out = _expert_ffn(x[rows], experts.gate_proj[i], experts.up_proj[i], experts.down_proj[i], cfg)  # (M_i, D)
        y = y.at[rows].add(gates[rows, slots][:, None] * out)  # (N, D)
    return y


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
        y = dispatch(tokens, topk_idx, gates, self.experts, cfg)  # (N, D)
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
