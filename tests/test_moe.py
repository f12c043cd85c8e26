"""DeepSeekMoE: routing (Eqs. 13-16, notes §2.2), dispatch (Eq. 12), balance loss (Eqs. 17-20), bias update ([LF])."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from minidsv3 import dispatch, moe


def make_moe(cfg, seed=0):
    return moe.MoE(cfg, rngs=nnx.Rngs(seed))


def random_tokens(cfg, b=2, t=5, seed=1):
    return jax.random.normal(jax.random.key(seed), (b, t, cfg.hidden_size), jnp.float32)  # (B, T, D)


def router_with_scores(cfg, scores, bias=None):
    """A Router whose sigmoid affinities for the input e_0 (first basis vector of R^D) are exactly `scores` (E,).

    Column 0 of the weight holds logit(s), so u_tᵀ e_i = logit(s_i) and σ(·) gives s_i back (up to float32 rounding).
    """
    router = moe.Router(cfg, rngs=nnx.Rngs(0))
    s = np.asarray(scores, np.float64)
    weight = np.zeros((cfg.n_routed_experts, cfg.hidden_size), np.float32)
    weight[:, 0] = np.log(s / (1 - s))
    router.weight[...] = jnp.asarray(weight)
    if bias is not None:
        router.e_score_correction_bias[...] = jnp.asarray(bias, jnp.float32)
    x = jnp.zeros((1, cfg.hidden_size), jnp.float32).at[0, 0].set(1.0)  # (1, D) the token e_0
    return router, x


# ---------------------------------------------------------------------------------------------------------------
# Dispatch: vectorized (capacity buffers, batched matmuls) vs the per-expert loop


@pytest.mark.parametrize("n_shared", [1, 0])
def test_vectorized_dispatch_equals_the_per_expert_loop(cfg, n_shared):
    cfg = dataclasses.replace(cfg, n_shared_experts=n_shared)
    layer = make_moe(cfg)
    x = random_tokens(cfg, b=3, t=7)  # (B, T, D)
    token_mask = jnp.ones((3, 7)).at[1, 4:].set(0).at[2, :2].set(0)  # (B, T) right and left padding

    y, _, _ = layer(x, token_mask)  # (B, T, D)

    tokens = x.reshape(-1, cfg.hidden_size)  # (N, D)
    topk_idx, gates, _ = layer.gate(tokens)
    expected = moe.experts_loop(tokens, topk_idx, gates, layer.experts, cfg)  # (N, D)
    if n_shared:
        expected = expected + layer.shared_experts(tokens)
    else:
        assert layer.shared_experts is None
    np.testing.assert_allclose(y.reshape(-1, cfg.hidden_size), expected, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(expected).max()) > 1e-3  # a non-trivial output, so agreement means something


def test_dispatch_equals_the_per_expert_loop_under_jit_and_in_bfloat16(cfg):
    cfg = dataclasses.replace(cfg, dtype="bfloat16")
    layer = make_moe(cfg)
    tokens = random_tokens(cfg).reshape(-1, cfg.hidden_size)  # (N, D)
    topk_idx, gates, _ = layer.gate(tokens)
    fast = nnx.jit(lambda experts, x, i, g: dispatch.dispatch(x, i, g, experts, cfg))(
        layer.experts, tokens, topk_idx, gates
    )
    slow = moe.experts_loop(tokens, topk_idx, gates, layer.experts, cfg)
    # both cast the same bf16 inputs and accumulate in float32; only the summation order may differ
    np.testing.assert_allclose(fast, slow, rtol=1e-3, atol=1e-4)


def test_fp8_dispatch_equals_the_per_expert_fp8_loop_and_stays_near_float32(cfg):
    cfg = dataclasses.replace(cfg, fp8=True)
    layer = make_moe(cfg)
    tokens = random_tokens(cfg, b=3, t=7).reshape(-1, cfg.hidden_size)  # (N, D)
    topk_idx, gates, _ = layer.gate(tokens)
    grouped = dispatch.dispatch(tokens, topk_idx, gates, layer.experts, cfg)  # fp8.fp8_matmul per block
    looped = moe.experts_loop(tokens, topk_idx, gates, layer.experts, cfg)  # fp8.fp8_matmul per expert
    # same per-token activation tiles and per-expert weight blocks, so the same quantized operands
    np.testing.assert_allclose(grouped, looped, rtol=1e-4, atol=1e-4)
    exact = dispatch.dispatch(tokens, topk_idx, gates, layer.experts, dataclasses.replace(cfg, fp8=False))
    rel = float(jnp.linalg.norm(grouped - exact) / jnp.linalg.norm(exact))
    # E4M3 keeps 3 mantissa bits: rounding error up to 2^-4 = 6.25 % per value, ~3.6 % RMS (uniform over ±half an
    # ulp of 2^-3); with both operands of three chained GEMMs quantized we measured ~6 %. Above 1 % proves that the
    # FP8 path ran at all; below 15 % that it is quantization noise, not a wrong expert or scale.
    assert 0.01 < rel < 0.15, rel


def test_capacities_are_multiples_of_eight_above_the_average_load_and_at_most_every_token():
    assert dispatch.capacities(64, 2, 8) == [24, 32]  # average 16: 1.25x = 20 -> 24, 2x = 32
    assert dispatch.capacities(2048, 2, 16) == [320, 512]  # tiny.toml at 8 x 256 tokens
    assert dispatch.capacities(10, 2, 8) == [8]  # 1.25x and 2x of 2.5 both round up to 8 (N = 10 would cap them)


def test_dispatch_runs_the_experts_on_capacity_buffers_or_blocks_never_every_expert_on_every_token(cfg):
    layer = make_moe(cfg)
    tokens = random_tokens(cfg, b=4, t=16).reshape(-1, cfg.hidden_size)  # (N, D), N = 64
    topk_idx, gates, _ = layer.gate(tokens)
    jaxpr = jax.make_jaxpr(lambda x, i, g: dispatch.dispatch(x, i, g, layer.experts, cfg))(tokens, topk_idx, gates)
    (switch,) = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "cond"]
    n, k, e = 64, cfg.num_experts_per_tok, cfg.n_routed_experts
    m = dispatch.block_size(n * k, e)  # 128 // (4 * 8) = 4 -> clipped up to 8
    # N·K = 128 assignments plus at most E·(M-1) = 56 padding rows: 184 // 8 = 23 blocks of 8 rows
    groups = [(e, 24), (e, 32), ((n * k + e * (m - 1)) // m, m)]  # capacity 1.25x, 2x, then blocks

    def dots(jaxpr) -> list[tuple]:  # the lhs shapes of its dot_generals, looking inside the checkpoint
        shapes = []
        for q in jaxpr.eqns:
            if q.primitive.name == "dot_general":
                shapes.append(q.invars[0].aval.shape)
            for v in q.params.values():
                for sub in v if isinstance(v, (tuple, list)) else [v]:
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        shapes += dots(getattr(sub, "jaxpr", sub))
        return shapes

    for branch, (n_groups, rows) in zip(switch.params["branches"], groups, strict=True):
        gemms = dots(branch.jaxpr)
        expert_gemms = [shape for shape in gemms if len(shape) == 3 and shape[0] != n]  # not the (N, K, D) combine
        assert len(expert_gemms) == 3  # gate, up, down
        assert all(shape[:2] == (n_groups, rows) for shape in expert_gemms) and n_groups * rows < n * e


@pytest.mark.parametrize("busiest", [20, 30, 64])  # fits capacity 24, 32, then only the blocks
def test_dispatch_equals_the_per_expert_loop_at_every_capacity(cfg, busiest):
    layer = make_moe(cfg)
    n, e = 64, cfg.n_routed_experts
    tokens = random_tokens(cfg, b=4, t=16).reshape(-1, cfg.hidden_size)  # (N, D)
    idx, loads = np.zeros((n, 2), np.int32), np.zeros(e, int)
    for t in range(n):  # expert 0 takes the first `busiest` tokens, the rest go to the least loaded other experts
        for j in range(2):
            free = [x for x in np.argsort(loads, kind="stable") if x != 0 and x not in idx[t, :j]]
            idx[t, j] = 0 if j == 0 and t < busiest else free[0]
            loads[idx[t, j]] += 1
    assert loads.max() == loads[0] == busiest and (idx[:, 0] != idx[:, 1]).all()
    topk_idx = jnp.asarray(idx)  # (N, 2)
    gates = jax.random.uniform(jax.random.key(2), (n, 2))
    fast = dispatch.dispatch(tokens, topk_idx, gates, layer.experts, cfg)
    slow = moe.experts_loop(tokens, topk_idx, gates, layer.experts, cfg)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)


def test_dispatch_gradients_equal_those_of_the_per_expert_loop(cfg):
    layer = make_moe(cfg)
    tokens = random_tokens(cfg, b=2, t=8).reshape(-1, cfg.hidden_size)  # (N, D)
    topk_idx, gates, _ = layer.gate(tokens)
    cot = jax.random.normal(jax.random.key(3), tokens.shape)  # (N, D)

    def grads(fn):
        def loss(x, g, experts):
            return jnp.sum(fn(x, topk_idx, g, experts, cfg) * cot)

        return jax.grad(loss, argnums=(0, 1, 2))(tokens, gates, layer.experts)

    fast, slow = grads(dispatch.dispatch), grads(moe.experts_loop)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert float(jnp.abs(b).max()) > 0


def test_dispatch_is_dropless_when_every_token_picks_the_same_experts(cfg):
    layer = make_moe(cfg)
    tokens = random_tokens(cfg, b=2, t=20).reshape(-1, cfg.hidden_size)  # (N, D), N = 40
    topk_idx = jnp.tile(jnp.asarray([[3, 5]], jnp.int32), (40, 1))  # the worst imbalance: two experts get everything
    gates = jnp.full((40, 2), 1.25)
    fast = dispatch.dispatch(tokens, topk_idx, gates, layer.experts, cfg)
    slow = moe.experts_loop(tokens, topk_idx, gates, layer.experts, cfg)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(fast).min(axis=-1).max()) > 0  # every token got its experts' output


# ---------------------------------------------------------------------------------------------------------------
# Routing: bias, groups, gates


def test_bias_changes_which_experts_are_chosen_but_never_their_gate_values(cfg):
    # conftest: E=8 in G=4 groups of 2 ({0,1} {2,3} {4,5} {6,7}), topk_group=2, K=2, routed_scaling_factor=2.5
    s = [0.9, 0.1, 0.8, 0.1, 0.3, 0.2, 0.05, 0.05]
    # No bias: group scores 1.0, 0.9, 0.5, 0.1 -> groups {0,1},{2,3}; top-2 = experts 0 (0.9), 2 (0.8).
    # gates = 2.5·[0.9, 0.8]/1.7 = [1.3235294, 1.1764706]
    router, x = router_with_scores(cfg, s)
    idx, gates, _ = router(x)
    assert idx[0].tolist() == [0, 2]
    np.testing.assert_allclose(gates[0], [2.5 * 0.9 / 1.7, 2.5 * 0.8 / 1.7], rtol=1e-6)

    # Bias +0.2 on expert 2: biased 1.0 > 0.9 puts it first, the chosen set {0, 2} is the same, and so is each
    # expert's gate (the bias is used only for choosing).
    router, x = router_with_scores(cfg, s, bias=[0, 0, 0.2, 0, 0, 0, 0, 0])
    idx, gates, _ = router(x)
    assert idx[0].tolist() == [2, 0]
    np.testing.assert_allclose(gates[0], [2.5 * 0.8 / 1.7, 2.5 * 0.9 / 1.7], rtol=1e-6)

    # Bias −0.5 on expert 2, +0.4 on expert 4: biased = [0.9, 0.1, 0.3, 0.1, 0.7, 0.2, 0.05, 0.05];
    # group scores 1.0, 0.4, 0.9, 0.1 -> groups {0,1},{4,5}; top-2 = experts 0 (0.9), 4 (0.7).
    # Gates come from the unbiased s: 2.5·[0.9, 0.3]/1.2 = [1.875, 0.625]
    # (from the biased scores they would have been 2.5·[0.9, 0.7]/1.6 = [1.40625, 1.09375]).
    flip = [0, 0, -0.5, 0, 0.4, 0, 0, 0]
    router, x = router_with_scores(cfg, s, bias=flip)
    idx, gates, _ = router(x)
    assert idx[0].tolist() == [0, 4]
    np.testing.assert_allclose(gates[0], [1.875, 0.625], rtol=1e-6)

    # Expert 0 is chosen with and without the bias; without renormalization its gate is 2.5·0.9 = 2.25 in both.
    raw = dataclasses.replace(cfg, norm_topk_prob=False)
    for bias in (None, flip):
        router, x = router_with_scores(raw, s, bias=bias)
        idx, gates, _ = router(x)
        assert idx[0, 0] == 0
        np.testing.assert_allclose(gates[0, 0], 2.25, rtol=1e-6)


def test_group_score_is_the_sum_of_the_top_two_biased_scores(cfg):
    # E=8 in G=2 groups of 4, topk_group=1, K=2.
    cfg = dataclasses.replace(cfg, n_group=2, topk_group=1)
    s = jnp.array([[0.9, 0.5, 0.4, 0.4, 0.7, 0.6, 0.0, 0.0]])  # (1, E)
    bias = jnp.array([0, 0, 0, 0, 0, 0.2, 0, 0], jnp.float32)  # (E,)
    # biased: group 0 = [0.9, 0.5, 0.4, 0.4], group 1 = [0.7, 0.8, 0.0, 0.0]
    #   top-2 sum: 0.9+0.5 = 1.4  vs  0.8+0.7 = 1.5 -> group 1
    #   (the max (V2) would pick group 0: 0.9 > 0.8; so would the sum of all: 2.2 > 1.5;
    #    and so would the top-2 sum of the *unbiased* scores: 1.4 > 1.3)
    np.testing.assert_allclose(moe.group_scores(s + bias, n_group=2), [[1.4, 1.5]], rtol=1e-6)
    idx = moe.select_experts(s, bias, cfg)
    assert idx[0].tolist() == [5, 4]  # biased 0.8, 0.7 inside group 1; expert 0 (0.9) is out with its group
    # gates from the unbiased s: 2.5·[0.6, 0.7]/1.3 = [1.1538462, 1.3461538]
    np.testing.assert_allclose(moe.gate_values(s, idx, cfg), [[2.5 * 0.6 / 1.3, 2.5 * 0.7 / 1.3]], rtol=1e-6)


def test_a_single_expert_group_is_scored_by_that_expert_alone(cfg):
    s = jnp.array([[0.1, 0.2, 0.3, 0.4]])  # (1, 4) four groups of one expert
    np.testing.assert_allclose(moe.group_scores(s, n_group=4), s, rtol=1e-6)


def test_dropped_groups_are_masked_with_minus_infinity_not_zero(cfg):
    # E=8 in G=2 groups of 4, topk_group=1, K=2, negative biases everywhere but expert 0.
    cfg = dataclasses.replace(cfg, n_group=2, topk_group=1)
    s = jnp.array([[0.3, 0.22, 0.21, 0.2, 0.1, 0.1, 0.1, 0.1]])  # (1, E)
    bias = jnp.array([0, -0.25, -0.25, -0.25, -0.5, -0.5, -0.5, -0.5])  # (E,)
    # biased: group 0 = [0.3, −0.03, −0.04, −0.05] (top-2 sum 0.27), group 1 = [−0.4]·4 (−0.8) -> keep group 0.
    # −inf mask: top-2 of [0.3, −0.03, −0.04, −0.05, −inf·4] = experts 0, 1.
    # 0 mask ([HFt]): [0.3, −0.03, −0.04, −0.05, 0, 0, 0, 0] -> experts 0 and 4, a dropped group's expert.
    idx = moe.select_experts(s, bias, cfg)
    assert idx[0].tolist() == [0, 1]
    # gates 2.5·[0.3, 0.22]/0.52 = [1.4423077, 1.0576923]
    np.testing.assert_allclose(moe.gate_values(s, idx, cfg), [[2.5 * 0.3 / 0.52, 2.5 * 0.22 / 0.52]], rtol=1e-6)


def test_gates_sum_to_the_routed_scaling_factor_and_experts_lie_in_at_most_topk_group_groups(cfg):
    layer = make_moe(cfg)
    # a random bias, so the biased selection differs from the plain top-K of s
    layer.gate.e_score_correction_bias[...] = 0.05 * jax.random.normal(jax.random.key(7), (cfg.n_routed_experts,))
    tokens = random_tokens(cfg, b=4, t=16).reshape(-1, cfg.hidden_size)  # (N, D)
    idx, gates, scores = layer.gate(tokens)
    n = tokens.shape[0]
    assert idx.shape == gates.shape == (n, cfg.num_experts_per_tok) and idx.dtype == jnp.int32
    assert scores.shape == (n, cfg.n_routed_experts) and scores.dtype == gates.dtype == jnp.float32
    np.testing.assert_allclose(gates.sum(-1), np.full(n, cfg.routed_scaling_factor), rtol=1e-6)
    groups = np.asarray(idx) // (cfg.n_routed_experts // cfg.n_group)  # (N, K)
    assert max(len(set(row)) for row in groups.tolist()) <= cfg.topk_group
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in np.asarray(idx).tolist())  # K distinct experts


def test_expert_loads_sum_to_n_times_k_counting_only_unpadded_tokens(cfg):
    layer = make_moe(cfg)
    x = random_tokens(cfg, b=2, t=6)  # (B, T, D)
    _, load, _ = layer(x)
    assert load.shape == (cfg.n_routed_experts,) and load.dtype == jnp.float32
    assert float(load.sum()) == 2 * 6 * cfg.num_experts_per_tok

    token_mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])  # 9 valid tokens
    _, masked_load, _ = layer(x, token_mask)
    assert float(masked_load.sum()) == 9 * cfg.num_experts_per_tok
    # and the loads are those of the valid tokens' own choices
    idx, _, _ = layer.gate(x.reshape(-1, cfg.hidden_size))
    valid_idx = np.asarray(idx)[np.asarray(token_mask).reshape(-1) == 1]  # (9, K)
    np.testing.assert_array_equal(masked_load, np.bincount(valid_idx.ravel(), minlength=cfg.n_routed_experts))


# ---------------------------------------------------------------------------------------------------------------
# Bias update, MaxVio, balance loss


def test_update_router_bias_moves_each_bias_by_gamma_toward_the_mean_load():
    # mean load 4: expert 0 overloaded (−γ), expert 2 underloaded (+γ), experts 1 and 3 exactly balanced (0)
    new = moe.update_router_bias(jnp.zeros(4), jnp.array([5.0, 4.0, 3.0, 4.0]), gamma=0.01)
    np.testing.assert_allclose(new, [-0.01, 0.0, 0.01, 0.0], atol=1e-9)
    # it adds to the current bias
    new = moe.update_router_bias(jnp.array([0.1, 0.1, 0.1, 0.1]), jnp.array([5.0, 4.0, 3.0, 4.0]), gamma=0.01)
    np.testing.assert_allclose(new, [0.09, 0.1, 0.11, 0.1], rtol=1e-6)


def test_max_violation_worked_example():
    # [5, 4, 3, 4]: mean 4, (5 − 4)/4 = 0.25; [2, 2, 2, 2]: 0; [8, 0, 0, 0]: mean 2, (8 − 2)/2 = 3
    vio = moe.max_violation(jnp.array([[5.0, 4.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0], [8.0, 0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(vio, [0.25, 0.0, 3.0], rtol=1e-6)


def test_balance_loss_worked_example(cfg):
    # One sequence, T=2, E=4, K=2, α = cfg.aux_loss_alpha = 1e-4.
    # token 0: s = [0.8, 0.4, 0.4, 0.4], Σ = 2.0 -> s' = [0.4, 0.2, 0.2, 0.2], routed to experts 0, 1
    # token 1: s = [0.5, 0.1, 0.3, 0.1], Σ = 1.0 -> s' = [0.5, 0.1, 0.3, 0.1], routed to experts 0, 2
    # f_i = E/(K·T)·count_i = 4/4·[2, 1, 1, 0] = [2, 1, 1, 0]                     (Eq. 18)
    # P_i = mean of s' = [0.45, 0.15, 0.25, 0.15]                                 (Eqs. 19, 20)
    # Σ f_i P_i = 0.9 + 0.15 + 0.25 + 0 = 1.3 -> L_Bal = 1.3e-4                   (Eq. 17)
    scores = jnp.array([[[0.8, 0.4, 0.4, 0.4], [0.5, 0.1, 0.3, 0.1]]])  # (1, 2, 4)
    topk_idx = jnp.array([[[0, 1], [0, 2]]])  # (1, 2, 2)
    assert cfg.aux_loss_alpha == 1e-4
    np.testing.assert_allclose(moe.sequence_balance_loss(scores, topk_idx, cfg), 1.3e-4, rtol=1e-6)

    # A third, padded token changes nothing: T counts valid tokens only.
    scores3 = jnp.concatenate([scores, jnp.array([[[0.1, 0.1, 0.1, 0.9]]])], axis=1)  # (1, 3, 4)
    topk3 = jnp.concatenate([topk_idx, jnp.array([[[3, 2]]])], axis=1)  # (1, 3, 2)
    loss = moe.sequence_balance_loss(scores3, topk3, cfg, token_mask=jnp.array([[1, 1, 0]]))
    np.testing.assert_allclose(loss, 1.3e-4, rtol=1e-6)


def test_balance_loss_is_computed_per_sequence_not_over_the_batch(cfg):
    # Two sequences of T=2 with mirrored imbalance: sequence 0 sends every token to experts {0, 1}, sequence 1 to
    # {2, 3}, with s' = [0.4, 0.4, 0.1, 0.1] and its mirror. Per sequence: f = 4/4·[2, 2, 0, 0] = [2, 2, 0, 0],
    # Σ f P = 2·0.4 + 2·0.4 = 1.6 (and 1.6 for the mirror), mean 1.6 -> 1.6e-4.
    # Pooled over the batch the loads are balanced: f = 4/(2·4)·[2, 2, 2, 2] = 1, P = 0.25 each, Σ = 1.0 -> 1.0e-4.
    seq0 = [[0.4, 0.4, 0.1, 0.1]] * 2
    seq1 = [[0.1, 0.1, 0.4, 0.4]] * 2
    scores = jnp.array([seq0, seq1])  # (2, 2, 4)
    topk_idx = jnp.array([[[0, 1], [0, 1]], [[2, 3], [2, 3]]])  # (2, 2, 2)
    np.testing.assert_allclose(moe.sequence_balance_loss(scores, topk_idx, cfg), 1.6e-4, rtol=1e-6)
    pooled = moe.sequence_balance_loss(scores.reshape(1, 4, 4), topk_idx.reshape(1, 4, 2), cfg)
    np.testing.assert_allclose(pooled, 1.0e-4, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Gradients and state


def test_gradients_reach_the_router_and_every_expert_weight_but_not_the_bias(cfg):
    layer = make_moe(cfg)
    layer.gate.e_score_correction_bias[...] = 0.05 * jax.random.normal(jax.random.key(3), (cfg.n_routed_experts,))
    x = random_tokens(cfg, b=2, t=8)  # (B, T, D): 32 assignments over 8 experts, so every expert gets tokens

    def loss_fn(m):
        y, _, balance = m(x)
        return jnp.mean(y**2) + balance

    _, load, _ = layer(x)
    assert bool((load > 0).all())  # otherwise an expert's zero gradient would be legitimate
    grads = nnx.jit(nnx.grad(loss_fn))(layer)  # w.r.t. nnx.Param
    flat = {"/".join(map(str, path)): leaf for path, leaf in nnx.to_flat_state(grads)}
    expected = {"gate/weight", "experts/gate_proj", "experts/up_proj", "experts/down_proj"}
    expected |= {f"shared_experts/{p}/kernel" for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(flat) == expected  # the bias is not a parameter
    for name, g in flat.items():
        g = np.asarray(g[...])
        per_expert = g.reshape(g.shape[0], -1) if name.startswith("experts/") else g.reshape(1, -1)
        assert (np.abs(per_expert).max(axis=1) > 0).all(), name  # every expert's weights get gradient

    # Differentiating w.r.t. every variable, bias included: its gradient is exactly zero.
    all_grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Variable)))(layer)
    bias_grad = nnx.state(all_grads, moe.RouterBias)
    assert np.all(np.asarray(bias_grad["gate"]["e_score_correction_bias"][...]) == 0)


def test_the_moe_output_alone_gives_the_router_weights_the_gradient_of_a_finite_difference(cfg):
    # Without the balance loss, the router's only gradient path is the gates (Eq. 13): detaching them would leave
    # the router weights with a zero gradient here, while moving the weights still changes the output.
    layer = make_moe(cfg)
    x = random_tokens(cfg, b=2, t=8)  # (B, T, D)
    cot = jax.random.normal(jax.random.key(5), x.shape)  # (B, T, D)
    w0 = layer.gate.weight[...]  # (E, D)

    def output(m):  # <MoE(x), cot>
        return jnp.sum(m(x)[0] * cot)

    def at(w, fn):  # fn(layer) with router weights w
        layer.gate.weight[...] = w
        value = fn(layer)
        layer.gate.weight[...] = w0
        return value

    def routing(m):
        return m.gate(x.reshape(-1, cfg.hidden_size))[0]  # (N, K)

    direction = jax.random.normal(jax.random.key(6), w0.shape)  # (E, D)
    eps = 1e-3
    assert (at(w0 + eps * direction, routing) == routing(layer)).all()  # a step this small keeps every choice
    assert (at(w0 - eps * direction, routing) == routing(layer)).all()
    finite = (at(w0 + eps * direction, output) - at(w0 - eps * direction, output)) / (2 * eps)
    analytic = jnp.sum(nnx.grad(output)(layer)["gate"]["weight"][...] * direction)
    assert abs(float(finite)) > 1e-3  # the gates do move the output
    np.testing.assert_allclose(float(analytic), float(finite), rtol=2e-2)


def test_router_bias_is_in_the_model_state_but_not_in_params_or_the_optimizer(cfg):
    layer = make_moe(cfg)
    assert "e_score_correction_bias" in nnx.state(layer)["gate"]
    assert "e_score_correction_bias" not in nnx.state(layer, nnx.Param)["gate"]
    assert isinstance(layer.gate.e_score_correction_bias, moe.RouterBias)
    assert layer.gate.e_score_correction_bias[...].dtype == jnp.float32

    optimizer = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
    x = random_tokens(cfg)
    grads = nnx.grad(lambda m: jnp.mean(m(x)[0] ** 2))(layer)
    before = np.asarray(layer.gate.e_score_correction_bias[...])
    optimizer.update(layer, grads)
    np.testing.assert_array_equal(layer.gate.e_score_correction_bias[...], before)
    # the bias moves only through update_router_bias: 20 assignments over 8 experts, mean 2.5, so every expert is
    # over- or underloaded and every bias moves by exactly γ
    _, load, _ = layer(x)
    bias = layer.gate.e_score_correction_bias
    bias[...] = moe.update_router_bias(bias[...], load, 0.01)
    np.testing.assert_allclose(np.abs(np.asarray(bias[...])), 0.01, rtol=1e-6)


def test_dispatch_layouts_place_the_docstrings_worked_example_by_hand(monkeypatch):
    # N = 3 tokens, K = 2, E = 3: token 0 -> experts 0, 2; token 1 -> 2, 1; token 2 -> 0, 2 (dispatch's docstring).
    flat_expert = jnp.array([0, 2, 2, 1, 0, 2])  # assignment a = n·K + k
    rank = jnp.array([0, 0, 1, 0, 1, 2])  # earlier assignments to the same expert
    sizes = jnp.array([2, 1, 3])  # loads
    weights = (jnp.arange(3.0).reshape(3, 1, 1),)  # one (1, 1) "matrix" per expert, holding the expert's number

    row, m, _ = dispatch._capacity_layout(flat_expert, rank, sizes, weights, capacity=3)
    assert m == 3 and row.tolist() == [0, 6, 7, 3, 1, 8]  # expert·3 + rank

    monkeypatch.setattr(dispatch, "block_size", lambda n_assignments, n_experts: 2)
    row, m, (block_weights,) = dispatch._block_layout(flat_expert, rank, sizes, weights)
    # loads padded to [2, 2, 4] rows, experts starting at rows [0, 2, 4]; (6 + 3·1) // 2 = 4 blocks
    assert m == 2 and row.tolist() == [0, 4, 5, 2, 1, 6]
    assert block_weights.ravel().tolist() == [0, 1, 2, 2]  # block_expert: each block gathers its expert's weights
