"""Group Relative Policy Optimization, GRPO (report §5.2.2, Eqs. 26-28; DeepSeekMath, arXiv:2402.03300 §4.1).

For each question q, GRPO samples a group of G outputs o_1..o_G from the old policy (minidsv3/rollout.py), scores
them with the rule reward (minidsv3/reward.py) and uses the group itself as the baseline, so no value model is needed:

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)                                                          Eq. 28

    J(θ) = E[ 1/G Σ_i ( min( ρ_i A_i, clip(ρ_i, 1-ε, 1+ε) A_i ) - β D_KL(π_θ || π_ref) ) ],  ρ_i = π_θ(o_i|q) / π_θold(o_i|q)  Eq. 26

    D_KL(π_θ || π_ref) = π_ref(o_i|q) / π_θ(o_i|q) - log(π_ref(o_i|q) / π_θ(o_i|q)) - 1                  Eq. 27

Choices made here.
- Per token. The report writes Eq. 26 with the probability ratio of whole outputs; DeepSeekMath's Eq. 3 applies the
  ratio, clip and KL at each token t of o_i with the 1/|o_i| Σ_t average, and so do we (`grpo_loss`).
- One update per batch. π_θold is the policy that sampled the batch, and we take one optimizer step per batch, so at
  the step ρ = 1 exactly (up to the float difference between decode and training forward) and the clip is inactive:
  the gradient is REINFORCE with the group mean as baseline, scaled by 1/std (tests hold this numerically). The clip
  only matters with several updates per batch, which we do not do.
- KL. Eq. 27 (DeepSeekMath Eq. 4) is the k3 estimator of KL(π_θ || π_ref) (Schulman, "Approximating KL
  divergence", 2020): unbiased with samples from π_θ and >= 0 per token (x - log x - 1 >= 0). The reference is the
  frozen SFT model. β = 0 by default: DeepSeekMath trained with β = 0.04 (§4.2, at learning rate 1e-6), the V3 report
  gives no value, and DAPO and Dr. GRPO drop the term. With β = 0 the KL is still measured and logged. ε = 0.2 is
  PPO's usual value (arXiv:1707.06347); neither DeepSeek paper states one.
- Aggregation over tokens (`aggregation`): "grpo" is Eq. 26 / DeepSeekMath Eq. 3, a mean over each output's tokens,
  then over outputs, so a token of a short output weighs more than one of a long output; "dapo" (the default) is
  DAPO's "token-level policy gradient loss", Σ over all tokens / their count (arXiv:2503.14476); "drgrpo" divides
  the sum by a constant, here the row width T (Dr. GRPO, arXiv:2503.20783, uses the generation budget: any constant
  is a rescaled learning rate), and Dr. GRPO also drops the 1/std of Eq. 28 (`group_advantages(..., std=False)`).
- Std: the population std of the group (the report does not say which); a group whose rewards are all equal has
  no signal and gets A = 0 (not 0/0).
- During RL the router biases are frozen (γ = 0), the MTP modules do not run (λ = 0), and the sequence-wise balance
  loss (Eq. 17) stays in the loss; the expert loads are returned for MaxVio.

Shapes: B = P·G rows (rows of a group adjacent) · T positions of the training batch (minidsv3/rollout.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from minidsv3 import moe, step
from minidsv3.model import Transformer

AGGREGATIONS = ("grpo", "dapo", "drgrpo")


def group_advantages(rewards: jax.Array, group_size: int, *, std: bool = True) -> jax.Array:
    """rewards (B,) with rows of a group adjacent -> advantages (B,): Eq. 28, (r - group mean) / group std; 0 for a
    group of equal rewards. std=False: r - group mean (Dr. GRPO)."""
    r = rewards.reshape(-1, group_size).astype(jnp.float32)  # (P, G)
    centred = r - r.mean(axis=1, keepdims=True)  # (P, G)
    if not std:
        return centred.reshape(-1)
    sigma = r.std(axis=1, keepdims=True)  # (P, 1)
    return jnp.where(sigma > 0, centred / jnp.where(sigma > 0, sigma, 1.0), 0.0).reshape(-1)  # (B,)


def zero_variance_groups(rewards: jax.Array, group_size: int) -> jax.Array:
    """rewards (B,) -> how many groups have all rewards equal (no gradient from them), int32 ()."""
    r = rewards.reshape(-1, group_size)  # (P, G)
    return (r.min(axis=1) == r.max(axis=1)).sum()


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token KL(π_θ || π_ref) estimate, Eq. 27: π_ref/π_θ - log(π_ref/π_θ) - 1 >= 0; log-probs (B, T) -> (B, T)."""
    log_ratio = ref_logp - logp  # (B, T)
    return jnp.exp(log_ratio) - log_ratio - 1.0


def aggregate(values: jax.Array, mask: jax.Array, aggregation: str) -> jax.Array:
    """Per-token values (B, T) where mask (B, T) is 1 -> one number, as `aggregation` weighs tokens (module doc)."""
    total = values * mask  # (B, T)
    if aggregation == "grpo":  # 1/G Σ_i 1/|o_i| Σ_t, Eq. 26 per token (DeepSeekMath Eq. 3)
        per_output = total.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)  # (B,)
        return per_output.mean()
    if aggregation == "dapo":  # Σ_i Σ_t / Σ_i |o_i|, token level (DAPO)
        return total.sum() / jnp.maximum(mask.sum(), 1.0)
    if aggregation == "drgrpo":  # Σ_i Σ_t / (B·T), a constant normalizer (Dr. GRPO)
        return total.sum() / mask.size
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def token_logprobs(model: Transformer, batch: dict) -> tuple[jax.Array, dict]:
    """log π(target) (B, T) under the model through the training forward (left padding by batch["offsets"]), and aux."""
    h_normed, aux = model.features(batch["inputs"], token_mask=batch["token_mask"], offsets=batch["offsets"])
    return -model.head_nll(h_normed, batch["targets"]), aux  # (B, T)


@nnx.jit
def reference_logprobs(model: Transformer, batch: dict) -> jax.Array:
    """log π_ref(target) (B, T) of the frozen reference model, for Eq. 27."""
    return token_logprobs(model, batch)[0]


def grpo_loss(model: Transformer, batch: dict, beta, clip_eps, aggregation: str) -> tuple[jax.Array, dict]:
    """-J(θ) of Eq. 26 per token, plus the balance loss (Eq. 17). batch: the rollout's `training_batch` with
    advantages (B,) and ref_logp (B, T) added. Returns the loss and metrics."""
    mask = batch["loss_mask"]  # (B, T): response tokens and EOS
    logp, aux = token_logprobs(model, batch)  # (B, T)
    # Off the mask every log-prob is set to 0 before exp: padding targets may have log-probs that overflow the
    # ratio or the KL, and an inf there would turn the masked sum's gradient into NaN.
    logp = jnp.where(mask > 0, logp, 0.0)  # (B, T)
    old_logp, ref_logp = batch["old_logp"] * mask, batch["ref_logp"] * mask  # (B, T)
    ratio = jnp.exp(logp - old_logp)  # (B, T) ρ per token: π_θ / π_θold
    adv = batch["advantages"][:, None]  # (B, 1): every token of o_i shares A_i
    # With one update per batch ρ = 1 here, so the clip never binds (module docstring).
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)  # (B, T), Eq. 26
    kl = k3_kl(logp, ref_logp)  # (B, T), Eq. 27
    objective = aggregate(surrogate - beta * kl, mask, aggregation)  # J(θ), Eq. 26
    loss = -objective + aux["balance_loss"]
    scored = jnp.maximum(mask.sum(), 1.0)
    return loss, {
        "loss": loss,
        "kl": (kl * mask).sum() / scored,  # mean per response token
        "clip_fraction": ((jnp.abs(ratio - 1.0) > clip_eps) * mask).sum() / scored,
        "balance_loss": aux["balance_loss"],
        "expert_load": aux["expert_load"],  # (L_moe, E)
    }


@functools.partial(nnx.jit, static_argnames=("aggregation",))
def grpo_step(
    model: Transformer,
    optimizer: nnx.Optimizer,
    batch: dict,
    learning_rate,
    beta=0.0,
    clip_eps=0.2,
    *,
    aggregation="dapo",
) -> dict:
    """One optimizer step on -J(θ) (Eq. 26) + L_Bal with the optimizer of minidsv3/step.py, router biases frozen.

    batch: `rollout.training_batch` plus advantages (B,) and ref_logp (B, T). A step whose loss or gradient is not
    finite changes nothing, as in `step.train_step`. Returns loss, kl, clip_fraction, balance_loss, grad_norm,
    skipped, expert_load (L_moe, E) and maxvio_batch."""
    grad_fn = nnx.value_and_grad(grpo_loss, has_aux=True)
    (loss, metrics), grads = grad_fn(model, batch, beta, clip_eps, aggregation)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    mtp_loads = jnp.zeros((len(model.mtp), model.cfg.n_routed_experts), jnp.float32)  # the MTP modules do not run
    loads = jnp.concatenate([metrics["expert_load"], mtp_loads])  # (L_moe + depths, E)
    gamma = jnp.float32(0.0)  # router biases frozen during RL: b + 0·sign(...) leaves them as they are
    nnx.cond(finite, step.apply_update, step.skip_update, model, optimizer, grads, loads, learning_rate, gamma)
    return {
        **metrics,
        "grad_norm": grad_norm,
        "skipped": ~finite,
        "maxvio_batch": moe.max_violation(metrics["expert_load"]).mean(),  # [LF] Eq. 4 on this step's loads
    }
