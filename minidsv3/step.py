"""The optimizer and the jitted training and evaluation steps that train.py runs (report §4.2).

γ (bias update speed) and λ (MTP weight) are arguments of the step, their schedules live in schedules.py; the
aux-loss-free bias update runs inside the step, after the optimizer update and outside autodiff.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from minidsv3 import moe, schedules
from minidsv3.config import TrainConfig
from minidsv3.model import Transformer, cross_entropy, training_loss, update_router_biases


def make_optimizer(model: Transformer, t: TrainConfig) -> nnx.Optimizer:
    """AdamW (β1 0.9, β2 0.95, weight decay 0.1) after global-norm clipping at 1.0, on the nnx.Params only, with the
    learning rate of all three stages (schedules.learning_rate)."""
    tx = optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(
            lambda step: schedules.learning_rate(step, t),
            b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, weight_decay=t.weight_decay, mask=decay_mask,
        ),
    )  # fmt: skip
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model: Transformer, optimizer: nnx.Optimizer, micro_batches: dict, mtp_lambda, gamma) -> dict:
    """One optimizer step over A micro-batches (arrays (A, B, T)): mean gradient, AdamW, then the bias update."""
    grad_fn = nnx.value_and_grad(training_loss, has_aux=True)
    n_micro = micro_batches["inputs"].shape[0]
    grads, metrics = None, []
    for i in range(n_micro):  # gradient accumulation, unrolled (A is small and static)
        batch = {k: v[i] for k, v in micro_batches.items()}  # (B, T) each
        (_, m), g = grad_fn(model, batch, mtp_lambda)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        metrics.append(m)
    grads = jax.tree.map(lambda g: g / n_micro, grads)
    metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)  # (A, ...)
    optimizer.update(model, grads)
    # Aux-loss-free balancing (report §2.1.2): the loads of the whole step, all micro-batches, padding excluded.
    loads = jnp.concatenate([metrics["expert_load"].sum(0), metrics["mtp_expert_load"].sum(0)])  # (L_moe + D, E)
    update_router_biases(model, loads, gamma)
    return {
        "main_loss": metrics["main_loss"].mean(),  # next-token cross-entropy, the number to compare across runs
        "total_loss": metrics["total_loss"].mean(),  # what the gradient descends: main + λ·MTP + balance
        "mtp_loss": metrics["mtp_loss"].mean(),
        "balance_loss": metrics["balance_loss"].mean(),
        "grad_norm": optax.tree.norm(grads),
        "expert_load": metrics["expert_load"].sum(0),  # (L_moe, E)
        "maxvio_batch": moe.max_violation(metrics["expert_load"].sum(0)).mean(),  # [LF] Eq. 4 on this step's loads
    }


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
