"""Orbax checkpoints of a whole training position: model (with the router biases), optimizer, and a JSON record.

A checkpoint holds everything needed to continue a run bit for bit: the model state (parameters and the
non-trainable router biases), the optimizer state (AdamW moments and step), and `meta`, a JSON dict that train.py
fills with the stage and step, the data loaders' generator states and positions, the ledger so far, the resolved
config and the tokenizer. Checkpoints live in `<run>/checkpoints/<step>`; the last `keep` are kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

# Orbax logs every save at INFO and each unreadable file at ERROR before raising; the errors reach the caller as
# CheckpointError with one line that says what to do, so its log lines would only repeat them.
logging.getLogger("absl").setLevel(logging.CRITICAL)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: the message names it and how to recover."""


def _manager(run_dir: Path, keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
    directory = Path(run_dir).absolute() / "checkpoints"  # Orbax wants absolute paths
    return ocp.CheckpointManager(directory, options=options)


def _abstract(tree: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def latest_step(run_dir: Path) -> int | None:
    """The newest checkpoint's step, or None when the run folder has none."""
    if not (Path(run_dir) / "checkpoints").is_dir():
        return None
    return _manager(run_dir).latest_step()


def save(run_dir: Path, step: int, model: nnx.Module, optimizer: nnx.Optimizer, meta: dict, keep: int) -> None:
    """Write checkpoint `step` (overwriting nothing: a step already saved is left as it is)."""
    manager = _manager(run_dir, keep)
    if step in manager.all_steps():
        return
    items = {
        name: ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(m)))
        for name, m in (("model", model), ("optimizer", optimizer))
    }
    manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def restore(run_dir: Path, model: nnx.Module, optimizer: nnx.Optimizer | None, step: int | None = None) -> dict:
    """Load checkpoint `step` (default: the newest) into `model` and `optimizer` in place; return its meta dict.
    With `optimizer=None` only the model is read (sampling)."""
    manager = _manager(run_dir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from")
    modules = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    items = {name: ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(nnx.state(m)))) for name, m in modules.items()}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 (Orbax raises many types for truncated or foreign files)
        where = Path(run_dir).absolute() / "checkpoints" / str(step)
        raise CheckpointError(
            f"{where}: checkpoint is unreadable ({type(e).__name__}); delete that folder to resume from an older one"
        ) from None
    for name, module in modules.items():
        state = nnx.state(module)
        nnx.replace_by_pure_dict(state, restored[name])
        nnx.update(module, state)
    return restored.meta
