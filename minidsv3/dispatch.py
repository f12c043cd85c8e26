"""Fast dropless expert dispatch: the routed sum of Eq. 12 as a few batched matmuls (report §2.1.2).

`moe.experts_loop` is the definition: each expert takes the tokens routed to it, and its output is added to theirs,
weighted by the gate. A loop over E experts with data-dependent sizes cannot be jitted and runs E small matmuls, so
`dispatch` computes the same sum with static shapes: every (token, expert) assignment gets one row of a buffer cut
into J groups of M rows, each group belonging to one expert, and all groups go through their experts at once as
`(J, M, D) @ (J, D, F)`. No assignment is ever dropped (§2.1.2: "no token-dropping").

Shapes follow the package's legend (README.md): N tokens · K experts per token · E routed experts · D hidden_size · F
moe_intermediate_size · A = N·K assignments · J groups of rows · M rows per group.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from einops import rearrange

from minidsv3 import fp8
from minidsv3.config import ModelConfig
from minidsv3.layers import grouped_matmul, swiglu

CAPACITY_FACTORS = (1.25, 2.0)  # the expert capacities tried, x the average load, before the block layout


def dispatch(x: jax.Array, topk_idx: jax.Array, gates: jax.Array, experts, cfg: ModelConfig) -> jax.Array:
    """x (N, D), topk_idx (N, K), gates (N, K) -> Σ_k g_k FFN_k^(r)(x) (N, D) float32: `moe.experts_loop`'s sum.

    Assignment a = n·K + k sends token n to expert `flat_expert[a]`; `rank[a]` counts the earlier assignments to the
    same expert. Two layouts place the assignments in rows, both dropless:

    - capacity: one group of M rows per expert (J = E), assignment a at row `flat_expert[a]·M + rank[a]`, and the
      expert weights used in place. M is static under jit, so it must hold the busiest expert: 1.25x or 2x the
      average load (`capacities`), the smallest that does.
    - blocks, when even 2x is too small (early training, before the bias update has balanced the routers): each
      expert's assignments fill whole blocks of M rows, at most E·(M-1) rows of them padding, and each block
      multiplies its own gathered copy of its expert's weights (the layout of MegaBlocks, arXiv:2211.15841). Any
      routing fits.

    Worked example: N = 3 tokens, K = 2, E = 3, topk_idx = [[0, 2], [2, 1], [0, 2]].
        flat_expert    = [0, 2, 2, 1, 0, 2]    assignments a = 0..5 (token a // K)
        rank           = [0, 0, 1, 0, 1, 2]    loads (sizes) = [2, 1, 3]
    capacity M = 3 (J = 3 groups, 9 rows; · = an unused row, read as a zero token):
        row            = [0, 6, 7, 3, 1, 8]    flat_expert·M + rank
        token_of_row   = [0, 2, ·, 1, ·, ·, 0, 1, 2]
    blocks of M = 2 (the loads padded to [2, 2, 4], so experts start at rows [0, 2, 4]; J = (6 + 3·1) // 2 = 4):
        row            = [0, 4, 5, 2, 1, 6]    start[flat_expert] + rank
        token_of_row   = [0, 2, 1, ·, 0, 1, 2, ·]
        block_expert   = [0, 1, 2, 2]          the expert of each block of 2 rows

    `lax.switch` picks the layout at run time from the batch's largest load; only that branch runs. Measured on a
    2-core CPU, tiny dims (8 x 256 tokens, D 256, E 16, K 2, F 128), float32 forward + backward: 27 ms at 1.25x,
    54 ms at 2x and 68 ms in blocks (copying the weights per block and summing their gradients cost more than the
    matmuls). NOTE: `jax.lax.ragged_dot` expresses the same grouped GEMM, but XLA's CPU backend lowers it to a masked
    matmul against every expert (E times the work).
    """
    n, k = topk_idx.shape
    e = cfg.n_routed_experts
    flat_expert = rearrange(topk_idx, "n k -> (n k)")  # (A,)
    chosen = jax.nn.one_hot(flat_expert, e, dtype=jnp.int32)  # (A, E)
    rank = jnp.sum((jnp.cumsum(chosen, axis=0) - chosen) * chosen, axis=-1)  # (A,) earlier rows of the same expert
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


def capacities(n_tokens: int, k: int, n_experts: int) -> list[int]:
    """The static expert capacities `dispatch` tries, ascending: CAPACITY_FACTORS x the average load N·K/E rounded up
    to a multiple of 8 (at most N: top-K picks K distinct experts, so no expert ever gets more than N rows)."""
    average = n_tokens * k / n_experts
    return sorted({min(n_tokens, 8 * math.ceil(f * average / 8)) for f in CAPACITY_FACTORS})


def block_size(n_assignments: int, n_experts: int) -> int:
    """Rows per block of the block layout: a power of two near a quarter of an expert's average share, in [8, 128].

    Smaller blocks waste less padding (at most E·(M-1) rows), larger ones make better matmuls."""
    target = max(n_assignments // (4 * n_experts), 1)
    return int(min(128, max(8, 2 ** math.floor(math.log2(target)))))


def _capacity_layout(flat_expert, rank, sizes, weights, *, capacity: int):
    """The row of each assignment (A,), M, and the weights of each group: one group of `capacity` rows per expert."""
    return flat_expert * capacity + rank, capacity, weights


def _block_layout(flat_expert, rank, sizes, weights):
    """The row of each assignment (A,), M, and the weights of each group: blocks of M rows, each expert's rows padded
    up to whole blocks, so any routing fits in (A + E·(M-1)) // M blocks."""
    e = sizes.shape[0]
    m = block_size(flat_expert.shape[0], e)
    n_blocks = (flat_expert.shape[0] + e * (m - 1)) // m  # J: a static bound on the blocks any routing can need
    padded = (sizes + m - 1) // m * m  # (E,) rows per expert, rounded up to whole blocks
    start = jnp.cumsum(padded) - padded  # (E,) first row of each expert
    block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_blocks) * m, side="right")  # (J,)
    block_expert = jnp.minimum(block_expert, e - 1)  # unused tail blocks borrow the last expert (their rows are 0)
    return start[flat_expert] + rank, m, tuple(w[block_expert] for w in weights)  # weights (J, in, out)


def _run_experts(x, gates, weights, row, m, group_weights, cfg: ModelConfig) -> jax.Array:
    """x (N, D), gates (N, K), row (A,): each assignment's row in a buffer of J groups of m rows, group_weights
    (J, D, F), (J, D, F), (J, F, D) -> Σ_k g_k FFN_k(x) (N, D)."""
    n, k = gates.shape
    n_rows = group_weights[0].shape[0] * m
    unused = jnp.full((n_rows,), n * k, jnp.int32)  # A marks an unused row
    assignment_of_row = unused.at[row].set(jnp.arange(n * k, dtype=jnp.int32))  # (J·M,)
    token_of_row = jnp.where(assignment_of_row < n * k, assignment_of_row // k, n)  # (J·M,) N = unused row
    x_buf = gather_rows(x, token_of_row, rearrange(row, "(n k) -> n k", k=k))  # (J·M, D), unused rows are zeros
    x_buf = rearrange(x_buf, "(j m) d -> j m d", m=m)  # (J, M, D)

    def expert_matmul(a: jax.Array, w: jax.Array) -> jax.Array:  # (J, M, in), (J, in, out) -> (J, M, out)
        if cfg.fp8:  # the report runs the expert GEMMs in FP8 too (§3.3)
            return jax.vmap(lambda ag, wg: fp8.fp8_matmul(ag, wg, cfg))(a, w)
        return grouped_matmul(a.astype(jnp.float32), w, cfg.dtype)

    w1, w3, w2 = group_weights
    out = swiglu(x_buf, *(partial(expert_matmul, w=w) for w in (w1, w3, w2)))  # (J, M, D) FFN^(r)(x), via (J, M, F)
    out = rearrange(out, "j m d -> (j m) d")  # (J·M, D) per row
    out = gather_rows(out, row, assignment_of_row[:, None])  # (A, D) back in assignment order
    out = rearrange(out, "(n k) d -> n k d", k=k)  # (N, K, D)
    return jnp.einsum("nkd,nk->nd", out, gates.astype(jnp.float32))  # (N, D) Σ_k g_{k,t} FFN_k(u_t), Eq. 12


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """y[i] = x[index[i]], zero where index[i] = len(x): x (rows, D), index (out_rows,) -> y (out_rows, D).

    `inverse` (rows, readers) lists the rows of y that read each row of x (len(y) pads a short list), so the gradient
    dx[r] = Σ_i dy[inverse[r, i]] is a gather too. Plain autodiff would scatter-add dy into dx: XLA's CPU backend runs
    scatters one row at a time, and on GPUs a scatter-add sums in whatever order its atomics land (not
    deterministic); the permutations of `dispatch` know their inverses, so neither is needed."""
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x, index, inverse):
    return gather_rows(x, index, inverse), inverse


def _gather_rows_bwd(inverse, dy):
    dx = jnp.take(dy, inverse, axis=0, mode="fill", fill_value=0).sum(axis=1)  # (rows, D)
    return dx, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)
