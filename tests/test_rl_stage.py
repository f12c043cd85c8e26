"""train.py's fourth stage, RL with GRPO (minidsv3/rl.py): a run stopped in the middle of RL and resumed equals the
uninterrupted run bit for bit, and the stage leaves its ledger line, reward plot and before/after evaluation."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from test_train import TINY, train, write_corpus

from minidsv3 import config
from minidsv3.ledger import Ledger, StageCost
from minidsv3.run import load_run, read_metrics

# TINY's three stages take 8 steps; RL adds 3: 4 prompts x 2 samples of 4 new tokens, scored on 2 held-out prompts.
RL = [
    "--train.rl_steps=3", "--train.rl_prompts=4", "--train.rl_samples=2", "--train.rl_max_new_tokens=4",
    "--train.rl_eval_prompts=2", "--train.rl_learning_rate=1e-3",
]  # fmt: skip


def rl_records(run) -> list[dict]:
    """The RL steps' records of metrics.jsonl, less their wall-clock seconds."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run) if r["stage"] == "rl"]


@pytest.mark.slow
def test_a_run_stopped_inside_rl_and_resumed_equals_the_uninterrupted_run_bit_for_bit(tmp_path, jax_cache_env):
    corpus = write_corpus(tmp_path / "corpus")
    common = [*TINY, *RL, f"--data.path={corpus}"]
    straight = train(*common, f"--train.out_dir={tmp_path / 'a'}", cwd=tmp_path, env=jax_cache_env)
    assert straight.returncode == 0, straight.stderr[-2000:]
    for stop in (9, 0):  # step 9 is RL's first: the resumed run reloads the reference and the scores before RL
        part = train(*common, f"--train.out_dir={tmp_path / 'b'}", f"--train.stop_after_steps={stop}", cwd=tmp_path,
                     env=jax_cache_env)  # fmt: skip
        assert part.returncode == 0, part.stderr[-2000:]
    assert "resumed from checkpoint at step 9" in part.stdout

    a, b = rl_records(tmp_path / "a"), rl_records(tmp_path / "b")
    assert [r["step"] for r in a] == [9, 10, 11] and a == b  # rewards, losses, KL, biases: all exactly
    assert all(r["gamma"] == 0 and r["mtp_lambda"] == 0 for r in a)  # router biases frozen, no MTP
    assert a[0]["router_bias"] == a[-1]["router_bias"]
    model_a, _, _ = load_run(tmp_path / "a")
    model_b, _, _ = load_run(tmp_path / "b")
    jax.tree.map(
        np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model_a)), nnx.to_pure_dict(nnx.state(model_b))
    )
    final_a = json.loads((tmp_path / "a" / "final.json").read_text())
    assert final_a == json.loads((tmp_path / "b" / "final.json").read_text())
    for when in ("before", "after"):
        ev = final_a["rl"][when]
        for name in ("greedy_pass@1", "pass@1", "pass@8", "parse_rate", "response_length", "stdlib_val_loss"):
            assert np.isfinite(ev[name]), (when, name)
        assert 0 <= ev["pass@1"] <= ev["pass@8"] <= 1 and ev["pass@1_se"] >= 0
    assert "held-out RL task" in straight.stdout  # the before/after table

    stages = json.loads((tmp_path / "b" / "ledger.json").read_text())["stages"]
    assert stages["rl"]["steps"] == 3 and stages["rl"]["tokens"] == sum(r["tokens"] for r in a)
    assert "Post-Training: RL" in (tmp_path / "b" / "costs.md").read_text()
    assert (tmp_path / "b" / "rl_reward.png").is_file()


def test_table_1_shows_sft_and_rl_apart_as_post_training():
    ledger = Ledger("CPU", 1e12, False)
    for stage in ("pretrain", "sft", "rl"):
        ledger.stages[stage] = StageCost(stage, 1.0, tokens=10, flops=1e12, steps=1, seconds=3600)
    header = ledger.format_table1().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Training Costs", "Pre-Training", "Post-Training: SFT", "Post-Training: RL", "Total"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("--train.rl_aggregation=ppo", "train.rl_aggregation"),
        ("--train.rl_samples=1", "train.rl_samples"),
        ("--train.rl_eval_prompts=301", "train.rl_eval_prompts"),
        ("--train.rl_task_pairs=1", "train.rl_task_pairs"),
        ("--train.rl_beta=-0.1", "train.rl_beta"),
    ],
)
def test_bad_rl_settings_are_refused_naming_the_field(override, field):
    with pytest.raises(config.ConfigError, match=field):
        config.load(None, [override])
