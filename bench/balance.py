"""Does aux-loss-free balancing do its job? The same pre-training with the router-bias update (γ as configured,
report §2.1.2) and without it (γ = 0), side by side.

    python bench/balance.py            # configs/tiny.toml: two pre-trainings, two passes over the training text
    python bench/balance.py configs/tiny.toml --train.pretrain_steps=200 --tag=short

Each run is train.py's pre-training alone (after context extension and SFT the biases balance those stages' data, not
the corpus's), in runs/bench/balance-gamma-{configured,0}[-TAG]; a finished run of the same config is reused. For
each it prints MaxVio ([LF] Eq. 4: max over experts of load / mean load - 1, averaged over the MoE layers):
- of the training stream: the loads of the last 100 steps summed, the very data the sign rule balanced;
- MaxVio_global of the final model on the whole held-out text (train.py's final evaluation) and on the whole
  training text (one forward pass here, a few minutes). The held-out figure is the larger mostly because the
  held-out files are few: docs/results.md tells how that was measured.
"""

import json
import sys
from pathlib import Path

import numpy as np
from train_once import bench_args, train_once

from minidsv3 import config, data, moe
from minidsv3.batches import eval_batches
from minidsv3.run import load_run, read_metrics
from minidsv3.step import evaluate

PRETRAIN_ONLY = ["--train.context_steps=0", "--train.sft_steps=0", "--train.sample_tokens=0"]


def main() -> None:
    path, overrides, tag, _ = bench_args(sys.argv[1:])
    runs = [
        train_once(f"balance-gamma-configured{tag}", [path, *overrides, *PRETRAIN_ONLY]),
        train_once(f"balance-gamma-0{tag}", [path, *overrides, *PRETRAIN_ONLY, "--train.bias_update_speed=0"]),
    ]
    rows = []
    for out in runs:
        print(f"reading {out.name}'s training text ...", flush=True)
        gamma = json.loads((out / "config.json").read_text())["train"]["bias_update_speed"]
        final = json.loads((out / "final.json").read_text())
        rows.append((f"γ = {gamma:g}", stream_maxvio(read_metrics(out)), layer_mean(final["maxvio_global"]),
                     training_text_maxvio(out), final["val_loss"]))  # fmt: skip
    print(f"\n{'':<12} {'training stream':>16}   {'MaxVio_global, final model':^32}   {'val loss':>8}")
    print(f"{'':<12} {'last 100 steps':>16}   {'held-out text':>15} {'training text':>16}")
    for label, stream, held_out, training, loss in rows:
        print(f"{label:<12} {stream:>16.3f}   {held_out:>15.3f} {training:>16.3f}   {loss:>8.3f}")


def stream_maxvio(records: list[dict], steps: int = 100) -> float:
    """MaxVio of the expert loads summed over the last `steps` pre-training steps, averaged over the MoE layers."""
    loads = [r["expert_load"] for r in records if not r.get("eval") and r["stage"] == "pretrain"][-steps:]
    return layer_mean(moe.max_violation(np.sum(loads, axis=0)))  # (steps, L_moe, E) -> (L_moe, E) -> (L_moe,)


def layer_mean(maxvio_per_layer) -> float:
    """The average over the MoE layers, as [LF] reports MaxVio; nan when no layer routes anything."""
    return float(np.mean(maxvio_per_layer)) if len(maxvio_per_layer) else float("nan")


def training_text_maxvio(out: Path) -> float:
    """MaxVio_global of a run's final model over its whole training text, in windows of seq_len."""
    cfg = config.from_dict(json.loads((out / "config.json").read_text()))
    model, tokenizer, _ = load_run(out)
    train_docs, _ = data.split_documents(data.load_documents(cfg.data.path), cfg.data.val_fraction, cfg.data.split_seed)
    cache_dir = Path(cfg.data.cache_dir).absolute() if cfg.data.cache_dir else out / "cache"  # as train.py's
    tokens = data.load_or_tokenize(train_docs, tokenizer, cache_dir, "train")  # (N,) tokenized by train.py already
    windows = eval_batches(tokens, cfg.data.seq_len, cfg.train.batch_size, None)  # every window once
    return layer_mean(evaluate(model, windows)["maxvio_global"])


if __name__ == "__main__":
    main()
