"""train.py end to end, as a user runs it: exact resume across all four stages, RL included (in a moved folder), the
ledger, Ctrl-C, and bad input: what a run folder accepts, and one-line refusals that leave every file as it was.

The refusals run train.py in this process (runpy), which saves the ~4 s of a fresh Python and JAX per case; a start
that passes every check is stopped before its first step."""

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from minidsv3 import checkpoint, config, data, flops
from minidsv3.model import Transformer
from minidsv3.run import RunFolderError, check_corpus, check_run_folder, load_run, read_metrics
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
    "--train.rl_steps=0",  # tiny.toml's RL stage: RL below
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


def train(*args: str, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus")


# tiny.toml's fourth stage, RL with GRPO, in 3 steps: 4 prompts x 2 samples of 4 new tokens, scored on 2 held-out prompts
RL = [
    "--train.rl_steps=3", "--train.rl_prompts=4", "--train.rl_samples=2", "--train.rl_max_new_tokens=4",
    "--train.rl_eval_prompts=2", "--train.rl_learning_rate=1e-3",
]  # fmt: skip


def train_records(run: Path) -> list[tuple]:
    """(step, stage, main_loss, router_bias) of every pre-training, context-extension and SFT step."""
    lines = read_metrics(run)
    return [(r["step"], r["stage"], r["main_loss"], r["router_bias"]) for r in lines if not r.get("eval")
            and r["stage"] != "rl"]  # fmt: skip


def rl_records(run: Path) -> list[dict]:
    """The RL steps' records of metrics.jsonl (no main_loss: rewards, KL, ...), less their wall-clock seconds."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run) if r["stage"] == "rl"]


@pytest.mark.slow
def test_a_run_stopped_and_resumed_three_times_equals_the_uninterrupted_run_bit_for_bit(
    tmp_path, corpus, jax_cache_env
):
    """All four stages (8 steps, then RL's 3): stopped inside pre-training (step 3), inside context extension (step
    5: across the stage boundary) and after RL's first step (9: the resumed run reloads the reference model and the
    scores of before RL), in a moved folder with a moved corpus; and the ledger, reports and RL's evaluation."""
    common = [*TINY, *RL, f"--data.path={corpus}"]
    # the uninterrupted run a, alongside b's four starts (a train.py keeps about one core busy)
    straight = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, f"--train.out_dir={tmp_path / 'a'}"],
                                cwd=tmp_path, env=jax_cache_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
    first = train(
        *common, f"--train.out_dir={tmp_path / 'b0'}", "--train.stop_after_steps=3", cwd=tmp_path, env=jax_cache_env
    )
    assert first.returncode == 0, first.stderr[-2000:]
    # A run is what it trains, not where it lives: the stopped run and its corpus move, and the run continues
    (tmp_path / "b0").rename(tmp_path / "b")
    moved_corpus = shutil.copytree(corpus, tmp_path / "elsewhere" / "corpus")
    for stop, resumed_at in ((5, 3), (9, 5), (0, 9)):
        part = train(*TINY, *RL, f"--data.path={moved_corpus}", f"--train.out_dir={tmp_path / 'b'}",
                     f"--train.stop_after_steps={stop}", cwd=tmp_path, env=jax_cache_env)  # fmt: skip
        assert part.returncode == 0, part.stderr[-2000:]
        assert f"resumed from checkpoint at step {resumed_at}" in part.stdout
    assert json.loads((tmp_path / "b" / "config.json").read_text())["data"]["path"] == str(moved_corpus)
    straight_out, straight_err = straight.communicate(timeout=600)
    assert straight.returncode == 0, straight_err[-2000:]

    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert [r[0] for r in a] == list(range(1, 9)) and a == b  # every loss and router bias, exactly
    rl_a, rl_b = rl_records(tmp_path / "a"), rl_records(tmp_path / "b")
    assert [r["step"] for r in rl_a] == [9, 10, 11] and rl_a == rl_b  # rewards, losses, KL, biases: all exactly
    assert all(r["gamma"] == 0 and r["mtp_lambda"] == 0 for r in rl_a)  # router biases frozen, no MTP
    assert rl_a[0]["router_bias"] == rl_a[-1]["router_bias"]
    model_a, _, _ = load_run(tmp_path / "a")
    model_b, _, _ = load_run(tmp_path / "b")
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
    assert stages["rl"]["steps"] == 3 and stages["rl"]["tokens"] == sum(r["tokens"] for r in rl_a)
    for f in ("costs.md", "loss.png", "expert_load.png", "router_bias.png", "rl_reward.png", "manifest.json"):
        assert (tmp_path / "b" / f).is_file(), f
    costs = (tmp_path / "b" / "costs.md").read_text()
    assert "Context Extension" in costs and " + RL " in costs  # RL's share of the Post-Training column
    # The final report: held-out pre-training text, the held-out SFT pairs, and the RL task before and after RL
    final = json.loads((tmp_path / "b" / "final.json").read_text())
    assert final == json.loads((tmp_path / "a" / "final.json").read_text())
    assert final["val_loss"] > 0 and final["unigram_entropy"] > 0 and len(final["maxvio_global"]) == 1  # one MoE layer
    assert final["sft"]["val_loss"] > 0 and len(final["sft"]["maxvio_global"]) == 1
    for when in ("before", "after"):
        ev = final["rl"][when]
        for name in ("greedy_pass@1", "pass@1", "pass@8", "parse_rate", "response_length", "stdlib_val_loss"):
            assert np.isfinite(ev[name]), (when, name)
        assert 0 <= ev["pass@1"] <= ev["pass@8"] <= 1 and ev["pass@1_se"] >= 0
    assert "held-out RL task" in straight_out  # the before/after table


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_with_130_in_the_middle_of_the_batch_ramp(tmp_path, corpus, jax_cache_env):
    # The batch ramp (report §4.2) from 1 to 2 micro-batches of 2 x 16 tokens over the first 32 tokens: the first
    # step holds 32 tokens, every later one 64 (a second compilation of the step, not one per step).
    run = tmp_path / "run"
    ramp = ["--train.batch_size=2", "--train.grad_accum_steps=2", "--train.batch_ramp_start=2",
            "--train.batch_ramp_tokens=32"]  # fmt: skip
    args = [*TINY, *ramp, "--train.pretrain_steps=2000", f"--data.path={corpus}", f"--train.out_dir={run}"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=jax_cache_env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
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


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, every file as it was


class Accepted(Exception):
    """Raised where train.py opens metrics.jsonl to train: every input was checked, the run folder opened, the model
    built and any checkpoint restored."""


def train_here(args: list, monkeypatch, capsys) -> tuple[int | None, list[str]]:
    """Run train.py in this process with `args`; (exit code, stderr lines without warnings), or (None, ...) when it
    got past every check."""
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, args)])

    def stop(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr("minidsv3.run.open_metrics", stop)
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        code = "finished"
    except SystemExit as e:
        code = e.code
    except Accepted:
        code = None
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    return code, lines


def snapshot(root: Path) -> dict:
    """Every path under `root` and, for files, its bytes: equal snapshots mean nothing was made, changed or removed."""
    return {p: p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """A run folder as train.py leaves it after a checkpoint at step 2: config.json, manifest.json, checkpoints/2."""
    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = config.load(ROOT / "configs/tiny.toml", [*TINY, f"--data.path={corpus}", f"--train.out_dir={run}"])
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict(cfg), indent=2))
    (run / "manifest.json").write_text(json.dumps(data.manifest(data.load_documents(str(corpus))), indent=2))
    net = Transformer(cfg.model, rngs=nnx.Rngs(0))
    checkpoint.save(run, 2, net, make_optimizer(net, cfg.train), {"step": 2}, keep=2)
    return run


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_path", "no such file or folder"),
        ("empty_folder", "has no files"),
        ("empty_file", "files has text: all empty"),
        ("no_usable_file", "files has text: 2 skipped"),  # a dangling link and a binary file, each with a warning
        ("too_short", "fewer than one sequence"),
        ("not_utf8_file", "not valid UTF-8"),  # a single-file corpus is all or nothing
        ("unwritable_run_folder", "is not a folder"),
        ("different_config", "different config (model.hidden_size: 32 in config.json, 48 now)"),
        ("edited_corpus", "the corpus (--data.path) has changed since this run began"),
        ("bad_override", "model.hidden_size"),
        ("seq_len_beyond_positions", "data.seq_len: must be <= model.max_position_embeddings (12), got 16"),
        ("context_beyond_positions", "train.context_yarn_factor: stretches data.seq_len to 16 x 2.0 = 32 positions"),
        ("promotion_interval", "model.fp8_promotion_interval: must be a multiple of 32"),
        ("config_not_utf8", "bad.toml: not UTF-8 text (byte offset 13)"),
        ("config_not_toml", "bad.toml: not valid TOML"),
        ("corrupt_checkpoint", "unreadable"),
    ],
)
def test_bad_input_gets_a_one_line_error_exit_2_and_leaves_every_file_as_it_was(
    tmp_path, corpus, trained, monkeypatch, capsys, case, message
):
    run, data_path, config_path, extra = tmp_path / "run", tmp_path / "data", ROOT / "configs/tiny.toml", []
    if case == "missing_path":
        data_path = tmp_path / "nowhere"
    elif case == "empty_folder":
        data_path.mkdir()
    elif case == "empty_file":
        data_path.mkdir()
        (data_path / "a.txt").write_text("")
    elif case == "no_usable_file":
        data_path.mkdir()
        (data_path / "gone.py").symlink_to(tmp_path / "deleted.py")
        (data_path / "image.bin").write_bytes(b"abc\xff\xfe")
    elif case == "too_short":
        data_path.mkdir()
        (data_path / "a.py").write_text('def f():\n    """A."""\n    return 1\n')  # one SFT pair each, a few tokens
        (data_path / "b.py").write_text('def g():\n    """B."""\n    return 2\n')
    elif case == "not_utf8_file":
        data_path = tmp_path / "bad.txt"
        data_path.write_bytes(b"abc\xff\xfe")
    elif case == "unwritable_run_folder":
        (tmp_path / "a_file").write_text("keep me")
        run = tmp_path / "a_file" / "run"  # a folder cannot be made inside a file
    elif case in ("different_config", "edited_corpus", "corrupt_checkpoint"):
        run = shutil.copytree(trained, tmp_path / "run")
        data_path = shutil.copytree(corpus, tmp_path / "data")
        if case == "different_config":
            extra = ["--model.hidden_size=48"]
        elif case == "edited_corpus":
            (data_path / "module_0.py").write_text((data_path / "module_0.py").read_text() + "x = 1\n")
        else:
            for f in (run / "checkpoints" / "2").rglob("*"):
                if f.is_file() and f.suffix != ".json" and "metadata" not in f.name:
                    f.write_bytes(b"garbage")
    elif case == "bad_override":
        extra = ["--model.hidden_size=-3"]
    elif case == "seq_len_beyond_positions":
        extra = ["--model.max_position_embeddings=12"]  # TINY's seq_len is 16
    elif case == "context_beyond_positions":
        extra = ["--model.max_position_embeddings=20"]  # 16 fits, 16 x 2 does not
    elif case == "promotion_interval":
        extra = ["--model.fp8=true", "--model.fp8_promotion_interval=48"]
    elif case in ("config_not_utf8", "config_not_toml"):
        config_path = tmp_path / "bad.toml"
        text = b"[model]\n# caf\xe9 in Latin-1\n" if case == "config_not_utf8" else b"[model\nhidden_size = 3\n"
        config_path.write_bytes(text)
    if data_path == tmp_path / "data" and not data_path.exists():
        data_path = corpus
    before = snapshot(tmp_path)
    args = [config_path, *TINY, f"--data.path={data_path}", f"--train.out_dir={run}", *extra]
    code, lines = train_here(args, monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    assert message in lines[0], lines[0]
    after = snapshot(tmp_path)
    assert after == before  # the refused start wrote nothing, the checkpoint case included


def test_a_run_folder_and_its_corpus_moved_elsewhere_still_hold_the_same_run(tmp_path, corpus, trained):
    # the checks train.py makes before it resumes (the slow test above resumes a moved folder end to end)
    moved_run = shutil.copytree(trained, tmp_path / "renamed" / "run")
    moved_corpus = shutil.copytree(corpus, tmp_path / "mnt" / "corpus")
    args = [*TINY, f"--data.path={moved_corpus}", f"--train.out_dir={moved_run}", f"--data.cache_dir={tmp_path}"]
    resolved = config.to_dict(config.load(ROOT / "configs/tiny.toml", args))
    assert check_run_folder(str(moved_run), resolved) == moved_run
    check_corpus(moved_run, data.manifest(data.load_documents(str(moved_corpus))))


def test_a_refusal_is_one_line_on_stderr_and_exit_2_from_a_real_process_too(tmp_path, corpus):
    result = train(*TINY, f"--data.path={corpus}", f"--train.out_dir={tmp_path / 'run'}", "--data.seq_len=5000",
                   cwd=tmp_path, env=dict(os.environ))  # fmt: skip
    assert result.returncode == 2 and result.stdout == "", result.stderr[-2000:]
    assert result.stderr == "error: data.seq_len: must be <= model.max_position_embeddings (4096), got 5000\n"
    assert list(tmp_path.iterdir()) == []


def test_a_folder_left_by_a_failed_start_accepts_the_corrected_command(tmp_path, corpus, monkeypatch, capsys):
    run = tmp_path / "run"
    good = [*TINY, f"--data.path={corpus}", f"--train.out_dir={run}"]
    assert train_here([*good, "--data.seq_len=5000"], monkeypatch, capsys)[0] == 2
    assert not run.exists()  # a refused start writes nothing
    # what a start that failed later (out of memory, say, before its first checkpoint) leaves: another config, another
    # corpus, a few metrics; nothing to continue
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict(config.load(None, ["--model.hidden_size=64"]))))
    (run / "manifest.json").write_text('{"files": 1, "bytes": 5, "sha256": "0"}')
    (run / "metrics.jsonl").write_text('{"step": 1, "main_loss": 9.0}\n')
    assert train_here(good, monkeypatch, capsys) == (None, [])
    assert json.loads((run / "config.json").read_text()) == config.to_dict(
        config.load(ROOT / "configs/tiny.toml", good)
    )
    assert json.loads((run / "manifest.json").read_text()) == data.manifest(data.load_documents(str(corpus)))
    assert len(list((run / "cache").glob("tokens-*.npy"))) == 2  # the caches are written with the run folder


def test_metrics_jsonl_cut_off_by_a_kill_loses_only_its_unfinished_line_and_a_garbled_line_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "main_lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunFolderError, match=r"metrics.jsonl: line 2 is not JSON; delete that line"):
        read_metrics(tmp_path)
