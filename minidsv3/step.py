"""The optimizer and the jitted training and evaluation steps that train.py runs (report §4.2).

The learning rate, γ (bias update speed) and λ (MTP weight) are arguments of the step; their schedules live in
schedules.py, evaluated by train.py from the tokens seen. The aux-loss-free bias update runs inside the step, after the
optimizer update and outside autodiff. A step whose loss or gradient is not finite is skipped whole, inside the step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from minidsv3 import moe
from minidsv3.config import TrainConfig
from minidsv3.model import Transformer, cross_entropy, training_loss, update_router_biases


def make_optimizer(model: Transformer, tc: TrainConfig) -> nnx.Optimizer:
    """AdamW (β1 0.9, β2 0.95, weight decay 0.1) after global-norm clipping at 1.0, on the nnx.Params only."""
    return nnx.Optimizer(model, transformation(tc), wrt=nnx.Param)


@functools.cache
def transformation(tc: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """The optimizer's optax transformation, one per config: nnx.jit keys a compiled train_step on its arguments'
    graph, the transformation's functions included, so a second optimizer of the same config (a test's, a bench's)
    reuses the step compiled for the first instead of compiling it again.

    optax.adamw is scale_by_adam -> add_decayed_weights -> scale by -lr; we chain the same three, with the last taking
    the learning rate from each update (`optimizer.update(model, grads, learning_rate=lr)`) instead of a schedule of
    the update count, because the schedule counts tokens, which only train.py knows (schedules.py)."""
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.scale_by_adam(b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps),
        optax.add_decayed_weights(tc.weight_decay, mask=decay_mask),
        scale_by_learning_rate_argument(),
    )


def scale_by_learning_rate_argument() -> optax.GradientTransformationExtraArgs:
    """updates -> -learning_rate · updates, with `learning_rate` given to each update as a keyword argument."""

    def update(updates, state, params=None, *, learning_rate, **extra_args):
        del params, extra_args
        return jax.tree.map(lambda u: -learning_rate * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


@nnx.jit
def train_step(
    model: Transformer, optimizer: nnx.Optimizer, micro_batches: dict, learning_rate, mtp_lambda, gamma
) -> dict:
    """One optimizer step over a stack of micro-batches (arrays (micro, B, T)): the gradient of the step's loss, AdamW,
    then the bias update. Each micro-batch contributes its share (`micro_batch_loss`); their gradients add up.

    A step whose loss or gradient holds a NaN or an infinity changes nothing (`skipped` is True): parameters, AdamW
    moments and count, and router biases stay bit for bit as they were, and train.py stops after a few in a row."""
    grad_fn = nnx.value_and_grad(micro_batch_loss, has_aux=True)
    n_micro = micro_batches["inputs"].shape[0]
    scored = micro_batches["loss_mask"].sum(axis=(1, 2))  # (micro,) scored tokens of each micro-batch
    weights = scored / jnp.maximum(scored.sum(), 1.0)  # (micro,) each one's share of the step's scored tokens
    grads, metrics = None, []
    for i in range(n_micro):  # gradient accumulation, unrolled (their number is small and static)
        batch = {k: v[i] for k, v in micro_batches.items()}  # (B, T) each
        (_, m), g = grad_fn(model, batch, mtp_lambda, weights[i], n_micro)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        metrics.append(m)
    metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)  # (micro, ...)
    main, mtp = weights @ metrics["main_loss"], weights @ metrics["mtp_loss"]  # means over the step's scored tokens
    balance = metrics["balance_loss"].mean()  # mean over the step's sequences
    total = main + mtp_lambda * mtp + balance  # what the gradient descends
    grad_norm = optax.tree.norm(grads)  # NaN or inf exactly when some gradient is (or their squares overflow)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    # Aux-loss-free balancing (report §2.1.2): the loads of the whole step, all micro-batches, padding excluded.
    loads = jnp.concatenate([metrics["expert_load"].sum(0), metrics["mtp_expert_load"].sum(0)])  # (L_moe + depths, E)
    # NOTE: a guard of ours, not in the report. A cond rather than optax.apply_if_finite, which still counts the
    # skipped step in AdamW's state and leaves the biases to move on the loads of a diverged forward pass.
    nnx.cond(finite, apply_update, skip_update, model, optimizer, grads, loads, learning_rate, gamma)
    return {
        "main_loss": main,  # next-token cross-entropy, the number to compare across runs
        "total_loss": total,
        "mtp_loss": mtp,
        "balance_loss": balance,
        "grad_norm": grad_norm,
        "skipped": ~finite,  # the step changed nothing: its loss or a gradient was not finite
        "expert_load": metrics["expert_load"].sum(0),  # (L_moe, E)
        "maxvio_batch": moe.max_violation(metrics["expert_load"].sum(0)).mean(),  # [LF] Eq. 4 on this step's loads
    }


def apply_update(model, optimizer, grads, loads, learning_rate, gamma) -> None:
    """AdamW on the parameters, then the router biases from the step's loads (L_moe + depths, E), outside autodiff."""
    optimizer.update(model, grads, learning_rate=learning_rate)
    update_router_biases(model, loads, gamma)


def skip_update(model, optimizer, grads, loads, learning_rate, gamma) -> None:
    """A non-finite step: nothing moves."""


def micro_batch_loss(model: Transformer, batch: dict, mtp_lambda, weight, n_micro: int) -> tuple[jax.Array, dict]:
    """One micro-batch's part of the step's loss: weight·(L_main + λ·L_MTP) + L_Bal/n_micro (Eqs. 17, 25), and its
    metrics.

    L_main and L_MTP are means over the micro-batch's scored tokens (loss_mask; Eq. 24's 1/T counts the same tokens).
    Weighted by its share of the step's scored tokens, they add up over the step to the mean over all of them: the
    step's loss is (sum of NLL over every scored token of the step) / (their count), whether the step arrives in one
    batch or in n_micro. Without the weights, an SFT micro-batch of a few short responses would count as much as a full
    one.
    L_Bal is a mean over sequences (Eq. 17), and every micro-batch holds B of them, so a plain mean over the
    micro-batches is the mean over the step's sequences: a sequence is routed whole, whatever it scores.
    """
    _, metrics = training_loss(model, batch, mtp_lambda)
    loss = weight * (metrics["main_loss"] + mtp_lambda * metrics["mtp_loss"]) + metrics["balance_loss"] / n_micro
    return loss, metrics


@nnx.jit
def eval_step(model: Transformer, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed NLL and count of scored tokens, and the expert loads (L_moe, E), on one validation batch."""
    logits, aux = model(batch["inputs"], token_mask=batch["token_mask"])
    count = batch["loss_mask"].sum()
    return cross_entropy(logits, batch["targets"], batch["loss_mask"]) * count, count, aux["expert_load"]


def evaluate(model: Transformer, batches: list[dict]) -> dict:
    """Validation loss (nats/token), perplexity, and MaxVio_global per MoE layer over all validation batches."""
    nll, count, load = 0.0, 0.0, 0.0
    for batch in batches:
        n, c, l = eval_step(model, batch)
        nll, count, load = nll + float(n), count + float(c), load + np.asarray(l)
    maxvio = np.asarray(moe.max_violation(jnp.asarray(load)))  # (L_moe,), [LF] Eq. 4 over the whole set
    loss = nll / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "maxvio_global": maxvio.tolist()}


def decay_mask(params: nnx.State) -> nnx.State:
    """Weight decay on matrices only: RMSNorm gains (1-D) are scales of normalized activations, and decaying them
    toward 0 would only shrink the signal. The router bias is not a parameter, so AdamW never sees it."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)
