"""GRPO (minidsv3/grpo.py, Eqs. 26-28) and its rollouts (minidsv3/rollout.py) on a tiny random model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL
from flax import nnx

from minidsv3 import grpo, rollout
from minidsv3.config import TrainConfig
from minidsv3.model import Transformer, routers
from minidsv3.step import make_optimizer

G, R, W = 3, 5, 6  # samples per prompt, new tokens, prompt window
PROMPTS = [[5, 17, 42, 8], [9, 3]]  # of different lengths: the second row is left-padded more
EOS, PAD = 0, 1


@pytest.fixture(scope="module")
def rolled():
    """A model, its rollout of G samples of each prompt, and that rollout as a training batch."""
    model = Transformer(SMALL, rngs=nnx.Rngs(0))
    window, offsets = rollout.left_pad(PROMPTS, G, W, PAD)
    out = rollout.sample(model, window, offsets, jax.random.key(1), EOS, PAD, max_new_tokens=R)
    return model, out, rollout.training_batch(out)


def test_left_padded_rollout_log_probs_equal_the_unpadded_forward_of_each_sequence(rolled):
    model, out, batch = rolled
    lengths, tokens = np.asarray(out["lengths"]), np.asarray(out["tokens"])
    # Unpadded: each row's prompt + response from position 0, right-padded (causal: the tail changes nothing before).
    rows = [PROMPTS[b // G] + tokens[b, : lengths[b]].tolist() for b in range(len(lengths))]
    plain = np.full((len(rows), W + R), PAD, np.int32)
    for b, r in enumerate(rows):
        plain[b, : len(r)] = r
    log_probs = jax.nn.log_softmax(nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(plain)), axis=-1)  # (B, W+R, V)
    trained = np.asarray(grpo.reference_logprobs(model, batch))  # the training forward on the left-padded batch
    for b, r in enumerate(rows):
        p = len(PROMPTS[b // G])
        expected = [float(log_probs[b, p - 1 + i, r[p + i]]) for i in range(lengths[b])]
        np.testing.assert_allclose(np.asarray(out["logp"])[b, : lengths[b]], expected, atol=2e-4)  # the sampler
        np.testing.assert_allclose(trained[b, W - 1 : W - 1 + lengths[b]], expected, atol=2e-4)
    assert (lengths >= 1).all() and float(np.asarray(batch["loss_mask"]).sum()) == lengths.sum()


def test_rows_of_a_group_are_adjacent_and_advantages_compare_only_within_them(rolled):
    _, out, _ = rolled
    window = np.asarray(out["window"])
    rewards = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    advantages = np.asarray(grpo.group_advantages(jnp.asarray(rewards), G))
    for b in range(len(rewards)):
        prompt = window[b, np.asarray(out["offsets"])[b] :].tolist()
        assert prompt == PROMPTS[b // G]
        same = [c for c in range(len(rewards)) if (window[c] == window[b]).all()]  # the rows of b's prompt
        group = rewards[same]
        np.testing.assert_allclose(advantages[b], (rewards[b] - group.mean()) / group.std(), rtol=1e-6)


def test_loss_mask_is_built_by_position_covering_eos_and_excluding_padding():
    # Row 0: prompt [5] left-padded to 3 slots; it samples 4, then the padding id as a real token, then EOS.
    # Row 1: prompt [7, 8, 9]; no EOS within R = 4 tokens.
    out = {
        "window": jnp.asarray([[PAD, PAD, 5], [7, 8, 9]]),
        "offsets": jnp.asarray([2, 0]),
        "tokens": jnp.asarray([[4, PAD, EOS, PAD], [6, 6, 6, 6]]),
        "lengths": jnp.asarray([3, 4]),
        "logp": jnp.asarray([[-1.0, -2.0, -3.0, 0.0], [-4.0, -5.0, -6.0, -7.0]]),
    }
    batch = rollout.training_batch(out)
    # T = 3 + 4 - 1 = 6 targets; response token i is target 2 + i
    np.testing.assert_array_equal(batch["targets"], [[PAD, 5, 4, PAD, EOS, PAD], [8, 9, 6, 6, 6, 6]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["token_mask"], [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["old_logp"], [[0, 0, -1, -2, -3, 0], [0, 0, -4, -5, -6, -7]])


def test_advantages_worked_example_and_a_zero_variance_group_gets_zero():
    rewards = jnp.asarray([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4; the second all equal
    a = grpo.group_advantages(rewards, 4)
    # group 1: mean 0.25, population std sqrt(0.25 * 0.75) = 0.4330: (1 - 0.25) / 0.4330 = 1.7321, -0.25 / 0.4330
    np.testing.assert_allclose(a[:4], [1.7320508, -0.5773503, -0.5773503, -0.5773503], rtol=1e-6)
    np.testing.assert_array_equal(a[4:], [0.0, 0.0, 0.0, 0.0])
    assert bool(jnp.isfinite(a).all()) and int(grpo.zero_variance_groups(rewards, 4)) == 1
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, std=False)[:4], [0.75, -0.25, -0.25, -0.25])


def test_k3_kl_is_nonnegative_zero_at_the_reference_and_worked_example():
    logp = jax.random.normal(jax.random.key(0), (4, 7)) - 3.0
    ref = jax.random.normal(jax.random.key(1), (4, 7)) - 3.0
    assert bool((grpo.k3_kl(logp, ref) >= 0).all())
    np.testing.assert_array_equal(grpo.k3_kl(logp, logp), np.zeros((4, 7)))
    # π_ref / π_θ = 2: 2 - ln 2 - 1 = 0.30685
    np.testing.assert_allclose(grpo.k3_kl(jnp.log(jnp.asarray([0.25])), jnp.log(jnp.asarray([0.5]))), [0.3068528])


def test_aggregations_weigh_tokens_as_their_papers_do():
    values = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(grpo.aggregate(values, mask, "grpo")) == pytest.approx((6 / 3 + 4 / 1) / 2)  # per output, then mean
    assert float(grpo.aggregate(values, mask, "dapo")) == pytest.approx(10 / 4)  # per token
    assert float(grpo.aggregate(values, mask, "drgrpo")) == pytest.approx(10 / 6)  # by a constant, B·T
    with pytest.raises(ValueError, match="aggregation"):
        grpo.aggregate(values, mask, "ppo")


@pytest.mark.slow
def test_with_one_update_per_batch_the_grpo_gradient_is_reinforce_with_a_group_baseline(rolled):
    model, _, batch = rolled
    rewards = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    baseline = rewards.reshape(-1, G).mean(1).repeat(G)  # the group mean, per row
    scale = rewards.reshape(-1, G).std(1).repeat(G)
    exact = grpo.reference_logprobs(model, batch)  # π_θold = π_θ: the policy that sampled, before any update
    batch = {
        **batch,
        "advantages": grpo.group_advantages(jnp.asarray(rewards), G),
        "old_logp": exact,
        "ref_logp": exact,
    }
    mask = batch["loss_mask"]

    def reinforce(m):  # -Σ (r - baseline)/std · log π(o) over all response tokens: from full logits, not grpo's code
        logits, aux = m(batch["inputs"], token_mask=batch["token_mask"], offsets=batch["offsets"])
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
        weight = jnp.asarray((rewards - baseline) / scale, jnp.float32)[:, None] * mask  # (B, T)
        return -(weight * logp).sum() / mask.sum() + aux["balance_loss"]

    @nnx.jit
    def both(m):  # the default aggregation, token-level; the others differ only in `aggregate`, tested above
        ours = nnx.grad(lambda m: grpo.grpo_loss(m, batch, 0.0, 0.2, "dapo")[0])(m)
        return ours, nnx.grad(reinforce)(m)

    ours, theirs = both(model)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()) + 1e-9)


@pytest.mark.slow
def test_grpo_step_moves_parameters_not_router_biases_and_skips_non_finite_steps(rolled):
    _, _, batch = rolled
    model = Transformer(SMALL, rngs=nnx.Rngs(0))  # a fresh copy: the fixture's model stays as it was
    optimizer = make_optimizer(model, TrainConfig())
    rewards = jnp.asarray([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    batch = {
        **batch,
        "advantages": grpo.group_advantages(rewards, G),
        "ref_logp": grpo.reference_logprobs(model, batch),
    }
    biases = [np.asarray(r.e_score_correction_bias[...]) for r in routers(model)]
    before = np.asarray(model.embed_tokens[...])
    m = grpo.grpo_step(model, optimizer, batch, 1e-3, 0.04, 0.2)
    assert not bool(m["skipped"]) and np.isfinite(float(m["loss"])) and float(m["kl"]) >= 0
    assert float(m["clip_fraction"]) == 0.0  # ρ = 1 up to the decode/forward difference: the clip never binds
    assert m["expert_load"].shape == (SMALL.num_hidden_layers - SMALL.first_k_dense_replace, SMALL.n_routed_experts)
    after = np.asarray(model.embed_tokens[...])
    assert not np.array_equal(before, after)
    for r, b in zip(routers(model), biases, strict=True):
        np.testing.assert_array_equal(r.e_score_correction_bias[...], b)  # γ = 0 during RL
    m = grpo.grpo_step(model, optimizer, {**batch, "advantages": batch["advantages"] * jnp.nan}, 1e-3, 0.04, 0.2)
    assert bool(m["skipped"])
    np.testing.assert_array_equal(model.embed_tokens[...], after)
