"""Does aux-loss-free balancing do its job? The same run with γ as configured and with γ = 0, side by side.

    python bench/balance.py                       # configs/tiny.toml, the default run, twice (~20 min on 2 cores)
    python bench/balance.py configs/tiny.toml --train.pretrain_steps=200

Each run goes through train.py into runs/balance/gamma-<γ>; an existing finished run is reused. Prints the final
validation loss and MaxVio_global ([LF] Eq. 4: max over experts of load/mean - 1, loads counted over the whole
validation set, per MoE layer and averaged) of both runs.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, overrides: list[str], gamma: float | None) -> dict:
    name = "configured" if gamma is None else f"{gamma:g}"
    out = ROOT / "runs" / "balance" / f"gamma-{name}"
    args = [sys.executable, str(ROOT / "train.py"), config, *overrides, f"--train.out_dir={out}"]
    if gamma is not None:
        args.append(f"--train.bias_update_speed={gamma}")
    if not (out / "final.json").exists():
        print(f"training {out.name} ...", flush=True)
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "final.json").read_text())


def main() -> None:
    argv = sys.argv[1:]
    config = argv.pop(0) if argv and not argv[0].startswith("--") else str(ROOT / "configs" / "tiny.toml")
    with_bias, without = run(config, argv, None), run(config, argv, 0.0)
    print(f"\n{'run':<22} {'val loss':>9} {'MaxVio_global':>14}   per MoE layer")
    for label, r in (("γ as configured", with_bias), ("γ = 0 (no balancing)", without)):
        mv = r["maxvio_global"]
        print(f"{label:<22} {r['val_loss']:>9.3f} {sum(mv) / len(mv):>14.3f}   {', '.join(f'{v:.3f}' for v in mv)}")


if __name__ == "__main__":
    main()
