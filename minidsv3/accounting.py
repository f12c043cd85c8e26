"""What a model costs: parameters, training FLOPs per token, the device-hour ledger and the report's Table 1.

Report §1 and Table 1 (spec §7); [ISCA] Tables 2 and 4 for FLOPs per token and MFU; spec §5 for the parameter check.

Parameters
----------
Only `nnx.Param` leaves count; the router bias `e_score_correction_bias` (report §2.1.2) is non-trainable state and
is reported on its own line. Per layer (D hidden_size, H heads, E routed experts, K experts per token):

    attention   q_a_proj D·q_lora_rank + q_a_layernorm + q_b_proj q_lora_rank·H·(qk_nope+qk_rope)   (Eqs. 6-8)
                (or one q_proj D·H·(qk_nope+qk_rope) when q_lora_rank = 0)
                kv_a_proj_with_mqa D·(kv_lora_rank+qk_rope) + kv_a_layernorm + kv_b_proj kv_lora_rank·H·(qk_nope+v)
                o_proj H·v·D                                                                        (Eqs. 1-5, 11)
    mlp         dense SwiGLU 3·D·intermediate_size for the first `first_k_dense_replace` layers, else
                router E·D + routed 3·E·D·moe_intermediate_size + shared 3·D·n_shared·moe_intermediate_size (Eq. 12)
    norms       input_layernorm D, post_attention_layernorm D
plus embed_tokens V·D, the final norm D and lm_head D·V (unless tied). Each MTP module (report §2.2): enorm D, hnorm D,
eh_proj 2D·D, one MoE block, and its own final norm D; the embedding and the head are shared with the main model.
"Active per token" replaces E routed experts by K. V3 gives 671.03B total and 37.55B active (spec §5).

FLOPs per token
---------------
A matmul of an (N, a) input with an (a, b) weight costs 2·a·b FLOPs per row (one multiply and one add). The backward
pass runs two such matmuls per forward one (the gradient of the input and of the weight), so training costs 3 times
the forward. Attention's two matmuls follow the same rule with the keys in place of the weight. Per token, forward,
with the DeepSeek-V3 numbers at T = 4096 (causal: query t sees t keys, (T+1)/2 = 2048.5 on average):

    term              forward FLOPs per token                          V3 at 4K (×61 or ×58 layers, ×3 training)
    attn projections  2·(attention matmul params)                      2·187.1M·61·3   =  68.5 G
    attn scores       2·H·(qk_nope+qk_rope)·keys        (Eq. 10, q·k)  2·128·192·2048.5·61·3 = 18.4 G
    attn values       2·H·v_head_dim·keys               (Eq. 10, p·v)  2·128·128·2048.5·61·3 = 12.3 G
    dense MLPs        2·3·D·intermediate_size                          2·396.4M·3·3    =   7.1 G
    router            2·D·E                             (Eq. 15)       2·1.84M·58·3    =   0.6 G
    routed experts    2·3·D·moe_intermediate_size·K     (Eq. 12)       2·352.3M·58·3   = 122.6 G
    shared experts    2·3·D·moe_intermediate_size·N_s   (Eq. 12)       2·44.0M·58·3    =  15.3 G
    output head       2·D·V                                            2·0.927G·3      =   5.6 G
    main model                                                                           250.5 G  ([ISCA] Tab. 2: 250)
    MTP, per module   eh_proj 2·2D·D + one MoE block + the shared head                       10.2 G

keys = T for non-causal attention (the whole score matrix, [ISCA] Table 4's "non-causal MFU"). Left out, as in every
MFU convention: norms, RoPE, softmax, SiLU, the top-k, the loss and the embedding lookup (all O(D) per token, not
matmuls), and activation recomputation (hardware FLOPs, not model FLOPs).

Ledger and Table 1
------------------
`Ledger` collects, for each stage (pre-training, context extension, post-training), the steps, the tokens the data
loader delivered, the wall-clock seconds, and the FLOPs done = tokens × FLOPs per token at that stage's sequence
length. With the device count and the device's peak it gives device-hours, cost at a rental price, achieved FLOP/s and
MFU = achieved / peak. Peaks come from `PEAK_FLOPS` (dense bf16 and fp8 tensor-core rates; [ISCA] reports MFU against
the bf16 peak although V3 trains in FP8, and so do we); elsewhere, a CPU or an unlisted device, a short bf16 matmul
probe measures one and the table says so.

CLI: python -m minidsv3.accounting {params CONFIG | flops CONFIG [--seq-len N] | project [CONFIG] ...}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp

from minidsv3.config import ModelConfig, load_model_config

STAGES = {"pretrain": "Pre-Training", "context": "Context Extension", "sft": "Post-Training"}  # Table 1's columns

# Dense (no sparsity) tensor-core peaks per device, FLOP/s. H100 SXM5: 989.4 TFLOP/s bf16, 1978.9 fp8 (spec §7,
# glennklockwood.com/garden/processors/h100); the H800 has the H100's tensor cores with slower NVLink ([ISCA] §4.1), and
# the H200 the H100's compute with more memory. [ISCA] Table 4: 385 TFLOP/s at 38.94 % MFU implies a 989 peak.
PEAK_FLOPS = {
    "H800": {"bf16": 989.4e12, "fp8": 1978.9e12},
    "H100": {"bf16": 989.4e12, "fp8": 1978.9e12},
    "H200": {"bf16": 989.4e12, "fp8": 1978.9e12},
}


# ---------------------------------------------------------------------------------------------------------------
# Parameters


def _attention_params(cfg: ModelConfig) -> int:
    """Matmul weights of one MLA layer (Eqs. 1-11); the two latent norms are counted by `_attention_norm_params`."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank > 0:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim  # q_a_proj W^DQ, q_b_proj [W^UQ; W^QR]
    else:
        q = D * H * cfg.qk_head_dim  # q_proj: no query compression (DeepSeek-V2-Lite)
    kv_a = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # kv_a_proj_with_mqa [W^DKV; W^KR]
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kv_b_proj [W^UK; W^UV]
    o = H * cfg.v_head_dim * D  # o_proj W^O
    return q + kv_a + kv_b + o


def _attention_norm_params(cfg: ModelConfig) -> int:
    return cfg.q_lora_rank + cfg.kv_lora_rank  # q_a_layernorm (absent when q_lora_rank = 0), kv_a_layernorm


def _expert_params(cfg: ModelConfig) -> int:
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size  # gate_proj, up_proj, down_proj of one expert


def _block_params(cfg: ModelConfig, layer: int, *, active: bool) -> int:
    """One Block: two norms, attention, and a dense MLP or an MoE (all E routed experts, or the K used per token)."""
    D = cfg.hidden_size
    n = 2 * D + _attention_params(cfg) + _attention_norm_params(cfg)  # input_ and post_attention_layernorm
    if not cfg.is_moe_layer(layer):
        return n + 3 * D * cfg.intermediate_size
    routed = cfg.num_experts_per_tok if active else cfg.n_routed_experts
    return n + cfg.n_routed_experts * D + (routed + cfg.n_shared_experts) * _expert_params(cfg)  # router + experts


class ParamCount(NamedTuple):
    """Parameter counts (numbers of scalars); `router_bias` entries are state, not parameters, and not in any total."""

    total: int  # main model: embedding, layers, final norm, head
    active: int  # main model per token: K of E routed experts, embedding and head included (37.55B for V3)
    active_no_embedding: int  # the same without the input embedding, whose lookup is not a matmul (36.62B for V3)
    mtp: int  # unique to the MTP modules, the shared embedding and head excluded (11.61B for V3, spec §3)
    mtp_active: int  # per token in the MTP modules, the shared embedding and head included (2.54B, spec §3)
    router_bias: int  # e_score_correction_bias of the main model's MoE layers
    mtp_router_bias: int  # ... and of the MTP modules' MoE layers


def count_params(cfg: ModelConfig) -> ParamCount:
    """Count every nnx.Param of the model, the MTP modules separately (spec §5 check: 671.03B / 37.55B / 11.61B)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    embed, head = V * D, (0 if cfg.tie_word_embeddings else D * V)
    layers = range(cfg.num_hidden_layers)
    total = embed + head + D + sum(_block_params(cfg, i, active=False) for i in layers)  # + final norm
    active = embed + head + D + sum(_block_params(cfg, i, active=True) for i in layers)
    mtp_layers = range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    mtp_own = 2 * D + 2 * D * D + D  # enorm, hnorm, eh_proj M_k (Eq. 21), the module's norm before the shared head
    mtp = sum(mtp_own + _block_params(cfg, i, active=False) for i in mtp_layers)
    mtp_active = sum(mtp_own + _block_params(cfg, i, active=True) for i in mtp_layers)
    if cfg.num_nextn_predict_layers:
        mtp_active += embed + (head or embed)  # the shared Emb and OutHead run once more per token (Eqs. 21, 23)
    moe = cfg.n_routed_experts
    return ParamCount(
        total=total,
        active=active,
        active_no_embedding=active - embed,
        mtp=mtp,
        mtp_active=mtp_active,
        router_bias=moe * cfg.num_moe_layers,
        mtp_router_bias=moe * sum(cfg.is_moe_layer(i) for i in mtp_layers),
    )


# ---------------------------------------------------------------------------------------------------------------
# FLOPs per token


@dataclasses.dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs per token of the input sequence, by term (training = forward + backward unless asked otherwise)."""

    attn_proj: float  # the five MLA projections of every main layer
    attn_scores: float  # q·k over the visible keys (Eq. 10)
    attn_values: float  # softmax · v (Eq. 10)
    dense_mlp: float
    router: float  # u_t · e_i for all E experts (Eq. 15)
    routed_experts: float  # the K active ones
    shared_experts: float
    head: float  # lm_head
    mtp: float  # all MTP modules with their use of the shared head; 0 when include_mtp=False
    seq_len: int
    causal: bool
    training: bool

    @property
    def main(self) -> float:
        """The main model alone: [ISCA] Table 2's figure (250 GFLOP for V3 at 4K)."""
        return (
            self.attn_proj + self.attn_scores + self.attn_values + self.dense_mlp + self.router
            + self.routed_experts + self.shared_experts + self.head
        )  # fmt: skip

    @property
    def total(self) -> float:
        return self.main + self.mtp


def _block_forward_flops(cfg: ModelConfig, layer: int, keys: float) -> dict[str, float]:
    """Forward FLOPs of one Block at one query position that attends to `keys` keys on average."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    f = dict.fromkeys(("attn_proj", "attn_scores", "attn_values", "dense_mlp", "router", "routed", "shared"), 0.0)
    f["attn_proj"] = 2 * _attention_params(cfg)
    f["attn_scores"] = 2 * H * cfg.qk_head_dim * keys  # (d_h + d_h^R)-wide dot product per head and key
    f["attn_values"] = 2 * H * cfg.v_head_dim * keys
    if cfg.is_moe_layer(layer):
        f["router"] = 2 * D * cfg.n_routed_experts
        f["routed"] = 2 * cfg.num_experts_per_tok * _expert_params(cfg)
        f["shared"] = 2 * cfg.n_shared_experts * _expert_params(cfg)
    else:
        f["dense_mlp"] = 2 * 3 * D * cfg.intermediate_size
    return f


def _mean_keys(positions: int, causal: bool) -> float:
    """Keys seen per query: all of them, or under the causal mask 1, 2, ..., T, i.e. (T+1)/2 on average."""
    return (positions + 1) / 2 if causal else float(positions)


def flops_per_token(
    cfg: ModelConfig, seq_len: int, *, causal: bool = True, include_mtp: bool = True, training: bool = True
) -> FlopBreakdown:
    """Matmul FLOPs per token for sequences of `seq_len` (the derivation table is in the module docstring)."""
    passes = 3 if training else 1  # backward = two matmuls (input and weight gradients) per forward matmul
    keys = _mean_keys(seq_len, causal)
    layers = [_block_forward_flops(cfg, i, keys) for i in range(cfg.num_hidden_layers)]

    def total(name: str) -> float:
        return passes * sum(f[name] for f in layers)

    head = 2 * cfg.hidden_size * cfg.vocab_size
    mtp = 0.0
    for k in range(1, cfg.num_nextn_predict_layers + 1) if include_mtp else ():
        # NOTE: module k has only T−k positions to predict (Eq. 22), but minidsv3/mtp.py keeps static shapes and runs
        # all T (the last k padded, with zero loss weight); we count what runs. The difference is k/T of this term.
        block = _block_forward_flops(cfg, cfg.num_hidden_layers + k - 1, keys)
        mtp += passes * (2 * (2 * cfg.hidden_size) * cfg.hidden_size + sum(block.values()) + head)  # M_k, TRM_k, head
    return FlopBreakdown(
        attn_proj=total("attn_proj"),
        attn_scores=total("attn_scores"),
        attn_values=total("attn_values"),
        dense_mlp=total("dense_mlp"),
        router=total("router"),
        routed_experts=total("routed"),
        shared_experts=total("shared"),
        head=passes * head,
        mtp=mtp,
        seq_len=seq_len,
        causal=causal,
        training=training,
    )


# ---------------------------------------------------------------------------------------------------------------
# Device peaks


def measure_peak(seconds: float = 1.0, *, device: jax.Device | None = None, size: int = 1024) -> float:
    """Best FLOP/s of a (size, size) @ (size, size) matmul with bf16 inputs and float32 accumulation (the recipe of
    layers.matmul with dtype="bfloat16"), repeated for about `seconds` on `device` (default: the first CPU). Other
    processes sharing the cores lower it, and so raise the MFU reported against it."""
    device = device or jax.devices("cpu")[0]
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.device_put(jax.random.normal(k, (size, size), jnp.bfloat16), device) for k in keys)  # (size, size)
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
# Table 1


@dataclasses.dataclass
class StageCost:
    """One column of Table 1. `flops`, `tokens`, `steps` and `seconds` are None where a source does not give them."""

    stage: str  # "pretrain" | "context" | "sft"
    device_hours: float
    tokens: float | None = None
    flops: float | None = None
    steps: int | None = None
    seconds: float | None = None  # wall clock
    seq_lens: tuple[int, ...] = ()


def mfu(flops: float, device_hours: float, peak_flops: float) -> float:
    """Model FLOPs utilization: FLOPs done ÷ (device-seconds × peak FLOP/s per device)."""
    return flops / (device_hours * 3600 * peak_flops)


def _fmt_hours(h: float, unit: float) -> str:
    return f"{h / 1e3:.0f}K" if unit >= 1e4 else f"{h:.3g}"


def _fmt_usd(x: float, unit: float) -> str:
    return f"${x / 1e6:.3f}M" if unit >= 1e5 else (f"${x:,.2f}" if unit >= 1 else f"${x:.2g}")


def _fmt_count(x: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def format_table1(
    stages: list[StageCost], *, device: str, peak_flops: float, price_per_hour: float, peak_measured: bool = False
) -> str:
    """Markdown laid out as the report's Table 1: hours and USD per stage and in total, then FLOPs, tokens and MFU."""
    hours = [s.device_hours for s in stages]
    total_hours = sum(hours)
    known = [s for s in stages if s.flops is not None]
    total_flops = sum(s.flops for s in known)
    known_hours = sum(s.device_hours for s in known)

    def cell(value, fmt) -> str:
        return "—" if value is None else fmt(value)

    rows = [
        [f"in {device} Hours"] + [_fmt_hours(h, total_hours) for h in hours + [total_hours]],
        ["in USD"] + [_fmt_usd(h * price_per_hour, total_hours * price_per_hour) for h in hours + [total_hours]],
        ["FLOPs"] + [cell(s.flops, lambda x: f"{x:.3g}") for s in stages] + [f"{total_flops:.3g}" if known else "—"],
        ["Tokens"] + [cell(s.tokens, _fmt_count) for s in stages] + [cell(_sum_known(stages, "tokens"), _fmt_count)],
        ["MFU"]
        + [cell(_stage_mfu(s, peak_flops), lambda x: f"{100 * x:.2f} %") for s in stages]
        + [f"{100 * mfu(total_flops, known_hours, peak_flops):.2f} %" if known_hours else "—"],
    ]
    header = ["Training Costs"] + [STAGES[s.stage] for s in stages] + ["Total"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    peak = f"{'measured' if peak_measured else 'datasheet'} peak {peak_flops / 1e12:.4g} TFLOP/s per device"
    lines.append(f"\nUSD at ${price_per_hour:g} per {device} hour; MFU against the {peak}; — = not known.")
    return "\n".join(lines)


def _stage_mfu(s: StageCost, peak_flops: float) -> float | None:
    return mfu(s.flops, s.device_hours, peak_flops) if s.flops is not None and s.device_hours > 0 else None


def _sum_known(stages: list[StageCost], field: str) -> float | None:
    values = [getattr(s, field) for s in stages if getattr(s, field) is not None]
    return sum(values) if values else None


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
        s = self.stages.setdefault(stage, StageCost(stage, 0.0, tokens=0, flops=0.0, steps=0, seconds=0.0))
        s.steps, s.tokens, s.seconds, s.flops = s.steps + steps, s.tokens + tokens, s.seconds + seconds, s.flops + flops
        s.device_hours = s.seconds * self.device_count / 3600
        s.seq_lens = tuple(sorted({*s.seq_lens, seq_len}))
        return s

    def ordered(self) -> list[StageCost]:
        return [self.stages[name] for name in STAGES if name in self.stages]

    def format_table1(self) -> str:
        """Table 1 of this run (markdown), as `format_table1`."""
        return format_table1(
            self.ordered(),
            device=self.device,
            peak_flops=self.peak_flops,
            price_per_hour=self.price_per_hour,
            peak_measured=self.peak_measured,
        )

    def to_dict(self) -> dict:
        """The inputs (stages) and, for a reader of the file, what follows from them (cost, FLOP/s, MFU)."""
        stages = {}
        for s in self.ordered():
            stages[s.stage] = dataclasses.asdict(s) | {
                "cost_usd": s.device_hours * self.price_per_hour,
                "achieved_flops_per_device": s.flops / (s.seconds * self.device_count) if s.seconds else None,
                "mfu": _stage_mfu(s, self.peak_flops),
            }
        keys = ("device", "device_count", "peak_flops", "peak_measured", "price_per_hour")
        return {k: getattr(self, k) for k in keys} | {"stages": stages}

    @classmethod
    def from_dict(cls, data: dict) -> Ledger:
        fields = {f.name for f in dataclasses.fields(StageCost)}
        stages = {
            name: StageCost(**{k: v for k, v in s.items() if k in fields} | {"seq_lens": tuple(s["seq_lens"])})
            for name, s in data["stages"].items()
        }
        keys = ("device", "peak_flops", "peak_measured", "device_count", "price_per_hour")
        return cls(**{k: data[k] for k in keys}, stages=stages)

    def save(self, path: str | Path) -> None:
        """ledger.json in the run folder."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Ledger:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write_costs_md(self, path: str | Path) -> None:
        """costs.md in the run folder: Table 1 of this run."""
        Path(path).write_text(f"# Training costs\n\n{self.format_table1()}\n")


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
    for p in plans:
        if sum(x is not None for x in (p.mfu, p.tokens_per_day, p.hours)) != 1:
            raise ValueError(f"stage {p.stage}: give exactly one of mfu, tokens_per_day, hours")
        tokens = sum(t for t, _ in p.phases) if p.phases else None
        flops = sum(t * flops_per_token(cfg, n, include_mtp=include_mtp).total for t, n in p.phases) or None
        if p.hours is not None:
            hours = p.hours
        elif p.mfu is not None:
            hours = flops / (p.mfu * peak_flops) / 3600  # device-seconds = FLOPs ÷ achieved FLOP/s per device
        else:
            achieved = flops / tokens * p.tokens_per_day / 86400 / device_count  # FLOP/s per device
            hours = flops / achieved / 3600
        costs.append(StageCost(p.stage, hours, tokens=tokens, flops=flops, seq_lens=tuple(n for _, n in p.phases)))
    return costs


# The report's own inputs (spec §5-7): 14.8T tokens at 4K at [ISCA] Table 4's 272.8B tokens/day on 2048 H800s;
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


def _print_params(cfg: ModelConfig) -> None:
    p = count_params(cfg)
    rows = [
        ("total (main model)", p.total),
        ("active per token (embedding and head included)", p.active),
        ("active per token (input embedding excluded)", p.active_no_embedding),
        ("MTP modules, unique (shared embedding and head excluded)", p.mtp),
        ("MTP active per token (shared embedding and head included)", p.mtp_active),
        ("router bias e_score_correction_bias (state, in no total)", p.router_bias),
        ("  ... of the MTP modules", p.mtp_router_bias),
    ]
    for name, n in rows:
        print(f"{name:<60} {f'{n / 1e9:.3f} B' if n >= 1e6 else '':>11}  ({n:,})")


def _print_flops(cfg: ModelConfig, seq_len: int) -> None:
    causal, full = (flops_per_token(cfg, seq_len, causal=c) for c in (True, False))
    print(f"training FLOPs per token (forward + backward) at sequence length {seq_len}, GFLOP")
    print(f"{'term':<36} {'causal':>10} {'non-causal':>12}")
    names = [f.name for f in dataclasses.fields(FlopBreakdown)][:8]
    for name in names:
        print(f"{name:<36} {getattr(causal, name) / 1e9:>10.2f} {getattr(full, name) / 1e9:>12.2f}")
    print(f"{'= main model ([ISCA] Table 2)':<36} {causal.main / 1e9:>10.2f} {full.main / 1e9:>12.2f}")
    print(f"{'MTP modules':<36} {causal.mtp / 1e9:>10.2f} {full.mtp / 1e9:>12.2f}")
    print(f"{'= total with MTP':<36} {causal.total / 1e9:>10.2f} {full.total / 1e9:>12.2f}")
    n = count_params(cfg).active_no_embedding
    print(f"{'(6 × active matmul params)':<36} {6 * n / 1e9:>10.2f}")


def _parse_stage(values: list[str]) -> StagePlan:
    """NAME TOKENS SEQ_LEN RATE; TOKENS and SEQ_LEN comma lists of phases or '-'; RATE mfu=|tokens_per_day=|hours=."""
    name, tokens, seq_lens, rate = values
    phases = () if tokens == "-" else tuple(zip(map(float, tokens.split(",")), map(int, seq_lens.split(","))))
    key, _, value = rate.partition("=")
    if key not in ("mfu", "tokens_per_day", "hours") or name not in STAGES:
        raise SystemExit(f"--stage {' '.join(values)}: NAME in {list(STAGES)}, RATE mfu=|tokens_per_day=|hours=")
    return StagePlan(name, phases, **{key: float(value)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minidsv3.accounting", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("params", help="parameter counts").add_argument("config")
    fl = sub.add_parser("flops", help="training FLOPs per token")
    fl.add_argument("config")
    fl.add_argument("--seq-len", type=int, default=None, help="default: the config's data.seq_len")
    pr = sub.add_parser("project", help="Table 1 for a token budget, device and efficiency")
    pr.add_argument("config", nargs="?")
    pr.add_argument("--preset", choices=["deepseek-v3"])
    pr.add_argument("--device", choices=list(PEAK_FLOPS), default="H800")
    pr.add_argument("--devices", type=int, default=None)
    pr.add_argument("--price", type=float, default=2.0, help="USD per device-hour")
    pr.add_argument("--include-mtp", action="store_true", help="count the MTP modules' FLOPs too")
    pr.add_argument(
        "--stage", nargs=4, action="append", default=[], metavar=("NAME", "TOKENS", "SEQ_LEN", "RATE"),
        help="e.g. pretrain 14.8e12 4096 mfu=0.39; context 62.9e9,62.9e9 32768,131072 hours=119e3; sft - - hours=5e3",
    )  # fmt: skip
    args = parser.parse_args(argv)

    if args.command == "params":
        _print_params(load_model_config(args.config))
    elif args.command == "flops":
        from minidsv3.config import load

        cfg = load(args.config)
        _print_flops(cfg.model, args.seq_len or cfg.data.seq_len)
    else:
        preset = DEEPSEEK_V3_PRESET if args.preset else {}
        path = args.config or preset.get("config")
        if path is None:
            raise SystemExit("project: give a CONFIG or --preset")
        cfg = load_model_config(path)
        plans = [_parse_stage(s) for s in args.stage] or preset.get("plans", [])
        device = preset.get("device", args.device) if not args.stage else args.device
        count = args.devices or preset.get("device_count", 1)
        peak = PEAK_FLOPS[device]["bf16"]
        costs = project(cfg, plans, device_count=count, peak_flops=peak, include_mtp=args.include_mtp)
        print(f"{path}: {count} × {device}\n")
        print(format_table1(costs, device=f"{device} GPU", peak_flops=peak, price_per_hour=args.price))
        for c in costs:
            if c.flops:
                achieved = c.flops / (c.device_hours * 3600)  # FLOP/s per device
                print(
                    f"{STAGES[c.stage]}: {c.flops / c.tokens / 1e9:.1f} GFLOP/token, {achieved / 1e12:.1f} TFLOP/s per"
                    f" device, implied MFU {100 * mfu(c.flops, c.device_hours, peak):.2f} %"
                )
        if args.preset:
            print("[ISCA] Table 4 reports 38.94 % causal MFU for pre-training; [R] Table 1: 2664K / 119K / 5K hours.")


if __name__ == "__main__":
    main()
