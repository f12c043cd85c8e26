"""Validation of a Config: every value and combination that would fail later, refused at load time with one line
naming the field and what is allowed (config.py's `load` and `from_dict` call `validate` and `validate_run`)."""

from __future__ import annotations

import typing

from minidsv3.config_io import ConfigError

if typing.TYPE_CHECKING:
    from minidsv3.config import Config, DataConfig, ModelConfig, TrainConfig


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _require_each(section, prefix: str, names: tuple[str, ...], ok, allowed: str) -> None:
    """_require(ok(value)) for each named field of `section`: "train.batch_size: must be > 0, got 0"."""
    for name in names:
        value = getattr(section, name)
        _require(ok(value), f"{prefix}.{name}", f"must be {allowed}, got {value}")


def validate_model(m: ModelConfig) -> None:
    """Reject every invalid value or combination, naming the field."""
    positive = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
        "fp8_block_size", "fp8_promotion_interval", "routed_scaling_factor", "rope_theta", "rms_norm_eps",
        "initializer_range",
    )  # fmt: skip
    _require_each(m, "model", positive, lambda v: v > 0, "> 0")
    non_negative = ("q_lora_rank", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers")
    _require_each(m, "model", (*non_negative, "aux_loss_alpha"), lambda v: v >= 0, ">= 0")
    rope_dim = m.qk_rope_head_dim
    _require(rope_dim % 2 == 0, "model.qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {rope_dim}")
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
    bits = m.fp8_accum_mantissa_bits
    _require(1 <= bits <= 23, "model.fp8_accum_mantissa_bits", f"must be in [1, 23] (float32 has 23), got {bits}")
    # Promotion happens between MMA instructions, each 32 deep on Hopper (fp8.MMA_K; config cannot import fp8.py)
    interval = m.fp8_promotion_interval
    _require(interval % 32 == 0, "model.fp8_promotion_interval", f"must be a multiple of 32 (e.g. 128), got {interval}")
    if m.rope_scaling is not None:
        r = m.rope_scaling
        _require(r.type == "yarn", "model.rope_scaling.type", f"only 'yarn' is supported, got {r.type!r}")
        _require(r.factor >= 1, "model.rope_scaling.factor", f"must be >= 1, got {r.factor}")
        _require_each(r, "model.rope_scaling", ("original_max_position_embeddings",), lambda v: v > 0, "> 0")
        _require(r.beta_fast > r.beta_slow > 0, "model.rope_scaling.beta_fast", "need beta_fast > beta_slow > 0")


def validate_data(d: DataConfig) -> None:
    _require(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _require(d.seq_len > 0, "data.seq_len", f"must be > 0, got {d.seq_len}")


def validate_train(tc: TrainConfig) -> None:
    positive = (
        "batch_size", "grad_accum_steps", "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints",
        "learning_rate", "context_learning_rate", "sft_learning_rate", "adam_eps", "grad_clip", "max_skipped_steps",
    )  # fmt: skip
    _require_each(tc, "train", positive, lambda v: v > 0, "> 0")
    non_negative = (
        "pretrain_steps", "context_steps", "sft_steps", "warmup_steps", "sample_tokens", "stop_after_steps",
        "batch_ramp_start", "batch_ramp_tokens", "weight_decay", "bias_update_speed", "mtp_lambda", "mtp_lambda_late",
        "price_per_hour",
    )  # fmt: skip
    _require_each(tc, "train", non_negative, lambda v: v >= 0, ">= 0")
    _require_each(tc, "train", ("adam_b1", "adam_b2"), lambda v: 0 <= v < 1, "in [0, 1)")
    fractions = (
        "constant_fraction", "tail_fraction", "final_fraction", "bias_freeze_fraction", "mtp_lambda_switch",
        "min_lr_ratio", "final_lr_ratio",
    )  # fmt: skip
    _require_each(tc, "train", fractions, lambda v: 0 <= v <= 1, "in [0, 1]")
    _require(
        tc.constant_fraction + tc.tail_fraction <= 1,
        "train.constant_fraction",
        f"constant_fraction + tail_fraction must be <= 1, got {tc.constant_fraction} + {tc.tail_fraction}",
    )
    _require(
        tc.final_fraction <= tc.tail_fraction,
        "train.final_fraction",
        f"must be <= tail_fraction ({tc.tail_fraction}): it is the tail's last part, got {tc.final_fraction}",
    )
    _require(tc.context_yarn_factor >= 1, "train.context_yarn_factor", f"must be >= 1, got {tc.context_yarn_factor}")
    _require(0 <= tc.seed < 2**32, "train.seed", f"must be in [0, 2**32), got {tc.seed}")  # numpy refuses < 0
    _require(bool(tc.out_dir), "train.out_dir", "must not be empty")
    validate_batch_ramp(tc)


def validate_batch_ramp(tc: TrainConfig) -> None:
    """The ramp grows a step by whole micro-batches, from batch_ramp_start to batch_size·grad_accum_steps sequences."""
    full = tc.batch_size * tc.grad_accum_steps
    _require(
        (tc.batch_ramp_start > 0) == (tc.batch_ramp_tokens > 0),
        "train.batch_ramp_start",
        "batch_ramp_start and batch_ramp_tokens are set together (both > 0) or not at all (both 0),"
        f" got {tc.batch_ramp_start} and {tc.batch_ramp_tokens}",
    )
    if tc.batch_ramp_start:
        _require(
            tc.batch_ramp_start % tc.batch_size == 0 and tc.batch_ramp_start < full,
            "train.batch_ramp_start",
            f"must be a multiple of batch_size ({tc.batch_size}) below batch_size x grad_accum_steps ({full}),"
            f" got {tc.batch_ramp_start}",
        )


def validate(cfg: Config) -> Config:
    """Each section on its own (a saved [model] table alone is a valid Config)."""
    validate_model(cfg.model)
    validate_data(cfg.data)
    validate_train(cfg.train)
    return cfg


def validate_run(cfg: Config) -> Config:
    """What a training run needs across sections: every sequence it trains on or samples fits the model's positions,
    and the byte-level tokenizer fits the vocabulary. Checked at load time, not when a stage or a sample gets there."""
    m, seq_len, tc = cfg.model, cfg.data.seq_len, cfg.train
    limit = m.max_position_embeddings
    _require(seq_len <= limit, "data.seq_len", f"must be <= model.max_position_embeddings ({limit}), got {seq_len}")
    long_seq = round(seq_len * tc.context_yarn_factor)  # context extension's sequence length (and SFT's after it)
    _require(
        not tc.context_steps or long_seq <= limit,
        "train.context_yarn_factor",
        f"stretches data.seq_len to {seq_len} x {tc.context_yarn_factor} = {long_seq} positions, more than"
        f" model.max_position_embeddings ({limit}); must be <= {limit / seq_len:g}, or raise max_position_embeddings",
    )
    # a sample after each stage starts from the 4-byte prompt "def ", at most 4 tokens
    _require(
        tc.sample_tokens + 4 <= limit,
        "train.sample_tokens",
        f"must be <= model.max_position_embeddings - 4 ({limit - 4}), got {tc.sample_tokens}",
    )
    _require(
        m.vocab_size >= 258,
        "model.vocab_size",
        f"must be >= 258 for the byte-level tokenizer (256 bytes + 2 special tokens), got {m.vocab_size}",
    )
    return cfg
