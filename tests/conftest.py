"""The one small config every module test builds on: tiny.toml's shape, shrunk so each test takes seconds."""

import pytest

from minidsv3.config import ModelConfig

SMALL = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=2,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    num_nextn_predict_layers=1,
    initializer_range=0.1,  # larger than the report's 0.006 so that tiny random models produce non-trivial outputs
)


@pytest.fixture
def cfg() -> ModelConfig:
    return SMALL
