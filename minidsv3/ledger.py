"""What a training run did, stage by stage, laid out as the report's Table 1 (report §1 and Table 1, notes §7).

`Ledger` collects, for each stage (pre-training, context extension, post-training), the steps, the tokens the data
loader delivered, the wall-clock seconds, and the FLOPs done = tokens × FLOPs per token at that stage's sequence
length (minidsv3/flops.py). Tokens are counted per step as delivered, so a batch size that changes during a stage (the
report's ramp, §4.2) needs nothing special here. With the device count and the device's peak it gives device-hours,
cost at a rental price, achieved FLOP/s and MFU = achieved / peak. train.py takes the peak from
`accounting.device_peak`; [ISCA] reports MFU against the bf16 peak although V3 trains in FP8, and so do we.

`format_table1` lays out any list of `StageCost`s: this run's (`Ledger.write_costs_md`, costs.md in the run folder)
or DeepSeek-V3's projected ones (minidsv3/accounting.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# Table 1's columns. The report books SFT and RL together as post-training: the ledger keeps them apart, Table 1 adds
# them up (Ledger.format_table1).
STAGES = {"pretrain": "Pre-Training", "context": "Context Extension", "sft": "Post-Training", "rl": "RL"}
POST_TRAINING = ("sft", "rl")


@dataclasses.dataclass
class StageCost:
    """One column of Table 1. `flops`, `tokens`, `steps` and `seconds` are None where a source does not give them."""

    stage: str  # "pretrain" | "context" | "sft" | "rl"
    device_hours: float
    tokens: float | None = None
    flops: float | None = None
    steps: int | None = None
    seconds: float | None = None  # wall clock
    seq_lens: tuple[int, ...] = ()


def mfu(flops: float, device_hours: float, peak_flops: float) -> float:
    """Model FLOPs utilization: FLOPs done ÷ (device-seconds × peak FLOP/s per device)."""
    return flops / (device_hours * 3600 * peak_flops)


# ---------------------------------------------------------------------------------------------------------------
# Table 1


def format_table1(
    stages: list[StageCost], *, device: str, peak_flops: float, price_per_hour: float, peak_measured: bool = False
) -> str:
    """Markdown laid out as the report's Table 1: hours and USD per stage and in total, then FLOPs, tokens and MFU."""
    hours = [cost.device_hours for cost in stages]
    total_hours = sum(hours)
    known = [cost for cost in stages if cost.flops is not None]
    total_flops = sum(cost.flops for cost in known)
    known_hours = sum(cost.device_hours for cost in known)

    def cell(value, fmt) -> str:
        return "—" if value is None else fmt(value)

    total_usd = total_hours * price_per_hour
    rows = [
        [f"in {device} Hours"] + [_fmt_hours(stage_hours, total_hours) for stage_hours in hours + [total_hours]],
        ["in USD"] + [_fmt_usd(stage_hours * price_per_hour, total_usd) for stage_hours in hours + [total_hours]],
        ["FLOPs"]
        + [cell(cost.flops, "{:.3g}".format) for cost in stages]
        + [cell(total_flops if known else None, "{:.3g}".format)],
        ["Tokens"]
        + [cell(cost.tokens, _fmt_count) for cost in stages]
        + [cell(_sum_known(stages, "tokens"), _fmt_count)],
        ["MFU"]
        + [cell(_stage_mfu(cost, peak_flops), _fmt_percent) for cost in stages]
        + [cell(mfu(total_flops, known_hours, peak_flops) if known_hours else None, _fmt_percent)],
    ]
    header = ["Training Costs"] + [STAGES[cost.stage] for cost in stages] + ["Total"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    peak = f"{'measured' if peak_measured else 'datasheet'} peak {peak_flops / 1e12:.4g} TFLOP/s per device"
    lines.append(f"\nUSD at ${price_per_hour:g} per {device} hour; MFU against the {peak}; — = not known.")
    return "\n".join(lines)


def _fmt_hours(hours: float, unit: float) -> str:
    """Thousands of hours ("2664K") when the table's total is that large, as the report writes them."""
    return f"{hours / 1e3:.0f}K" if unit >= 1e4 else f"{hours:.3g}"


def _fmt_usd(usd: float, unit: float) -> str:
    return f"${usd / 1e6:.3f}M" if unit >= 1e5 else (f"${usd:,.2f}" if unit >= 1 else f"${usd:.2g}")


def _fmt_percent(share: float) -> str:
    return f"{100 * share:.2f} %"


def _fmt_count(count: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.3g}"


def _stage_mfu(cost: StageCost, peak_flops: float) -> float | None:
    return mfu(cost.flops, cost.device_hours, peak_flops) if cost.flops is not None and cost.device_hours > 0 else None


def _sum_known(stages: list[StageCost], field: str) -> float | None:
    values = [getattr(cost, field) for cost in stages if getattr(cost, field) is not None]
    return sum(values) if values else None


def _sum_of(stage: str, parts: list[StageCost]) -> StageCost:
    """One column for several stages' costs (each part known, as the ledger's are)."""
    total = {f: sum(getattr(c, f) for c in parts) for f in ("device_hours", "tokens", "flops", "steps", "seconds")}
    return StageCost(stage, **total, seq_lens=tuple(sorted({n for c in parts for n in c.seq_lens})))


# ---------------------------------------------------------------------------------------------------------------
# The ledger train.py fills


@dataclasses.dataclass
class Ledger:
    """Per-stage steps, tokens, seconds and FLOPs of a run on `device_count` devices of one kind; saved as JSON."""

    device: str  # "H800 GPU", "CPU", ...: Table 1's "in <device> Hours"
    peak_flops: float  # per device
    peak_measured: bool
    device_count: int = 1
    price_per_hour: float = 2.0
    stages: dict[str, StageCost] = dataclasses.field(default_factory=dict)

    def record(self, stage: str, *, steps: int, tokens: int, seconds: float, seq_len: int, flops: float) -> StageCost:
        """Add work done in `stage`; called per step (or again after a resume, or for a second phase) it accumulates.

        `tokens`: what the data loader delivered; `flops`: tokens × flops_per_token(cfg, seq_len).total.
        """
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r}: must be one of {', '.join(STAGES)}")
        cost = self.stages.setdefault(stage, StageCost(stage, 0.0, tokens=0, flops=0.0, steps=0, seconds=0.0))
        cost.steps, cost.tokens = cost.steps + steps, cost.tokens + tokens
        cost.seconds, cost.flops = cost.seconds + seconds, cost.flops + flops
        cost.device_hours = cost.seconds * self.device_count / 3600
        cost.seq_lens = tuple(sorted({*cost.seq_lens, seq_len}))
        return cost

    def ordered(self) -> list[StageCost]:
        return [self.stages[name] for name in STAGES if name in self.stages]

    def format_table1(self) -> str:
        """Table 1 of this run (markdown), as `format_table1`. Its Post-Training column is SFT + RL, as the report books
        them; a line under the table gives each part."""
        stages = self.ordered()
        parts = [cost for cost in stages if cost.stage in POST_TRAINING]
        table = format_table1(
            [cost for cost in stages if cost not in parts] + ([_sum_of("sft", parts)] if parts else []),
            device=self.device,
            peak_flops=self.peak_flops,
            price_per_hour=self.price_per_hour,
            peak_measured=self.peak_measured,
        )
        if len(parts) < 2:
            return table
        shares = [f"{c.stage.upper()} {_fmt_hours(c.device_hours, 0)} hours, {c.steps} steps, {_fmt_count(c.tokens)} tokens"
                  for c in parts]  # fmt: skip
        return f"{table}\nPost-Training = {' + '.join(shares)}."

    def write_costs_md(self, path: str | Path) -> str:
        """costs.md in the run folder: Table 1 of this run under a title. Returns the table, for the console."""
        table = self.format_table1()
        Path(path).write_text(f"# Training costs\n\n{table}\n")
        return table

    def to_dict(self) -> dict:
        """The inputs (stages) and, for a reader of the file, what follows from them (cost, FLOP/s, MFU)."""
        stages = {}
        for cost in self.ordered():
            device_seconds = cost.seconds * self.device_count
            stages[cost.stage] = dataclasses.asdict(cost) | {
                "cost_usd": cost.device_hours * self.price_per_hour,
                "achieved_flops_per_device": cost.flops / device_seconds if cost.seconds else None,
                "mfu": _stage_mfu(cost, self.peak_flops),
            }
        keys = ("device", "device_count", "peak_flops", "peak_measured", "price_per_hour")
        return {k: getattr(self, k) for k in keys} | {"stages": stages}

    @classmethod
    def from_dict(cls, data: dict) -> Ledger:
        """The inverse of `to_dict` (the derived figures are dropped); train.py resumes from checkpoint meta with it."""
        fields = {f.name for f in dataclasses.fields(StageCost)}
        stages = {
            name: StageCost(**{k: v for k, v in saved.items() if k in fields} | {"seq_lens": tuple(saved["seq_lens"])})
            for name, saved in data["stages"].items()
        }
        keys = ("device", "peak_flops", "peak_measured", "device_count", "price_per_hour")
        return cls(**{k: data[k] for k in keys}, stages=stages)

    def save(self, path: str | Path) -> None:
        """ledger.json in the run folder."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Ledger:
        return cls.from_dict(json.loads(Path(path).read_text()))
