"""Expert parallelism: the routed sum of Eq. 12 with the experts spread over the mesh's 'expert' axis (report §3.2.2).

Each device holds E_loc = E / EP of the experts (minidsv3/sharding.py) and its own share of the tokens. Inside
`jax.shard_map`, every device
    1. has routed its own tokens already (the router is replicated, so routing needs no communication);
    2. writes each (token, expert) assignment into a send buffer, one slot range per destination device (the one
       that owns the expert: expert // E_loc), and sends it with `jax.lax.all_to_all` over 'expert';
    3. runs the rows it received through its E_loc local experts with the single-device layout (`dispatch.dispatch`,
       called with K = 1 and E = E_loc on the received rows);
    4. sends the results back with the reverse all-to-all, and sums them per token, weighted by the gates.
Over the 'data' axis the experts are replicated, so each data row of the mesh exchanges among its own EP devices.

Dropless, by worst-case capacity
--------------------------------
Static shapes need a fixed number of slots C per destination. We choose the smallest C that can never overflow: top-K
picks K distinct experts, so a token sends at most min(K, E_loc) rows to one device, and C = n·min(K, E_loc) for n
local tokens. No assignment is ever dropped (§2.1.2: "no token-dropping"), whatever the routing, even every token
choosing the same expert. The cost: the all-to-all moves EP·C rows each way where a balanced routing needs n·K, i.e.
EP·min(K, E_loc)/K times the balanced volume (8x on 8 devices with K = 2, E_loc = 2; 4x with E_loc = 1; 32x at
DeepSeek-V3's 64-way EP, K = 8, E_loc = 4: bench/scaling.py), and the local experts also run the empty slots (zero
rows). DeepSeek avoids both with variable-size exchanges (DeepEP) and node-limited routing (each token to at most 4
nodes, §2.1.2); `jax.lax.ragged_all_to_all` would be the JAX form, but XLA's CPU backend does not implement it
(jax-ml/jax#34755), and these tests must run on a CPU.

Worked example: EP = 2 devices, E = 4 experts (E_loc = 2), n = 2 local tokens, K = 2: C = 2·min(2, 2) = 4 slots.
    topk_idx      = [[0, 3], [2, 3]]    assignments a = 0..3 (token a // K)
    dest          = [0, 1, 1, 1]        expert // E_loc
    slot          = [0, 0, 1, 2]        earlier assignments to the same device
    row           = [0, 4, 5, 6]        dest·C + slot in the (EP·C,) send buffer
    token_of_row  = [0, ·, ·, ·, 0, 1, 1, ·]   (· = an empty slot, sent as a zero row)
    local expert  = [0, ·, ·, ·, 1, 0, 1, ·]   expert % E_loc: which of the receiver's experts runs the row

The loads for the aux-loss-free bias update are computed outside this function on the global (N, K) routing, so XLA
sums them over the whole mesh (an all-reduce, the psum) and every device applies the single-device update.
Shapes: N tokens (n of them local) · K · E · D hidden_size · A = n·K local assignments · EP the expert axis size.
"""

from __future__ import annotations

import dataclasses
import typing
from functools import partial

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.sharding import PartitionSpec as P

from minidsv3 import dispatch as single_device
from minidsv3.config import ModelConfig
from minidsv3.dispatch import gather_rows
from minidsv3.sharding import BATCH

AXIS = "expert"


class LocalExperts(typing.NamedTuple):
    """A device's E_loc experts, in the form `dispatch.dispatch` reads: (E_loc, D, F), (E_loc, D, F), (E_loc, F, D)."""

    gate_proj: jax.Array
    up_proj: jax.Array
    down_proj: jax.Array


def applies(mesh, n_tokens: int) -> bool:
    """Whether the MoE layer runs expert-parallel: an expert axis of more than one device in the active mesh
    (`jax.set_mesh`), and tokens that split evenly over the mesh (a short last validation batch runs replicated)."""
    if AXIS not in mesh.shape or mesh.shape[AXIS] == 1:
        return False
    return n_tokens % (mesh.shape["data"] * mesh.shape[AXIS]) == 0


def dispatch(x: jax.Array, topk_idx: jax.Array, gates: jax.Array, experts, cfg: ModelConfig, mesh) -> jax.Array:
    """x (N, D), topk_idx (N, K), gates (N, K) -> Σ_k g_k FFN_k^(r)(x) (N, D) float32, the experts split over
    `mesh`'s 'expert' axis: the same sum as `dispatch.dispatch` on one device."""
    weights = (experts.gate_proj[...], experts.up_proj[...], experts.down_proj[...])  # (E, D, F), (E, D, F), (E, F, D)
    local = partial(_local_dispatch, cfg=cfg, ep=mesh.shape[AXIS])
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(BATCH), P(BATCH), P(BATCH), P(AXIS), P(AXIS), P(AXIS)),
        out_specs=P(BATCH),
    )(x, topk_idx, gates, *weights)


def _local_dispatch(x, topk_idx, gates, w1, w3, w2, *, cfg: ModelConfig, ep: int) -> jax.Array:
    """One device: x (n, D), topk_idx (n, K), gates (n, K), its experts (E_loc, D, F), (E_loc, D, F), (E_loc, F, D)
    -> (n, D), its tokens' routed sum."""
    n, k = topk_idx.shape
    e_loc = w1.shape[0]
    # The experts are the same on every data row, the tokens are not: marked as varying over 'data', the weights'
    # gradients (summed over local tokens in layers.matmul's backward) come back through the transpose, a psum.
    w1, w3, w2 = (jax.lax.pcast(w, "data", to="varying") for w in (w1, w3, w2))
    cap = n * min(k, e_loc)  # C: slots per destination, the most rows a device can send to one device
    n_assign, n_rows = n * k, ep * cap  # A, EP·C
    flat_expert = rearrange(topk_idx, "n k -> (n k)")  # (A,)
    dest = flat_expert // e_loc  # (A,) the device that owns the expert
    chosen = jax.nn.one_hot(dest, ep, dtype=jnp.int32)  # (A, EP)
    slot = jnp.sum((jnp.cumsum(chosen, axis=0) - chosen) * chosen, axis=-1)  # (A,) earlier rows to the same device
    row = dest * cap + slot  # (A,) its row in the send buffer
    assignment_of_row = jnp.full((n_rows,), n_assign, jnp.int32).at[row].set(jnp.arange(n_assign, dtype=jnp.int32))
    used = assignment_of_row < n_assign  # (EP·C,)
    token_of_row = jnp.where(used, assignment_of_row // k, n)  # (EP·C,) n = an empty slot, a zero row
    send_x = gather_rows(x, token_of_row, rearrange(row, "(n k) -> n k", k=k))  # (EP·C, D)
    # empty slots go round-robin to the local experts, so they do not pile onto one and widen the layout
    spread = jnp.arange(n_rows, dtype=jnp.int32) % e_loc  # (EP·C,)
    send_expert = jnp.where(used, flat_expert[jnp.minimum(assignment_of_row, n_assign - 1)] % e_loc, spread)

    # block j of the (EP·C,) buffer goes to device j; block i of what arrives came from device i
    recv_x = jax.lax.all_to_all(send_x, AXIS, 0, 0, tiled=True)  # (EP·C, D)
    recv_expert = jax.lax.all_to_all(send_expert, AXIS, 0, 0, tiled=True)  # (EP·C,) local expert of each row
    out = single_device.dispatch(
        recv_x,
        recv_expert[:, None],  # (EP·C, 1): each received row is one assignment to one local expert
        jnp.ones((n_rows, 1), jnp.float32),  # gates are applied at home, below
        LocalExperts(w1, w3, w2),
        dataclasses.replace(cfg, n_routed_experts=e_loc),
    )  # (EP·C, D) FFN^(r)(row)
    back = jax.lax.all_to_all(out, AXIS, 0, 0, tiled=True)  # (EP·C, D): our rows, in the order we sent them
    out = gather_rows(back, row, assignment_of_row[:, None])  # (A, D) in assignment order
    out = rearrange(out, "(n k) d -> n k d", k=k)  # (n, K, D)
    return jnp.einsum("nkd,nk->nd", out, gates.astype(jnp.float32))  # (n, D) Σ_k g_{k,t} FFN_k(u_t), Eq. 12
