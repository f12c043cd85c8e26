"""train.py runs for the benches, each trained once: a finished run folder is reused only when it was trained with
the config these arguments resolve to, so that changing a bench's arguments (or the config file) can never print the
figures of an older run."""

import json
import subprocess
import sys
from pathlib import Path

from minidsv3 import config

ROOT = Path(__file__).resolve().parents[1]


def resolved_config(args: list[str]) -> dict:
    """The config train.py would run for ARGS (CONFIG --section.field=value ...; the benches always name the config),
    as its run folder's config.json stores it: overrides in any order, numbers however written, defaults given or not,
    all resolve alike."""
    path, *overrides = args
    try:
        return json.loads(json.dumps(config.to_dict(config.load(path, overrides))))  # tuples -> lists, as stored
    except config.ConfigError as e:
        sys.exit(f"error: {e}")


def train_once(out: Path, args: list[str]) -> Path:
    """`python train.py ARGS --train.out_dir=OUT` unless OUT holds a finished run of the same config; returns OUT."""
    args = [*args, f"--train.out_dir={out}"]
    if (out / "final.json").exists():
        if json.loads((out / "config.json").read_text()) == resolved_config(args):
            return out
        sys.exit(f"error: {out} holds a finished run trained with another config; delete it to train this one")
    print(f"training {out.name} ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=True, stdout=subprocess.DEVNULL)
    return out
