"""Train a small DeepSeek-V3 through the three stages of the report's Table 1, on a 2-core CPU or one accelerator.

    python train.py                                   # configs/tiny.toml on the Python standard library's source
    python train.py configs/small.toml --train.pretrain_steps=2000 --data.path=my_corpus/

config -> data -> model and optimizer -> resume if the run folder has a checkpoint -> for each stage (pre-training,
context extension, post-training): nnx.jit train steps, evaluation, checkpoints -> plots, samples and the cost table.
Ctrl-C (or SIGTERM) saves a checkpoint and exits; running the same command again continues the run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from minidsv3 import accounting, checkpoint, config, data, flops, generate, plots, schedules, sft
from minidsv3.model import Transformer, routers, with_config
from minidsv3.step import evaluate, make_optimizer, train_step


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def mean_maxvio(ev: dict, per_layer: bool = False) -> str:
    """An evaluation's MaxVio_global averaged over the MoE layers, as [LF] reports it, and its layers' own values."""
    layers = ev["maxvio_global"]
    if not layers:  # first_k_dense_replace = num_hidden_layers: nothing is routed
        return "n/a (no MoE layer)"
    per = f" (per MoE layer: {', '.join(f'{v:.3f}' for v in layers)})" if per_layer else ""
    return f"{np.mean(layers):.3f}{per}"


# ---------------------------------------------------------------------------------------------------------------
# Config and run folder

args = sys.argv[1:]
config_path = args.pop(0) if args and not args[0].startswith("--") else Path(__file__).parent / "configs/tiny.toml"
try:
    cfg = config.load(config_path, args)
except config.ConfigError as e:
    fail(str(e))
t = cfg.train
run_dir = Path(t.out_dir).absolute()
try:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".write-test").touch()
    (run_dir / ".write-test").unlink()
except OSError as e:
    fail(f"{run_dir}: run folder is not writable ({e.strerror}); choose another --train.out_dir")
config_file = run_dir / "config.json"
resolved = config.to_dict(cfg)


if config_file.exists():
    try:
        previous = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        fail(f"{config_file}: is not valid JSON; delete the run folder or choose another --train.out_dir")
    if config.run_defining(previous) != config.run_defining(json.loads(json.dumps(resolved))):
        fail(f"{run_dir}: holds a run with a different config; choose another --train.out_dir or delete that folder")
else:
    config_file.write_text(json.dumps(resolved, indent=2))
print(f"run folder {run_dir}")

# ---------------------------------------------------------------------------------------------------------------
# Data: corpus -> split by files -> BPE tokenizer -> cached token arrays; SFT pairs from the same corpus

try:
    docs = data.load_documents(cfg.data.path)
    train_docs, val_docs = data.split_documents(docs, cfg.data.val_fraction, cfg.data.split_seed)
    (run_dir / "manifest.json").write_text(json.dumps(data.manifest(docs), indent=2))
    cache_dir = Path(cfg.data.cache_dir).absolute() if cfg.data.cache_dir else run_dir / "cache"
    t0 = time.time()
    tokenizer = data.load_or_train_tokenizer(train_docs, cfg.model.vocab_size, cache_dir)
    train_tokens = data.load_or_tokenize(train_docs, tokenizer, cache_dir, "train")
    val_tokens = data.load_or_tokenize(val_docs, tokenizer, cache_dir, "val")
except data.DataError as e:
    fail(str(e))
entropy = data.unigram_entropy(train_tokens, cfg.model.vocab_size)
print(
    f"corpus: {len(docs)} files ({len(train_docs)} train / {len(val_docs)} val), {len(train_tokens):,} train tokens,"
    f" {len(val_tokens):,} val tokens; unigram entropy {entropy:.3f} nats/token"
    f" (tokenizer and tokens ready in {time.time() - t0:.1f}s)"
)

# The three stages of Table 1. Context extension stretches the sequence by s and switches YaRN on (report §4.3),
# with batch/s sequences so that a step holds the same tokens (15360 x 4K = 1920 x 32K in the report).
s = t.context_yarn_factor
long_seq = round(cfg.data.seq_len * s)
yarn_model = dataclasses.replace(
    cfg.model,
    rope_scaling=config.RopeScaling(factor=s, original_max_position_embeddings=cfg.data.seq_len),
    max_position_embeddings=max(cfg.model.max_position_embeddings, long_seq),
)
extended = t.context_steps > 0 and s > 1
sft_seq = long_seq if extended else cfg.data.seq_len
stages = [
    {"name": "pretrain", "steps": t.pretrain_steps, "seq_len": cfg.data.seq_len, "model": cfg.model},
    {"name": "context", "steps": t.context_steps, "seq_len": long_seq, "model": yarn_model},
    {"name": "sft", "steps": t.sft_steps, "seq_len": sft_seq, "model": yarn_model if extended else cfg.model},
]
context_batch = max(1, int(t.batch_size / s))
try:  # each stage's loader and validation batches; a stage switched off (0 steps) needs no data
    stages[0]["val"] = data.eval_batches(val_tokens, cfg.data.seq_len, t.batch_size, t.eval_batches)
    if t.pretrain_steps:
        stages[0]["batches"] = data.PackedBatches(train_tokens, cfg.data.seq_len, t.batch_size, t.seed)
    if t.context_steps:
        stages[1]["batches"] = data.PackedBatches(train_tokens, long_seq, context_batch, t.seed + 1)
        stages[1]["val"] = data.eval_batches(val_tokens, long_seq, context_batch, t.eval_batches)
    if t.sft_steps:  # post-training pairs: a JSONL, or signature+docstring -> body mined from the corpus
        pairs = sft.load_jsonl(cfg.data.sft_path) if cfg.data.sft_path else sft.extract_pairs(docs)
        if len(pairs) < 2 and not cfg.data.sft_path:
            fail(
                f"the corpus yields {len(pairs)} SFT pairs (functions with docstrings); give --data.sft_path=pairs.jsonl"
                " or switch post-training off with --train.sft_steps=0"
            )
        sft_train, sft_val = sft.split_pairs(pairs, cfg.data.val_fraction, cfg.data.split_seed)
        stages[2]["batches"] = sft.SFTBatches(sft_train, tokenizer, sft_seq, t.batch_size, t.seed + 2)
        stages[2]["val"] = sft.eval_batches(sft_val, tokenizer, sft_seq, t.batch_size, t.eval_batches)
        print(f"post-training: {len(sft_train)} prompt/response pairs ({len(sft_val)} held out)")
except data.DataError as e:
    fail(str(e))
stages = [st for st in stages if st["steps"] or st["name"] == "pretrain"]  # at least one, for the final report
total_steps = sum(st["steps"] for st in stages)

# ---------------------------------------------------------------------------------------------------------------
# Model and optimizer (AdamW, report §4.2), then resume

model = Transformer(cfg.model, rngs=nnx.Rngs(t.seed))
optimizer = make_optimizer(model, t)
ledger = accounting.Ledger(*accounting.device_peak(), price_per_hour=t.price_per_hour)
step = 0
if (last := checkpoint.latest_step(run_dir)) is not None:
    try:
        meta = checkpoint.restore(run_dir, model, optimizer)
    except checkpoint.CheckpointError as e:
        fail(str(e))
    step = meta["step"]
    for st in stages:
        if st["steps"]:
            st["batches"].load_state_dict(meta["loaders"][st["name"]])
    ledger = accounting.Ledger.from_dict(meta["ledger"])
    print(f"resumed from checkpoint at step {step} of {total_steps}")
# metrics.jsonl holds exactly the steps up to the checkpoint: later lines (from a run that died) are dropped.
metrics_file = run_dir / "metrics.jsonl"
if metrics_file.exists():
    kept = [ln for ln in metrics_file.read_text().splitlines() if json.loads(ln)["step"] <= step]
    metrics_file.write_text("".join(ln + "\n" for ln in kept))
metrics_out = metrics_file.open("a")


def log(record: dict) -> None:
    metrics_out.write(json.dumps(record) + "\n")
    metrics_out.flush()


def save_checkpoint() -> None:
    meta = {
        "step": step,
        "loaders": {st["name"]: st["batches"].state_dict() for st in stages if st["steps"]},
        "ledger": ledger.to_dict(),
        "config": resolved,
        "model_config": config.to_dict(model.cfg),  # the current stage's (YaRN on after pre-training)
        "tokenizer": tokenizer.to_str(),
    }
    checkpoint.save(run_dir, step, model, optimizer, meta, t.keep_checkpoints)


stop_signal = []
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

# ---------------------------------------------------------------------------------------------------------------
# The stages

stage_start = 0
for st in stages:
    stage_end = stage_start + st["steps"]
    if step >= stage_end:  # finished before a resume
        stage_start = stage_end
        continue
    model = with_config(model, st["model"])  # YaRN on for context extension and after; same parameters
    # cached_partial walks the model's module graph once, not on every call (~0.3 s a step for the tiny model).
    step_fn = nnx.cached_partial(train_step, model, optimizer)
    flops_per_token = flops.flops_per_token(st["model"], st["seq_len"]).total
    bar = tqdm(total=st["steps"], initial=step - stage_start, desc=st["name"], dynamic_ncols=True)
    stage_tokens, stage_seconds, stage_steps = 0, 0.0, 0
    while step < stage_end and not stop_signal and not 0 < t.stop_after_steps <= step:
        gamma, lam = schedules.bias_update_speed(step, t), schedules.mtp_lambda(step, t)
        micro = [st["batches"].next_batch() for _ in range(t.grad_accum_steps)]
        micro = {k: jnp.asarray(np.stack([b[k] for b in micro])) for k in micro[0]}  # (A, B, T)
        tic = time.perf_counter()
        out = step_fn(micro, lam, gamma)
        loss = float(out["main_loss"])  # waits for the step
        seconds = time.perf_counter() - tic
        tokens = int(micro["inputs"].size)
        if stage_steps > 0:  # the first step of a stage includes compilation; keep it out of the throughput
            stage_tokens, stage_seconds = stage_tokens + tokens, stage_seconds + seconds
        ledger.record(st["name"], steps=1, tokens=tokens, seconds=seconds, seq_len=st["seq_len"],
                      flops=tokens * flops_per_token)  # fmt: skip
        stage_steps += 1
        step += 1
        load = np.asarray(out["expert_load"])  # (L_moe, E)
        maxvio_batch = float(out["maxvio_batch"]) if load.size else None  # None: no MoE layer routes anything
        biases = [np.asarray(r.e_score_correction_bias[...]).round(5).tolist() for r in routers(model)]
        lr = float(schedules.learning_rate(step - 1, t))
        log({"step": step, "stage": st["name"], "main_loss": loss, "total_loss": float(out["total_loss"]), "mtp_loss": float(out["mtp_loss"]),
             "balance_loss": float(out["balance_loss"]), "grad_norm": float(out["grad_norm"]), "lr": lr,
             "gamma": gamma, "mtp_lambda": lam, "tokens": tokens, "seconds": seconds, "maxvio_batch": maxvio_batch,
             "expert_load": load.tolist(), "router_bias": biases})  # fmt: skip
        tok_s = stage_tokens / stage_seconds if stage_seconds else 0.0
        shown = f" MaxVio {maxvio_batch:.2f}" if maxvio_batch is not None else ""
        bar.set_postfix_str(f"loss {loss:.3f} lr {lr:.1e} {tok_s:,.0f} tok/s{shown}")
        bar.update(1)
        if step % t.eval_every == 0 or step == stage_end:
            ev = evaluate(model, st["val"])
            log({"step": step, "stage": st["name"], "eval": True, **ev})
            bar.write(
                f"[{st['name']} step {step}] val loss {ev['val_loss']:.3f} ppl {ev['val_ppl']:.1f}"
                f" MaxVio_global {mean_maxvio(ev)}"
            )
        if step % t.ckpt_every == 0 or step == stage_end:
            save_checkpoint()
    bar.close()
    if stop_signal:
        save_checkpoint()
        print(f"stopped by signal {stop_signal[0]} at step {step}; checkpoint saved, run the same command to resume")
        sys.exit(128 + stop_signal[0])
    if 0 < t.stop_after_steps <= step:
        save_checkpoint()
        print(f"stopped after step {step} (train.stop_after_steps); checkpoint saved, run again to continue")
        sys.exit(0)
    if t.sample_tokens:
        sample = generate.sample_text(
            model, tokenizer, "def ", max_new_tokens=t.sample_tokens, temperature=0.8, top_p=0.95, seed=t.seed
        )
        print(f"--- sample after {st['name']} (temperature 0.8, top-p 0.95) ---\n{sample}\n---")
    stage_start = stage_end

# ---------------------------------------------------------------------------------------------------------------
# Final report

metrics_out.close()
# On the whole held-out pre-training text (MaxVio_global counts loads over the whole validation set, [LF] Eq. 4), and
# on the held-out SFT pairs when post-training ran: after SFT the router biases balance SFT's data, not the corpus's.
model = with_config(model, stages[-1]["model"])
final = evaluate(model, data.eval_batches(val_tokens, cfg.data.seq_len, t.batch_size, None))
final["unigram_entropy"] = entropy
if t.sft_steps:  # post-training is the last stage
    final["sft"] = evaluate(model, stages[-1]["val"])
(run_dir / "final.json").write_text(json.dumps(final, indent=2))
print(
    f"final validation loss {final['val_loss']:.3f} nats/token vs the corpus's unigram entropy {entropy:.3f}"
    f" nats/token; MaxVio_global {mean_maxvio(final, per_layer=True)}"
    + (f"; on the held-out SFT pairs: loss {final['sft']['val_loss']:.3f}, MaxVio {mean_maxvio(final['sft'])}"
       if "sft" in final else "")
)  # fmt: skip
plots.plot_run(run_dir)
ledger.save(run_dir / "ledger.json")
table = ledger.format_table1()
(run_dir / "costs.md").write_text(table + "\n")
print(table)
print(f"plots, metrics.jsonl, ledger.json and costs.md are in {run_dir}")
