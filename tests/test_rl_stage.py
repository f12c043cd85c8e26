"""train.py's fourth stage, RL with GRPO (minidsv3/rl.py): its column of Table 1 and its settings. The stage end to end
(a run stopped in the middle of RL and resumed equals the uninterrupted run bit for bit; its ledger line, reward plot
and before/after evaluation) is tests/test_train.py's resume test, which runs all four stages in the same processes.
"""

import pytest

from minidsv3 import config
from minidsv3.ledger import Ledger


def test_table_1_books_sft_and_rl_together_as_post_training_and_names_each_part():
    ledger = Ledger("CPU", 1e12, False)
    ledger.record("pretrain", steps=4, tokens=400, seconds=3600, seq_len=64, flops=4e12)
    ledger.record("sft", steps=80, tokens=1000, seconds=720, seq_len=128, flops=2e12)
    ledger.record("rl", steps=30, tokens=500, seconds=360, seq_len=96, flops=1e12)
    lines = ledger.format_table1().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[:6]]
    assert cells[0] == ["Training Costs", "Pre-Training", "Post-Training", "Total"]
    assert cells[2] == ["in CPU Hours", "1", "0.3", "1.3"]  # 0.2 + 0.1 hours
    assert cells[4] == ["FLOPs", "4e+12", "3e+12", "7e+12"] and cells[5] == ["Tokens", "400", "1.5K", "1.9K"]
    assert lines[-1] == "Post-Training = SFT 0.2 hours, 80 steps, 1K tokens + RL 0.1 hours, 30 steps, 500 tokens."
    assert set(ledger.to_dict()["stages"]) == {"pretrain", "sft", "rl"}  # ledger.json keeps the parts apart


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
