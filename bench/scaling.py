"""Expert parallelism: training tokens/s on 1, 2, 4 and 8 devices, and the all-to-all bytes a step would move.

    python bench/scaling.py                                   # configs/tiny.toml, 1 2 4 8 forced host devices
    python bench/scaling.py --devices 1,8 --steps 3 --comm-config configs/deepseek_v3.toml --ep 64

1. Throughput. Each device count runs in its own process with XLA_FLAGS=--xla_force_host_platform_device_count=N and
   a (1, N) mesh: the experts split N ways, the batch too, tokens exchanged by all-to-all (minidsv3/expert_parallel.py).
   NOTE: forced host devices are threads of one CPU sharing its cores: this measures the overhead of the mesh (the
   exchange, the worst-case capacity slots, the per-device program), not a speed-up. On real accelerators each
   device brings its own compute.
2. Communication, from the config alone: the bytes one MoE layer's all-to-all moves per token and per step, forward,
   for DeepSeek-V3's shape at 64-way EP (report §3.2.2: 256 experts on 64 GPUs over 8 nodes), three ways:
     - this repository's dropless worst-case capacity: EP·min(K, E/EP) float32 rows per token each way, whatever
       the routing (static shapes without ragged all-to-all on CPU);
     - a ragged (variable-size) exchange of exactly K rows per token, BF16 both ways;
     - DeepSeek's: node-limited routing sends a token to at most M = topk_group nodes (§2.1.2), once per node over IB
       (then NVLink within the node), the dispatch in FP8 with one scale per 128 values, the combine in BF16 (§3.3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from minidsv3 import config

ROOT = Path(__file__).resolve().parents[1]

FP8_BLOCK = 128  # values per FP8 scale of a dispatched activation (report §3.3.1: 1 x 128 tiles)


def measure(n_devices: int, config_path: str, steps: int) -> dict:
    """Run `--one` for n_devices in a fresh process (the device count is fixed when jax starts) and read its JSON."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(n_devices), "--config", config_path, "--steps", str(steps)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def one(n_devices: int, config_path: str, steps: int) -> dict:
    """Inside the forced-device process: `steps` timed train steps (after one that compiles) on a (1, N) mesh."""
    import jax
    import numpy as np
    from flax import nnx

    from minidsv3 import sharding
    from minidsv3.model import Transformer
    from minidsv3.step import make_optimizer, train_step

    cfg = config.load(config_path)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    mesh = sharding.make_mesh(1, n_devices, cfg.model.n_routed_experts)
    sharding.check_batch(mesh, b, "train.batch_size")
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, cfg.train)
    sharding.shard_modules(mesh, model, optimizer)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (1, b, t + 1)).astype(np.int32)
    ones = np.ones((1, b, t), np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "loss_mask": ones, "token_mask": ones}
    times = []
    with jax.set_mesh(mesh):
        for _ in range(steps + 1):
            tic = time.perf_counter()
            float(train_step(model, optimizer, sharding.put_batch(mesh, batch, 1), 1e-3, 0.3, 0.001)["main_loss"])
            times.append(time.perf_counter() - tic)
    step = sorted(times[1:])[len(times[1:]) // 2]  # median, compilation (the first) left out
    return {"devices": n_devices, "step_s": step, "tokens_per_s": b * t / step, "compile_s": times[0]}


def comm_volume(m: config.ModelConfig, ep: int, tokens_per_step: int) -> list[tuple[str, float, float]]:
    """(scheme, bytes per token, bytes per step summed over devices) of one MoE layer's forward all-to-alls (dispatch
    and combine), from the model config alone. Rows that stay on their own device are counted too (an upper bound)."""
    d, k, e = m.hidden_size, m.num_experts_per_tok, m.n_routed_experts
    e_loc = e // ep
    ours = 2 * ep * min(k, e_loc) * d * 4  # EP·C rows per n tokens each way, C = n·min(K, E_loc), float32
    ragged = 2 * k * d * 2  # K rows each way, bf16
    fp8_row = d + 4 * (d // FP8_BLOCK)  # E4M3 values + one float32 scale per 1 x 128 tile
    node_limited = m.topk_group * (fp8_row + 2 * d)  # one copy per node: FP8 dispatch + BF16 combine
    return [
        (f"dropless worst-case capacity (this repo, float32, EP={ep})", ours, ours * tokens_per_step),
        ("ragged all-to-all, exactly K rows (bf16)", ragged, ragged * tokens_per_step),
        (f"node-limited, <= {m.topk_group} nodes per token (FP8 dispatch, BF16 combine; IB)", node_limited,
         node_limited * tokens_per_step),
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"), help="the model and batch to time")
    p.add_argument("--devices", default="1,2,4,8", help="forced host device counts, comma-separated")
    p.add_argument("--steps", type=int, default=5, help="timed steps per device count, after the compiling one")
    p.add_argument("--comm-config", default=str(ROOT / "configs" / "deepseek_v3.toml"))
    p.add_argument("--ep", type=int, default=64, help="expert-parallel degree for the communication volume")
    p.add_argument("--tokens-per-step", type=int, default=15360 * 4096, help="report §4.2: 15,360 x 4K")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: the forced-device child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.config, args.steps)))
        return

    print(f"training step of {args.config} on N forced host devices, (1, N) mesh (one CPU: overhead, not speed-up)")
    print("| devices | step (s) | tokens/s | vs 1 device | compile (s) |\n|---|---|---|---|---|")
    base = None
    for n in (int(x) for x in args.devices.split(",")):
        r = measure(n, args.config, args.steps)
        base = base or r["tokens_per_s"]
        print(f"| {n} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x |"
              f" {r['compile_s']:.1f} |")  # fmt: skip

    m = config.load_model_config(args.comm_config)
    print(f"\nall-to-all per MoE layer, forward (dispatch + combine), {args.comm_config}: D {m.hidden_size}, "
          f"E {m.n_routed_experts}, K {m.num_experts_per_tok}, EP {args.ep}, {args.tokens_per_step:,} tokens a step")  # fmt: skip
    print("| scheme | per token | per step, all devices | x ragged |\n|---|---|---|---|")
    rows = comm_volume(m, args.ep, args.tokens_per_step)
    for name, per_token, per_step in rows:
        print(f"| {name} | {per_token / 1e3:,.1f} KB | {per_step / 1e12:,.2f} TB | {per_token / rows[1][1]:.1f} |")
    layers = m.num_moe_layers + m.num_nextn_predict_layers
    print(
        f"x {layers} MoE layers (main + MTP) and about 3x for forward + backward (the backward pass sends the"
        " gradients of both exchanges back)."
    )


if __name__ == "__main__":
    main()
