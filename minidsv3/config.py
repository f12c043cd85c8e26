"""Configuration: frozen dataclasses and `load` (a TOML file, then `--section.field=value` overrides; the reading and
type-checking mechanics are in config_io.py, the validation in config_checks.py).

Architecture fields carry exactly the names of Hugging Face's `DeepseekV3Config`, so a config can be diffed against
DeepSeek's own `config.json` (notes §8). Fields of our own carry the paper's symbol and source in a comment.

A run is described by one `Config` with three sections, each its own TOML table:
    [model]  ModelConfig  the architecture (and the FP8 switch, which changes the numerics of the model's matmuls)
    [data]   DataConfig   where text comes from and how it is cut into sequences
    [train]  TrainConfig  optimizer, schedules, the three stages of Table 1, logging and checkpoints
    [mesh]   MeshConfig   the devices it runs on: a (data, expert) mesh and, for several hosts, jax.distributed
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

# config.ConfigError and config.to_dict are part of this module's interface; they live with the loading mechanics
from minidsv3.config_checks import validate, validate_run
from minidsv3.config_io import ConfigError, apply_override, build, read_toml, to_dict  # noqa: F401


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
    # fine-tuning: a Hugging Face DeepSeek-V3 folder (minidsv3/hf.py) whose weights start a new run; its architecture
    # replaces [model]'s (dtype and FP8 stay the run's) and its tokenizer the one trained on the corpus. "" = random
    init_from: str = ""
    batch_size: int = 16  # sequences per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step (once the batch-size ramp is over)
    # batch-size ramp, report §4.2: 3,072 -> 15,360 sequences over the first 469B tokens (schedules.BatchRamp)
    batch_ramp_start: int = 0  # sequences per step when pre-training starts, a multiple of batch_size; 0 = no ramp
    batch_ramp_tokens: int = 0  # pre-training tokens over which the batch grows to batch_size·grad_accum_steps
    # AdamW, report §4.2; the fractions are shares of the pre-training tokens (schedules.py)
    learning_rate: float = 3e-3  # peak; 2.2e-4 in the report at its scale
    warmup_steps: int = 50  # linear warmup from 0, in steps (2K steps in the report); 0 = none
    constant_fraction: float = 0.5  # share held at the peak (10T of 14.8T tokens ≈ 0.68)
    min_lr_ratio: float = 0.1  # cosine decay to 10 % of the peak (2.2e-4 -> 2.2e-5)
    tail_fraction: float = 0.05  # constant tail at the minimum (333B+167B of 14.8T tokens ≈ 0.034)
    final_fraction: float = 0.0  # the tail's last share at final_lr_ratio·peak (167B of 14.8T ≈ 0.011); 0 = none
    final_lr_ratio: float = 0.0  # 7.3e-6 / 2.2e-4 ≈ 0.033 in the report
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
    mtp_lambda_switch: float = 10.0 / 14.8  # share of the pre-training tokens after which λ drops
    # the three stages of Table 1; steps = 0 switches a stage off
    pretrain_steps: int = 600
    context_steps: int = 60  # context extension (report §4.3: two phases of 1000 steps)
    context_yarn_factor: float = 2.0  # s: sequence length and RoPE wavelength are stretched by s
    context_learning_rate: float = 3e-4  # constant, the final pre-training LR (7.3e-6 in the report)
    sft_steps: int = 100  # post-training: supervised fine-tuning, loss on responses only
    sft_learning_rate: float = 3e-4  # cosine to sft_learning_rate·min_lr_ratio (5e-6 -> 1e-6 in the report)
    # post-training: reinforcement learning with GRPO on the task of minidsv3/tasks.py, after SFT (report §5.2;
    # minidsv3/rl.py). It starts from the SFT model, so it runs only when sft_steps > 0
    rl_steps: int = 0  # GRPO steps, one optimizer update per batch of rollouts; 0 = no RL
    rl_learning_rate: float = 2e-4  # constant; DeepSeekMath's 1e-6 is for 7B, 1e-3 collapsed a 0.8M-param prototype
    rl_prompts: int = 8  # P: prompts per step
    rl_samples: int = 8  # G: samples per prompt (a group), report §5.2.2
    rl_max_new_tokens: int = 24  # R: response budget, EOS included (the task's bodies take <= 20 tokens)
    rl_beta: float = 0.0  # β of the KL penalty, Eq. 26 (DeepSeekMath: 0.04; the V3 report gives none)
    rl_clip: float = 0.2  # ε of the clipped ratio, Eq. 26 (inactive with one update per batch, minidsv3/grpo.py)
    rl_aggregation: str = "dapo"  # how token terms are averaged: "grpo", "dapo" or "drgrpo" (minidsv3/grpo.py)
    rl_eval_prompts: int = 300  # held-out prompts scored before and after RL, at most the 300 of tasks.held_out_tasks
    # The SFT model must solve some tasks for GRPO to have a signal: at 1 % of pre-training tokens and 20 % of 40 SFT
    # steps' pairs (256 task pairs) the tiny model solved none of the held-out tasks; at 5 % and half of 80 steps'
    # pairs it solves some (docs/results.md)
    rl_task_tokens: float = 0.05  # share of the pre-training token stream that is task functions
    rl_task_pairs: float = 0.5  # share of the SFT pairs that are task pairs
    # bookkeeping
    eval_every: int = 100
    eval_batches: int = 4
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    max_skipped_steps: int = 10  # stop after this many steps in a row skipped for a NaN or inf loss or gradient
    sample_tokens: int = 120
    price_per_hour: float = 2.0  # USD per device-hour, report Table 1
    stop_after_steps: int = 0  # stop (with a checkpoint) after this global step, to continue later; 0 = run to the end


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh (minidsv3/sharding.py): data x expert devices, the experts split over `expert` (report §3.2.2:
    64-way expert parallelism). Several hosts: one process each, started with the same command plus its process_id."""

    data: int = 1  # devices a batch is split over, each with all the experts
    expert: int = 1  # EP: devices the routed experts are split over (the batch is split over them too)
    coordinator_address: str = ""  # host:port of process 0 for jax.distributed; "" = one process, or auto-detected
    num_processes: int = 1  # processes (hosts) in the run; > 1 calls jax.distributed.initialize
    process_id: int = 0  # this process, 0 .. num_processes-1; process 0 writes the logs, plots and reports


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()


# ---------------------------------------------------------------------------------------------------------------
# Loading: a TOML file, then the command line's overrides, then validation (the mechanics are in config_io.py)


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (or the defaults when `path` is None), apply `--section.field=value` overrides, validate
    the sections and the run they describe."""
    tables = read_toml(path) if path is not None else {}
    for text in overrides:
        apply_override(tables, text)
    return validate_run(from_dict(tables))


def from_dict(tables: dict) -> Config:
    """Build and validate a Config from {"model": {...}, "data": {...}, "train": {...}}."""
    return validate(build(Config, tables))


# Fields that say where a run lives and how it is kept, not what it trains: a run folder may be moved or copied, its
# corpus moved (manifest.json's hash checks the content) and its caches kept elsewhere, and a continuation may stop
# elsewhere, keep more checkpoints or tolerate more non-finite steps. bench/train_once.py reuses a finished run on the
# same terms. train.init_from is not among them: the weights a run starts from are part of what it trains.
NOT_RUN_DEFINING = {
    "data": ("path", "cache_dir"),
    "train": ("out_dir", "stop_after_steps", "keep_checkpoints", "max_skipped_steps"),
}


def run_defining(tables: dict) -> dict:
    """A config dict (as config.json stores it) minus NOT_RUN_DEFINING: what two runs must share to be the same run.
    The [mesh] table never is: every mesh computes the same steps, and a checkpoint restores onto any mesh."""
    return {
        section: {k: v for k, v in fields.items() if k not in NOT_RUN_DEFINING.get(section, ())}
        if isinstance(fields, dict) else fields
        for section, fields in tables.items() if section != "mesh"
    }  # fmt: skip


def load_model_config(path: str | Path) -> ModelConfig:
    """Just the [model] table of a TOML config (used by the accounting commands)."""
    return load(path).model
