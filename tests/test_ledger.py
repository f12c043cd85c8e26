"""The run's ledger and its Table 1 (minidsv3/ledger.py; report Table 1): what train.py records per step, saves in
ledger.json and checkpoint meta, and writes to costs.md."""

import json

import numpy as np
import pytest

from minidsv3.ledger import Ledger, StageCost, format_table1


def test_ledger_derives_hours_cost_and_mfu_from_what_was_recorded():
    ledger = Ledger("CPU", peak_flops=1e4, peak_measured=True, device_count=4, price_per_hour=2.5)
    ledger.record("pretrain", steps=10, tokens=1000, seconds=7200.0, seq_len=8, flops=2.4e8)
    assert ledger.stages["pretrain"].device_hours == 8.0  # 7200 s × 4 devices
    saved = ledger.to_dict()["stages"]["pretrain"]
    assert saved["cost_usd"] == 20.0  # 8 h × $2.5
    np.testing.assert_allclose(saved["mfu"], 2.4e8 / (8 * 3600 * 1e4))  # 0.8333
    np.testing.assert_allclose(saved["achieved_flops_per_device"], 2.4e8 / (7200 * 4))  # 8333 FLOP/s


def test_ledger_accumulates_steps_and_phases_and_survives_a_json_round_trip(tmp_path):
    ledger = Ledger("CPU", peak_flops=1e9, peak_measured=True)
    ledger.record("context", steps=1, tokens=16, seconds=1.0, seq_len=8, flops=100.0)
    ledger.record("context", steps=2, tokens=32, seconds=3.0, seq_len=16, flops=300.0)
    cost = ledger.stages["context"]
    assert (cost.steps, cost.tokens, cost.seconds, cost.flops, cost.seq_lens) == (3, 48, 4.0, 400.0, (8, 16))
    ledger.save(tmp_path / "ledger.json")
    assert json.loads((tmp_path / "ledger.json").read_text())["stages"]["context"]["steps"] == 3
    assert Ledger.load(tmp_path / "ledger.json") == ledger
    with pytest.raises(ValueError, match="stage"):
        ledger.record("dpo", steps=1, tokens=1, seconds=1.0, seq_len=8, flops=1.0)  # not a stage of train.py


def test_table_1_has_the_reports_rows_and_columns(tmp_path):
    ledger = Ledger("CPU", peak_flops=1e9, peak_measured=True)
    ledger.record("sft", steps=1, tokens=100, seconds=36.0, seq_len=8, flops=1.0)
    ledger.record("pretrain", steps=1, tokens=100, seconds=360.0, seq_len=8, flops=1.0)
    ledger.write_costs_md(tmp_path / "costs.md")
    lines = (tmp_path / "costs.md").read_text().splitlines()
    table = [line.split(" | ") for line in lines if line.startswith("| ")]
    assert [cell.strip("| ") for cell in table[0]] == ["Training Costs", "Pre-Training", "Post-Training", "Total"]
    assert [row[0].strip("| ") for row in table[1:]] == ["in CPU Hours", "in USD", "FLOPs", "Tokens", "MFU"]
    assert [cell.strip("| ") for cell in table[1]][1:] == ["0.1", "0.01", "0.11"]  # 360 s, 36 s, their sum
    assert [cell.strip("| ") for cell in table[2]][1:] == ["$0.2", "$0.02", "$0.22"]  # at $2 per hour
    assert "measured peak" in lines[-1]


def test_costs_md_is_the_printed_table_under_a_title(tmp_path):
    # train.py prints what write_costs_md returns: the console and the file must show the same table
    ledger = Ledger("CPU", peak_flops=1e9, peak_measured=True)
    ledger.record("pretrain", steps=2, tokens=64, seconds=3.0, seq_len=8, flops=1e6)
    printed = ledger.write_costs_md(tmp_path / "costs.md")
    assert (tmp_path / "costs.md").read_text() == f"# Training costs\n\n{printed}\n"
    assert printed.startswith("| Training Costs | Pre-Training | Total |")


def test_a_ledger_restored_from_checkpoint_meta_keeps_accumulating_as_if_never_stopped():
    # train.py saves to_dict() in the checkpoint's JSON meta and resumes with from_dict; the derived figures in the
    # dict (cost_usd, mfu, ...) must not leak back in as inputs
    whole = Ledger("CPU", peak_flops=1e9, peak_measured=True, device_count=2)
    resumed = Ledger("CPU", peak_flops=1e9, peak_measured=True, device_count=2)
    for step in range(4):
        whole.record("pretrain", steps=1, tokens=32, seconds=0.5, seq_len=16, flops=1e6)
        resumed.record("pretrain", steps=1, tokens=32, seconds=0.5, seq_len=16, flops=1e6)
        if step == 1:
            resumed = Ledger.from_dict(json.loads(json.dumps(resumed.to_dict())))
    assert resumed == whole
    assert whole.stages["pretrain"].device_hours == 4 * 0.5 * 2 / 3600


def test_table_1_marks_what_a_source_does_not_give():
    costs = [StageCost("pretrain", 10.0, tokens=1e3, flops=3.6e16), StageCost("sft", 10.0)]
    text = format_table1(costs, device="H800 GPU", peak_flops=1e12, price_per_hour=2.0)
    mfu_row = next(line for line in text.splitlines() if line.startswith("| MFU"))
    assert mfu_row == "| MFU | 100.00 % | — | 100.00 % |"  # 3.6e16 FLOP in 10 h at 1e12 FLOP/s; total over known
