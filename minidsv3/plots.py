"""PNG plots of a run from its metrics.jsonl: losses over all stages, expert loads and router biases over time."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np

from minidsv3 import run


def plot_run(run_dir: Path) -> list[Path]:
    """Write loss.png, expert_load.png, router_bias.png and, after RL, rl_reward.png into `run_dir`; return their
    paths."""
    run_dir = Path(run_dir)
    records = run.read_metrics(run_dir)
    steps = [r for r in records if not r.get("eval")]
    evals = [r for r in records if r.get("eval")]
    if not steps:
        return []
    written = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    supervised = [r for r in steps if "main_loss" in r]  # RL steps log a reward, not a cross-entropy
    ax.plot([r["step"] for r in supervised], [r["main_loss"] for r in supervised], lw=0.8, label="train loss (main)")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="validation loss")
    for prev, cur in itertools.pairwise(steps):
        if cur["stage"] != prev["stage"]:
            ax.axvline(prev["step"], color="grey", ls="--", lw=0.8)
            ax.text(prev["step"], ax.get_ylim()[1], f" {cur['stage']}", va="top", fontsize=8, color="grey")
    ax.set(xlabel="optimizer step", ylabel="nats / token", title="Loss over pre-training, context extension and SFT")
    ax.legend()
    written.append(_save(fig, run_dir / "loss.png"))

    loads = np.asarray([r["expert_load"] for r in steps], dtype=float)  # (steps, L_moe, E)
    biases = np.asarray([r["router_bias"] for r in steps], dtype=float)  # (steps, L_moe + depths, E)
    if loads.ndim == 3 and loads.shape[1] > 0:
        n_layers = loads.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=(9, 2.2 * n_layers), squeeze=False)
        share = loads / np.maximum(loads.sum(-1, keepdims=True), 1) * loads.shape[-1]  # 1.0 = perfectly balanced
        for i, ax in enumerate(axes[:, 0]):
            im = ax.imshow(share[:, i].T, aspect="auto", cmap="coolwarm", vmin=0, vmax=2, interpolation="nearest")
            ax.set(ylabel=f"MoE layer {i}\nexpert")
            fig.colorbar(im, ax=ax, label="load / mean")
        axes[-1, 0].set_xlabel("optimizer step")
        axes[0, 0].set_title("Expert load per layer (1 = balanced)")
        written.append(_save(fig, run_dir / "expert_load.png"))

        fig, axes = plt.subplots(biases.shape[1], 1, figsize=(9, 2.2 * biases.shape[1]), squeeze=False)
        for i, ax in enumerate(axes[:, 0]):
            ax.plot([r["step"] for r in steps], biases[:, i], lw=0.7)
            ax.set(ylabel=f"router {i}\nbias b_i")
        axes[-1, 0].set_xlabel("optimizer step")
        axes[0, 0].set_title("Router biases (aux-loss-free balancing); the last rows are the MTP blocks'")
        written.append(_save(fig, run_dir / "router_bias.png"))

    rl = [r for r in steps if r["stage"] == "rl"]
    if rl:  # GRPO (minidsv3/rl.py): the mean reward of each step's samples and the groups that gave no gradient
        fig, ax = plt.subplots(figsize=(9, 4))
        x = [r["step"] for r in rl]
        reward = np.array([r["reward"] for r in rl])
        ax.plot(x, reward, lw=0.8, alpha=0.5, label="reward (mean of the step's samples)")
        window = min(10, len(rl))
        ax.plot(x[window - 1 :], np.convolve(reward, np.ones(window) / window, "valid"), label=f"mean of {window}")
        ax.set(xlabel="optimizer step", ylabel="reward", ylim=(0, 1), title="RL: rule reward of the rollouts (GRPO)")
        ax.legend(loc="upper left")
        right = ax.twinx()
        right.plot(x, [r["zero_variance_groups"] for r in rl], ":", lw=0.8, color="grey")
        right.set_ylabel("groups with equal rewards (dotted)")
        written.append(_save(fig, run_dir / "rl_reward.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
