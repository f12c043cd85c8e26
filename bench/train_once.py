"""The benches' training runs: `python train.py ARGS` into runs/bench/NAME, once. A folder that holds a finished run
(final.json) of the same config is reused as it is; one that holds another config is train.py's to refuse: delete it,
or give the bench --tag=TAG to train beside it in runs/bench/NAME-TAG."""

import json
import subprocess
import sys
from pathlib import Path

from minidsv3 import config

ROOT = Path(__file__).resolve().parents[1]


def bench_args(argv: list[str]) -> tuple[str, list[str], str, config.Config]:
    """A bench's arguments [CONFIG] [--section.field=value ...] [--tag=TAG] -> (config path, overrides, "-TAG" or "",
    the config they make). CONFIG defaults to configs/tiny.toml; a bad override is a one-line error."""
    tag = "".join(f"-{a.split('=', 1)[1]}" for a in argv if a.startswith("--tag="))
    overrides = [a for a in argv if not a.startswith("--tag=")]
    path = overrides.pop(0) if overrides and not overrides[0].startswith("--") else str(ROOT / "configs" / "tiny.toml")
    try:
        return path, overrides, tag, config.load(path, overrides)
    except config.ConfigError as e:
        sys.exit(f"error: {e}")


def train_once(name: str, args: list[str]) -> Path:
    """runs/bench/NAME after `python train.py ARGS --train.out_dir=<it>`, skipped when it already holds that run
    finished. ARGS = [CONFIG, --section.field=value, ...]."""
    out = ROOT / "runs" / "bench" / name
    args = [*args, f"--train.out_dir={out}"]
    wanted = json.loads(json.dumps(config.to_dict(config.load(args[0], args[1:]))))  # as config.json stores it
    if (out / "final.json").exists():
        trained = json.loads((out / "config.json").read_text())
        if config.run_defining(trained) == config.run_defining(wanted):
            return out
    print(f"training {out.relative_to(ROOT)} ...", flush=True)
    finished = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=False, stdout=subprocess.DEVNULL)
    if finished.returncode:  # train.py has said why on stderr
        sys.exit(f"error: train.py did not finish {out}; if it holds a run of other arguments, delete it or --tag=TAG")
    return out
