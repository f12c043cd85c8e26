"""train.py end to end, as a user runs it: exact resume across stages, the ledger, Ctrl-C, and bad input."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from minidsv3 import checkpoint, config, flops
from minidsv3.generate import load_run
from minidsv3.model import Transformer
from minidsv3.run import read_metrics
from minidsv3.step import make_optimizer

ROOT = Path(__file__).resolve().parents[1]

# A model of a few thousand parameters and stages of a few steps: each run takes seconds, mostly compilation.
TINY = [
    "--model.vocab_size=300", "--model.hidden_size=32", "--model.intermediate_size=48",
    "--model.moe_intermediate_size=16", "--model.num_hidden_layers=2", "--model.num_attention_heads=2",
    "--model.q_lora_rank=16", "--model.kv_lora_rank=16", "--model.qk_nope_head_dim=8", "--model.qk_rope_head_dim=4",
    "--model.v_head_dim=8", "--model.n_routed_experts=4", "--model.n_group=2", "--model.topk_group=1",
    "--model.num_experts_per_tok=2", "--model.dtype=float32", "--data.seq_len=16", "--train.batch_size=4",
    "--train.pretrain_steps=4", "--train.context_steps=2", "--train.sft_steps=2", "--train.eval_every=100",
    "--train.eval_batches=1", "--train.ckpt_every=100", "--train.sample_tokens=0", "--train.warmup_steps=2",
]  # fmt: skip


def write_corpus(folder: Path, files: int = 6) -> Path:
    """A small Python-like corpus with documented functions, so that SFT pairs can be mined from it."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        body = "".join(
            f'def f{i}(v):\n    """Scale {i}."""\n    r = v * {i} + {f}\n    for k in range(r):\n        r += k\n    return r\n\n'
            for i in range(12)
        )
        (folder / f"module_{f}.py").write_text(body)
    return folder


def train(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus")


def train_records(run: Path) -> list[tuple]:
    lines = read_metrics(run)
    return [(r["step"], r["stage"], r["main_loss"], r["router_bias"]) for r in lines if not r.get("eval")]


@pytest.mark.slow
def test_a_run_stopped_and_resumed_twice_equals_the_uninterrupted_run_bit_for_bit(tmp_path, corpus):
    common = [*TINY, f"--data.path={corpus}"]
    straight = train(*common, f"--train.out_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    # stop inside pre-training (step 3 of 4), then inside context extension (step 5: across the stage boundary)
    for stop in (3, 5, 0):
        part = train(*common, f"--train.out_dir={tmp_path / 'b'}", f"--train.stop_after_steps={stop}", cwd=tmp_path)
        assert part.returncode == 0, part.stderr[-2000:]
    assert "resumed from checkpoint at step 5" in part.stdout

    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert [r[0] for r in a] == list(range(1, 9)) and a == b  # every loss and router bias, exactly
    model_a, _ = load_run(tmp_path / "a")
    model_b, _ = load_run(tmp_path / "b")
    jax.tree.map(
        np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model_a)), nnx.to_pure_dict(nnx.state(model_b))
    )

    # The ledger counts what the loaders delivered, and FLOPs = tokens x the analytic FLOPs/token of each stage.
    ledger = json.loads((tmp_path / "b" / "ledger.json").read_text())
    stages = ledger["stages"]
    cfg = config.load(None, common).model
    yarn = config.from_dict({"model": json.loads((tmp_path / "b" / "config.json").read_text())["model"]}).model
    for name, steps, seq_len, batch in (("pretrain", 4, 16, 4), ("context", 2, 32, 2), ("sft", 2, 32, 4)):
        assert stages[name]["steps"] == steps and stages[name]["tokens"] == steps * seq_len * batch
        per_token = flops.flops_per_token(cfg if name == "pretrain" else yarn, seq_len).total
        np.testing.assert_allclose(stages[name]["flops"], stages[name]["tokens"] * per_token, rtol=1e-9)
    for f in ("costs.md", "loss.png", "expert_load.png", "router_bias.png", "manifest.json"):
        assert (tmp_path / "b" / f).is_file(), f
    assert "Context Extension" in (tmp_path / "b" / "costs.md").read_text()
    # The final report: held-out pre-training text and, as post-training ran, the held-out SFT pairs
    final = json.loads((tmp_path / "b" / "final.json").read_text())
    assert final == json.loads((tmp_path / "a" / "final.json").read_text())
    assert final["val_loss"] > 0 and final["unigram_entropy"] > 0 and len(final["maxvio_global"]) == 1  # one MoE layer
    assert final["sft"]["val_loss"] > 0 and len(final["sft"]["maxvio_global"]) == 1


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_with_130_in_the_middle_of_the_batch_ramp(tmp_path, corpus):
    # The batch ramp (report §4.2) from 1 to 2 micro-batches of 2 x 16 tokens over the first 32 tokens: the first
    # step holds 32 tokens, every later one 64 (a second compilation of the step, not one per step).
    run = tmp_path / "run"
    ramp = ["--train.batch_size=2", "--train.grad_accum_steps=2", "--train.batch_ramp_start=2",
            "--train.batch_ramp_tokens=32"]  # fmt: skip
    args = [*TINY, *ramp, "--train.pretrain_steps=2000", f"--data.path={corpus}", f"--train.out_dir={run}"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "checkpoint saved" in out and "batch-size ramp (sequences per step): 2 from step 0, 4 from step 1" in out
    steps_done = len(train_records(run))
    assert (run / "checkpoints" / str(steps_done)).is_dir()
    tokens = [r["tokens"] for r in map(json.loads, metrics.read_text().splitlines()) if not r.get("eval")]
    assert steps_done >= 3 and tokens == [32] + [64] * (steps_done - 1)
    # the checkpoint's ledger counts the tokens of the ramp's steps
    cfg = config.from_dict(json.loads((run / "config.json").read_text()))
    meta = checkpoint.restore(run, Transformer(cfg.model, rngs=nnx.Rngs(0)), None)
    assert meta["step"] == steps_done and meta["ledger"]["stages"]["pretrain"]["tokens"] == sum(tokens)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_path", "no such file or folder"),
        ("empty_folder", "has no files"),
        ("empty_file", "files are empty"),
        ("too_short", "fewer than one sequence"),
        ("not_utf8", "UTF-8"),
        ("unwritable_run_folder", "not writable"),
        ("different_config", "different config"),
        ("bad_override", "model.hidden_size"),
        ("corrupt_checkpoint", "unreadable"),
    ],
)
def test_bad_input_gets_a_one_line_error_a_nonzero_exit_and_overwrites_nothing(tmp_path, corpus, case, message):
    run = tmp_path / "run"
    data = tmp_path / "data"
    extra = []
    if case == "missing_path":
        data = tmp_path / "nowhere"
    elif case == "empty_folder":
        data.mkdir()
    elif case == "empty_file":
        data.mkdir()
        (data / "a.txt").write_text("")
    elif case == "too_short":
        data.mkdir()
        (data / "a.py").write_text('def f():\n    """A."""\n    return 1\n')  # one SFT pair each, a few tokens
        (data / "b.py").write_text('def g():\n    """B."""\n    return 2\n')
    elif case == "not_utf8":
        write_corpus(data, files=2)
        (data / "bad.txt").write_bytes(b"abc\xff\xfe")
    elif case == "unwritable_run_folder":
        (tmp_path / "a_file").write_text("keep me")
        run = tmp_path / "a_file" / "run"  # a folder cannot be made inside a file
        data = corpus
    elif case == "different_config":
        run.mkdir()
        (run / "config.json").write_text('{"model": {"hidden_size": 64}, "data": {}, "train": {}}')
        data = corpus
    elif case == "bad_override":
        extra = ["--model.hidden_size=-3"]
        data = corpus
    elif case == "corrupt_checkpoint":  # the run's config and a checkpoint as train.py saves them, then garbage
        data = corpus
        cfg = config.load(ROOT / "configs/tiny.toml", [*TINY, f"--data.path={corpus}", f"--train.out_dir={run}"])
        run.mkdir()
        (run / "config.json").write_text(json.dumps(config.to_dict(cfg), indent=2))
        model = Transformer(cfg.model, rngs=nnx.Rngs(0))
        checkpoint.save(run, 2, model, make_optimizer(model, cfg.train), {"step": 2}, keep=2)
        for f in (run / "checkpoints" / "2").rglob("*"):
            if f.is_file() and f.suffix != ".json" and "metadata" not in f.name:
                f.write_bytes(b"garbage")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    result = train(*TINY, f"--data.path={data}", f"--train.out_dir={run}", *extra, cwd=tmp_path)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert message in lines[0], lines[0]
    for path, content in before.items():
        if path.exists() and path.name != "metrics.jsonl":
            assert path.read_bytes() == content, f"{path} was changed"
