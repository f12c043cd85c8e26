"""train.py runs for the benches, each trained once, in a folder named after its config: a bench asked again with
the same config reuses the finished run, and one asked with other arguments (or an edited config file) trains beside
the older runs, so it can never print their figures nor overwrite them."""

import hashlib
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


def config_key(resolved: dict) -> str:
    """Eight hex digits that name a resolved config. Left out: the run folder (train.out_dir), which is named after
    the key, and where to stop (train.stop_after_steps), which train.py lets a run's continuation change too. A new
    config field changes every key: runs trained before it are then trained anew, never mistaken for the new ones."""
    defining = config.run_defining(resolved, without=("out_dir", "stop_after_steps"))
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:8]


def with_absolute_paths(args: list[str]) -> list[str]:
    """ARGS with the corpus, SFT-pair and cache paths made absolute, so that a key names the same files whichever
    folder the bench is started from."""
    data = resolved_config(args)["data"]
    return [*args, *(f"--data.{k}={Path(data[k]).absolute()}" for k in ("path", "sft_path", "cache_dir") if data[k])]


def train_once(parent: Path, name: str, args: list[str]) -> Path:
    """`python train.py ARGS` into PARENT/NAME-<config key> unless that folder holds a finished run; returns it."""
    args = with_absolute_paths(args)
    resolved = resolved_config(args)
    out = parent / f"{name}-{config_key(resolved)}"
    if (out / "final.json").exists():
        if config_key(json.loads((out / "config.json").read_text())) != config_key(resolved):
            sys.exit(f"error: {out}/config.json is not the config this folder is named after; move the folder away")
        return out
    print(f"training {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"--train.out_dir={out}"], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return out
