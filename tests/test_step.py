"""The optimizer and the jitted train step (minidsv3/step.py): overfitting, gradient accumulation, the bias update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from minidsv3 import moe
from minidsv3.config import TrainConfig
from minidsv3.model import Transformer, routers, training_loss
from minidsv3.step import evaluate, make_optimizer, train_step

TRAIN = TrainConfig(pretrain_steps=1000, context_steps=0, sft_steps=0)
LR = 1e-2  # the learning rate each step gets (train.py takes it from schedules.learning_rate)


def batch(cfg, b=4, t=16, seed=0):
    x = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, cfg.vocab_size)
    ones = jnp.ones((b, t), jnp.float32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": ones, "token_mask": ones}


def stacked(*batches):
    return {k: jnp.stack([b[k] for b in batches]) for k in batches[0]}  # (micro, B, T)


def test_overfitting_one_batch_drives_the_loss_down(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, TRAIN)
    micro = stacked(batch(cfg))
    losses = [float(train_step(model, optimizer, micro, LR, 0.3, 0.001)["main_loss"]) for _ in range(40)]
    # uniform guessing over 97 tokens is ln 97 = 4.57 nats; memorizing 64 targets must get far below
    assert losses[0] > 4.0 and losses[-1] < 0.5 * losses[0], losses[::10]


def test_the_router_bias_moves_once_per_step_from_the_loads_of_all_micro_batches(cfg):
    cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, TRAIN)
    a, b = batch(cfg, seed=1), batch(cfg, seed=2)
    # loads each micro-batch routes with the parameters and biases of before the step
    forward = nnx.jit(lambda model, x: model(x)[1]["expert_load"])  # (L_moe, E); jitted: eager takes ~15 s a call
    loads = sum(np.asarray(forward(model, m["inputs"])) for m in (a, b))  # (L_moe, E)
    before = [np.asarray(r.e_score_correction_bias[...]) for r in routers(model)]
    gamma = 0.01
    out = train_step(model, optimizer, stacked(a, b), LR, 0.3, gamma)
    np.testing.assert_allclose(out["expert_load"], loads)  # the step reports the summed loads it used
    for router, b0, load in zip(routers(model), before, loads, strict=True):
        expected = np.asarray(moe.update_router_bias(jnp.asarray(b0), jnp.asarray(load), gamma))
        np.testing.assert_allclose(router.e_score_correction_bias[...], expected, atol=1e-7)
        assert np.all(np.abs(np.asarray(router.e_score_correction_bias[...]) - b0) <= gamma + 1e-7)
    # one step moved each bias by exactly γ or 0: the update ran once, not once per micro-batch
    moved = np.abs(np.asarray(routers(model)[0].e_score_correction_bias[...]) - before[0])
    assert set(np.round(moved / gamma, 4)) <= {0.0, 1.0} and moved.max() > 0


def test_with_gamma_zero_the_biases_stay_put_but_the_parameters_move(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, TRAIN)
    w0 = np.asarray(model.layers[1].mlp.gate.weight[...])
    train_step(model, optimizer, stacked(batch(cfg)), LR, 0.3, 0.0)
    for router in routers(model):
        np.testing.assert_array_equal(router.e_score_correction_bias[...], 0.0)
    assert not np.allclose(model.layers[1].mlp.gate.weight[...], w0)


def test_a_step_with_a_non_finite_loss_or_gradient_changes_nothing_and_the_next_finite_step_updates(cfg):
    # a dense layer, two MoE layers and the MTP module's: the model and batch of the tests above, whose compiled
    # step this test reuses
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, TRAIN)
    micro = stacked(batch(cfg))

    def snapshot():  # parameters, router biases, AdamW moments and count, copied to the host
        return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state((model, optimizer))))

    assert not train_step(model, optimizer, micro, LR, 0.3, 0.01)["skipped"]  # moments, count and biases move off 0
    before = snapshot()
    # λ = NaN: the step's loss is NaN, and so is the gradient of every weight the MTP loss reaches
    out = train_step(model, optimizer, micro, LR, float("nan"), 0.01)
    assert out["skipped"] and np.isnan(out["total_loss"])
    jax.tree.map(np.testing.assert_array_equal, snapshot(), before)  # bit for bit, biases and AdamW count included
    assert not train_step(model, optimizer, micro, LR, 0.3, 0.01)["skipped"]
    after = snapshot()
    assert {int(c) for c in jax.tree.leaves(after) if np.ndim(c) == 0} == {2}  # AdamW's step count: 2, not 3
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after, before))
    assert np.mean(moved) > 0.9  # the finite step moved (nearly) every array again
    biases = [np.asarray(r.e_score_correction_bias[...]) for r in routers(model)]
    assert all(np.abs(bias).max() > 0 for bias in biases)


def test_the_step_descends_the_mean_over_all_its_scored_tokens_however_they_are_split_into_micro_batches(cfg):
    # With SGD at learning rate 1, a step moves every parameter by exactly the gradient it applied. Micro-batch a
    # scores 3 tokens (an SFT batch of short responses), b scores all 2 x 16 = 32: the step must apply the gradient of
    # (NLL summed over the 35 scored tokens) / 35 (+ λ·the MTP NLL over the same count, + the balance loss averaged
    # over the 4 sequences), i.e. the loss of one batch a+b. Averaging the two micro-batch means would weigh a's
    # 3 tokens as much as b's 32.
    a, b = batch(cfg, b=2, seed=3), batch(cfg, b=2, seed=4)
    a["loss_mask"] = jnp.zeros_like(a["loss_mask"]).at[0, 4:7].set(1.0)  # (2, 16): 3 scored tokens
    both = {k: jnp.concatenate([a[k], b[k]]) for k in a}
    reference = Transformer(cfg, rngs=nnx.Rngs(0))
    grad_fn = nnx.jit(nnx.grad(lambda m, x: training_loss(m, x, 0.3)[0]))  # jitted: half the time of eager
    expected = nnx.to_flat_state(grad_fn(reference, both))

    for micro in (stacked(a, b), stacked(both)):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        before = [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        train_step(model, nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param), micro, LR, 0.3, 0.0)
        after = [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        for (path, g), b0, b1 in zip(expected, before, after, strict=True):
            np.testing.assert_allclose(b0 - b1, g[...], rtol=1e-3, atol=1e-6, err_msg=str(path))


def test_evaluate_reports_loss_perplexity_and_maxvio_per_moe_layer(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    ev = evaluate(model, [batch(cfg, seed=5), batch(cfg, seed=6)])
    assert abs(ev["val_ppl"] - np.exp(ev["val_loss"])) < 1e-3 * ev["val_ppl"]
    assert len(ev["maxvio_global"]) == cfg.num_moe_layers and all(v >= 0 for v in ev["maxvio_global"])


def test_evaluation_and_generation_leave_the_router_biases_where_they_are(cfg):
    # The biases move only in train_step, from training loads (report §2.1.2); measuring the model must not move them.
    from minidsv3.generate import run

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for i, router in enumerate(routers(model)):
        router.e_score_correction_bias[...] = 0.01 * (i + 1) * jnp.arange(cfg.n_routed_experts, dtype=jnp.float32)
    before = [np.asarray(r.e_score_correction_bias[...]) for r in routers(model)]
    evaluate(model, [batch(cfg, seed=5)])
    run(model, [1, 2, 3], 6)
    run(model, [1, 2, 3], 6, speculative=True)
    for r, b in zip(routers(model), before, strict=True):
        np.testing.assert_array_equal(np.asarray(r.e_score_correction_bias[...]), b)


def test_the_optimized_step_has_the_loss_and_gradients_of_the_plain_path(cfg, monkeypatch):
    """The speed-ups of issue #11 change how, not what: hand-written backward GEMMs (layers.matmul), the fused chunked
    head + cross-entropy (layers.head_nll, chunks smaller than the batch here), causal-blocked attention (blocks
    smaller than T here) against plain autodiff, the unfused head and one T x T score matrix, in float32."""
    from minidsv3 import layers, mla
    from minidsv3 import model as model_lib

    cfg = dataclasses.replace(cfg, num_attention_heads=2, dtype="float32")
    b = batch(cfg, b=3, t=24, seed=4)
    b = {**b, "loss_mask": b["loss_mask"].at[0, :5].set(0.0)}  # a masked prefix, as SFT's prompts
    monkeypatch.setattr(layers, "LOSS_CHUNK", 16)  # 72 tokens -> 5 chunks, the last one padded
    monkeypatch.setattr(mla, "QUERY_BLOCK", 8)  # T = 24 -> 3 query blocks

    def loss_and_grads():  # jitted (eager takes ~3x as long), traced anew for each path: the patches apply at trace
        m = Transformer(cfg, rngs=nnx.Rngs(0))
        (loss, metrics), grads = nnx.jit(nnx.value_and_grad(model_lib.training_loss, has_aux=True))(m, b, 0.3)
        return float(loss), float(metrics["mtp_loss"]), nnx.to_flat_state(grads)

    fast = loss_and_grads()
    monkeypatch.setattr(mla, "QUERY_BLOCK", 10**9)
    monkeypatch.setattr(layers, "_matmul", lambda x, w, dtype: jnp.matmul(x, w))  # autodiff's backward
    monkeypatch.setattr(
        Transformer,
        "head_nll",
        lambda self, h, targets: layers.token_nll(self.head(h), targets),  # full logits
    )
    plain = loss_and_grads()
    np.testing.assert_allclose(fast[0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(fast[1], plain[1], rtol=1e-6)
    assert fast[1] > 0  # the MTP loss went through the fused head too
    for (path, g_fast), (_, g_plain) in zip(fast[2], plain[2], strict=True):
        scale = float(jnp.abs(g_plain[...]).max())
        assert scale > 0, path
        np.testing.assert_allclose(g_fast[...], g_plain[...], rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))
