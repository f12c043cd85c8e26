"""The RL stage of train.py: GRPO steps on the task of minidsv3/tasks.py after SFT, and its evaluation (report §5.2).

One step (`rl_step`), the loop of report §5.2.2 with one policy update per batch:

    P training prompts (`RLPrompts`)  ->  G samples each at temperature 1 from the current policy (rollout.sample)
    ->  rule reward per sample, run in the sandbox (reward.Sandbox)  ->  group advantages, Eq. 28
    ->  log-probs of the frozen SFT reference (Eq. 27's π_ref)  ->  one AdamW step on -J(θ) + L_Bal (grpo.grpo_step)

The reference is the model as SFT left it, copied when RL starts and kept in the run folder (`save_reference`), so a
run resumed in the middle of RL scores the KL against the same weights. Before the first RL step and after the last,
`evaluate` scores the policy on the held-out prompts (minidsv3/rl_eval.py) and checks that nothing else regressed:
the validation loss on held-out stdlib text and the parse rate of greedy bodies for held-out stdlib SFT prompts.

Shapes: P prompts · G samples · B = P·G rows · W prompt window · R response budget · T = W + R - 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from minidsv3 import flops, grpo, rl_eval, rollout, step, tasks
from minidsv3.config import ModelConfig, TrainConfig
from minidsv3.data import EOT, PAD, special_id
from minidsv3.model import Transformer, routers
from minidsv3.reward import Sandbox

REFERENCE_FILE = "rl_reference.npz"  # in the run folder: the SFT model, π_ref of Eq. 27
STDLIB_PROMPTS, STDLIB_NEW_TOKENS = 64, 64  # the parse-rate check: held-out stdlib prompts, greedy budget


def prompt_window(tokenizer: Tokenizer, held_out: list[tasks.Task]) -> int:
    """W: the longest held-out prompt in tokens, rounded up to a multiple of 8. Every rollout, training and
    evaluation alike, uses this one window, so each compiled function has one shape."""
    longest = max(len(ids) for ids in (e.ids for e in tokenizer.encode_batch([t.prompt for t in held_out])))
    return -(-longest // 8) * 8


class RLPrompts:
    """The RL stage's loader: P training prompts per step (tasks.TrainingTasks, never a held-out prompt; one longer
    than the window is skipped) and the step's sampling key, both fixed by the seed and the count of batches so far,
    so a resumed run samples what the uninterrupted run sampled."""

    def __init__(self, tokenizer: Tokenizer, prompts: int, window: int, seed: int, held_out: list[tasks.Task]):
        self.tokenizer, self.prompts, self.window, self.seed = tokenizer, prompts, window, seed
        self.stream = tasks.TrainingTasks(seed, held_out=held_out)
        self.batches_delivered = 0
        self.tokens_delivered = 0  # training positions B·T of the steps so far (the ledger's tokens)

    def next_prompts(self) -> tuple[list[tasks.Task], list[list[int]], jax.Array]:
        """(P tasks, their prompts' token ids, this step's sampling key)."""
        chosen, ids = [], []
        while len(chosen) < self.prompts:
            (task,) = self.stream.take(1)
            encoded = self.tokenizer.encode(task.prompt).ids
            if len(encoded) <= self.window:
                chosen.append(task)
                ids.append(encoded)
        key = jax.random.fold_in(jax.random.key(self.seed), self.batches_delivered)
        self.batches_delivered += 1
        return chosen, ids, key

    def state_dict(self) -> dict:
        return {"tasks": self.stream.state_dict(), "batches": self.batches_delivered, "tokens": self.tokens_delivered}

    def load_state_dict(self, d: dict) -> None:
        self.stream.load_state_dict(d["tasks"])
        self.batches_delivered, self.tokens_delivered = d["batches"], d["tokens"]


def rl_step(
    model: Transformer, reference: Transformer, optimizer: nnx.Optimizer, loader: RLPrompts, sandbox: Sandbox,
    tc: TrainConfig,
) -> dict:  # fmt: skip
    """One GRPO step (module docstring). Returns grpo.grpo_step's outputs plus reward (mean over the B samples),
    zero_variance_groups (of P), response_length (mean tokens, EOS included), tokens (B·T) and positions (T)."""
    tokenizer, G = loader.tokenizer, tc.rl_samples
    eos, pad = special_id(tokenizer, EOT), special_id(tokenizer, PAD)
    chosen, ids, key = loader.next_prompts()
    window, offsets = rollout.left_pad(ids, G, loader.window, pad)  # (B, W), (B,)
    out = rollout.sample(model, window, offsets, key, eos, pad, max_new_tokens=tc.rl_max_new_tokens)
    lengths = np.asarray(out["lengths"])  # (B,)
    texts = rl_eval.decode_responses(tokenizer, np.asarray(out["tokens"]), lengths, eos)
    verdicts = sandbox.rewards([t for t in chosen for _ in range(G)], texts)  # row b holds prompt b // G
    rewards = jnp.asarray([v.reward for v in verdicts], jnp.float32)  # (B,)

    batch = rollout.training_batch(out)  # (B, T) each, the same left padding as the rollout
    batch["advantages"] = grpo.group_advantages(rewards, G, std=tc.rl_aggregation != "drgrpo")  # (B,), Eq. 28
    batch["ref_logp"] = grpo.reference_logprobs(reference, batch)  # (B, T), π_ref for Eq. 27
    metrics = grpo.grpo_step(
        model, optimizer, batch, tc.rl_learning_rate, tc.rl_beta, tc.rl_clip, aggregation=tc.rl_aggregation
    )
    tokens = int(batch["inputs"].size)
    loader.tokens_delivered += tokens
    return {
        **metrics,
        "reward": float(rewards.mean()),
        "parse_rate": float(np.mean([v.parsed for v in verdicts])),
        "zero_variance_groups": int(grpo.zero_variance_groups(rewards, G)),
        "response_length": float(lengths.mean()),
        "tokens": tokens,
        "positions": int(batch["inputs"].shape[1]),
    }


def step_record(step_: int, out: dict, model: Transformer, *, lr: float, seconds: float) -> dict:
    """The metrics.jsonl record of an RL step: `rl_step`'s figures, and the expert loads and router biases (frozen)
    as the other stages log them (run.step_record). No main_loss: the loss plot is for cross-entropies."""
    load = np.asarray(out["expert_load"])  # (L_moe, E)
    keys = ("loss", "reward", "parse_rate", "response_length", "kl", "clip_fraction", "balance_loss", "grad_norm")
    return {
        "step": step_, "stage": "rl", **{k: float(out[k]) for k in keys},
        "zero_variance_groups": out["zero_variance_groups"], "lr": lr, "gamma": 0.0, "mtp_lambda": 0.0,
        "tokens": out["tokens"], "seconds": seconds, "skipped": bool(out["skipped"]),
        "maxvio_batch": float(out["maxvio_batch"]) if load.size else None,
        "expert_load": load.tolist(),
        "router_bias": [np.asarray(r.e_score_correction_bias[...]).round(5).tolist() for r in routers(model)],
    }  # fmt: skip


def flops_per_token(cfg: ModelConfig, positions: int) -> float:
    """FLOPs per training position of an RL step: forward and backward of the policy (no MTP: λ = 0), plus two
    forwards, the reference's log-probs and the rollout's decoding of the same positions (counted as one forward
    over the window, although the decoder skips the padding and its latent cache saves the re-computation)."""
    train = flops.flops_per_token(cfg, positions, include_mtp=False).total
    return train + 2 * flops.flops_per_token(cfg, positions, include_mtp=False, training=False).total


def write_json(path: Path, value: dict) -> None:
    """`value` as JSON at `path`, through a temporary file: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The reference model in the run folder


def save_reference(run_dir: Path, model: Transformer) -> Transformer:
    """A frozen copy of `model` (the SFT model), also written to the run folder (atomically) for a resumed run."""
    reference = nnx.clone(model)
    leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(reference)))
    path = Path(run_dir) / REFERENCE_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, *[np.asarray(x) for x in leaves])
    os.replace(tmp, path)
    return reference


def load_reference(run_dir: Path, model: Transformer) -> Transformer:
    """The reference of a run resumed in the middle of RL: `model`'s structure with the weights of REFERENCE_FILE."""
    path = Path(run_dir) / REFERENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing, a run resumed inside RL needs the SFT model it started from; restore the file or start"
            " a new --train.out_dir"
        )
    reference = nnx.clone(model)
    state = nnx.state(reference)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree.flatten(pure)
    with np.load(path) as saved:
        loaded = [jnp.asarray(saved[f"arr_{i}"], x.dtype) for i, x in enumerate(leaves)]
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, loaded))
    nnx.update(reference, state)
    return reference


# ---------------------------------------------------------------------------------------------------------------
# Evaluation before and after RL


def stdlib_prompts(tokenizer: Tokenizer, pairs: list[tuple[str, str]], window: int) -> list[tuple[str, str]]:
    """Up to STDLIB_PROMPTS held-out stdlib SFT pairs whose prompt fits the window and whose reference body ends
    well within the budget (at most half of it), evenly spaced over `pairs`."""
    fits = [
        (p, r) for p, r in pairs
        if len(tokenizer.encode(p).ids) <= window and len(tokenizer.encode(r).ids) < STDLIB_NEW_TOKENS // 2
    ]  # fmt: skip
    if len(fits) <= STDLIB_PROMPTS:
        return fits
    return [fits[i] for i in np.linspace(0, len(fits) - 1, STDLIB_PROMPTS).round().astype(int)]


def evaluate(
    model: Transformer, tokenizer: Tokenizer, held_out: list[tasks.Task], sandbox: Sandbox, tc: TrainConfig, *,
    window: int, stdlib_val: list[dict], stdlib_pairs: list[tuple[str, str]],
) -> dict:  # fmt: skip
    """rl_eval.evaluate on the held-out prompts (8 samples each at T = 1, pass@8) in rollouts of the training
    stage's B rows, plus stdlib_val_loss (held-out stdlib text) and stdlib_parse_rate (and _se) with its bodies."""
    rows = tc.rl_prompts * tc.rl_samples if tc.rl_prompts * tc.rl_samples % 8 == 0 else 64  # the rollout's shape
    result = rl_eval.evaluate(
        model, tokenizer, held_out, sandbox, samples=8, k=8, max_new_tokens=tc.rl_max_new_tokens, window=window,
        seed=tc.seed, rows=rows,
    )  # fmt: skip
    result["stdlib_val_loss"] = step.evaluate(model, stdlib_val)["val_loss"]
    if stdlib_pairs:
        rate, se, bodies = rl_eval.parse_rate(
            model, tokenizer, stdlib_pairs, max_new_tokens=STDLIB_NEW_TOKENS, window=window, rows=STDLIB_PROMPTS
        )
        result["stdlib_parse_rate"], result["stdlib_parse_rate_se"] = rate, se
        result["stdlib_examples"] = [{"prompt": p, "response": b} for (p, _), b in zip(stdlib_pairs[:2], bodies)]
    return result


FIGURES = ("greedy_pass@1", "pass@1", "pass@8", "parse_rate", "response_length", "stdlib_parse_rate")


def report(before: dict, after: dict) -> str:
    """The before/after table printed at the end of train.py, and the greedy samples of both."""
    lines = [f"{'held-out RL task (± standard error)':<38}{'SFT model':>18}{'after RL':>18}{'change (paired SE)':>22}"]
    for name in FIGURES:
        if name not in before or name not in after:
            continue
        a, b, sa, sb = before[name], after[name], before[f"{name}_se"], after[f"{name}_se"]
        delta = f"{b - a:+.3f}"
        if name in before.get("per_prompt", {}):  # the same prompts scored twice: the SE of their differences
            change, se = rl_eval.paired_change(before, after, name)
            delta += f" ({change / max(se, 1e-9):+.1f} SE)"
        lines.append(f"{name:<38}{a:>11.3f} ± {sa:.3f}{b:>11.3f} ± {sb:.3f}{delta:>22}")
    lines.append(
        f"{'stdlib_val_loss (nats/token)':<38}{before['stdlib_val_loss']:>18.3f}{after['stdlib_val_loss']:>18.3f}"
        f"{after['stdlib_val_loss'] - before['stdlib_val_loss']:>+18.3f}"
    )
    for title, ev in (("SFT model", before), ("after RL", after)):
        lines.append(f"greedy samples, {title}:")
        for ex in ev["examples"]:
            head = ex["prompt"].splitlines()[0]
            lines.append(f"  {head}  ->  {ex['response'].strip()!r}  reward {ex['reward']:.0f}")
    return "\n".join(lines)
