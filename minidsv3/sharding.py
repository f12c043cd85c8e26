"""The device mesh and the one table of partition rules: how the model, the optimizer and a batch lie on N devices.

The mesh has two axes, ('data', 'expert'), of sizes `mesh.data` x `mesh.expert` (config [mesh]):
    - routed-expert weights (E, ...) are split over 'expert': each device holds E / mesh.expert whole experts, as
      DeepSeek-V3 spreads its 256 experts over 64 GPUs (report §3.2.2, expert parallelism);
    - everything else, the router biases included, is replicated on every device;
    - a batch is split over both axes together: the expert axis carries data too (as MaxText lays it out), so every
      device routes its own sequences and expert parallelism costs no idle device (minidsv3/expert_parallel.py);
    - an optimizer moment lies as its parameter does: its path ends with the parameter's path, so the same rule
      matches it.
Partitioning is a table from state path (e.g. `layers.1.mlp.experts.gate_proj`) to `PartitionSpec`, applied to
the state after construction: constructors never see an axis name.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "expert")
BATCH = ("data", "expert")  # the mesh axes a batch's leading (sequence) dimension is split over

# (path pattern, PartitionSpec): the first pattern found in a leaf's dotted path decides. The routed experts' three
# stacked weights (E, D, F), (E, D, F), (E, F, D) and their AdamW moments; `shared_experts.*` end in `.kernel`.
PARTITION_RULES = (
    (r"(^|\.)experts\.(gate|up|down)_proj(\.value)?$", P("expert", None, None)),  # E / mesh.expert experts each
    (r".*", P()),  # replicated: attention, dense MLPs, shared experts, routers and their biases, norms, embeddings
)


class ShardingError(ValueError):
    """A mesh that does not fit the devices, the experts or the batch; the message names the fix."""


def make_mesh(data: int, expert: int, n_experts: int | None = None) -> Mesh:
    """A ('data', 'expert') mesh on the first data·expert devices (of all processes). Raises ShardingError when the
    product does not divide the devices or the experts do not split evenly over the expert axis."""
    n_devices = jax.device_count()
    if data < 1 or expert < 1 or n_devices % (data * expert):
        raise ShardingError(
            f"mesh.data x mesh.expert = {data} x {expert} = {data * expert} does not divide the {n_devices} devices;"
            f" choose sizes whose product divides {n_devices}"
        )
    if n_experts is not None and n_experts % expert:
        raise ShardingError(
            f"model.n_routed_experts ({n_experts}) is not divisible by mesh.expert ({expert}); choose a mesh.expert"
            f" that divides {n_experts}"
        )
    devices = np.array(jax.devices()[: data * expert]).reshape(data, expert)  # (data, expert)
    # Auto axes: XLA places the intermediates (GSPMD); only the expert exchange is written by hand (shard_map).
    return Mesh(devices, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def partition_spec(path: str) -> P:
    """The PartitionSpec of the state leaf at dotted `path`: the first matching rule of PARTITION_RULES."""
    return next(spec for pattern, spec in PARTITION_RULES if re.search(pattern, path))


def state_shardings(mesh: Mesh, state) -> object:
    """A tree like `state` (an nnx.State or a pure dict) of NamedShardings, one per leaf, from PARTITION_RULES."""

    def sharding(path, leaf) -> NamedSharding:
        spec = partition_spec(jax.tree_util.keystr(path, simple=True, separator="."))
        return NamedSharding(mesh, spec if np.ndim(leaf) else P())  # scalars (AdamW's count) are replicated

    return jax.tree_util.tree_map_with_path(sharding, state)


def shard_modules(mesh: Mesh, *modules: nnx.Module) -> None:
    """Place each module's whole state (an optimizer's moments included) on the mesh by PARTITION_RULES, in place."""
    for module in modules:
        state = nnx.state(module)
        nnx.update(module, jax.device_put(state, state_shardings(mesh, state)))


def mesh_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH]))


def check_batch(mesh: Mesh, batch_size: int, what: str) -> None:
    """A batch of `batch_size` sequences splits evenly over the mesh, or ShardingError naming `what` and the fix."""
    if batch_size % mesh_size(mesh):
        raise ShardingError(
            f"{what} ({batch_size} sequences) is not divisible by mesh.data x mesh.expert ({mesh_size(mesh)});"
            f" choose a batch size that is a multiple of {mesh_size(mesh)}"
        )


def put_batch(mesh: Mesh, arrays: dict, batch_axis: int = 0) -> dict:
    """Numpy arrays whose axis `batch_axis` holds sequences -> global jax.Arrays split over BATCH on that axis
    (replicated when the count does not divide the mesh, e.g. a short last validation batch). Each process cuts only
    its own devices' slices out of the arrays, so the same call serves one host and several."""
    out = {}
    for name, x in arrays.items():
        x = np.asarray(x)
        spec = [None] * x.ndim
        if x.shape[batch_axis] % mesh_size(mesh) == 0:
            spec[batch_axis] = BATCH
        sharding = NamedSharding(mesh, P(*spec))
        out[name] = jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
    return out
