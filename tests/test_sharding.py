"""The (data, expert) mesh (minidsv3/sharding.py) and expert-parallel dispatch (minidsv3/expert_parallel.py): training
on 8 devices laid out as (8, 1), (2, 4) or (1, 8) equals training on one, the experts are split, the dispatch is
dropless, and a checkpoint moves between mesh shapes.

Eight devices need XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported, so every check runs in
one subprocess (`python tests/test_sharding.py OUT.json`, this file's `__main__`), which writes what it measured;
the tests below read it, one property each. The model is conftest's SMALL cut to one MoE layer and no MTP: the same
MoE code path, and a train step that compiles in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's SMALL, in the subprocess too
from conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]
CFG = dataclasses.replace(SMALL, num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)
MESHES = ((8, 1), (2, 4), (1, 8))  # (data, expert), each against (1, 1)
B, T, STEPS, SAVE_AT = 8, 16, 5, 3  # 8 sequences: one per device on every mesh
LR, MTP_LAMBDA, GAMMA = 1e-3, 0.3, 0.01
SAME_EXPERTS = (3, 5)  # the dropless check routes every token to these two experts


# ---------------------------------------------------------------------------------------------------------------
# The tests: read what the subprocess measured


@pytest.fixture(scope="module")
def measured(tmp_path_factory, jax_cache_env) -> dict:
    out = tmp_path_factory.mktemp("mesh") / "measured.json"
    # Backend optimization level 0: the step compiles ~2.5x faster on CPU; every mesh runs with the same flag.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = {**jax_cache_env, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, __file__, str(out)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", [f"{d}x{e}" for d, e in MESHES])
def test_five_training_steps_on_a_mesh_equal_one_device(measured, mesh):
    one, run = measured["1x1"], measured[mesh]
    np.testing.assert_allclose(run["losses"], one["losses"], rtol=1e-5)
    assert len(run["losses"]) == STEPS
    # The sign rule moves every bias by ±γ or 0: identical biases mean the same loads, summed over the whole mesh.
    np.testing.assert_array_equal(run["router_bias"], one["router_bias"])
    assert np.abs(one["router_bias"]).max() > 0  # the biases did move
    assert run["max_param_diff"] < 1e-5, run["max_param_diff_at"]


def test_the_bias_check_can_tell_local_loads_from_mesh_wide_ones(measured):
    """Precondition of the bias equality above: on the first batch some device's own tokens would move some bias the
    other way than the whole batch does, so a sign rule on per-device loads could not give the one-device biases."""
    assert measured["local_sign_disagreements"] > 0


@pytest.mark.parametrize("mesh, ep", [("2x4", 4), ("1x8", 8), ("8x1", 1)])
def test_each_device_holds_one_ep_th_of_the_expert_weights_and_their_adam_moments(measured, mesh, ep):
    e, d, f = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size
    shards = measured[mesh]["expert_shards"]
    assert shards["gate_proj"] == [[e // ep, d, f]] * 8  # one shard per device, on all 8
    assert shards["down_proj"] == [[e // ep, f, d]] * 8
    assert shards["adam_mu_gate_proj"] == [[e // ep, d, f]] * 8
    assert shards["router_bias"] == [[e]] * 8  # replicated


def test_the_compiled_expert_parallel_step_exchanges_tokens_by_all_to_all(measured):
    assert measured["2x4"]["all_to_all_ops"] >= 2  # there and back (and their transposes in the backward pass)
    assert measured["8x1"]["all_to_all_ops"] == 0  # pure data parallelism needs none


@pytest.mark.parametrize("mesh", ["2x4", "1x8"])
def test_dispatch_is_dropless_when_every_token_picks_the_same_experts(measured, mesh):
    """Every token to experts SAME_EXPERTS: all N·K rows land on one or two devices, the worst case for capacity."""
    drop = measured["dropless"][mesh]
    assert drop["max_abs_diff"] < 1e-5 * drop["max_abs"]
    assert drop["max_abs"] > 0


@pytest.mark.parametrize("target", ["1x1", "4x2"])
def test_a_checkpoint_saved_on_2x4_restores_on_another_mesh_and_continues_identically(measured, target):
    uninterrupted, resumed = measured["2x4"], measured[f"resumed_on_{target}"]
    data, ep = (int(n) for n in target.split("x"))
    shard = [CFG.n_routed_experts // ep, CFG.hidden_size, CFG.moe_intermediate_size]
    assert resumed["expert_shards"] == [shard] * (data * ep)  # laid out on the new mesh
    np.testing.assert_allclose(resumed["losses"], uninterrupted["losses"][SAVE_AT:], rtol=1e-5)
    np.testing.assert_array_equal(resumed["router_bias"], uninterrupted["router_bias"])
    assert resumed["max_param_diff_to_2x4"] < 1e-5, resumed["max_param_diff_at"]


def test_the_all_to_all_volume_of_a_deepseek_v3_layer_at_64_way_ep_worked_by_hand():
    """bench/scaling.py's bytes per token, one MoE layer forward: D 7168, K 8, E 256 over EP 64 (E_loc 4), M 4 nodes."""
    sys.path.insert(0, str(ROOT / "bench"))
    import scaling

    from minidsv3 import config

    m = config.load_model_config(ROOT / "configs" / "deepseek_v3.toml")
    (_, ours, _), (_, ragged, _), (_, node_limited, per_step) = scaling.comm_volume(m, ep=64, tokens_per_step=10)
    assert ours == 2 * 64 * 4 * 7168 * 4  # EP·min(K, E_loc) float32 rows each way = 14.7 MB, 64x ragged
    assert ragged == 2 * 8 * 7168 * 2  # K bf16 rows each way = 229 KB
    assert node_limited == 4 * (7168 + 4 * 56 + 2 * 7168)  # 4 nodes x (FP8 row + 56 scales, BF16 row) = 86.9 KB
    assert per_step == 10 * node_limited


# ---------------------------------------------------------------------------------------------------------------
# The subprocess: 8 host devices


def batches() -> list[dict]:
    """STEPS batches of one micro-batch of B random sequences, (1, B, T) each."""
    out = []
    for i in range(STEPS):
        tokens = np.random.default_rng(i).integers(0, CFG.vocab_size, (1, B, T + 1)).astype(np.int32)
        ones = np.ones((1, B, T), np.int32)
        out.append({"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "loss_mask": ones, "token_mask": ones})
    return out


def main(out_path: str) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minidsv3 import checkpoint, expert_parallel, sharding
    from minidsv3.config import TrainConfig
    from minidsv3.dispatch import dispatch
    from minidsv3.model import Transformer, routers
    from minidsv3.step import make_optimizer, train_step

    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    data, tc, results = batches(), TrainConfig(), {}
    ckpt_dir = Path(out_path).parent / "run"

    def build(shape, seed=0):
        mesh = sharding.make_mesh(*shape, CFG.n_routed_experts)
        with jax.set_mesh(mesh):
            model = Transformer(CFG, rngs=nnx.Rngs(seed))
            optimizer = make_optimizer(model, tc)
            sharding.shard_modules(mesh, model, optimizer)
        return mesh, model, optimizer

    def train(mesh, model, optimizer, steps) -> list[float]:
        with jax.set_mesh(mesh):
            return [
                float(train_step(model, optimizer, sharding.put_batch(mesh, data[i], 1), LR, MTP_LAMBDA, GAMMA)[
                    "main_loss"])
                for i in steps
            ]  # fmt: skip

    def arrays(model, optimizer) -> dict:
        """Every array of the model and the optimizer, by dotted path ("0.layers.0.mlp.experts.gate_proj")."""
        flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state((model, optimizer))))[0]
        return {jax.tree_util.keystr(p, simple=True, separator="."): x for p, x in flat}

    def host_state(model, optimizer) -> dict:
        return {k: np.asarray(x) for k, x in arrays(model, optimizer).items()}

    def describe(model, optimizer, losses) -> dict:
        state = arrays(model, optimizer)
        (mu,) = [x for k, x in state.items() if k.endswith("mu.layers.0.mlp.experts.gate_proj")]  # Adam's moment
        shapes = {
            "gate_proj": state["0.layers.0.mlp.experts.gate_proj"], "down_proj": state["0.layers.0.mlp.experts.down_proj"],
            "adam_mu_gate_proj": mu, "router_bias": state["0.layers.0.mlp.gate.e_score_correction_bias"],
        }  # fmt: skip
        return {
            "losses": losses,
            "router_bias": [np.asarray(r.e_score_correction_bias[...]).tolist() for r in routers(model)],
            "expert_shards": {k: [list(s.data.shape) for s in v.addressable_shards] for k, v in shapes.items()},
        }

    def compare(state: dict, reference: dict, into: dict, suffix: str = "") -> None:
        diffs = {k: float(np.abs(v.astype(np.float64) - reference[k]).max()) for k, v in state.items()}
        worst = max(diffs, key=diffs.get)
        into[f"max_param_diff{suffix}"], into["max_param_diff_at"] = diffs[worst], worst

    # one device: (1, 1)
    mesh, model, optimizer = build((1, 1))
    results["1x1"] = describe(model, optimizer, train(mesh, model, optimizer, range(STEPS)))
    reference = host_state(model, optimizer)

    # the three meshes; (2, 4) saves a checkpoint after step SAVE_AT
    for shape in MESHES:
        name = f"{shape[0]}x{shape[1]}"
        mesh, model, optimizer = build(shape)
        t0 = time.perf_counter()
        losses = train(mesh, model, optimizer, range(SAVE_AT))
        if shape == (2, 4):
            checkpoint.save(ckpt_dir, SAVE_AT, model, optimizer, {"step": SAVE_AT}, keep=1)
        losses += train(mesh, model, optimizer, range(SAVE_AT, STEPS))
        results[name] = describe(model, optimizer, losses)
        results[name]["seconds"] = time.perf_counter() - t0
        compare(host_state(model, optimizer), reference, results[name])
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):  # the compiled step, to look for the exchange
            hlo = train_step.lower(model, optimizer, sharding.put_batch(mesh, data[0], 1), LR, MTP_LAMBDA, GAMMA)
            results[name]["all_to_all_ops"] = hlo.compile().as_text().count(" all-to-all(")
        results[name]["compile_seconds"] = time.perf_counter() - t0
        if shape == (2, 4):
            at_2x4 = host_state(model, optimizer)

    # the checkpoint of (2, 4) continued on (1, 1) and (4, 2), from a model initialized otherwise
    for shape in ((1, 1), (4, 2)):
        mesh, model, optimizer = build(shape, seed=1)
        with jax.set_mesh(mesh):
            checkpoint.restore(ckpt_dir, model, optimizer)
        entry = describe(model, optimizer, train(mesh, model, optimizer, range(SAVE_AT, STEPS)))
        entry["expert_shards"] = entry["expert_shards"]["gate_proj"]
        compare(host_state(model, optimizer), at_2x4, entry, "_to_2x4")
        results[f"resumed_on_{shape[0]}x{shape[1]}"] = entry

    # the bias check's precondition: per-device loads of the first batch disagree in sign with the whole batch's
    mesh, model, _ = build((1, 1))
    with jax.set_mesh(mesh):
        forward = nnx.jit(lambda m, x: m(x)[1]["expert_load"][0])  # (E,) loads of the MoE layer
        local = [np.asarray(forward(model, jnp.asarray(data[0]["inputs"][0, i : i + 1]))) for i in range(B)]  # (E,)

    def signs(load):  # [LF] Algorithm 1's sign rule
        return np.sign(load.mean() - load)

    whole = signs(np.sum(local, axis=0))  # loads add up over tokens; one sequence per device on every mesh
    results["local_sign_disagreements"] = int(sum((signs(load) != whole).sum() for load in local))

    # dropless: every token routed to the same two experts, expert-parallel vs one device
    experts = model.layers[0].mlp.experts
    n = B * T
    x = jax.random.normal(jax.random.key(0), (n, CFG.hidden_size))  # (N, D)
    topk = jnp.broadcast_to(jnp.asarray(SAME_EXPERTS, jnp.int32), (n, 2))  # (N, K)
    gates = jax.random.uniform(jax.random.key(1), (n, 2))  # (N, K)
    one_device = np.asarray(jax.jit(dispatch, static_argnums=4)(x, topk, gates, experts, CFG))
    results["dropless"] = {}
    for shape in ((2, 4), (1, 8)):
        mesh = sharding.make_mesh(*shape, CFG.n_routed_experts)
        with jax.set_mesh(mesh):
            placed = jax.device_put(nnx.state(experts), sharding.state_shardings(mesh, nnx.state(experts)))
            sharded = nnx.merge(nnx.graphdef(experts), placed)
            ep = jax.jit(lambda x, t, g, ex, m=mesh: expert_parallel.dispatch(x, t, g, ex, CFG, m))(
                x, topk, gates, sharded
            )
        results["dropless"][f"{shape[0]}x{shape[1]}"] = {
            "max_abs_diff": float(np.abs(np.asarray(ep) - one_device).max()),
            "max_abs": float(np.abs(one_device).max()),
        }
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(sys.argv[1])
