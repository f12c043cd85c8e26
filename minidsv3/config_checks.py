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
    validate_rl(tc)
    _require(0 <= tc.seed < 2**32, "train.seed", f"must be in [0, 2**32), got {tc.seed}")  # numpy refuses < 0
    _require(bool(tc.out_dir), "train.out_dir", "must not be empty")
    validate_batch_ramp(tc)


def validate_rl(tc: TrainConfig) -> None:
    """The RL stage's fields (minidsv3/rl.py)."""
    _require(tc.rl_steps >= 0, "train.rl_steps", f"must be >= 0, got {tc.rl_steps}")
    positive = ("rl_learning_rate", "rl_prompts", "rl_max_new_tokens")
    _require_each(tc, "train", positive, lambda v: v > 0, "> 0")
    held_out = 300  # the held-out set of minidsv3/tasks.py, kept out of every training prompt
    _require(
        0 < tc.rl_eval_prompts <= held_out,
        "train.rl_eval_prompts",
        f"must be in [1, {held_out}] (the held-out set), got {tc.rl_eval_prompts}",
    )
    _require(tc.rl_samples >= 2, "train.rl_samples", f"must be >= 2 (a group needs a baseline), got {tc.rl_samples}")
    _require_each(tc, "train", ("rl_beta", "rl_clip"), lambda v: v >= 0, ">= 0")
    _require_each(tc, "train", ("rl_task_tokens", "rl_task_pairs"), lambda v: 0 <= v < 1, "in [0, 1)")
    aggregations = ("grpo", "dapo", "drgrpo")  # minidsv3/grpo.py's AGGREGATIONS
    _require(
        tc.rl_aggregation in aggregations,
        "train.rl_aggregation",
        f"must be one of {', '.join(aggregations)}, got {tc.rl_aggregation!r}",
    )


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
    validate_mesh(cfg)
    return cfg


def validate_mesh(cfg: Config) -> None:
    """The [mesh] table against the experts and the batches it splits (minidsv3/sharding.py). Whether the devices
    divide into the mesh is known only when it is built (sharding.make_mesh, from train.py)."""
    mesh, tc = cfg.mesh, cfg.train
    _require_each(mesh, "mesh", ("data", "expert", "num_processes"), lambda v: v > 0, "> 0")
    _require(
        0 <= mesh.process_id < mesh.num_processes,
        "mesh.process_id",
        f"must be in [0, num_processes = {mesh.num_processes}), got {mesh.process_id}",
    )
    experts = cfg.model.n_routed_experts
    _require(
        experts % mesh.expert == 0,
        "mesh.expert",
        f"must divide model.n_routed_experts ({experts}) so that each device holds whole experts, got {mesh.expert}",
    )
    devices = mesh.data * mesh.expert  # every device gets whole sequences of every batch
    _require(
        tc.batch_size % devices == 0,
        "train.batch_size",
        f"must be a multiple of mesh.data x mesh.expert ({devices}) to split over the mesh, got {tc.batch_size}",
    )
    context_batch = max(1, int(tc.batch_size / tc.context_yarn_factor))  # as train.py cuts context extension's batch
    _require(
        not tc.context_steps or context_batch % devices == 0,
        "train.batch_size",
        f"context extension's batch, batch_size / context_yarn_factor = {context_batch} sequences, must be a multiple"
        f" of mesh.data x mesh.expert ({devices}); choose another batch_size or context_yarn_factor",
    )
