"""Training-step speed: tokens/s, ms/step and MFU of one optimizer step, as train.py runs it, against transformers.

    python bench/train_step.py                       # configs/tiny.toml's [model], 8 x 256 and 32 x 64, f32 and bf16
    python bench/train_step.py --peer                # and transformers' DeepseekV3ForCausalLM, alternating (.[peer])
    python bench/train_step.py --shapes 8x256 --dtypes bfloat16 --steps 20
    python bench/train_step.py --model.first_k_dense_replace=4    # any [model] override

The minidsv3 step is `minidsv3.step.train_step` called through `nnx.cached_partial`, exactly as train.py calls it:
forward, backward, global-norm clipping, AdamW and the router-bias update, on random tokens. MTP is switched off
(`num_nextn_predict_layers = 0`) because transformers trains no MTP module, so the two do the same work. The peer
is built from the same [model] table (same widths, experts, groups, interleaved RoPE), trained with torch's AdamW
after `clip_grad_norm_`; "bfloat16" means `model.dtype = "bfloat16"` here (bf16 matmul inputs, float32 master
weights and accumulation) and `torch.autocast("cpu", torch.bfloat16)` there.

Each step is timed on its own (the result is fetched to the host, as train.py's logging does), after warm-up steps
that include compilation; the figure is the median. With --peer the two implementations take turns step by step,
so a noisy neighbour on the machine slows both alike, and the ratio is of medians taken in the same run.
MFU = matmul FLOPs per token (minidsv3/flops.py, causal attention counted at half the T x T) x tokens/s divided by
the measured peak of a large matmul in the same dtype (float32 inputs, or bf16 inputs with float32 accumulation); on
a GPU listed in minidsv3/accounting.py, bf16 MFU is against its datasheet peak, and peak device memory is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minidsv3 import accounting, config, flops
from minidsv3.model import Transformer
from minidsv3.step import make_optimizer, train_step

TARGETS = {"float32": 1.5, "bfloat16": 2.5}  # issue #11: minidsv3 tokens/s over transformers' on the same CPU


def minidsv3_step(cfg: config.Config, batch: int, seq_len: int, seed: int = 0):
    """A function running one training step of the train.py recipe on fixed random tokens; returns the loss."""
    model = Transformer(cfg.model, rngs=nnx.Rngs(seed))
    optimizer = make_optimizer(model, cfg.train)
    step_fn = nnx.cached_partial(train_step, model, optimizer)
    tokens = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (1, batch, seq_len + 1), dtype=np.int32)
    micro = {
        "inputs": jnp.asarray(tokens[..., :-1]),  # (micro=1, B, T)
        "targets": jnp.asarray(tokens[..., 1:]),  # (1, B, T)
        "loss_mask": jnp.ones((1, batch, seq_len), jnp.float32),
        "token_mask": jnp.ones((1, batch, seq_len), jnp.float32),
    }
    lr, mtp_lambda, gamma = (jnp.float32(v) for v in (cfg.train.learning_rate, 0.0, cfg.train.bias_update_speed))

    def run() -> float:
        return float(step_fn(micro, lr, mtp_lambda, gamma)["main_loss"])  # the host fetch train.py's logging does

    return run


def peer_config(m: config.ModelConfig):
    """transformers' DeepseekV3Config for the same [model] table: same widths, experts, groups, interleaved RoPE."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        moe_intermediate_size=m.moe_intermediate_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
        n_shared_experts=m.n_shared_experts, n_routed_experts=m.n_routed_experts,
        routed_scaling_factor=m.routed_scaling_factor, kv_lora_rank=m.kv_lora_rank,
        q_lora_rank=m.q_lora_rank or None, qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
        qk_nope_head_dim=m.qk_nope_head_dim, n_group=m.n_group, topk_group=m.topk_group,
        num_experts_per_tok=m.num_experts_per_tok, first_k_dense_replace=m.first_k_dense_replace,
        norm_topk_prob=m.norm_topk_prob, max_position_embeddings=m.max_position_embeddings,
        initializer_range=m.initializer_range, rms_norm_eps=m.rms_norm_eps,
        tie_word_embeddings=m.tie_word_embeddings, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, num_mtp_layers=0,
    )  # fmt: skip


def peer_step(m: config.ModelConfig, t: config.TrainConfig, batch: int, seq_len: int, seed: int = 0):
    """The same step in transformers: DeepseekV3ForCausalLM from the same [model] table, AdamW after clipping."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = peer_config(m)
    model = DeepseekV3ForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(t.adam_b1, t.adam_b2), eps=t.adam_eps, weight_decay=t.weight_decay
    )
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, m.vocab_size, (batch, seq_len + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, :-1]  # transformers shifts the labels inside its loss
    bf16 = m.dtype == "bfloat16"

    def run() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def median_seconds(fns: list, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Compile/warm-up time of each function (its first `warmup` calls) and median seconds per call, taking turns."""
    first, times = [], [[] for _ in fns]
    for fn in fns:
        tic = time.perf_counter()
        for _ in range(warmup):
            fn()
        first.append(time.perf_counter() - tic)
    for _ in range(steps):
        for fn, ts in zip(fns, times, strict=True):
            tic = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - tic)
    return first, [statistics.median(ts) for ts in times]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/tiny.toml")
    p.add_argument("--shapes", default="8x256,32x64", help="BATCHxSEQ_LEN, comma-separated")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--peer", action="store_true", help="time transformers' DeepseekV3ForCausalLM too (.[peer])")
    a, overrides = p.parse_known_args(argv)
    if a.peer:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            raise SystemExit('error: --peer needs torch and transformers: pip install -e ".[peer]"') from None
    try:  # a bad config or override fails here, with one line
        config.load(a.config, [*overrides, "--model.num_nextn_predict_layers=0"])
    except config.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    device = jax.devices()[0]
    if device.platform == "cpu":
        peaks = {d: accounting.measure_peak(1.0, size=1024, dtype=d) for d in a.dtypes.split(",")}
    else:  # a GPU: its datasheet bf16 peak where accounting.PEAK_FLOPS lists it, float32 measured
        peaks = {
            d: accounting.device_peak()[1]
            if d == "bfloat16"
            else accounting.measure_peak(1.0, device=device, size=4096, dtype=d)
            for d in a.dtypes.split(",")
        }
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; measured matmul peak: "
          + ", ".join(f"{d} {v / 1e9:.0f} GFLOP/s" for d, v in peaks.items()))  # fmt: skip
    header = f"{'shape':>8} {'dtype':>9} {'impl':>12} {'compile+warm s':>14} {'ms/step':>8} {'tok/s':>8} {'MFU':>6}"
    print(header + ("  ratio (target)" if a.peer else ""))
    for shape in a.shapes.split(","):
        batch, seq_len = (int(x) for x in shape.lower().split("x"))
        for dtype in a.dtypes.split(","):
            c = config.load(a.config, [*overrides, "--model.num_nextn_predict_layers=0", f"--model.dtype={dtype}"])
            fns = {"minidsv3": minidsv3_step(c, batch, seq_len)}
            if a.peer:
                fns["transformers"] = peer_step(c.model, c.train, batch, seq_len)
            first, med = median_seconds(list(fns.values()), a.warmup, a.steps)
            flop_per_tok = flops.flops_per_token(c.model, seq_len, include_mtp=False).total
            for (name, _), f, s in zip(fns.items(), first, med, strict=True):
                tps = batch * seq_len / s
                line = f"{shape:>8} {dtype:>9} {name:>12} {f:>14.1f} {1e3 * s:>8.1f} {tps:>8,.0f} "
                stats = device.memory_stats() or {}  # GPUs report their peak memory; CPUs report nothing
                memory = (
                    f"  peak memory {stats['peak_bytes_in_use'] / 2**30:.1f} GiB"
                    if "peak_bytes_in_use" in stats
                    else ""
                )
                print(line + f"{100 * flop_per_tok * tps / peaks[dtype]:>5.1f}%{memory}")
            if a.peer:
                ratio = med[1] / med[0]
                verdict = "met" if ratio >= TARGETS[dtype] else "NOT met"
                print(f"{'':>8} {dtype:>9} {'speed-up':>12} {ratio:.2f}x over transformers "
                      f"(target >= {TARGETS[dtype]}x: {verdict})")  # fmt: skip


if __name__ == "__main__":
    main()
