"""Does aux-loss-free balancing do its job? The same run with γ as configured and with γ = 0, side by side.

    python bench/balance.py                       # configs/tiny.toml, the default run, twice (~20 min on 2 cores)
    python bench/balance.py configs/tiny.toml --train.pretrain_steps=200

Each run goes through train.py into runs/balance/gamma-<γ>; an existing finished run is reused (delete the folder
to rerun). For both runs it prints MaxVio ([LF] Eq. 4: max over experts of load/mean - 1, averaged over the MoE
layers):
- MaxVio_global on the held-out validation text at the end of each stage (train.py's evaluations), and at the end
  of the run, the issue's figure (final.json);
- the training stream's own balance: loads summed over the last 100 pre-training steps. The sign rule balances the
  loads it sees, so this is where it is closest to perfect; the validation figure adds the drift of the bias around
  its equilibrium at the moment of measurement and the difference between the held-out files' mix and training's.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, overrides: list[str], gamma: float | None) -> Path:
    name = "configured" if gamma is None else f"{gamma:g}"
    out = ROOT / "runs" / "balance" / f"gamma-{name}"
    args = [sys.executable, str(ROOT / "train.py"), config, *overrides, f"--train.out_dir={out}"]
    if gamma is not None:
        args.append(f"--train.bias_update_speed={gamma}")
    if not (out / "final.json").exists():
        print(f"training {out.name} ...", flush=True)
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return out


def max_violation(load: np.ndarray) -> float:
    """load (L_moe, E) -> MaxVio averaged over the MoE layers."""
    return float(np.mean(load.max(-1) / load.mean(-1) - 1))


def summary(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["stage"]: r for r in records if r.get("eval")}  # the last evaluation of each stage
    steps = [r for r in records if not r.get("eval") and r["stage"] == "pretrain"][-100:]
    final = json.loads((out / "final.json").read_text())
    return {
        "val_loss": final["val_loss"],
        "stages": {stage: float(np.mean(r["maxvio_global"])) for stage, r in evals.items()},
        "final": final["maxvio_global"],
        "train_pooled": max_violation(np.sum([np.asarray(r["expert_load"]) for r in steps], axis=0)),
    }


def main() -> None:
    argv = sys.argv[1:]
    config = argv.pop(0) if argv and not argv[0].startswith("--") else str(ROOT / "configs" / "tiny.toml")
    runs = {
        "γ as configured": summary(run(config, argv, None)),
        "γ = 0 (no balancing)": summary(run(config, argv, 0.0)),
    }
    stages = list(next(iter(runs.values()))["stages"])
    print(f"\n{'MaxVio':<22} {'val loss':>9} {'final':>7}   per MoE layer        {'  '.join(f'{s:>8}' for s in stages)}"
          f"  {'train, last 100 steps':>21}")  # fmt: skip
    for label, r in runs.items():
        mv = r["final"]
        layers = ", ".join(f"{v:.3f}" for v in mv)
        ends = "  ".join(f"{r['stages'].get(s, float('nan')):>8.3f}" for s in stages)
        print(
            f"{label:<22} {r['val_loss']:>9.3f} {np.mean(mv):>7.3f}   {layers:<20} {ends}  {r['train_pooled']:>21.3f}"
        )
    print(
        "\nfinal: MaxVio_global on the pre-training validation text at the end of the run (the issue's target: < 0.2);"
    )
    print("stage columns: at the end of each stage, on that stage's validation batches.")


if __name__ == "__main__":
    main()
