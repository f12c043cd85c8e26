"""Sampling from a trained run, decoding from the compressed latent KV cache (spec §1.5).

    python -m minidsv3.generate runs/tiny --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-p 0.95

The prompt is prefilled in one call; each new token then runs one position through every layer, attending to the
cached normalized latents c^KV and roped shared keys k^R with the absorbed weights (MLA's inference path). The
MTP modules are not used for generation (report §2.2: the main model works on its own).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from tokenizers import Tokenizer

from minidsv3 import checkpoint, config
from minidsv3.model import Transformer, with_config


@nnx.jit
def _prefill(model: Transformer, tokens: jax.Array, caches: list) -> tuple[jax.Array, list]:
    logits, caches = model.decode(tokens, caches, jnp.int32(0))  # (B, T, V)
    return logits[:, -1], caches


@nnx.jit
def _step(model: Transformer, token: jax.Array, caches: list, position: jax.Array) -> tuple[jax.Array, list]:
    logits, caches = model.decode(token[:, None], caches, position)  # (B, 1, V)
    return logits[:, 0], caches


def pick(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Next token from logits (B, V): greedy at temperature 0, else sample after top-k and top-p (nucleus) cuts."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1)  # (B,)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)  # (B, V), most likely first
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits), order, axis=-1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass strictly before each token
        drop_sorted = before >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)  # (B,)


def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token: int | None = None,
) -> tuple[list[int], float]:
    """Token ids of the continuation of `prompt`, and the decode speed in tokens/s (prefill excluded)."""
    max_len = len(prompt) + max_new_tokens
    if max_len > model.cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds max_position_embeddings")
    caches = model.init_cache(1, max_len)
    logits, caches = _prefill(model, jnp.asarray([prompt], jnp.int32), caches)
    key = jax.random.key(seed)
    out: list[int] = []
    tic = time.perf_counter()
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = pick(logits, sub, temperature, top_k, top_p)  # (1,)
        out.append(int(token[0]))
        if stop_token is not None and out[-1] == stop_token or i == max_new_tokens - 1:
            break
        logits, caches = _step(model, token.astype(jnp.int32), caches, jnp.int32(len(prompt) + i))
    return out, len(out) / max(time.perf_counter() - tic, 1e-9)


def sample_text(model: Transformer, tokenizer: Tokenizer, prompt: str, **kwargs) -> str:
    """The prompt followed by its continuation, decoded to text (stops at <|endoftext|>)."""
    ids = tokenizer.encode(prompt).ids
    out, _ = generate(model, ids, stop_token=tokenizer.token_to_id("<|endoftext|>"), **kwargs)
    return prompt + tokenizer.decode(out)


def load_run(run_dir: Path) -> tuple[Transformer, Tokenizer]:
    """The model of a run's newest checkpoint (with the config of its last stage) and its tokenizer."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or checkpoint.latest_step(run_dir) is None:
        raise checkpoint.CheckpointError(f"{run_dir}: no run with a checkpoint here; train one with `python train.py`")
    cfg = config.from_dict(json.loads((run_dir / "config.json").read_text()))
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    meta = checkpoint.restore(run_dir, model, None)
    model = with_config(model, config.from_dict({"model": meta["model_config"]}).model)  # YaRN after context ext.
    return model, Tokenizer.from_str(meta["tokenizer"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        model, tokenizer = load_run(a.run_dir)
    except (checkpoint.CheckpointError, config.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    ids = tokenizer.encode(a.prompt).ids
    out, speed = generate(
        model, ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
        stop_token=tokenizer.token_to_id("<|endoftext|>"),
    )  # fmt: skip
    print(a.prompt + tokenizer.decode(out))
    print(f"\n[{len(out)} tokens at {speed:.1f} tokens/s from the latent KV cache]", file=sys.stderr)


if __name__ == "__main__":
    main()
