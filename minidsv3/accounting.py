"""What training DeepSeek-V3 costs: the report's Table 1 projected from a config, and the device peaks behind MFU.

Report §1 and Table 1 (notes §7); [ISCA] Tables 2 and 4 for FLOPs per token and MFU; notes §5 for the parameter check.
Parameter counts and FLOPs per token are in minidsv3/flops.py; what a run of train.py did, and the Table 1 layout, in
minidsv3/ledger.py.

Projection
----------
`project` turns token budgets into device-hours: FLOPs = Σ tokens × FLOPs per token at each phase's sequence length,
divided by the achieved FLOP/s, given as an MFU, as a cluster throughput in tokens/day, or replaced by the reported
hours. `DEEPSEEK_V3_PRESET` holds the report's own inputs and reproduces Table 1. Hours depend on tokens, not on how
they are grouped into steps, so the report's batch-size ramp (3,072 -> 15,360 sequences over the first 469B tokens,
§4.2) changes the step count but not this projection.

Device peaks
------------
`PEAK_FLOPS` holds dense bf16 and fp8 tensor-core rates; [ISCA] reports MFU against the bf16 peak although V3 trains
in FP8, and so do we. Elsewhere, a CPU or an unlisted device, a short bf16 matmul probe measures one and the table
says so (`device_peak`, which train.py gives its ledger).

CLI: python -m minidsv3.accounting {params CONFIG | flops CONFIG [--seq-len N] | project [CONFIG] ...}
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from minidsv3.config import ConfigError, ModelConfig, load, load_model_config
from minidsv3.flops import FlopBreakdown, count_params, flops_per_token
from minidsv3.ledger import STAGES, StageCost, format_table1, mfu

# Dense (no sparsity) tensor-core peaks per device, FLOP/s. H100 SXM5: 989.4 TFLOP/s bf16, 1978.9 fp8 (notes §7,
# glennklockwood.com/garden/processors/h100); the H800 has the H100's tensor cores with slower NVLink ([ISCA] §4.1), and
# the H200 the H100's compute with more memory. [ISCA] Table 4: 385 TFLOP/s at 38.94 % MFU implies a 989 peak.
PEAK_FLOPS = {
    "H800": {"bf16": 989.4e12, "fp8": 1978.9e12},
    "H100": {"bf16": 989.4e12, "fp8": 1978.9e12},
    "H200": {"bf16": 989.4e12, "fp8": 1978.9e12},
}


# ---------------------------------------------------------------------------------------------------------------
# Device peaks


def measure_peak(
    seconds: float = 1.0, *, device: jax.Device | None = None, size: int = 1024, dtype: str = "bfloat16"
) -> float:
    """Best FLOP/s of a (size, size) @ (size, size) matmul with `dtype` inputs and float32 accumulation (the recipe of
    layers.matmul), repeated for about `seconds` on `device` (default: the first CPU). Other processes sharing the
    cores lower it, and so raise the MFU reported against it."""
    device = device or jax.devices("cpu")[0]
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.device_put(jax.random.normal(k, (size, size), dtype), device) for k in keys)  # (size, size)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()  # compile and warm up outside the clock
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def measure_cpu_peak(seconds: float = 1.0) -> float:
    """The CPU's measured matmul peak, FLOP/s (there is no datasheet figure for 'a CPU')."""
    return measure_peak(seconds, device=jax.devices("cpu")[0])


def _known_device(device_kind: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'H100'. PCIe and NVL boards run slower clocks than the SXM peaks of the table."""
    if any(word in device_kind for word in ("PCIe", "NVL")):
        return None
    return next((name for name in PEAK_FLOPS if name in device_kind.upper()), None)


def device_peak(*, precision: str = "bf16") -> tuple[str, float, bool]:
    """(device label, peak FLOP/s per device, measured?) for the default JAX device: from `PEAK_FLOPS` for the GPUs
    listed there, else measured with `measure_peak` (a CPU, an unlisted GPU)."""
    device = jax.devices()[0]
    name = _known_device(device.device_kind)
    if name is not None:
        return f"{name} GPU", PEAK_FLOPS[name][precision], False
    if device.platform == "cpu":
        return "CPU", measure_cpu_peak(), True
    return device.device_kind, measure_peak(1.0, device=device, size=4096), True


# ---------------------------------------------------------------------------------------------------------------
# Projection: what a config costs at a given token budget, device and efficiency


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """A stage to project: phases of (tokens, sequence length), and exactly one of mfu, tokens_per_day (whole
    cluster) or hours (device-hours, as reported). Phases may be empty when a source gives only the hours."""

    stage: str
    phases: tuple[tuple[float, int], ...] = ()
    mfu: float | None = None
    tokens_per_day: float | None = None
    hours: float | None = None


def project(
    cfg: ModelConfig, plans: list[StagePlan], *, device_count: int, peak_flops: float, include_mtp: bool = False
) -> list[StageCost]:
    """Device-hours of each stage. FLOPs = Σ tokens × FLOPs per token at the phase's length; hours = FLOPs ÷ achieved
    FLOP/s, the achieved rate being MFU × peak, or throughput × FLOPs per token. MTP is left out by default, as in
    [ISCA]'s MFU (Table 2's 250 GFLOP is the main model's)."""
    costs = []
    for plan in plans:
        if sum(x is not None for x in (plan.mfu, plan.tokens_per_day, plan.hours)) != 1:
            raise ValueError(f"stage {plan.stage}: give exactly one of mfu, tokens_per_day, hours")
        phase_flops = [
            n_tokens * flops_per_token(cfg, seq_len, include_mtp=include_mtp).total for n_tokens, seq_len in plan.phases
        ]
        tokens = sum(n_tokens for n_tokens, _ in plan.phases) if plan.phases else None
        flops = sum(phase_flops) or None
        if plan.hours is not None:
            hours = plan.hours
        elif plan.mfu is not None:
            hours = flops / (plan.mfu * peak_flops) / 3600  # device-seconds = FLOPs ÷ achieved FLOP/s per device
        else:
            achieved = flops / tokens * plan.tokens_per_day / 86400 / device_count  # FLOP/s per device
            hours = flops / achieved / 3600
        seq_lens = tuple(seq_len for _, seq_len in plan.phases)
        costs.append(StageCost(plan.stage, hours, tokens=tokens, flops=flops, seq_lens=seq_lens))
    return costs


# The report's own inputs (notes §5-7): 14.8T tokens at 4K at [ISCA] Table 4's 272.8B tokens/day on 2048 H800s;
# context extension 2 × 1000 steps of 1920 × 32K and 480 × 128K tokens with the reported 119K hours; post-training
# with the reported 5K hours (its token count is not published).
DEEPSEEK_V3_PRESET = {
    "config": Path(__file__).resolve().parents[1] / "configs" / "deepseek_v3.toml",
    "device": "H800",
    "device_count": 2048,
    "plans": [
        StagePlan("pretrain", ((14.8e12, 4096),), tokens_per_day=272.8e9),
        StagePlan("context", ((1000 * 1920 * 32768, 32768), (1000 * 480 * 131072, 131072)), hours=119e3),
        StagePlan("sft", (), hours=5e3),
    ],
}


# ---------------------------------------------------------------------------------------------------------------
# Command line


class PlanError(ValueError):
    """A `project` request that cannot be projected (a malformed --stage, no config): the message says what to give."""


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    # what the user can get wrong (a config, a --stage plan) fails here with one line; anything else is a bug
    try:
        if args.command == "params":
            _print_params(load_model_config(args.config))
        elif args.command == "flops":
            cfg = load(args.config)
            _print_flops(cfg.model, args.seq_len or cfg.data.seq_len)
        else:
            _print_projection(args)
    except (ConfigError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minidsv3.accounting", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("params", help="parameter counts").add_argument("config")
    flops = commands.add_parser("flops", help="training FLOPs per token")
    flops.add_argument("config")
    flops.add_argument("--seq-len", type=_positive_int, default=None, help="default: the config's data.seq_len")
    proj = commands.add_parser("project", help="Table 1 for a token budget, device and efficiency")
    proj.add_argument("config", nargs="?")
    proj.add_argument("--preset", choices=["deepseek-v3"])
    proj.add_argument("--device", choices=list(PEAK_FLOPS), default="H800")
    proj.add_argument("--devices", type=_positive_int, default=None)
    proj.add_argument("--price", type=_non_negative_float, default=2.0, help="USD per device-hour")
    proj.add_argument("--include-mtp", action="store_true", help="count the MTP modules' FLOPs too")
    proj.add_argument(
        "--stage", nargs=4, action="append", default=[], metavar=("NAME", "TOKENS", "SEQ_LEN", "RATE"),
        help="e.g. pretrain 14.8e12 4096 mfu=0.39; context 62.9e9,62.9e9 32768,131072 hours=119e3; sft - - hours=5e3",
    )  # fmt: skip
    return parser


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = _whole(text)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _number(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _whole(text: str) -> int | None:
    """`text` as an int, or None when it is not one ("4.5", "4k")."""
    try:
        return int(text)
    except ValueError:
        return None


def _number(text: str) -> float | None:
    """`text` as a finite float, or None when it is not one ("abc", "nan", "inf")."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _print_params(cfg: ModelConfig) -> None:
    counts = count_params(cfg)
    rows = [
        ("total (main model)", counts.total),
        ("active per token (embedding and head included)", counts.active),
        ("active per token (input embedding excluded)", counts.active_no_embedding),
        ("MTP modules, unique (shared embedding and head excluded)", counts.mtp),
        ("MTP active per token (shared embedding and head included)", counts.mtp_active),
        ("router bias e_score_correction_bias (state, in no total)", counts.router_bias),
        ("  ... of the MTP modules", counts.mtp_router_bias),
    ]
    for name, count in rows:
        print(f"{name:<60} {f'{count / 1e9:.3f} B' if count >= 1e6 else '':>11}  ({count:,})")


def _print_flops(cfg: ModelConfig, seq_len: int) -> None:
    causal, full = (flops_per_token(cfg, seq_len, causal=is_causal) for is_causal in (True, False))
    print(f"training FLOPs per token (forward + backward) at sequence length {seq_len}, GFLOP")
    print(f"{'term':<36} {'causal':>10} {'non-causal':>12}")
    names = [field.name for field in dataclasses.fields(FlopBreakdown)][:8]  # the matmul terms, attn_proj ... head
    for name in names:
        print(f"{name:<36} {getattr(causal, name) / 1e9:>10.2f} {getattr(full, name) / 1e9:>12.2f}")
    print(f"{'= main model ([ISCA] Table 2)':<36} {causal.main / 1e9:>10.2f} {full.main / 1e9:>12.2f}")
    print(f"{'MTP modules':<36} {causal.mtp / 1e9:>10.2f} {full.mtp / 1e9:>12.2f}")
    print(f"{'= total with MTP':<36} {causal.total / 1e9:>10.2f} {full.total / 1e9:>12.2f}")
    active = count_params(cfg).active_no_embedding
    print(f"{'(6 × active matmul params)':<36} {6 * active / 1e9:>10.2f}")


def _print_projection(args: argparse.Namespace) -> None:
    """`project`: Table 1 from --stage plans (or the preset's) on --devices × --device, then each stage's rates."""
    preset = DEEPSEEK_V3_PRESET if args.preset else {}
    path = args.config or preset.get("config")
    if path is None:
        raise PlanError("project: give a CONFIG (e.g. configs/deepseek_v3.toml) or --preset deepseek-v3")
    cfg = load_model_config(path)
    plans = [_parse_stage(values) for values in args.stage] or preset.get("plans", [])
    device = preset.get("device", args.device) if not args.stage else args.device
    count = args.devices or preset.get("device_count", 1)
    peak = PEAK_FLOPS[device]["bf16"]
    costs = project(cfg, plans, device_count=count, peak_flops=peak, include_mtp=args.include_mtp)
    print(f"{path}: {count} × {device}\n")
    print(format_table1(costs, device=f"{device} GPU", peak_flops=peak, price_per_hour=args.price))
    for cost in costs:
        if cost.flops:
            achieved = cost.flops / (cost.device_hours * 3600)  # FLOP/s per device
            print(
                f"{STAGES[cost.stage]}: {cost.flops / cost.tokens / 1e9:.1f} GFLOP/token, {achieved / 1e12:.1f} TFLOP/s"
                f" per device, implied MFU {100 * mfu(cost.flops, cost.device_hours, peak):.2f} %"
            )
    if args.preset:
        print("[ISCA] Table 4 reports 38.94 % causal MFU for pre-training; [R] Table 1: 2664K / 119K / 5K hours.")


def _parse_stage(values: list[str]) -> StagePlan:
    """NAME TOKENS SEQ_LEN RATE; TOKENS and SEQ_LEN comma lists of phases or '-'; RATE mfu=|tokens_per_day=|hours=.
    Anything else is a PlanError naming the --stage and the part at fault."""
    name, tokens, seq_lens, rate = values
    where = f"--stage {' '.join(values)}"
    if name not in STAGES:
        raise PlanError(f"{where}: NAME must be one of {', '.join(STAGES)}, got {name!r}")
    key, _, text = rate.partition("=")
    value = _number(text)
    if key not in ("mfu", "tokens_per_day", "hours") or value is None:
        raise PlanError(f"{where}: RATE must be mfu=, tokens_per_day= or hours= and a number, got {rate!r}")
    if not (0 < value <= 1 if key == "mfu" else value > 0):
        raise PlanError(f"{where}: {key} must be {'in (0, 1]' if key == 'mfu' else '> 0'}, got {text}")
    if tokens == "-" or seq_lens == "-":
        if (tokens, seq_lens, key) != ("-", "-", "hours"):
            raise PlanError(f"{where}: '-' for both TOKENS and SEQ_LEN (no phases) goes with hours= only")
        return StagePlan(name, (), hours=value)
    counts, lengths = [_number(t) for t in tokens.split(",")], [_whole(n) for n in seq_lens.split(",")]
    if len(counts) != len(lengths) or any(c is None or c <= 0 or n is None or n < 1 for c, n in zip(counts, lengths)):
        raise PlanError(f"{where}: TOKENS must be numbers > 0, SEQ_LEN whole numbers >= 1, one per token count")
    return StagePlan(name, tuple(zip(counts, lengths)), **{key: value})


if __name__ == "__main__":
    main()
