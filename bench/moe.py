"""One DeepSeekMoE layer against a dense SwiGLU MLP with the same active parameters: the price of routing.

    python bench/moe.py                        # tiny dims and E 64 / K 6 / F 64, 8 x 256 tokens, float32 and bf16
    python bench/moe.py --tokens 4096 --dtypes bfloat16 --steps 30

Both layers run forward + backward (gradients of the input and of every weight) on the same tokens, jitted, taking
turns step by step; the figure is the median time. The MoE layer (minidsv3/moe.py) routes each token to K of E
experts of width F through the dropless block-sparse dispatch and adds one shared expert; the dense MLP has width
(n_shared + K)·F, so both do the same expert FLOPs per token, and the ratio is what routing, dispatch and combine
cost on top. Issue #11's targets: <= 2x at tiny dims (D 256, E 16, K 2, F 128), <= 3x at E 64, K 6, F 64.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from minidsv3 import config
from minidsv3.layers import MLP
from minidsv3.moe import MoE

CASES = {  # name: ([model] overrides of configs/tiny.toml, target ratio)
    "tiny: D 256, E 16, K 2, F 128": ({}, 2.0),
    "E 64, K 6, F 64": ({"n_routed_experts": 64, "num_experts_per_tok": 6, "moe_intermediate_size": 64}, 3.0),
}


def fwd_bwd(layer: nnx.Module, is_moe: bool):
    """A jitted function x (B, T, D), cotangent (B, T, D) -> gradients of <layer(x), cotangent> w.r.t. x and params."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x, cot):
        out = nnx.merge(graphdef, params, rest)(x)
        y = out[0] if is_moe else out  # MoE returns (y, load, balance loss)
        return jnp.sum(y * cot)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda x, cot: grad(params, x, cot)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="8x256", help="BATCHxSEQ_LEN")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    batch, seq_len = (int(x) for x in a.tokens.lower().split("x"))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {batch} x {seq_len} tokens, forward + backward")
    print(f"{'case':>30} {'dtype':>9} {'dense ms':>9} {'MoE ms':>8} {'ratio':>6}  target")
    for name, (overrides, target) in CASES.items():
        for dtype in a.dtypes.split(","):
            cfg = dataclasses.replace(config.load("configs/tiny.toml").model, dtype=dtype, **overrides)
            moe = MoE(cfg, rngs=nnx.Rngs(0))
            dense = MLP(
                cfg, (cfg.n_shared_experts + cfg.num_experts_per_tok) * cfg.moe_intermediate_size, rngs=nnx.Rngs(0)
            )
            keys = jax.random.split(jax.random.key(1), 2)
            x, cot = (jax.random.normal(k, (batch, seq_len, cfg.hidden_size)) for k in keys)  # (B, T, D) each
            fns = [fwd_bwd(dense, False), fwd_bwd(moe, True)]
            for fn in fns:
                jax.block_until_ready(fn(x, cot))  # compile
            times = [[], []]
            for _ in range(a.steps):
                for fn, ts in zip(fns, times, strict=True):
                    tic = time.perf_counter()
                    jax.block_until_ready(fn(x, cot))
                    ts.append(time.perf_counter() - tic)
            d, m = (1e3 * statistics.median(ts) for ts in times)
            verdict = "met" if m / d <= target else "NOT met"
            print(f"{name:>30} {dtype:>9} {d:>9.2f} {m:>8.2f} {m / d:>5.2f}x  <= {target}x: {verdict}")


if __name__ == "__main__":
    main()
