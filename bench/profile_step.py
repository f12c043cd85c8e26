"""Where a training step's time goes: XLA's own op timings, attributed to the minidsv3 function that emitted each op.

    python bench/profile_step.py                                  # tiny.toml's [model], 8 x 256, bf16, no MTP
    python bench/profile_step.py --shape 32x64 --model.dtype=float32 --model.num_nextn_predict_layers=1

Runs the step of bench/train_step.py (train.py's) under `jax.profiler.trace` with XLA's optimized HLO dumped to a
temporary folder. Every op the CPU runtime executes is recorded with its HLO instruction; the HLO's metadata names
the Python call stack that produced it, and the op's time is charged to the innermost frame in minidsv3/ (file and
function; optax's frames count as the optimizer). Ops under `transpose(...)` in their op name are the backward
pass. Prints ms per step per function, forward and backward, the sum of op time against the wall time of a step
(the rest is runtime overhead between ops and work outside the compiled step), and saves the trace for
Perfetto (ui.perfetto.dev) with --keep.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

DUMP = Path(tempfile.mkdtemp(prefix="minidsv3-hlo-"))
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*"
)  # before jax is imported: XLA reads its flags once

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import minidsv3_step

from minidsv3 import config

FRAME = re.compile(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}")
LOCATION = re.compile(r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)")
CONTAINER = re.compile(r"^(cond|conditional|while|call)(\.\d+)?$")
NAMED = re.compile(r'^(\d+) "(.*)"$')
INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*metadata=\{op_name="([^"]*)"(?: stack_frame_id=(\d+))?')


def hlo_sources(text: str) -> dict[str, tuple[str, str]]:
    """Optimized HLO text -> {instruction name: (label, op_name)}, label = "file.py:function" of the innermost
    minidsv3 frame of the instruction's Python stack ("optimizer" for optax, "other" when neither appears)."""
    section, tables = None, {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    out = {}
    for line in text.splitlines():
        if line in tables:
            section = line
            continue
        if section and (m := NAMED.match(line)) and section in ("FileNames", "FunctionNames"):
            tables[section][int(m[1])] = m[2]
        elif section == "FileLocations" and (m := LOCATION.match(line)):
            tables[section][int(m[1])] = (int(m[2]), int(m[3]))
        elif section == "StackFrames" and (m := FRAME.match(line)):
            tables[section][int(m[1])] = (int(m[2]), int(m[3]) - 1)  # printed parent ids are one-based, 0 = none
        elif (m := INSTRUCTION.match(line)) and m[3]:
            section = None
            frame, label = int(m[3]), "other"
            while frame in tables["StackFrames"]:  # innermost first
                location, frame = tables["StackFrames"][frame]
                file_id, function_id = tables["FileLocations"][location]
                path = tables["FileNames"][file_id]
                if "/minidsv3/" in path:
                    label = f"{Path(path).name}:{tables['FunctionNames'][function_id]}"
                    break
                if "/optax/" in path:
                    label = "optimizer (optax)"
                    break
            out[m[1]] = (label, m[2])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/tiny.toml")
    p.add_argument("--shape", default="8x256", help="BATCHxSEQ_LEN")
    p.add_argument("--steps", type=int, default=5, help="steps traced (after two untimed ones)")
    p.add_argument("--ops", type=int, default=0, help="also list the N most expensive single ops")
    p.add_argument("--keep", type=Path, help="save the trace folder here (open the .trace.json.gz in Perfetto)")
    a, overrides = p.parse_known_args(argv)
    try:
        cfg = config.load(a.config, ["--model.num_nextn_predict_layers=0", "--model.dtype=bfloat16", *overrides])
    except config.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    batch, seq_len = (int(x) for x in a.shape.lower().split("x"))
    step = minidsv3_step(cfg, batch, seq_len)
    step(), step()  # compile, warm up
    trace_dir = a.keep or Path(tempfile.mkdtemp(prefix="minidsv3-trace-"))
    tic = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(a.steps):
            step()
    wall = (time.perf_counter() - tic) / a.steps

    sources = {}
    for f in DUMP.glob("*train_step*cpu_after_optimizations.txt"):
        sources.update(hlo_sources(f.read_text()))
    with gzip.open(max(trace_dir.rglob("*.trace.json.gz"))) as f:
        trace = json.load(f)
    per = collections.defaultdict(lambda: [0.0, 0.0])  # label -> [forward ms, backward ms] per step
    single = collections.Counter()  # (instruction, label, op name) -> ms per step
    for e in trace["traceEvents"]:
        args = e.get("args", {})
        if e.get("ph") != "X" or "train_step" not in args.get("hlo_module", ""):
            continue
        if CONTAINER.match(args.get("hlo_op", "")):  # a loop or branch: its body's ops are recorded on their own
            continue
        label, op_name = sources.get(args.get("hlo_op", ""), ("other", ""))
        per[label]["transpose(" in op_name] += e["dur"] / 1e3 / a.steps
        single[(args.get("hlo_op", ""), label, op_name)] += e["dur"] / 1e3 / a.steps
    ops = sum(sum(v) for v in per.values())
    print(f"{a.shape}, {cfg.model.dtype}: {1e3 * wall:.1f} ms a step (wall), {ops:.1f} ms of XLA ops\n")
    print(f"{'where (innermost minidsv3 frame)':<40} {'fwd ms':>8} {'bwd ms':>8} {'total':>8} {'share':>6}")
    for label, (fwd, bwd) in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        print(f"{label:<40} {fwd:>8.1f} {bwd:>8.1f} {fwd + bwd:>8.1f} {100 * (fwd + bwd) / ops:>5.1f}%")
    if a.ops:
        print(f"\n{'ms':>6}  op  where  op name")
        for (op, label, op_name), ms in single.most_common(a.ops):
            print(f"{ms:>6.1f}  {op}  {label}  {op_name[-110:]}")
    if a.keep:
        print(f"\ntrace saved under {trace_dir}")


if __name__ == "__main__":
    main()
