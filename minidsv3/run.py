"""The run folder: which runs a folder accepts, metrics.jsonl and its records, throughput, and reading a run back.

A run folder holds
    <out_dir>/config.json     the resolved config of the latest start
    <out_dir>/manifest.json   the corpus it trains on: file count, bytes, content hash (data.manifest)
    <out_dir>/metrics.jsonl   one JSON line per training step and per evaluation (plots.py reads it)
    <out_dir>/checkpoints/    minidsv3/checkpoint.py

A run is what it trains, not where it lives. Once a folder holds a checkpoint, a start in it continues that run, so
it must train the same model on the same schedule (config.run_defining: every field but where the folder, the corpus
and the caches live and where to stop) and the same corpus content (manifest.json). So a folder may be moved, renamed
or copied. A folder without a checkpoint holds nothing to continue: a new start replaces what an earlier, failed
start left in it. `check_run_folder` and `check_corpus` only read, so a refused start leaves the folder as it was;
`open_run_folder` writes, once every input is checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TextIO

import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from minidsv3 import checkpoint, config
from minidsv3.model import Transformer, routers, with_config


class RunFolderError(ValueError):
    """The run folder cannot hold this run; the message names it and what to do."""


def check_run_folder(out_dir: str, resolved: dict) -> Path:
    """The run folder as an absolute path, after checking (reading only) that it can hold the run `resolved`: a
    folder that can be made and written, and that holds no run or this one."""
    run_dir = Path(out_dir).absolute()
    # the folder, or the nearest ancestor to make it in (a dangling link counts: it blocks the path too)
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise RunFolderError(
            f"{run_dir}: cannot be a run folder, {existing} is not a folder; choose another --train.out_dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"{existing}: not writable; choose another --train.out_dir")
    if checkpoint.latest_step(run_dir) is None:  # nothing to continue
        return run_dir
    config_file = run_dir / "config.json"
    previous = _read_json(config_file)
    if not isinstance(previous, dict):
        raise RunFolderError(
            f"{config_file}: missing or not a config, next to checkpoints; restore it from that run, or choose another"
            " --train.out_dir"
        )
    changed = _differences(config.run_defining(previous), config.run_defining(json.loads(json.dumps(resolved))))
    if changed:
        raise RunFolderError(
            f"{run_dir}: holds a run with a different config ({'; '.join(changed[:3])}"
            f"{'; ...' if len(changed) > 3 else ''}); choose another --train.out_dir, or delete that folder"
        )
    return run_dir


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """One line per field where two config dicts differ: `section.field: A in config.json, B now`."""
    found = []
    for key in sorted(saved.keys() | now.keys()):
        a, b = saved.get(key, "unset"), now.get(key, "unset")
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a} in config.json, {b} now")
    return found


def check_corpus(run_dir: Path, corpus: dict) -> None:
    """A run that continues must read the corpus it was trained on: `corpus` (data.manifest) equals manifest.json."""
    manifest_file = run_dir / "manifest.json"
    if checkpoint.latest_step(run_dir) is None or not manifest_file.is_file():
        return
    trained = _read_json(manifest_file)
    if trained != corpus:
        was = f"{trained.get('files')} files, {trained.get('bytes')} bytes" if isinstance(trained, dict) else "?"
        raise RunFolderError(
            f"{run_dir}: the corpus (--data.path) has changed since this run began (manifest.json: {was}; now"
            f" {corpus['files']} files, {corpus['bytes']} bytes, another content hash); restore that corpus, or start"
            " a new run with another --train.out_dir"
        )


def _read_json(path: Path) -> object:
    """The JSON value in `path`, or None when it cannot be read or is not JSON (the caller names the file)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def open_run_folder(run_dir: Path, resolved: dict, corpus: dict) -> None:
    """Make the run folder and write config.json (this start's config) and manifest.json (its corpus)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
        (run_dir / "manifest.json").write_text(json.dumps(corpus, indent=2))
    except OSError as e:
        raise RunFolderError(
            f"{run_dir}: cannot write the run folder ({e.strerror}); choose another --train.out_dir"
        ) from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir`/metrics.jsonl, one dict per logged line (training steps and evaluations).

    A last line without its newline is one a killed run was writing: it is left out (the step it logged comes after
    the checkpoint, so a resume redoes it). Any other line that is not JSON is a RunFolderError naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for n, line in enumerate(path.read_text(errors="replace").split("\n")[:-1], start=1):  # whole lines only
        try:
            records.append(json.loads(line))
        except ValueError:
            raise RunFolderError(f"{path}: line {n} is not JSON; delete that line (or the file) to resume") from None
    return records


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
        "seconds": seconds, "skipped": bool(out["skipped"]),  # skipped: a non-finite step, not applied
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


# ---------------------------------------------------------------------------------------------------------------
# Reading a finished (or interrupted) run back: generate.py, the benches, the tests


def load_run(run_dir: str | Path) -> tuple[Transformer, Tokenizer, int]:
    """The model of a run's newest intact checkpoint, with the config of the stage that saved it, the run's tokenizer,
    and the step of that checkpoint (checkpoint.restore passes over damaged newer ones, naming each on stderr).
    Reads only; a missing or damaged file is a CheckpointError or ConfigError naming it."""
    run_dir = Path(run_dir)
    _require_a_run(run_dir)
    cfg = _run_config(run_dir / "config.json")
    model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))  # shapes only: restore fills in values
    meta = checkpoint.restore(run_dir, model, None)
    model = with_config(model, config.from_dict({"model": meta["model_config"]}).model)  # YaRN after context ext.
    return model, Tokenizer.from_str(meta["tokenizer"]), meta["restored_step"]


def _require_a_run(run_dir: Path) -> None:
    """Refuse a folder without config.json or checkpoints (before Orbax would make a checkpoints/ folder in it)."""
    if not (run_dir / "config.json").is_file() or checkpoint.latest_step(run_dir) is None:
        raise checkpoint.CheckpointError(f"{run_dir}: no run with a checkpoint here; train one with `python train.py`")


def _run_config(path: Path) -> config.Config:
    """A run folder's config.json, which train.py wrote; one that is unreadable or invalid is a ConfigError."""
    fix = "it is written by train.py: put back the run's own copy, or train a new run"
    try:
        tables = json.loads(path.read_bytes())
    except OSError as e:
        raise config.ConfigError(f"{path}: cannot be read ({e.strerror}); check the file's permissions") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise config.ConfigError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(tables, dict):
        raise config.ConfigError(
            f"{path}: expected a JSON object of config sections, got {type(tables).__name__}; {fix}"
        )
    try:
        return config.from_dict(tables)
    except config.ConfigError as e:
        raise config.ConfigError(f"{path}: {e}") from None
