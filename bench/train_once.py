"""train.py runs for the benches, each trained once: a finished run folder is reused only when it was trained with
the same arguments, so that changing a bench's arguments can never print the figures of an older run."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _resolved(args: list[str]) -> list:
    """The positional arguments and the overrides as train.py applies them (the last value of a key wins), so that
    the same run asked for with its overrides in another order is recognised."""
    overrides = dict(a.partition("=")[::2] for a in args if a.startswith("--"))
    return [[a for a in args if not a.startswith("--")], sorted(overrides.items())]


def train_once(out: Path, args: list[str]) -> Path:
    """`python train.py ARGS --train.out_dir=OUT` unless OUT holds a finished run of the same ARGS; returns OUT."""
    stamp = out / "bench_args.json"
    if (out / "final.json").exists():
        if stamp.exists() and _resolved(json.loads(stamp.read_text())) == _resolved(args):
            return out
        sys.exit(f"error: {out} holds a finished run trained with other arguments; delete it to train this one")
    print(f"training {out.name} ...", flush=True)
    command = [sys.executable, str(ROOT / "train.py"), *args, f"--train.out_dir={out}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    stamp.write_text(json.dumps(args))
    return out
