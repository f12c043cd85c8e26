"""Does aux-loss-free balancing do its job? The same run with γ as configured and with γ = 0, side by side.

    python bench/balance.py                       # configs/tiny.toml: the default run, with γ = 0, and the default
                                                  # run's pre-training alone (~30 min on 2 cores)
    python bench/balance.py configs/tiny.toml --train.pretrain_steps=200
    python bench/balance.py --held-out RUN_DIR    # only the held-out-mix measurements, on any run's final model

Each run goes through train.py into runs/balance/gamma-<γ>[-pretrain-only]-<config key>; a finished run of the same
config is reused, and runs of other configs live beside it. For each run it prints MaxVio ([LF] Eq. 4: max over
experts of load/mean - 1, averaged over the MoE layers):
- MaxVio_global at the end of the run (final.json) over the whole held-out pre-training text, and over the held-out
  SFT pairs, the data the biases were last balanced on; and at the end of each stage (train.py's evaluations);
- the training stream's own balance: loads summed over the last 100 pre-training steps. The sign rule balances the
  loads it sees, so this is where it is closest to perfect; the validation figure adds the drift of the bias around
  its equilibrium at the moment of measurement and the difference between the held-out files' mix and training's.
The third run stops where pre-training ends, with the biases still balanced for the corpus; after SFT they follow
SFT's data instead.

Then it asks how much of the validation figure is which files are held out. Experts specialize by content, and
a few large files (codec tables, pydoc's topic texts) can make up a good share of a 5 % split. The model at the end
of pre-training, then the final one, reads every file of the corpus once, and its MaxVio_global is printed on the
held-out files, on all the training files, and on random sets of training files as many as the held-out ones: if
the held-out figure is typical of those sets, it measures the small sample of files, not routing that fails to
carry over to unseen text.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer
from tqdm import tqdm
from train_once import ROOT, resolved_config, train_once

from minidsv3 import config, data, moe
from minidsv3.generate import load_run
from minidsv3.model import Transformer


def run(config_path: str, overrides: list[str], gamma: float | None, pretrain_only: bool = False) -> Path:
    name = "gamma-" + ("configured" if gamma is None else f"{gamma:g}")
    extra = [] if gamma is None else [f"--train.bias_update_speed={gamma}"]
    if pretrain_only:
        name, extra = f"{name}-pretrain-only", [*extra, "--train.context_steps=0", "--train.sft_steps=0"]
    return train_once(ROOT / "runs" / "balance", name, [config_path, *overrides, *extra])


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


@nnx.jit
def batch_loads(model: Transformer, inputs: jax.Array, token_mask: jax.Array) -> jax.Array:
    """inputs, token_mask (R, T) -> (L_moe, E): the expert loads of a batch of windows, padding left out."""
    return model(inputs, token_mask=token_mask)[1]["expert_load"]


def file_loads(
    model: Transformer, tokenizer: Tokenizer, docs: list[data.Document], seq_len: int, rows: int = 32
) -> np.ndarray:
    """(F, L_moe, E): the expert loads of every file, each read on its own in windows of seq_len, `rows` windows per
    batch (the last batch of a file and the last window padded, and the padding kept out of the loads)."""
    per_file = []
    for doc in tqdm(docs, desc="files", unit="file", dynamic_ncols=True):
        ids = data.encode_documents([doc], tokenizer)  # (n,) the file and its separator
        n_rows = -(-len(ids) // (rows * seq_len)) * rows  # whole batches: one shape, one compilation
        inputs = np.zeros(n_rows * seq_len, np.int32)  # (n_rows·T,)
        inputs[: len(ids)] = ids
        mask = (np.arange(n_rows * seq_len) < len(ids)).astype(np.float32)  # (n_rows·T,)
        inputs, mask = inputs.reshape(n_rows, seq_len), mask.reshape(n_rows, seq_len)  # (n_rows, T)
        per_file.append(sum(np.asarray(batch_loads(model, inputs[i : i + rows], mask[i : i + rows]))
                            for i in range(0, n_rows, rows)))  # fmt: skip  # (L_moe, E)
    return np.stack(per_file)  # (F, L_moe, E)


def maxvio(loads: np.ndarray) -> float:
    """(F, L_moe, E) -> MaxVio_global of the files pooled, averaged over the MoE layers."""
    return float(np.mean(moe.max_violation(jnp.asarray(loads.sum(0)))))


def held_out_mix(out: Path, draws: int = 1000) -> None:
    """How much of a run's held-out MaxVio_global is which files are held out: its final model on every file of the
    corpus, then on the held-out files, on all the training files (the text the biases balanced on), and on random
    sets of training files as many as the held-out ones. If the held-out figure is typical of those sets, the gap
    to the training files is the small sample of files, not routing that fails to carry over to unseen text."""
    cfg = config.from_dict(json.loads((out / "config.json").read_text()))
    model, tokenizer = load_run(out)
    docs = data.load_documents(cfg.data.path)
    if len(docs) < 2:
        print(f"\n{out.name}: a one-file corpus is split by lines, not files; there are no sets of files to compare")
        return
    if cfg.model.num_moe_layers == 0:
        print(f"\n{out.name}: MaxVio n/a (no MoE layer)")
        return
    held = np.array(data.hold_out([d.name for d in docs], cfg.data.val_fraction, cfg.data.split_seed))  # (F,)
    print(f"\n{out.name}'s final model on each of the corpus's {len(docs)} files (one forward pass over the corpus):")
    loads = file_loads(model, tokenizer, docs, cfg.data.seq_len)  # (F, L_moe, E)
    train_idx = np.flatnonzero(~held)
    k = min(int(held.sum()), len(train_idx))  # as many training files as held-out ones, where there are enough
    rng = np.random.default_rng(0)

    def drawn(pool: np.ndarray, size: int) -> np.ndarray:  # (draws,) MaxVio_global of random sets of files
        return np.array([maxvio(loads[rng.choice(pool, size, replace=False)]) for _ in range(draws)])

    sampled, val = drawn(train_idx, k), maxvio(loads[held])
    print(f"  the {int(held.sum())} held-out files:   MaxVio_global {val:.3f}")
    print(f"  all {len(train_idx)} training files:  MaxVio_global {maxvio(loads[train_idx]):.3f}")
    print(f"  {k} training files drawn at random ({draws} draws): median {np.median(sampled):.3f}, 10-90 % "
          f"{np.quantile(sampled, 0.1):.3f}-{np.quantile(sampled, 0.9):.3f}; the held-out files are above "
          f"{100 * np.mean(sampled < val):.0f} % of them")  # fmt: skip
    print("  random sets of the corpus's files, by share of the files: median (10-90 %) MaxVio_global")
    for share in (0.05, 0.1, 0.2, 0.5):
        s = drawn(np.arange(len(docs)), max(1, round(share * len(docs))))
        print(f"    {100 * share:>3.0f} %: {np.median(s):.3f} ({np.quantile(s, 0.1):.3f}-{np.quantile(s, 0.9):.3f})")
    print(
        f"    all: {maxvio(loads):.3f}  (the max over experts of a sample's loads is biased upwards: the fewer the"
        " files, the more)"
    )


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
    train = resolved_config([config_path, *argv])["train"]
    pretrained = configured
    if train["context_steps"] or train["sft_steps"]:  # the same run stopped where pre-training ends
        pretrained = run(config_path, argv, None, pretrain_only=True)
        runs["γ as configured, pre-training"] = summary(pretrained)
    stages = list(next(iter(runs.values()))["stages"])
    print(f"\n{'MaxVio':<30} {'val loss':>9} {'final':>7}   per MoE layer        {'SFT pairs':>9}  "
          f"{'  '.join(f'{s:>8}' for s in stages)}  {'train, last 100 steps':>21}")  # fmt: skip

    def cell(v: float, width: int) -> str:  # — = the run has no such stage
        return f"{'—' if np.isnan(v) else f'{v:.3f}':>{width}}"

    for label, r in runs.items():
        mv = r["final"]
        layers = ", ".join(f"{v:.3f}" for v in mv)
        ends = "  ".join(cell(r["stages"].get(s, float("nan")), 8) for s in stages)
        print(
            f"{label:<30} {r['val_loss']:>9.3f} {np.mean(mv):>7.3f}   {layers:<20} {cell(r['final_sft'], 9)}  {ends}"
            f"  {r['train_pooled']:>21.3f}"
        )
    print("\nfinal: MaxVio_global over the whole held-out pre-training text at the end of the run; SFT pairs: over the")
    print("held-out SFT pairs at the end; stage columns: at the end of each stage, on its 8 validation batches.")
    held_out_mix(pretrained)
    if pretrained != configured:
        held_out_mix(configured)


if __name__ == "__main__":
    main()
