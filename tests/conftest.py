"""The one small config every module test builds on: tiny.toml's shape, shrunk so each test takes seconds."""

import json
import os

# Before jax starts its CPU backend (here and in every train.py these tests start, which inherit the environment):
# LLVM's optimization level 0 compiles ~2x faster, and compiling is most of this suite's time on 2 cores. The numbers
# computed can differ from the default level's in the last bits (how LLVM contracts multiplies and adds); the
# bit-for-bit tests compare runs made under the same flags.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import numpy as np
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


@pytest.fixture
def check_resume():
    """check(make, tokens_per_batch): a loader `make(seed)` saved after 5 batches (its state through JSON, as in a
    checkpoint's meta) and restored into one built with another seed delivers the same next 4 batches."""

    def check(make, tokens_per_batch: int) -> None:
        original = make(seed=5)
        for _ in range(5):
            original.next_batch()
        saved = json.loads(json.dumps(original.state_dict()))
        restored = make(seed=123)
        restored.load_state_dict(saved)
        assert restored.tokens_delivered == original.tokens_delivered == 5 * tokens_per_batch
        for _ in range(4):
            expected, got = original.next_batch(), restored.next_batch()
            for key in expected:
                np.testing.assert_array_equal(expected[key], got[key])

    return check


@pytest.fixture(scope="session")
def jax_cache_env(tmp_path_factory) -> dict:
    """The environment for train.py subprocesses: every start after the first with the same shapes loads its compiled
    steps from JAX's persistent compilation cache (a few seconds, not ~20 per start on 2 cores)."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}  # fmt: skip
