"""train.py runs for the benches, each trained once: a finished run folder is reused only when it was trained with
the same arguments, so that changing a bench's arguments can never print the figures of an older run."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_once(out: Path, args: list[str]) -> Path:
    """`python train.py ARGS --train.out_dir=OUT` unless OUT holds a finished run of the same ARGS; returns OUT."""
    stamp = out / "bench_args.json"
    if (out / "final.json").exists():
        if stamp.exists() and json.loads(stamp.read_text()) == args:
            return out
        sys.exit(f"error: {out} holds a finished run trained with other arguments; delete it to train this one")
    print(f"training {out.name} ...", flush=True)
    command = [sys.executable, str(ROOT / "train.py"), *args, f"--train.out_dir={out}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    stamp.write_text(json.dumps(args))
    return out
