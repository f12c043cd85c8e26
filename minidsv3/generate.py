"""Sampling from a trained run, decoding from the compressed latent KV cache (report §2.1.1; arXiv:2405.04434 §2.1.2).

    python -m minidsv3.generate runs/tiny --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-p 0.95
    python -m minidsv3.generate runs/tiny --speculative       # greedy, drafting every other token with MTP
    python -m minidsv3.generate hf/tiny                       # a Hugging Face DeepSeek-V3 folder (minidsv3/hf.py)

The prompt is prefilled in one call; each new token then runs one position through every layer, attending to the
cached normalized latents c^KV and roped shared keys k^R with the absorbed weights (MLA's inference path). The whole
loop over new tokens is one compiled `lax.while_loop` on the device, with the cache at a static size (`bucket`).
The MTP modules are not needed for generation (report §2.2: the main model works on its own); `--speculative` uses
the first one to draft the token after next, which the main model confirms in the same forward pass (report §5.4.3).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from tokenizers import Tokenizer

from minidsv3 import checkpoint, config, hf
from minidsv3.mla import init_cache
from minidsv3.model import Transformer
from minidsv3.run import load_run


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


@dataclasses.dataclass
class Generation:
    """What `run` produced and what it cost."""

    tokens: list[int]  # the continuation, stop token included if it came
    tokens_per_s: float  # new tokens over the decode loop's seconds (prefill and compilation excluded)
    prefill_s: float  # the prompt's one forward pass
    compile_s: float  # 0 when the compiled functions came from the cache of an earlier call
    drafts_accepted: float | None = None  # speculative decoding: share of MTP drafts the main model confirmed


class GenerationError(ValueError):
    """A request `run` cannot serve (an empty or too long prompt, an option out of range); the message says which."""


def check_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int = 0) -> None:
    """Raise GenerationError naming the first option out of range (the checks that need no model or prompt)."""
    allowed = [
        (max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
        (math.isfinite(temperature) and temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
        (top_k >= 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
        (0 < top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {top_p}"),  # False for NaN too
        (0 <= seed < 2**32, f"seed must be in [0, 2**32), got {seed}"),
    ]
    for ok, message in allowed:
        if not ok:
            raise GenerationError(message)


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; text that is not valid Unicode (a lone surrogate from undecodable bytes on the command
    line) is a GenerationError."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(
            f"the prompt is not valid text (character {e.start} is {prompt[e.start]!r}); pass UTF-8 text"
        ) from None
    return tokenizer.encode(prompt).ids


def bucket(n: int, minimum: int = 64) -> int:
    """The static length used for n positions: the next power of two, at least `minimum`. Prompts and caches of
    different lengths share one compiled function per bucket instead of one per length."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _prefill(graphdef, state, prompt, length, cache_len: int, speculative: bool):
    """Run the prompt (1, P) (padded past `length`) through the model once: the logits after its last real token
    (1, V), the caches with positions 0..P-1 written, and for speculative decoding the first token and the MTP
    module's draft of the one after it."""
    model = nnx.merge(graphdef, state)
    h, caches = model.decode_hidden(prompt, model.init_cache(1, cache_len), jnp.int32(0))  # (1, P, D)
    last = jax.lax.dynamic_slice_in_dim(h, length - 1, 1, axis=1)  # (1, 1, D) after the last real token
    logits = model.head(model.norm(last))[:, 0]  # (1, V)
    if not speculative:
        return logits, caches, None
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # (1,) greedy x_P
    # MTP row j embeds token j+1 (Eq. 21): the prompt shifted left, with x_P after the last real token.
    ahead = jnp.roll(prompt, -1, axis=1).at[0, length - 1].set(first[0])  # (1, P)
    mtp = model.mtp[0]
    normed, mtp_cache = mtp.decode(h, model.embed(ahead), init_cache(model.cfg, 1, cache_len), jnp.int32(0))
    draft_logits = model.head(jax.lax.dynamic_slice_in_dim(normed, length - 1, 1, axis=1))[:, 0]  # (1, V)
    return logits, caches, (first, jnp.argmax(draft_logits, axis=-1).astype(jnp.int32), mtp_cache)


def _decode_loop(graphdef, state, logits, caches, start, max_new, key, stop, sampling: tuple, out_len: int):
    """Pick a token from `logits`, run it through the model at position start + i, repeat, all inside one
    `lax.while_loop` on the device: no host round trip per token. Returns tokens (out_len,) and how many are real."""
    model = nnx.merge(graphdef, state)
    key, sub = jax.random.split(key)
    out = jnp.zeros((out_len,), jnp.int32).at[0].set(pick(logits, sub, *sampling)[0])

    def running(s):
        i, out, *_ = s
        return (i < max_new) & (out[i - 1] != stop)

    def step(s):
        i, out, caches, key = s
        logits, caches = model.decode(out[i - 1][None, None], caches, start + i - 1)  # (1, 1, V)
        key, sub = jax.random.split(key)
        return i + 1, out.at[i].set(pick(logits[:, 0], sub, *sampling)[0]), caches, key

    n, out, _, _ = jax.lax.while_loop(running, step, (jnp.int32(1), out, caches, key))
    return out, n


def _speculative_loop(graphdef, state, first, draft, caches, mtp_cache, start, max_new, stop, out_len: int):
    """Greedy decoding two positions per forward (report §5.4.3). Each round feeds [x, draft] at positions p, p+1,
    where x is the last token and the draft is the MTP module's guess of the one after it. The main model's argmax
    y1 at p decides: if y1 = draft, the draft was right and y2 at p+1 is valid too, so the round emits two tokens;
    else it emits y1 alone. Either way every token emitted is the main model's own greedy choice on a correct
    prefix, so the output equals plain greedy decoding. Cache slots written for a rejected draft are overwritten by
    the next round, which starts at that position. The MTP module then runs on the same two positions (each with
    the main model's hidden state and the token after it, Eq. 21) to draft the next round.
    Returns tokens (out_len,), how many are real, rounds run and drafts accepted."""
    model = nnx.merge(graphdef, state)
    mtp = model.mtp[0]
    out = jnp.zeros((out_len + 1,), jnp.int32).at[0].set(first[0])  # one slot of slack for a round's second token

    def running(s):
        n, out, *_ = s
        return (n < max_new) & (out[n - 1] != stop)

    def step(s):
        n, out, pos, draft, caches, mtp_cache, rounds, accepted = s
        pair = jnp.stack([out[n - 1], draft])[None]  # (1, 2): [x_p, draft of x_{p+1}]
        h, caches = model.decode_hidden(pair, caches, pos)  # (1, 2, D)
        y = jnp.argmax(model.head(model.norm(h)), axis=-1).astype(jnp.int32)[0]  # (2,) greedy at p+1, p+2
        ok = (y[0] == draft) & (y[0] != stop)  # a stop token ends the text: nothing after it counts
        normed, mtp_cache = mtp.decode(h, model.embed(y[None]), mtp_cache, pos)  # (1, 2, D)
        drafts = jnp.argmax(model.head(normed), axis=-1).astype(jnp.int32)[0]  # (2,) guesses of x_{p+2}, x_{p+3}
        out = out.at[n].set(y[0]).at[n + 1].set(jnp.where(ok, y[1], 0))
        step_ = 1 + ok.astype(jnp.int32)
        return (n + step_, out, pos + step_, jnp.where(ok, drafts[1], drafts[0]), caches, mtp_cache,
                rounds + 1, accepted + ok.astype(jnp.int32))  # fmt: skip

    init = (jnp.int32(1), out, start, draft[0], caches, mtp_cache, jnp.int32(0), jnp.int32(0))
    n, out, _, _, _, _, rounds, accepted = jax.lax.while_loop(running, step, init)
    return out[:out_len], jnp.minimum(n, max_new), rounds, accepted


_COMPILED: dict = {}  # (phase, graphdef, static shapes and options) -> compiled executable


def _compiled(name: str, fn, static: dict, *args):
    """`fn` jitted with `static` keyword arguments fixed, compiled for these argument shapes once per process;
    returns (executable, seconds spent compiling now)."""
    leaves, structure = jax.tree.flatten(args[1:])
    key = (name, args[0], tuple(sorted(static.items())), structure, tuple((a.shape, a.dtype) for a in leaves))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    tic = time.perf_counter()
    _COMPILED[key] = jax.jit(functools.partial(fn, **static), static_argnums=0).lower(*args).compile()
    return _COMPILED[key], time.perf_counter() - tic


def run(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token: int | None = None,
    speculative: bool = False,
) -> Generation:
    """The continuation of `prompt` (token ids) from the latent cache, with its timings.

    The prompt is padded to a `bucket` and prefilled in one call; the tokens are then generated by one compiled
    loop on the device. Compiled functions are cached per (model structure, prompt bucket, cache bucket, sampling
    options), so a second call of similar size compiles nothing. `speculative=True` drafts every other token with
    the first MTP module (greedy only; the output is the same as without it).
    """
    check_options(max_new_tokens, temperature, top_k, top_p, seed)
    if not prompt:
        raise GenerationError("the prompt is empty; give at least one token")
    if speculative and (temperature > 0 or len(model.mtp) == 0):
        raise GenerationError(
            "speculative decoding needs greedy sampling (temperature 0) and a model with an MTP module"
        )
    need = len(prompt) + max_new_tokens + 1  # +1: a speculative round may write one position past the last token
    limit = model.cfg.max_position_embeddings
    if need - 1 > limit:
        raise GenerationError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = {need - 1} exceeds the model's"
            f" max_position_embeddings ({limit}); ask for at most {limit - len(prompt)} new tokens or shorten the prompt"
        )
    graphdef, state = nnx.split(model)
    p_len, cache_len, out_len = bucket(len(prompt)), bucket(need), bucket(max_new_tokens)
    tokens = jnp.zeros((1, p_len), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt, jnp.int32))  # (1, P)
    length, stop = jnp.int32(len(prompt)), jnp.int32(-1 if stop_token is None else stop_token)

    prefill, compile_s = _compiled(
        "prefill", _prefill, {"cache_len": cache_len, "speculative": speculative}, graphdef, state, tokens, length
    )
    tic = time.perf_counter()
    logits, caches, spec = jax.block_until_ready(prefill(state, tokens, length))
    prefill_s = time.perf_counter() - tic
    if speculative:
        first, draft, mtp_cache = spec
        args = (graphdef, state, first, draft, caches, mtp_cache, length, jnp.int32(max_new_tokens), stop)
        loop, c = _compiled("speculative", _speculative_loop, {"out_len": out_len}, *args)
    else:
        sampling = (temperature, top_k, top_p)
        args = (graphdef, state, logits, caches, length, jnp.int32(max_new_tokens), jax.random.key(seed), stop)
        loop, c = _compiled("decode", _decode_loop, {"sampling": sampling, "out_len": out_len}, *args)
    tic = time.perf_counter()
    result = jax.block_until_ready(loop(*args[1:]))
    seconds = time.perf_counter() - tic
    out, n = result[0], int(result[1])
    accepted = int(result[3]) / max(int(result[2]), 1) if speculative else None
    # the first token comes from the prefill's logits, so the loop made n - 1 forward passes for n tokens
    return Generation(out[:n].tolist(), n / max(seconds, 1e-9), prefill_s, compile_s + c, accepted)


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, **kwargs) -> tuple[list[int], float]:
    """Token ids of the continuation of `prompt`, and the decode speed in tokens/s (see `run`)."""
    g = run(model, prompt, max_new_tokens, **kwargs)
    return g.tokens, g.tokens_per_s


def sample_text(model: Transformer, tokenizer: Tokenizer, prompt: str, **kwargs) -> str:
    """The prompt followed by its continuation, decoded to text (stops at <|endoftext|>)."""
    ids = encode_prompt(tokenizer, prompt)
    out, _ = generate(model, ids, stop_token=tokenizer.token_to_id("<|endoftext|>"), **kwargs)
    return prompt + tokenizer.decode(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minidsv3.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true", help="draft with the MTP module (greedy only)")
    a = p.parse_args(argv)
    # what the user can get wrong (options, run folder, prompt) fails here with one line; anything else is a bug
    try:
        check_options(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)  # before the slow loading
        if hf.is_hf_folder(a.run_dir):  # an export or a downloaded DeepSeek-V3 folder, read as it is
            (model, tokenizer), source = hf.load(a.run_dir), "Hugging Face weights"
            if tokenizer is None:
                raise hf.HFError(f"{a.run_dir}: no tokenizer.json; generation needs the model's tokenizer")
        else:
            model, tokenizer, step = load_run(a.run_dir)
            source = f"checkpoint of step {step}"
        g = run(
            model, encode_prompt(tokenizer, a.prompt), a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
            top_p=a.top_p, seed=a.seed, stop_token=tokenizer.token_to_id("<|endoftext|>"), speculative=a.speculative,
        )  # fmt: skip
    except (checkpoint.CheckpointError, config.ConfigError, GenerationError, hf.HFError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(a.prompt + tokenizer.decode(g.tokens))
    drafts = f", {100 * g.drafts_accepted:.0f} % of MTP drafts accepted" if g.drafts_accepted is not None else ""
    print(
        f"\n[{source}: {len(g.tokens)} tokens at {g.tokens_per_s:.1f} tokens/s from the latent KV"
        f" cache{drafts}; prefill {1e3 * g.prefill_s:.0f} ms, compilation {g.compile_s:.1f} s]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
