"""Does aux-loss-free balancing do its job? The same run with γ as configured and with γ = 0, side by side.

    python bench/balance.py                       # configs/tiny.toml, the default run, twice (~20 min on 2 cores)
    python bench/balance.py configs/tiny.toml --train.pretrain_steps=200
    python bench/balance.py --held-out RUN_DIR    # only the held-out-mix measurements, on any run's final model

Each run goes through train.py into runs/balance/gamma-<γ>; a finished run of the same config is reused. For both
runs it prints MaxVio ([LF] Eq. 4: max over experts of load/mean - 1, averaged over the MoE layers):
- MaxVio_global at the end of the run (final.json) over the whole held-out pre-training text, and over the held-out
  SFT pairs, the data the biases were last balanced on; and at the end of each stage (train.py's evaluations);
- the training stream's own balance: loads summed over the last 100 pre-training steps. The sign rule balances the
  loads it sees, so this is where it is closest to perfect; the validation figure adds the drift of the bias around
  its equilibrium at the moment of measurement and the difference between the held-out files' mix and training's.

Then it asks how much of the validation figure is the held-out files' mix: the configured run's final model is
measured on the held-out files of other split seeds (same val_fraction; those files were partly trained on, which
matters little for routing) and on 2,560 windows drawn at random from the whole corpus. Experts specialize by
content, and a few large files (codec tables, pydoc's topic texts) can make up a good share of a 5 % split.
"""

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from train_once import ROOT, train_once

from minidsv3 import config, data, moe
from minidsv3.generate import load_run
from minidsv3.step import evaluate


def run(config_path: str, overrides: list[str], gamma: float | None) -> Path:
    name = "configured" if gamma is None else f"{gamma:g}"
    extra = [] if gamma is None else [f"--train.bias_update_speed={gamma}"]
    return train_once(ROOT / "runs" / "balance" / f"gamma-{name}", [config_path, *overrides, *extra])


def summary(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["stage"]: r for r in records if r.get("eval")}  # the last evaluation of each stage
    steps = [r for r in records if not r.get("eval") and r["stage"] == "pretrain"][-100:]
    final = json.loads((out / "final.json").read_text())
    return {
        "val_loss": final["val_loss"],
        "stages": {stage: float(np.mean(r["maxvio_global"])) for stage, r in evals.items()},
        "final": final["maxvio_global"],
        "final_sft": float(np.mean(final["sft"]["maxvio_global"])) if "sft" in final else float("nan"),
        "train_pooled": float(moe.max_violation(jnp.asarray(np.sum([r["expert_load"] for r in steps], axis=0))).mean()),
    }


def held_out_mix(out: Path, seeds: tuple[int, ...] = (0, 1, 2), windows: int = 2560) -> None:
    """Print the final model's MaxVio_global on other file splits' held-out text and on random corpus windows."""
    cfg = config.from_dict(json.loads((out / "config.json").read_text()))
    model, tokenizer = load_run(out)
    docs = data.load_documents(cfg.data.path)
    T, B = cfg.data.seq_len, cfg.train.batch_size
    print(f"\n{out.name}'s final model, MaxVio_global on other held-out sets ({cfg.data.val_fraction:g} of files):")
    for seed in seeds:
        _, val = data.split_documents(docs, cfg.data.val_fraction, seed)
        ev = evaluate(model, data.eval_batches(data.encode_documents(val, tokenizer), T, B, None))
        print(f"  split seed {seed}: {len(val):>3} files  {np.mean(ev['maxvio_global']):.3f}")
    stream = data.encode_documents(docs, tokenizer)  # (N,)
    starts = np.random.default_rng(0).choice((len(stream) - 1) // T, windows, replace=False) * T  # (windows,)
    ev = evaluate(model, [data.windows(stream, starts[i : i + B], T) for i in range(0, windows, B)])
    print(f"  {windows} random windows of the whole corpus: {np.mean(ev['maxvio_global']):.3f}")


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--held-out"] and len(argv) == 2:
        out = Path(argv[1]).absolute()
        if not (out / "final.json").exists():
            sys.exit(f"error: {out} holds no finished run (no final.json); give the folder of a run train.py finished")
        held_out_mix(out)
        return
    config_path = argv.pop(0) if argv and not argv[0].startswith("--") else str(ROOT / "configs" / "tiny.toml")
    configured = run(config_path, argv, None)
    runs = {"γ as configured": summary(configured), "γ = 0 (no balancing)": summary(run(config_path, argv, 0.0))}
    stages = list(next(iter(runs.values()))["stages"])
    print(f"\n{'MaxVio':<22} {'val loss':>9} {'final':>7}   per MoE layer        {'SFT pairs':>9}  "
          f"{'  '.join(f'{s:>8}' for s in stages)}  {'train, last 100 steps':>21}")  # fmt: skip
    for label, r in runs.items():
        mv = r["final"]
        layers = ", ".join(f"{v:.3f}" for v in mv)
        ends = "  ".join(f"{r['stages'].get(s, float('nan')):>8.3f}" for s in stages)
        print(
            f"{label:<22} {r['val_loss']:>9.3f} {np.mean(mv):>7.3f}   {layers:<20} {r['final_sft']:>9.3f}  {ends}"
            f"  {r['train_pooled']:>21.3f}"
        )
    print("\nfinal: MaxVio_global over the whole held-out pre-training text at the end of the run; SFT pairs: over the")
    print("held-out SFT pairs at the end; stage columns: at the end of each stage, on its 8 validation batches.")
    held_out_mix(configured)


if __name__ == "__main__":
    main()
