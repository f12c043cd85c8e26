"""The Transformer and MTP (minidsv3/model.py, block.py, mtp.py; report §2.2, Eqs. 21-25)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minidsv3 import moe
from minidsv3.config import RopeScaling, TrainConfig
from minidsv3.model import Transformer, cross_entropy, routers, training_loss, update_router_biases, with_config
from minidsv3.mtp import mtp_forward, mtp_loss, shift_left
from minidsv3.step import make_optimizer


def tokens(cfg, b=2, t=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


# The model runs jitted: eager, every call dispatches its hundreds of small operations one by one (~15 s a forward pass
# on 2 cores), while a jitted call compiles once per config, input shape and set of keyword arguments, and every model
# built from that config reuses it (most tests below share the default (2, 12) tokens for that reason).
forward = nnx.jit(lambda model, x, **kwargs: model(x, **kwargs))  # model(x, **kwargs): (logits, aux)
decode = nnx.jit(lambda model, x, caches, start: model.decode(x, caches, start))


def test_forward_returns_logits_and_aux_with_one_load_row_per_moe_layer(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x = tokens(cfg)
    logits, aux = forward(model, x, targets=x)
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
    assert aux["expert_load"].shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    assert aux["mtp_expert_load"].shape == (cfg.num_nextn_predict_layers, cfg.n_routed_experts)
    # every MoE layer routes each of the B*T tokens to K experts
    np.testing.assert_allclose(aux["expert_load"].sum(-1), 2 * 12 * cfg.num_experts_per_tok)
    assert float(aux["balance_loss"]) > 0 and float(aux["mtp_loss"]) > 0


def test_without_targets_the_mtp_modules_do_not_run(cfg):
    _, aux = forward(Transformer(cfg, rngs=nnx.Rngs(0)), tokens(cfg))
    assert aux["mtp_expert_load"].shape[0] == 0 and float(aux["mtp_loss"]) == 0.0


def test_perturbing_token_t_changes_no_logit_before_t_in_the_main_model_and_mtp(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x = tokens(cfg, b=1, t=10)
    t = 6
    y = x.at[0, t].set((x[0, t] + 1) % cfg.vocab_size)

    @nnx.jit
    def all_logits(model, inp):
        logits, _ = model(inp)
        # recompute the main hidden state through the public pieces to reach the MTP logits
        positions = jnp.arange(inp.shape[1])
        h = model.embed(inp)
        for layer in model.layers:
            h, _, _ = layer(h, positions, jnp.ones(inp.shape))
        mtp_logits, _, _ = mtp_forward(model.mtp, h, inp, positions, jnp.ones(inp.shape), model.embed, model.head)
        return logits, mtp_logits

    (main_x, mtp_x), (main_y, mtp_y) = all_logits(model, x), all_logits(model, y)
    np.testing.assert_allclose(main_x[:, :t], main_y[:, :t], atol=1e-6)
    assert not np.allclose(main_x[:, t], main_y[:, t])
    # MTP depth k at row j embeds inputs[j+k], so token t is first seen at row t-k.
    for k, (a, b) in enumerate(zip(mtp_x, mtp_y), start=1):
        np.testing.assert_allclose(a[:, : t - k], b[:, : t - k], atol=1e-6)
        assert not np.allclose(a[:, t - k], b[:, t - k])


def test_mtp_depth_k_prediction_at_position_i_is_scored_against_token_i_plus_k_plus_1(cfg):
    # 1-indexed as the report: sequence t_1..t_{T+1}; inputs = t_1..t_T, targets = t_2..t_{T+1}.
    # Eq. 24: L^k = -(1/T) Σ_{i=1}^{T-k} log P^k_{i+k+1}[t_{i+k+1}], P^k_{i+k+1} = row i of depth k's logits.
    cfg = dataclasses.replace(cfg, num_nextn_predict_layers=2)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    seq = np.asarray(tokens(cfg, b=1, t=9, seed=3))[0]  # t_1..t_9 at seq[0..8]
    inputs, targets = jnp.asarray(seq[None, :-1]), jnp.asarray(seq[None, 1:])  # T = 8
    T = 8

    @nnx.jit
    def depth_logits_and_losses(model, inputs, targets):
        positions = jnp.arange(T)
        h = model.embed(inputs)
        for layer in model.layers:
            h, _, _ = layer(h, positions, jnp.ones((1, T)))
        all_logits, _, _ = mtp_forward(model.mtp, h, inputs, positions, jnp.ones((1, T)), model.embed, model.head)
        return all_logits, mtp_loss(all_logits, targets, jnp.ones((1, T))), model(inputs, targets=targets)[1]

    all_logits, got, aux = depth_logits_and_losses(model, inputs, targets)
    expected = 0.0
    for k, logits in enumerate(all_logits, start=1):
        logp = np.asarray(jax.nn.log_softmax(logits[0]))  # (T, V), row i-1 is position i (1-indexed)
        lk = -sum(logp[i - 1, seq[i + k + 1 - 1]] for i in range(1, T - k + 1)) / T  # t_{i+k+1} = seq[i+k]
        expected += lk / 2  # Eq. 25 with D = 2, without λ
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    np.testing.assert_allclose(float(aux["mtp_loss"]), expected, rtol=1e-5)


def test_shift_left_moves_rows_and_pads_the_tail_with_zeros():
    x = jnp.asarray([[1, 2, 3, 4]])
    np.testing.assert_array_equal(shift_left(x, 1), [[2, 3, 4, 0]])
    np.testing.assert_array_equal(shift_left(x, 3), [[4, 0, 0, 0]])


def test_decoding_token_by_token_from_the_latent_cache_equals_the_full_forward(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x = tokens(cfg, b=2, t=12)
    full, _ = forward(model, x)
    caches = model.init_cache(2, 12)
    logits, caches = decode(model, x[:, :4], caches, jnp.int32(0))  # prefill 4 positions at once
    steps = [logits]
    for i in range(4, 12):
        logits, caches = decode(model, x[:, i : i + 1], caches, jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_padding_is_left_out_of_the_expert_loads(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    x = tokens(cfg)
    mask = jnp.ones((2, 12)).at[1, 9:].set(0)  # 3 padding tokens
    _, aux = forward(model, x, targets=x, token_mask=mask)
    np.testing.assert_allclose(aux["expert_load"].sum(-1), (24 - 3) * cfg.num_experts_per_tok)


def test_the_router_bias_gets_no_gradient_and_no_optimizer_state(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, TrainConfig())  # the optimizer train.py builds
    x = tokens(cfg)
    batch = {"inputs": x, "targets": x, "loss_mask": jnp.ones(x.shape), "token_mask": jnp.ones(x.shape)}
    grads = nnx.jit(nnx.grad(lambda m, b: training_loss(m, b, 0.3)[0]))(model, batch)
    paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]]
    assert paths and not any("e_score_correction_bias" in p for p in paths)
    opt_paths = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(optimizer)))[0]
    assert not any("e_score_correction_bias" in "/".join(map(str, p)) for p, _ in opt_paths)
    state_paths = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    assert sum("e_score_correction_bias" in "/".join(map(str, p)) for p, _ in state_paths) == len(routers(model))


def test_update_router_biases_applies_the_sign_rule_to_every_router_in_order(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    n = len(routers(model))
    assert n == cfg.num_moe_layers + cfg.num_nextn_predict_layers
    loads = jnp.tile(jnp.arange(cfg.n_routed_experts, dtype=jnp.float32), (n, 1))  # expert i has load i, mean 3.5
    loads = loads.at[1].set(jnp.flip(loads[1]))  # router 1 sees the mirror image
    update_router_biases(model, loads, 0.01)
    b0 = np.asarray(routers(model)[0].e_score_correction_bias[...])
    b1 = np.asarray(routers(model)[1].e_score_correction_bias[...])
    np.testing.assert_allclose(b0, np.where(np.arange(8) < 3.5, 0.01, -0.01))  # underloaded up, overloaded down
    np.testing.assert_allclose(b1, b0[::-1])


def test_with_config_keeps_every_parameter_and_switches_yarn_on(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    longer = with_config(
        model, dataclasses.replace(cfg, rope_scaling=RopeScaling(factor=2.0, original_max_position_embeddings=8))
    )
    assert longer.cfg.rope_scaling.factor == 2.0
    a, b = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(longer))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    x = tokens(cfg)  # 12 positions, beyond the 8 of original_max_position_embeddings
    # the rope frequencies changed beyond the ramp's low dims
    assert not np.allclose(forward(model, x)[0], forward(longer, x)[0])


def test_cross_entropy_of_uniform_logits_is_log_vocab_and_ignores_masked_targets():
    logits = jnp.zeros((1, 3, 5))
    targets = jnp.asarray([[0, 1, 2]])
    np.testing.assert_allclose(cross_entropy(logits, targets, jnp.ones((1, 3))), np.log(5), rtol=1e-6)
    peaked = logits.at[0, 2, 2].set(100.0)  # position 2 is certain, but masked out
    np.testing.assert_allclose(cross_entropy(peaked, targets, jnp.asarray([[1.0, 1.0, 0.0]])), np.log(5), rtol=1e-6)


def test_max_violation_of_a_built_model_is_finite(cfg):
    _, aux = forward(Transformer(cfg, rngs=nnx.Rngs(0)), tokens(cfg))
    assert np.isfinite(np.asarray(moe.max_violation(aux["expert_load"]))).all()


@pytest.mark.parametrize("tied", [False, True])
def test_tied_and_untied_heads_both_build_and_run(cfg, tied):
    model = Transformer(dataclasses.replace(cfg, tie_word_embeddings=tied), rngs=nnx.Rngs(0))
    assert (model.lm_head is None) == tied
    assert forward(model, tokens(cfg))[0].shape == (2, 12, cfg.vocab_size)
