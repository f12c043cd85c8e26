"""Train a small DeepSeek-V3 through the three stages of the report's Table 1, on a 2-core CPU or one accelerator.

    python train.py                                   # configs/tiny.toml on the Python standard library's source
    python train.py configs/small.toml --train.pretrain_steps=2000 --data.path=my_corpus/
    python train.py --train.init_from=hf/tiny --train.pretrain_steps=0 --train.out_dir=runs/ft  # fine-tune an export

config -> data -> model and optimizer -> resume if the run folder has a checkpoint -> for each stage (pre-training,
context extension, post-training): each step's batch size, learning rate, λ and γ from the tokens seen
(minidsv3/schedules.py), nnx.jit train steps, evaluation, checkpoints -> plots, samples and the cost table.
Post-training is SFT, then RL (minidsv3/rl.py): GRPO steps on a code task rewarded by executed tests, the task scored
on held-out prompts before and after.
Ctrl-C (or SIGTERM) saves a checkpoint and exits; running the same command again continues the run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from minidsv3 import (
    accounting,
    batches,
    checkpoint,
    config,
    data,
    flops,
    generate,
    hf,
    plots,
    rl,
    run,
    schedules,
    sft,
    sharding,
    tasks,
)
from minidsv3.ledger import Ledger
from minidsv3.model import Transformer, with_config
from minidsv3.reward import Sandbox
from minidsv3.step import evaluate, make_optimizer, train_step


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def next_micro_batches(loader, n_micro: int) -> dict:
    """A step's n_micro micro-batches from `loader`, stacked: inputs, targets, loss_mask, token_mask (micro, B, T),
    their B sequences split over the mesh (every process draws the same batch and places its own devices' rows)."""
    micro = [loader.next_batch() for _ in range(n_micro)]
    return sharding.put_batch(mesh, {k: np.stack([b[k] for b in micro]) for k in micro[0]}, batch_axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Config and run folder

args = sys.argv[1:]
config_path = args.pop(0) if args and not args[0].startswith("--") else Path(__file__).parent / "configs/tiny.toml"
try:
    cfg = config.load(config_path, args)
    if cfg.train.init_from:  # fine-tuning: the weights, architecture and tokenizer of a Hugging Face folder
        init_model, init_tokenizer = hf.load(cfg.train.init_from)
        cfg, changed = hf.with_architecture(cfg, init_model.cfg)
        print(f"init from {cfg.train.init_from}" + (f"; [model] takes its {', '.join(changed)}" if changed else ""))
        if init_tokenizer is None:
            fail(f"train.init_from: {cfg.train.init_from} has no tokenizer.json; the run needs the model's tokenizer")
    resolved = config.to_dict(cfg)
    run_dir = run.check_run_folder(cfg.train.out_dir, resolved)  # holds no run or this one; reads only
except (config.ConfigError, run.RunFolderError, hf.HFError) as e:
    fail(str(e))
tc = cfg.train
print(f"run folder {run_dir}")

# Devices: with several hosts each process joins the others (jax.distributed), then the (data, expert) mesh that every
# step runs on (minidsv3/sharding.py). Process 0 alone writes the run folder; checkpoints are written by all.
try:
    if cfg.mesh.num_processes > 1:  # coordinator "" = detected from the cluster's environment (SLURM, MPI, ...)
        jax.distributed.initialize(cfg.mesh.coordinator_address or None, cfg.mesh.num_processes, cfg.mesh.process_id)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.expert, cfg.model.n_routed_experts)
except sharding.ShardingError as e:
    fail(str(e))
except (RuntimeError, ValueError) as e:  # jax.distributed: no coordinator, a timeout, an unknown cluster
    fail(f"mesh: jax.distributed.initialize failed ({str(e).splitlines()[0]}); check --mesh.coordinator_address")
writer = jax.process_index() == 0
if mesh.size > 1:
    print(f"mesh: {cfg.mesh.data} (data) x {cfg.mesh.expert} (expert) devices of {jax.device_count()},"
          f" {jax.process_count()} process(es)")  # fmt: skip

# ---------------------------------------------------------------------------------------------------------------
# Data: corpus -> split by files -> BPE tokenizer -> cached token arrays; SFT pairs from the same corpus.
# Nothing is written until every input has been checked: a refused start leaves the run folder as it was.

try:
    docs = data.load_documents(cfg.data.path)  # warns about each file it skips
    corpus = data.manifest(docs)
    run.check_corpus(run_dir, corpus)  # a run that continues reads the corpus it began with
    train_docs, val_docs = data.split_documents(docs, cfg.data.val_fraction, cfg.data.split_seed)
    cache_dir = Path(cfg.data.cache_dir).absolute() if cfg.data.cache_dir else run_dir / "cache"
    new_cache_files = {}  # written with the run folder, below
    t0 = time.time()
    if tc.init_from:
        tokenizer = init_tokenizer
    else:
        tokenizer = data.load_or_train_tokenizer(train_docs, cfg.model.vocab_size, cache_dir, new_cache_files)
    train_tokens = data.load_or_tokenize(train_docs, tokenizer, cache_dir, "train", new_cache_files)
    val_tokens = data.load_or_tokenize(val_docs, tokenizer, cache_dir, "val", new_cache_files)
    if tc.rl_task_tokens:  # the RL task's functions (minidsv3/tasks.py), ~1 % of the stream, no held-out prompt
        task_tokens = tasks.pretraining_tokens(tokenizer, len(train_tokens), tc.rl_task_tokens, tc.seed + 16)
        train_tokens = np.concatenate([train_tokens, task_tokens.astype(train_tokens.dtype)])
except (data.DataError, run.RunFolderError) as e:
    fail(str(e))
entropy = data.unigram_entropy(train_tokens, cfg.model.vocab_size)
print(
    f"corpus: {len(docs)} files ({len(train_docs)} train / {len(val_docs)} val), {len(train_tokens):,} train tokens,"
    f" {len(val_tokens):,} val tokens; unigram entropy {entropy:.3f} nats/token"
    f" (tokenizer and tokens ready in {time.time() - t0:.1f}s)"
)

# The three stages of Table 1. Context extension stretches the sequence by s and switches YaRN on (report §4.3),
# with batch/s sequences so that a step holds the same tokens (15360 x 4K = 1920 x 32K in the report).
s = tc.context_yarn_factor
long_seq = round(cfg.data.seq_len * s)
yarn_model = dataclasses.replace(  # long_seq fits max_position_embeddings (config_checks.validate_run)
    cfg.model, rope_scaling=config.RopeScaling(factor=s, original_max_position_embeddings=cfg.data.seq_len)
)
extended = tc.context_steps > 0 and s > 1
sft_seq = long_seq if extended else cfg.data.seq_len
stages = [
    {"name": "pretrain", "steps": tc.pretrain_steps, "seq_len": cfg.data.seq_len, "model": cfg.model},
    {"name": "context", "steps": tc.context_steps, "seq_len": long_seq, "model": yarn_model},
    {"name": "sft", "steps": tc.sft_steps, "seq_len": sft_seq, "model": yarn_model if extended else cfg.model},
    # RL starts from the SFT model (report §5.2); its seq_len is set below from the prompt window
    {"name": "rl", "steps": tc.rl_steps if tc.sft_steps else 0, "model": yarn_model if extended else cfg.model},
]
if tc.rl_steps and not tc.sft_steps:
    print("no RL: it starts from the SFT model, and train.sft_steps = 0")
context_batch = max(1, int(tc.batch_size / s))
try:  # each stage's loader and validation batches; a stage switched off (0 steps) needs no data
    stages[0]["val"] = batches.eval_batches(val_tokens, cfg.data.seq_len, tc.batch_size, tc.eval_batches)
    if tc.pretrain_steps:
        stages[0]["batches"] = batches.PackedBatches(train_tokens, cfg.data.seq_len, tc.batch_size, tc.seed)
    if tc.context_steps:
        stages[1]["batches"] = batches.PackedBatches(train_tokens, long_seq, context_batch, tc.seed + 1)
        stages[1]["val"] = batches.eval_batches(val_tokens, long_seq, context_batch, tc.eval_batches)
    if tc.sft_steps:  # post-training pairs: a JSONL, or signature+docstring -> body mined from the corpus
        pairs = sft.load_jsonl(cfg.data.sft_path) if cfg.data.sft_path else sft.extract_pairs(docs)
        if len(pairs) < 2 and not cfg.data.sft_path:
            fail(
                f"the corpus yields {len(pairs)} SFT pairs (functions with docstrings); give --data.sft_path=pairs.jsonl"
                " or switch post-training off with --train.sft_steps=0"
            )
        sft_train, sft_val = sft.split_pairs(pairs, cfg.data.val_fraction, cfg.data.split_seed)
        sft_train = tasks.mix_pairs(sft_train, tc.rl_task_pairs, tc.seed + 17)  # + RL task pairs, held-out ones not
        stages[2]["batches"] = sft.SFTBatches(sft_train, tokenizer, sft_seq, tc.batch_size, tc.seed + 2)
        stages[2]["val"] = sft.eval_batches(sft_val, tokenizer, sft_seq, tc.batch_size, tc.eval_batches)
        print(f"post-training: {len(sft_train)} prompt/response pairs ({len(sft_val)} held out)")
    if stages[3]["steps"]:  # GRPO on the task's training prompts; scored on the held-out ones before and after
        held_out = tasks.held_out_tasks()[: tc.rl_eval_prompts]
        rl_window = rl.prompt_window(tokenizer, held_out)
        stages[3]["seq_len"] = rl_window + tc.rl_max_new_tokens - 1  # T of the training forward
        stages[3]["batches"] = rl.RLPrompts(tokenizer, tc.rl_prompts, rl_window, tc.seed + 3, held_out)
        stages[3]["val"] = stages[2]["val"]  # the held-out SFT pairs, as after SFT
        rl_stdlib = rl.stdlib_prompts(tokenizer, sft_val, rl_window)  # the parse-rate check on real code
        print(f"RL: {tc.rl_prompts} x {tc.rl_samples} samples a step, {len(held_out)} held-out task prompts")
except data.DataError as e:
    fail(str(e))
except OSError as e:  # e.g. an SFT file without read permission
    fail(f"{e.filename}: cannot be read ({e.strerror}); fix its permissions or point --data.sft_path elsewhere")
stages = [st for st in stages if st["steps"] or st["name"] == "pretrain"]  # at least one, for the final report
total_steps = sum(st["steps"] for st in stages)

# ---------------------------------------------------------------------------------------------------------------
# Model and optimizer (AdamW, report §4.2), the batch-size ramp, then resume

model = with_config(init_model, cfg.model) if tc.init_from else Transformer(cfg.model, rngs=nnx.Rngs(tc.seed))
optimizer = make_optimizer(model, tc)
sharding.shard_modules(mesh, model, optimizer)  # experts split over 'expert', the rest replicated (PARTITION_RULES)
ramp = schedules.BatchRamp(tc, cfg.data.seq_len)  # micro-batches per step, and pre-training tokens seen, by step
if tc.batch_ramp_tokens:
    levels = [f"{lv.micro_batches * tc.batch_size} from step {lv.first_step}" for lv in ramp.levels]
    print(f"batch-size ramp (sequences per step): {', '.join(levels)}")
ledger = Ledger(*accounting.device_peak(), price_per_hour=tc.price_per_hour)
step = 0
if checkpoint.latest_step(run_dir) is not None:
    try:
        meta = checkpoint.restore(run_dir, model, optimizer)
    except checkpoint.CheckpointError as e:
        fail(str(e))
    step = meta["step"]
    for moved in checkpoint.set_aside_newer(run_dir, meta["restored_step"]):  # unreadable: restore passed over them
        print(f"moved the unreadable checkpoint to {moved}; the run writes that step again")
    for st in stages:
        if st["steps"]:
            st["batches"].load_state_dict(meta["loaders"][st["name"]])
    ledger = Ledger.from_dict(meta["ledger"])
    print(f"resumed from checkpoint at step {step} of {total_steps}")
# Every input is checked, the checkpoint included: the run folder gets this start's config.json and manifest.json, and the caches their files.
try:
    if writer:  # the other processes read the same folder
        run.open_run_folder(run_dir, resolved, corpus)
        data.write_files(new_cache_files)
except run.RunFolderError as e:
    fail(str(e))
except OSError as e:
    fail(f"{e.filename}: cannot write the cache ({e.strerror}); choose another --data.cache_dir")

try:
    # the records up to the checkpoint (later ones are dropped); process 0's alone
    metrics_out = run.open_metrics(run_dir, step) if writer else open(os.devnull, "w")  # noqa: SIM115
except run.RunFolderError as e:
    fail(str(e))


def save_checkpoint() -> None:
    meta = {
        "step": step,
        "loaders": {st["name"]: st["batches"].state_dict() for st in stages if st["steps"]},
        "ledger": ledger.to_dict(),
        "config": resolved,
        "model_config": config.to_dict(model.cfg),  # the current stage's (YaRN on after pre-training)
        "tokenizer": tokenizer.to_str(),
    }
    try:  # refuses NaN or infinity; a full disk leaves the older checkpoints intact
        checkpoint.save(run_dir, step, model, optimizer, meta, tc.keep_checkpoints)
    except checkpoint.CheckpointError as e:
        fail(str(e))


def score_held_out(model: Transformer) -> dict:
    """The RL task on the held-out prompts, plus the stdlib non-regression checks (rl.evaluate)."""
    return rl.evaluate(model, tokenizer, held_out, sandbox, tc, window=rl_window, stdlib_val=stages[0]["val"],
                       stdlib_pairs=rl_stdlib)  # fmt: skip


sandbox = Sandbox()  # the reward's worker process, started by the first reward (minidsv3/reward.py)
stop_signal = []
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

# ---------------------------------------------------------------------------------------------------------------
# The stages

stage_start = 0
skipped, skipped_in_a_row = 0, 0  # steps whose loss or gradient was NaN or infinite, which changed nothing
for st in stages:
    stage_end = stage_start + st["steps"]
    if step >= stage_end:  # finished before a resume
        stage_start = stage_end
        continue
    model = with_config(model, st["model"])  # YaRN on for context extension and after; same parameters
    # cached_partial walks the model's module graph once, not on every call (~0.3 s a step for the tiny model).
    step_fn = nnx.cached_partial(train_step, model, optimizer)
    flops_per_token = flops.flops_per_token(st["model"], st["seq_len"]).total
    if st["name"] == "rl":  # π_ref = the SFT model (Eq. 27), kept in the run folder; the task scored before RL
        flops_per_token = rl.flops_per_token(st["model"], st["seq_len"])
        if step == stage_start:
            reference = rl.save_reference(run_dir, model)
            print(f"scoring the SFT model on {len(held_out)} held-out task prompts (rl_eval_before.json)")
            rl.write_json(run_dir / "rl_eval_before.json", score_held_out(model))
        else:
            try:
                reference = rl.load_reference(run_dir, model)
            except FileNotFoundError as e:
                fail(str(e))
    speed = run.Throughput()
    bar = tqdm(total=st["steps"], initial=step - stage_start, desc=st["name"], dynamic_ncols=True, disable=not writer)
    while step < stage_end and not stop_signal and not 0 < tc.stop_after_steps <= step:
        if st["name"] == "rl":  # a GRPO step: rollouts, rule rewards, one update, router biases frozen (rl.py)
            tic = time.perf_counter()
            out = rl.rl_step(model, reference, optimizer, st["batches"], sandbox, tc)
            seconds = time.perf_counter() - tic
            step += 1
            skipped += bool(out["skipped"])
            ledger.record("rl", steps=1, tokens=out["tokens"], seconds=seconds, seq_len=st["seq_len"],
                          flops=out["tokens"] * flops_per_token)  # fmt: skip
            record = rl.step_record(step, out, model, lr=tc.rl_learning_rate, seconds=seconds)
            run.write_record(metrics_out, record)
            shown = f" MaxVio {record['maxvio_batch']:.2f}" if record["maxvio_batch"] is not None else ""
            shown += f" skipped {skipped} (NaN/inf)" if skipped else ""
            bar.set_postfix_str(
                f"reward {record['reward']:.3f} zero-var groups {record['zero_variance_groups']}/{tc.rl_prompts}"
                f" KL {record['kl']:.4f} length {record['response_length']:.1f}{shown}"
            )
            bar.update(1)
            if step % tc.ckpt_every == 0 or step == stage_end:
                save_checkpoint()
            continue
        # schedules: the batch (ramp), learning rate, λ and γ of this step, from the tokens seen (report §4.2)
        micro = next_micro_batches(st["batches"], ramp.micro_batches(step))  # (micro, B, T) each
        lr = schedules.learning_rate(step, tc, ramp)
        lam, gamma = schedules.mtp_lambda(step, tc, ramp), schedules.bias_update_speed(step, tc, ramp)

        # forward, backward, update (then the router-bias update, inside the step)
        tic = time.perf_counter()
        with jax.set_mesh(mesh):  # the MoE layers exchange tokens over its 'expert' axis (minidsv3/expert_parallel.py)
            out = step_fn(micro, lr, lam, gamma)
        loss = float(out["main_loss"])  # waits for the step
        seconds = time.perf_counter() - tic
        step += 1
        skipped_in_a_row = skipped_in_a_row + 1 if out["skipped"] else 0
        skipped += bool(out["skipped"])

        # log
        tokens = int(micro["inputs"].size)
        ledger.record(st["name"], steps=1, tokens=tokens, seconds=seconds, seq_len=st["seq_len"],
                      flops=tokens * flops_per_token)  # fmt: skip
        record = run.step_record(step, st["name"], out, model, lr=lr, gamma=gamma, mtp_lambda=lam, tokens=tokens,
                                 seconds=seconds)  # fmt: skip
        run.write_record(metrics_out, record)
        tok_s = speed.add(micro["inputs"].shape, tokens, seconds)
        shown = f" MaxVio {record['maxvio_batch']:.2f}" if record["maxvio_batch"] is not None else ""
        shown += f" skipped {skipped} (NaN/inf)" if skipped else ""
        bar.set_postfix_str(f"loss {loss:.3f} lr {lr:.1e} {tok_s:,.0f} tok/s{shown}")
        bar.update(1)
        if skipped_in_a_row == tc.max_skipped_steps:  # diverged: more steps would only skip too
            bar.close()
            fail(
                f"training diverged: steps {step - skipped_in_a_row + 1} to {step} all had a NaN or infinite loss or"
                " gradient and were skipped (train.max_skipped_steps); stopped without saving a checkpoint. Resuming"
                " would repeat them exactly: start a new --train.out_dir with a lower --train.learning_rate"
            )

        # evaluate
        if step % tc.eval_every == 0 or step == stage_end:
            ev = evaluate(model, st["val"])
            run.write_record(metrics_out, {"step": step, "stage": st["name"], "eval": True, **ev})
            bar.write(
                f"[{st['name']} step {step}] val loss {ev['val_loss']:.3f} ppl {ev['val_ppl']:.1f}"
                f" MaxVio_global {run.mean_maxvio(ev)}"
            )

        # checkpoint
        if step % tc.ckpt_every == 0 or step == stage_end:
            save_checkpoint()
    bar.close()
    if stop_signal or 0 < tc.stop_after_steps <= step:  # stopped early: save, say how to continue, exit
        save_checkpoint()
        if stop_signal:
            print(
                f"stopped by signal {stop_signal[0]} at step {step}; checkpoint saved, run the same command to resume"
            )
            sys.exit(128 + stop_signal[0])
        print(f"stopped after step {step} (train.stop_after_steps); checkpoint saved, run again to continue")
        sys.exit(0)
    if tc.sample_tokens:
        sample = generate.sample_text(
            model, tokenizer, "def ", max_new_tokens=tc.sample_tokens, temperature=0.8, top_p=0.95, seed=tc.seed
        )
        print(f"--- sample after {st['name']} (temperature 0.8, top-p 0.95) ---\n{sample}\n---")
    stage_start = stage_end

# ---------------------------------------------------------------------------------------------------------------
# Final report

metrics_out.close()
# On the whole held-out pre-training text (MaxVio_global counts loads over the whole validation set, [LF] Eq. 4), and
# on the held-out SFT pairs when post-training ran: after SFT the router biases balance SFT's data, not the corpus's.
model = with_config(model, stages[-1]["model"])
final = evaluate(model, batches.eval_batches(val_tokens, cfg.data.seq_len, tc.batch_size, None))
final["unigram_entropy"] = entropy
if tc.sft_steps:  # post-training is the last stage
    final["sft"] = evaluate(model, stages[-1]["val"])
if stages[-1]["name"] == "rl":  # the task before (saved when RL began) and after RL
    final["rl"] = {"before": json.loads((run_dir / "rl_eval_before.json").read_text()), "after": score_held_out(model)}
sandbox.close()
if not writer:  # process 0 writes the reports
    sys.exit(0)
(run_dir / "final.json").write_text(json.dumps(final, indent=2))
print(
    f"final validation loss {final['val_loss']:.3f} nats/token vs the corpus's unigram entropy {entropy:.3f}"
    f" nats/token; MaxVio_global {run.mean_maxvio(final, per_layer=True)}"
    + (f"; on the held-out SFT pairs: loss {final['sft']['val_loss']:.3f}, MaxVio {run.mean_maxvio(final['sft'])}"
       if "sft" in final else "")
)  # fmt: skip
if "rl" in final:
    print(rl.report(final["rl"]["before"], final["rl"]["after"]))
plots.plot_run(run_dir)
ledger.save(run_dir / "ledger.json")
table = ledger.write_costs_md(run_dir / "costs.md")
print(table)
print(f"plots, metrics.jsonl, ledger.json and costs.md are in {run_dir}")
