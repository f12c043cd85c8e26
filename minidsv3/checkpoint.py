"""Orbax checkpoints of a whole training position: model (with the router biases), optimizer, and a JSON record.

A checkpoint holds everything needed to continue a run bit for bit: the model state (parameters and the
non-trainable router biases), the optimizer state (AdamW moments and step), and `meta`, a JSON dict that train.py
fills with the stage and step, the data loaders' generator states and positions, the ledger so far, the resolved
config and the tokenizer. Checkpoints live in `<run>/checkpoints/<step>`; the last `keep` are kept.

What survives what:
- a process killed at any moment, even mid-save: Orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp` and
  renames it to `<step>` only when every file is written, so a folder named by a bare step is whole; the next save
  removes the leftovers.
- a full disk: `save` removes its partial folder and raises CheckpointError saying so; older checkpoints are intact.
- a damaged checkpoint (overwritten, truncated, files missing): `restore` names the problem and, when the newest is
  damaged, falls back to the newest intact one, saying which on stderr. train.py then sets the damaged ones aside.
- NaN or infinity in the state: `save` refuses to write it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

# Orbax logs every save at INFO and each unreadable file at ERROR before raising, and the writes still in flight when
# a save fails (a full disk) log their own errors through asyncio when they are collected; the errors reach the
# caller as CheckpointError with one line that says what to do, so these log lines would only repeat them.
logging.getLogger("absl").setLevel(logging.CRITICAL)
logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _quiet_closed_loop(unraisable, report=sys.unraisablehook) -> None:
    """When Orbax gives up on a damaged checkpoint, the reads still in flight in TensorStore's threads finish after
    Orbax has closed its event loop, and each reports "Event loop is closed" as an unraisable exception: a screen of
    tracebacks after the one-line error. Those are dropped; any other unraisable exception is reported as usual."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        report(unraisable)


sys.unraisablehook = _quiet_closed_loop

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a checkpoint being written: `<step>.orbax-checkpoint-tmp`
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written: the message names it, the problem, and how to recover."""


def _manager(run_dir: Path, keep: int = 2, *, for_saving: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=False,
        create=True,
        cleanup_tmp_directories=for_saving,  # only a writer may remove leftovers of a killed save: a reader might
    )  # run while a save is in progress
    directory = Path(run_dir).absolute() / "checkpoints"  # Orbax wants absolute paths
    return ocp.CheckpointManager(directory, options=options)


def _abstract(tree: dict) -> dict:
    """Shapes, dtypes and the shardings of the arrays to restore into: Orbax reads each device's part of each array
    (minidsv3/sharding.py), so a checkpoint saved on one mesh shape restores onto another, or onto one device."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def latest_step(run_dir: Path) -> int | None:
    """The newest checkpoint's step, or None when the run folder has none."""
    if not (Path(run_dir) / "checkpoints").is_dir():
        return None
    return _manager(run_dir).latest_step()


def save(run_dir: Path, step: int, model: nnx.Module, optimizer: nnx.Optimizer, meta: dict, keep: int) -> None:
    """Write checkpoint `step` (overwriting nothing: a step already saved is left as it is).

    Raises CheckpointError, leaving the older checkpoints as they were, when the state holds a NaN or an infinity
    (nothing is written) or the disk is full (what was written is removed)."""
    manager = _manager(run_dir, keep, for_saving=True)
    if step in manager.all_steps():
        return
    folder = Path(run_dir).absolute() / "checkpoints" / str(step)
    newest = manager.latest_step()
    intact = f"the checkpoint of step {newest} is intact" if newest is not None else "there is no older checkpoint"
    states = {name: nnx.to_pure_dict(nnx.state(m)) for name, m in (("model", model), ("optimizer", optimizer))}
    if bad := _non_finite(states):
        raise CheckpointError(f"{folder}: not saved, {bad[0]} holds NaN or infinity; {intact}")
    retry = f"{intact}; free some space and run the same command to resume"
    # Arrays as they are in memory plus the JSON: an upper bound (Orbax compresses), checked before anything is written
    need = sum(x.nbytes for x in jax.tree.leaves(states)) + len(json.dumps(meta)) + 2**20
    if (free := shutil.disk_usage(folder.parent).free) < need:
        raise CheckpointError(
            f"{folder}: disk full, not saved: it needs up to {need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free; {retry}"
        )
    items = {name: ocp.args.StandardSave(state) for name, state in states.items()}
    try:
        manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    except Exception as e:
        _remove_partial(folder.parent, step)  # frees the space (the next save would too)
        if reason := _disk_full(e):  # the disk filled up meanwhile, or a quota the free space does not show
            raise CheckpointError(
                f"{folder}: disk full while saving ({reason}), partial checkpoint removed; {retry}"
            ) from None
        raise


def _remove_partial(directory: Path, step: int) -> None:
    """Remove what a failed save of `step` left. The writes still in flight when Orbax gave up finish in TensorStore's
    threads and may recreate files for a moment, so this removes until nothing reappears for 0.3 s (at most 5 s)."""
    quiet = 0
    for _ in range(50):
        partial = list(directory.glob(f"{step}{TMP_SUFFIX}*"))
        for folder in partial:
            shutil.rmtree(folder, ignore_errors=True)
        quiet = 0 if partial else quiet + 1
        if quiet == 3:
            return
        time.sleep(0.1)


def _non_finite(tree: dict) -> list[str]:
    """The paths of the floating-point arrays of `tree` that hold a NaN or an infinity."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        jax.tree_util.keystr(path, simple=True, separator=".")
        for path, x in leaves
        if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.isfinite(x).all())  # on device: x may span hosts
    ]


def _disk_full(e: BaseException | None) -> str | None:
    """The error's text, "No space left on device" or "Disk quota exceeded", when `e` or an exception it was raised
    from is one: an OSError from Python's file writes, or a ValueError that names it, from TensorStore (the arrays)."""
    while e is not None:
        for code in DISK_FULL:
            if (isinstance(e, OSError) and e.errno == code) or os.strerror(code) in str(e):
                return os.strerror(code)
        e = e.__cause__ or e.__context__
    return None


def restore(run_dir: Path, model: nnx.Module, optimizer: nnx.Optimizer | None, step: int | None = None) -> dict:
    """Load checkpoint `step` into `model` and `optimizer` in place; return its meta dict, with "restored_step" added.
    With `optimizer=None` only the model is read (sampling).

    Without `step`, the newest intact checkpoint: each newer one that cannot be read is named on stderr with its
    problem and passed over. Raises CheckpointError when there is none to read."""
    manager = _manager(run_dir)
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from")
    modules = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
    items = {name: ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(nnx.state(m)))) for name, m in modules.items()}
    damaged = []
    for s in steps:
        folder = Path(run_dir).absolute() / "checkpoints" / str(s)
        try:
            restored = manager.restore(s, args=ocp.args.Composite(**items, meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 (Orbax raises many types for truncated or foreign files)
            damaged.append(f"{folder}: checkpoint is unreadable ({_problem(e, folder, [*items, 'meta'])})")
            continue
        for message in damaged:
            print(f"warning: {message}; using the checkpoint of step {s} instead", file=sys.stderr)
        for name, module in modules.items():  # written only now: a failed attempt leaves the modules as they were
            state = nnx.state(module)
            nnx.replace_by_pure_dict(state, restored[name])
            nnx.update(module, state)
        return {**restored.meta, "restored_step": s}
    n = len(damaged) - 1
    older = "" if n == 0 else ", and so is the older one" if n == 1 else f", and so are the {n} older ones"
    remedy = f"delete {folder.parent} to start the run over" if step is None else "choose another step"
    raise CheckpointError(f"{damaged[0]}{older}; {remedy}")


def set_aside_newer(run_dir: Path, step: int) -> list[Path]:
    """Move the checkpoints newer than `step` (unreadable ones that `restore` passed over) to
    `<run>/checkpoints-damaged/`, so that the continued run writes those steps afresh; return their new places."""
    moved = []
    for s in _manager(run_dir).all_steps():
        if s > step:
            target = Path(run_dir).absolute() / "checkpoints-damaged" / str(s)
            while target.exists():  # damaged twice at the same step: keep both
                target = target.with_name(target.name + "-again")
            target.parent.mkdir(exist_ok=True)
            (Path(run_dir).absolute() / "checkpoints" / str(s)).rename(target)
            moved.append(target)
    return moved


def _problem(e: Exception, folder: Path, items: list[str]) -> str:
    """What is wrong with the checkpoint in `folder`, in a few words, from what Orbax raised reading it."""
    text = str(e)
    if not folder.is_dir():
        return "there is no such checkpoint"
    if missing := [name for name in items if not (folder / name).is_dir()]:
        return f"its {' and '.join(missing)} part is missing"
    if isinstance(e, FileNotFoundError) or "not found" in text or "does not exist" in text:
        return f"a file is missing: {_first_line(e).replace(f'{folder}/', '').replace(str(folder), '.')}"
    if isinstance(e, json.JSONDecodeError):
        return "a metadata file is not valid JSON: overwritten or truncated"
    if "DATA_LOSS" in text or "OUT_OF_RANGE" in text:  # TensorStore's words for garbage and short files
        return "its array files are overwritten or truncated"
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__
