"""The run folder's bookkeeping, for train.py: the config check, metrics.jsonl and its records, throughput.

A run folder holds
    <out_dir>/config.json     the resolved config; running again in the same folder must resolve to the same run
    <out_dir>/metrics.jsonl   one JSON line per training step and per evaluation (plots.py reads it)
    <out_dir>/checkpoints/    minidsv3/checkpoint.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

import numpy as np

from minidsv3 import config
from minidsv3.model import Transformer, routers


class RunFolderError(ValueError):
    """The run folder cannot hold this run; the message names it and what to do."""


def open_run_folder(out_dir: str, resolved: dict) -> Path:
    """The run folder as an absolute path, made if needed and checked writable. A new run writes its config.json;
    a folder that already holds one must hold the same run (config.run_defining: all but where to stop)."""
    run_dir = Path(out_dir).absolute()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write-test").touch()
        (run_dir / ".write-test").unlink()
    except OSError as e:
        raise RunFolderError(
            f"{run_dir}: run folder is not writable ({e.strerror}); choose another --train.out_dir"
        ) from None
    config_file = run_dir / "config.json"
    if not config_file.exists():
        config_file.write_text(json.dumps(resolved, indent=2))
        return run_dir
    try:
        previous = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        raise RunFolderError(
            f"{config_file}: is not valid JSON; delete the run folder or choose another --train.out_dir"
        ) from None
    if config.run_defining(previous) != config.run_defining(json.loads(json.dumps(resolved))):  # as JSON stores it
        raise RunFolderError(
            f"{run_dir}: holds a run with a different config; choose another --train.out_dir or delete that folder"
        )
    return run_dir


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir`/metrics.jsonl, one dict per logged line (training steps and evaluations)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def open_metrics(run_dir: Path, step: int) -> TextIO:
    """metrics.jsonl opened for appending, holding exactly the records of the steps up to `step` (the checkpoint
    resumed from): later lines, from a run that died after its last checkpoint, are dropped."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = [record for record in read_metrics(run_dir) if record["step"] <= step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))  # the same bytes json.dumps wrote
    return path.open("a")


def write_record(metrics_out: TextIO, record: dict) -> None:
    """One line of metrics.jsonl, flushed: a run killed at any moment leaves whole lines."""
    metrics_out.write(json.dumps(record) + "\n")
    metrics_out.flush()


def step_record(
    step: int, stage: str, out: dict, model: Transformer, *, lr: float, gamma: float, mtp_lambda: float, tokens: int,
    seconds: float,
) -> dict:  # fmt: skip
    """The metrics.jsonl record of a training step: the outputs of step.train_step, the step's inputs, and the router
    biases after it."""
    load = np.asarray(out["expert_load"])  # (L_moe, E)
    losses = {k: float(out[k]) for k in ("main_loss", "total_loss", "mtp_loss", "balance_loss", "grad_norm")}
    return {
        "step": step, "stage": stage, **losses, "lr": lr, "gamma": gamma, "mtp_lambda": mtp_lambda, "tokens": tokens,
        "seconds": seconds,
        "maxvio_batch": float(out["maxvio_batch"]) if load.size else None,  # None: no MoE layer routes anything
        "expert_load": load.tolist(),
        "router_bias": [np.asarray(r.e_score_correction_bias[...]).round(5).tolist() for r in routers(model)],
    }  # fmt: skip


def mean_maxvio(ev: dict, per_layer: bool = False) -> str:
    """An evaluation's MaxVio_global averaged over the MoE layers, as [LF] reports it, and its layers' own values."""
    layers = ev["maxvio_global"]
    if not layers:  # first_k_dense_replace = num_hidden_layers: nothing is routed
        return "n/a (no MoE layer)"
    per = f" (per MoE layer: {', '.join(f'{v:.3f}' for v in layers)})" if per_layer else ""
    return f"{np.mean(layers):.3f}{per}"


class Throughput:
    """Tokens per second over the steps that did not compile. A step whose batch shape (micro, B, T) this process has not
    run before includes jit compilation: each stage's first step, and the first of each level of the batch ramp."""

    def __init__(self):
        self.tokens, self.seconds, self.shapes = 0, 0.0, set()

    def add(self, shape: tuple, tokens: int, seconds: float) -> float:
        """Count one step; return the tokens per second so far (0 until a step without compilation)."""
        if shape in self.shapes:
            self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        self.shapes.add(shape)
        return self.tokens / self.seconds if self.seconds else 0.0
