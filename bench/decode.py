"""Decoding speed: the latent-cache loop against recomputation, against transformers, and with MTP speculation.

    python bench/decode.py                     # uses runs/tiny (train it with `python train.py`) when it exists
    python bench/decode.py --peer              # and transformers' DeepseekV3ForCausalLM.generate (.[peer])
    python bench/decode.py --run runs/other --new-tokens 500 --context 1024

Three measurements, each after a warm-up call that compiles (compile time printed apart):
1. Greedy tokens/s at --new-tokens after a 16-token prompt, end to end (prefill + loop), on tiny.toml's
   architecture with random weights and no stop token; with --peer, transformers' `generate(do_sample=False)` on
   the same architecture and prompt, taking turns, and the ratio (issue #11's target: >= 3x).
2. The latent cache against recomputing the prefix: seconds per new token at --context positions, decoding from
   the cache versus one full forward over the whole sequence per token (target: >= 5x).
3. Speculative decoding (report §5.4.3) on the trained run's model: the share of MTP drafts the main model accepts
   and the tokens/s against plain greedy decoding, on the run's own prompt "def " (both emit the same tokens).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import peer_config

from minidsv3 import config
from minidsv3.generate import run
from minidsv3.model import Transformer
from minidsv3.run import load_run


def peer_model(m: config.ModelConfig):
    """transformers' DeepseekV3ForCausalLM with the [model] table's architecture (random weights), eval mode."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(peer_config(m)).eval()


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/tiny"), help="trained run for the speculative part")
    p.add_argument("--new-tokens", type=int, default=500)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer", action="store_true", help="time transformers' generate too (.[peer])")
    a = p.parse_args(argv)
    if a.peer:
        try:
            import torch
        except ImportError:
            raise SystemExit('error: --peer needs torch and transformers: pip install -e ".[peer]"') from None
    cfg = config.load("configs/tiny.toml").model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 16).tolist()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; configs/tiny.toml's architecture, random weights")

    # 1. greedy tokens/s, end to end
    first = run(model, prompt, a.new_tokens)
    print(f"\n1. greedy, 16-token prompt + {a.new_tokens} new tokens (compilation {first.compile_s:.1f} s, once)")
    fns = {"minidsv3": lambda: run(model, prompt, a.new_tokens)}
    if a.peer:
        hf = peer_model(cfg)
        ids = torch.tensor([prompt])

        def hf_generate():
            with torch.no_grad():
                out = hf.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
            assert out.shape[1] == len(prompt) + a.new_tokens

        fns["transformers"] = hf_generate
        hf_generate()  # warm-up
    seconds = {name: [] for name in fns}
    for _ in range(a.repeats):  # taking turns
        for name, fn in fns.items():
            seconds[name].append(timed(fn, 1))
    speed = {name: a.new_tokens / statistics.median(s) for name, s in seconds.items()}
    for name, tps in speed.items():
        print(f"   {name:>12}: {tps:8.1f} tokens/s")
    if a.peer:
        ratio = speed["minidsv3"] / speed["transformers"]
        print(
            f"   {'speed-up':>12}: {ratio:.2f}x over transformers (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})"
        )

    # 2. latent cache against recomputation at --context positions
    ctx = np.random.default_rng(1).integers(0, cfg.vocab_size, a.context).tolist()
    run(model, ctx, 64)  # compile
    cached = 1 / run(model, ctx, 64).tokens_per_s  # seconds per new token, from the cache
    forward = jax.jit(lambda state, x: nnx.merge(*state)(x)[0][:, -1].argmax(-1))  # the whole prefix, every token
    state = nnx.split(model)
    x = jnp.asarray([ctx])
    jax.block_until_ready(forward(state, x))
    recompute = timed(lambda: jax.block_until_ready(forward(state, x)), a.repeats)
    ratio = recompute / cached
    print(f"\n2. one new token at {a.context} positions: {1e3 * cached:.2f} ms from the latent cache, "
          f"{1e3 * recompute:.1f} ms recomputing the prefix: {ratio:.0f}x (target >= 5x: "
          f"{'met' if ratio >= 5 else 'NOT met'})")  # fmt: skip

    # 3. speculative decoding on the trained run
    if not (a.run / "config.json").is_file():
        print(f"\n3. speculative decoding: no trained run at {a.run} (train it with `python train.py`); skipped")
        return
    trained, tokenizer, _ = load_run(a.run)
    ids = tokenizer.encode("def ").ids
    run(trained, ids, a.new_tokens), run(trained, ids, a.new_tokens, speculative=True)  # compile both
    plain = min((run(trained, ids, a.new_tokens) for _ in range(a.repeats)), key=lambda g: -g.tokens_per_s)
    spec = min(
        (run(trained, ids, a.new_tokens, speculative=True) for _ in range(a.repeats)), key=lambda g: -g.tokens_per_s
    )
    assert spec.tokens == plain.tokens, "speculative decoding changed the greedy output"
    print(f"\n3. speculative decoding on {a.run}, prompt 'def ', {a.new_tokens} greedy tokens (identical output):")
    print(f"   {100 * spec.drafts_accepted:.1f} % of MTP drafts accepted (report §5.4.3: 85-90 % for DeepSeek-V3); "
          f"{spec.tokens_per_s:.0f} against {plain.tokens_per_s:.0f} tokens/s: "
          f"{spec.tokens_per_s / plain.tokens_per_s:.2f}x (report: 1.8x)")  # fmt: skip


if __name__ == "__main__":
    main()
