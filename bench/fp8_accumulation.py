"""The accumulation experiment of report §3.3.2: how much a GEMM loses when its tensor-core accumulator keeps only
~13-14 fraction bits, and how promoting partial sums to float32 every N_C = 128 elements of K repairs it.

For each K it computes C = A·B with A (M, K), B (K, N) random, three ways: the limited accumulator over all of K
(what a plain FP8 GEMM on Hopper does), the same promoted every 128 elements (DeepSeek-V3's fix), and a float32 dot;
and prints the maximum and mean relative error against float64. The relative error is |C - C_exact| / (|A|·|B|),
the scale of summation-error bounds; for the default non-negative inputs it is the plain |C - C_exact| / C_exact.
The operands are not quantized here: this isolates the accumulator.

    python bench/fp8_accumulation.py                        # 13 and 14 bits side by side
    python bench/fp8_accumulation.py --mantissa-bits 13 --mma-k 8 --inputs normal

The report quotes "nearly 2%" for K = 4096 on H800. Our emulation truncates once per MMA chunk of 32 products,
while the hardware truncates each product as it is aligned (minidsv3/fp8.py), so it shows less: 0.32% max at 13
bits (0.16% at 14). A smaller --mma-k moves it toward per-product truncation: 2.3% with --mma-k 4, 8% with 1.
Promotion every 128 holds the error at ~1.4e-4 (13 bits) whatever K is: each interval only ever sees 4 adds.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from minidsv3 import fp8


def relative_errors(c: np.ndarray, exact: np.ndarray, scale: np.ndarray) -> tuple[float, float]:
    """(max, mean) of |c - exact| / scale over all outputs."""
    rel = np.abs(np.asarray(c, np.float64) - exact) / scale  # (M, N)
    return float(rel.max()), float(rel.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mantissa-bits", type=int, nargs="+", default=[13, 14], help="accumulator fraction bits")
    parser.add_argument("--k", type=int, nargs="+", default=[512, 1024, 4096, 16384], help="inner dimensions K")
    parser.add_argument("--m", type=int, default=64, help="rows of A (and columns of B)")
    parser.add_argument("--promotion-interval", type=int, default=128, help="N_C, report §3.3.2")
    parser.add_argument("--mma-k", type=int, default=fp8.MMA_K, help="products per accumulator update")
    parser.add_argument("--inputs", choices=["uniform", "normal"], default="uniform", help="uniform is in [0, 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dot = jax.jit(fp8.limited_precision_dot, static_argnums=(2, 3, 4))
    float32_dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=fp8.HIGHEST))
    rng = np.random.default_rng(args.seed)
    print(
        f"C = A·B, A ({args.m}, K) and B (K, {args.m}) {args.inputs}; relative error |C - C_exact| / (|A|·|B|) vs"
        f" float64;\nlimited accumulator truncated every {args.mma_k} products, promotion every"
        f" {args.promotion_interval} elements of K\n"
    )
    header = f"{'K':>6} {'bits':>4} | {'no promotion':^19} | {'promote every ' + str(args.promotion_interval):^19} |"
    print(header + f" {'float32':^19} |")
    print(f"{'':>11} |" + f" {'max':>9} {'mean':>9} |" * 3)
    start = time.perf_counter()
    for k in args.k:
        draw = rng.random if args.inputs == "uniform" else rng.standard_normal
        a, b = draw((args.m, k)), draw((k, args.m))  # (M, K), (K, N) float64
        exact = a @ b  # (M, N)
        scale = np.abs(a) @ np.abs(b)  # (M, N)
        a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        plain = relative_errors(float32_dot(a32, b32), exact, scale)
        for bits in args.mantissa_bits:
            limited = relative_errors(dot(a32, b32, bits, None, args.mma_k), exact, scale)
            promoted = relative_errors(dot(a32, b32, bits, args.promotion_interval, args.mma_k), exact, scale)
            row = " |".join(f" {mx:9.2e} {mean:9.2e}" for mx, mean in (limited, promoted, plain))
            print(f"{k:>6} {bits:>4} |{row} |")
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
