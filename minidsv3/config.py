"""Configuration: frozen dataclasses, TOML loading, `--section.field=value` overrides and validation.

Architecture fields carry exactly the names of Hugging Face's `DeepseekV3Config`, so a config can be diffed against
DeepSeek's own `config.json` (notes §8). Fields of our own carry the paper's symbol and source in a comment.

A run is described by one `Config` with three sections, each its own TOML table:
    [model]  ModelConfig  the architecture (and the FP8 switch, which changes the numerics of the model's matmuls)
    [data]   DataConfig   where text comes from and how it is cut into sequences
    [train]  TrainConfig  optimizer, schedules, the three stages of Table 1, logging and checkpoints
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config value or combination is invalid; the message names the field and what is allowed."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters, as `rope_scaling` in DeepSeek-V3's config.json (notes §6, §8)."""

    type: str = "yarn"
    factor: float = 40.0  # s, report §4.3
    original_max_position_embeddings: int = 4096  # the pre-training context the ramp is measured against
    beta_fast: float = 32.0  # β, report §4.3
    beta_slow: float = 1.0  # α, report §4.3
    mscale: float = 1.0  # √t = 0.1·mscale·ln(s) + 1, notes §1.4
    mscale_all_dim: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture. Defaults are DeepSeek-V3's where it has one, else a small CPU-sized model."""

    vocab_size: int = 4096
    hidden_size: int = 256  # D
    intermediate_size: int = 512  # dense SwiGLU MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 128  # one routed or shared expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4  # H
    q_lora_rank: int = 128  # d_c', 0 = no query compression (DeepSeek-V2-Lite)
    kv_lora_rank: int = 64  # d_c
    qk_nope_head_dim: int = 32  # d_h
    qk_rope_head_dim: int = 16  # d_h^R
    v_head_dim: int = 32
    n_routed_experts: int = 16  # N_r (E)
    n_shared_experts: int = 1  # N_s
    num_experts_per_tok: int = 2  # K_r (K)
    n_group: int = 4  # G: expert groups (nodes in the report)
    topk_group: int = 2  # M: groups a token may be routed to
    routed_scaling_factor: float = 2.5  # notes §2.2 (code only, not in the report)
    norm_topk_prob: bool = True  # Eq. 13: normalize gates over the selected experts
    first_k_dense_replace: int = 1
    num_nextn_predict_layers: int = 1  # D of MTP, report §2.2; 0 disables it
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # None = plain RoPE; set by context extension (report §4.3)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006  # init std, report §4.2 (HF's 0.02 is a library default, notes §9)
    aux_loss_alpha: float = 0.0001  # α of the sequence-wise balance loss, report §4.2 (HF config says 0.001)
    dtype: str = "float32"  # matmul input dtype: "float32" or "bfloat16"; params and accumulation stay float32
    fp8: bool = False  # FP8-simulated linear layers, report §3.3 (minidsv3/fp8.py)
    fp8_block_size: int = 128  # N_C: 1×N_C activation tiles, N_C×N_C weight blocks, report §3.3.1
    fp8_accum_mantissa_bits: int = 13  # limited-precision accumulator, [ISCA] §3.1.1 (notes §9 decision)
    fp8_promotion_interval: int = 128  # promote partial sums to float32 every N_C elements of K, report §3.3.2
    fp8_pow2_scales: bool = False  # round scales up to powers of two, report §3.3.2

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of queries and keys in the score: d_h + d_h^R (192 for V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """Layers before `first_k_dense_replace` use a dense MLP, the rest DeepSeekMoE."""
        return layer >= self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from. Empty paths mean the embedded default: the Python standard library's source."""

    path: str = ""  # a UTF-8 text file or a folder of them; "" = the stdlib's *.py files
    sft_path: str = ""  # JSONL of {"prompt", "response"}; "" = pairs mined from the corpus (signature+doc -> body)
    val_fraction: float = 0.05  # share of whole files held out for validation
    seq_len: int = 128  # pre-training sequence length (4K in the report)
    cache_dir: str = ""  # tokenizer and token caches; "" = <run folder>/cache
    split_seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization (report §4.2), the three stages of Table 1, and bookkeeping."""

    out_dir: str = "runs/tiny"
    seed: int = 0
    batch_size: int = 16  # sequences per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    # AdamW, report §4.2
    learning_rate: float = 3e-3  # peak; 2.2e-4 in the report at its scale
    warmup_steps: int = 50  # linear warmup (2K steps in the report)
    constant_fraction: float = 0.5  # share of pre-training steps held at the peak (10T of 14.8T tokens ≈ 0.68)
    min_lr_ratio: float = 0.1  # cosine decay to 10 % of the peak (2.2e-4 -> 2.2e-5)
    tail_fraction: float = 0.05  # constant tail at the minimum (333B+167B of 14.8T tokens ≈ 0.034)
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8  # not given in the report (notes §5)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # aux-loss-free balancing and MTP, report §4.2
    bias_update_speed: float = 0.001  # γ
    bias_freeze_fraction: float = 0.034  # γ = 0 for the last 500B of 14.8T pre-training tokens
    mtp_lambda: float = 0.3  # λ for the first 10T tokens
    mtp_lambda_late: float = 0.1  # λ for the remaining 4.8T
    mtp_lambda_switch: float = 10.0 / 14.8  # fraction of pre-training after which λ drops
    # the three stages of Table 1; steps = 0 switches a stage off
    pretrain_steps: int = 600
    context_steps: int = 60  # context extension (report §4.3: two phases of 1000 steps)
    context_yarn_factor: float = 2.0  # s: sequence length and RoPE wavelength are stretched by s
    context_learning_rate: float = 3e-4  # constant, the final pre-training LR (7.3e-6 in the report)
    sft_steps: int = 100  # post-training: supervised fine-tuning, loss on responses only
    sft_learning_rate: float = 3e-4  # cosine to sft_learning_rate·min_lr_ratio (5e-6 -> 1e-6 in the report)
    # bookkeeping
    eval_every: int = 100
    eval_batches: int = 4
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    sample_tokens: int = 120
    price_per_hour: float = 2.0  # USD per device-hour, report Table 1
    stop_after_steps: int = 0  # stop (with a checkpoint) after this global step, to continue later; 0 = run to the end


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def validate_model(m: ModelConfig) -> None:
    """Reject every invalid value or combination, naming the field."""
    for name in (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
        "fp8_block_size", "fp8_promotion_interval",
    ):  # fmt: skip
        _require(getattr(m, name) > 0, f"model.{name}", f"must be > 0, got {getattr(m, name)}")
    for name in ("q_lora_rank", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
        _require(getattr(m, name) >= 0, f"model.{name}", f"must be >= 0, got {getattr(m, name)}")
    for name in ("routed_scaling_factor", "rope_theta", "rms_norm_eps", "initializer_range"):
        _require(getattr(m, name) > 0, f"model.{name}", f"must be > 0, got {getattr(m, name)}")
    _require(m.aux_loss_alpha >= 0, "model.aux_loss_alpha", f"must be >= 0, got {m.aux_loss_alpha}")
    _require(
        m.qk_rope_head_dim % 2 == 0,
        "model.qk_rope_head_dim",
        f"must be even (RoPE rotates pairs), got {m.qk_rope_head_dim}",
    )
    _require(m.topk_group <= m.n_group, "model.topk_group", f"must be <= n_group ({m.n_group}), got {m.topk_group}")
    _require(
        m.n_routed_experts % m.n_group == 0,
        "model.n_routed_experts",
        f"must be divisible by n_group ({m.n_group}), got {m.n_routed_experts}",
    )
    reachable = m.topk_group * (m.n_routed_experts // m.n_group)
    _require(
        m.num_experts_per_tok <= reachable,
        "model.num_experts_per_tok",
        f"must be <= the experts in topk_group groups ({m.topk_group} x {m.n_routed_experts // m.n_group} = {reachable}),"
        f" got {m.num_experts_per_tok}",
    )
    _require(
        m.first_k_dense_replace <= m.num_hidden_layers,
        "model.first_k_dense_replace",
        f"must be <= num_hidden_layers ({m.num_hidden_layers}), got {m.first_k_dense_replace}",
    )
    _require(m.dtype in ("float32", "bfloat16"), "model.dtype", f"must be 'float32' or 'bfloat16', got {m.dtype!r}")
    _require(
        1 <= m.fp8_accum_mantissa_bits <= 23,
        "model.fp8_accum_mantissa_bits",
        f"must be in [1, 23] (float32 has 23), got {m.fp8_accum_mantissa_bits}",
    )
    if m.rope_scaling is not None:
        r = m.rope_scaling
        _require(r.type == "yarn", "model.rope_scaling.type", f"only 'yarn' is supported, got {r.type!r}")
        _require(r.factor >= 1, "model.rope_scaling.factor", f"must be >= 1, got {r.factor}")
        _require(
            r.original_max_position_embeddings > 0,
            "model.rope_scaling.original_max_position_embeddings",
            f"must be > 0, got {r.original_max_position_embeddings}",
        )
        _require(r.beta_fast > r.beta_slow > 0, "model.rope_scaling.beta_fast", "need beta_fast > beta_slow > 0")


def validate_data(d: DataConfig) -> None:
    _require(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _require(d.seq_len > 0, "data.seq_len", f"must be > 0, got {d.seq_len}")


def validate_train(t: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum_steps", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints"):
        _require(getattr(t, name) > 0, f"train.{name}", f"must be > 0, got {getattr(t, name)}")
    for name in ("pretrain_steps", "context_steps", "sft_steps", "warmup_steps", "sample_tokens", "stop_after_steps"):
        _require(getattr(t, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    for name in ("learning_rate", "context_learning_rate", "sft_learning_rate", "adam_eps", "grad_clip"):
        _require(getattr(t, name) > 0, f"train.{name}", f"must be > 0, got {getattr(t, name)}")
    for name in ("adam_b1", "adam_b2"):
        _require(0 <= getattr(t, name) < 1, f"train.{name}", f"must be in [0, 1), got {getattr(t, name)}")
    for name in ("constant_fraction", "tail_fraction", "bias_freeze_fraction", "mtp_lambda_switch", "min_lr_ratio"):
        _require(0 <= getattr(t, name) <= 1, f"train.{name}", f"must be in [0, 1], got {getattr(t, name)}")
    _require(
        t.constant_fraction + t.tail_fraction <= 1,
        "train.constant_fraction",
        f"constant_fraction + tail_fraction must be <= 1, got {t.constant_fraction} + {t.tail_fraction}",
    )
    for name in ("weight_decay", "bias_update_speed", "mtp_lambda", "mtp_lambda_late", "price_per_hour"):
        _require(getattr(t, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    _require(t.context_yarn_factor >= 1, "train.context_yarn_factor", f"must be >= 1, got {t.context_yarn_factor}")
    _require(bool(t.out_dir), "train.out_dir", "must not be empty")


def validate(cfg: Config) -> Config:
    validate_model(cfg.model)
    validate_data(cfg.data)
    validate_train(cfg.train)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts (TOML tables) with type checks


def _check_type(value, annotation, field: str):
    """Return `value` converted to `annotation`, or raise naming the field. Ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, field)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a table, got {type(value).__name__} {value!r}")
        return _from_dict(annotation, value, field)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{field}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{field}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{field}: must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation} for {field}")


def _from_dict(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}: unknown key (allowed: {', '.join(sorted(known))})")
    return cls(**{k: _check_type(v, hints[k], f"{prefix}.{k}") for k, v in values.items()})


def from_dict(tables: dict) -> Config:
    """Build and validate a Config from {"model": {...}, "data": {...}, "train": {...}}."""
    sections = {f.name for f in dataclasses.fields(Config)}
    for key in tables:
        if key not in sections:
            raise ConfigError(f"{key}: unknown section (allowed: {', '.join(sorted(sections))})")
    hints = typing.get_type_hints(Config)
    return validate(Config(**{k: _check_type(v, hints[k], k) for k, v in tables.items()}))


def run_defining(tables: dict, without: tuple[str, ...] = ("stop_after_steps",)) -> dict:
    """A config dict (as config.json stores it) minus the train fields that do not define the run: by default where
    to stop, which a run's continuation may change."""
    return {**tables, "train": {k: v for k, v in tables["train"].items() if k not in without}}


def to_dict(cfg) -> dict:
    """A config dataclass as a plain nested dict, JSON/TOML-ready (None values dropped: TOML has no null)."""

    def drop_none(d: dict) -> dict:
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    return drop_none(dataclasses.asdict(cfg))


def _parse_override(text: str) -> tuple[list[str], object]:
    """`--model.hidden_size=512` -> (["model", "hidden_size"], 512). The value is read as a TOML value when it
    parses as one (numbers, booleans, quoted strings) and as a bare string otherwise."""
    if not text.startswith("--") or "=" not in text:
        raise ConfigError(f"{text}: overrides are written --section.field=value, e.g. --train.pretrain_steps=100")
    key, raw = text[2:].split("=", 1)
    path = key.split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"{key}: overrides name a section and a field, e.g. --train.pretrain_steps=100")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (or the defaults when `path` is None), apply `--section.field=value` overrides, validate."""
    tables: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            tables = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    for text in overrides:
        keys, value = _parse_override(text)
        node = tables
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(keys)}: {k} is not a table")
        node[keys[-1]] = value
    return from_dict(tables)


def load_model_config(path: str | Path) -> ModelConfig:
    """Just the [model] table of a TOML config (used by the accounting commands)."""
    return load(path).model
