"""Config loading, overrides and validation (minidsv3/config.py)."""

import dataclasses
from pathlib import Path

import pytest

from minidsv3 import config, fp8
from minidsv3.config import ConfigError, ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_toml_has_exactly_the_architecture_the_issue_fixes():
    m = config.load(ROOT / "configs/tiny.toml").model
    expected = dict(  # noqa: C408  (keyword form reads like the TOML)
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=2,
        n_shared_experts=1, n_group=4, topk_group=2, num_nextn_predict_layers=1, tie_word_embeddings=False,
    )  # fmt: skip
    assert {k: getattr(m, k) for k in expected} == expected


@pytest.mark.parametrize("name", ["tiny", "small", "deepseek_v3", "deepseek_v2"])
def test_every_shipped_config_loads_and_validates(name):
    assert isinstance(config.load(ROOT / f"configs/{name}.toml"), config.Config)


def test_overrides_set_nested_fields_with_toml_typed_values(tmp_path):
    cfg = config.load(
        None,
        ["--train.pretrain_steps=7", "--model.fp8=true", "--data.path=some/dir", "--model.rope_scaling.factor=4"],
    )
    assert cfg.train.pretrain_steps == 7 and cfg.model.fp8 is True and cfg.data.path == "some/dir"
    assert cfg.model.rope_scaling == config.RopeScaling(factor=4.0)


def test_an_int_is_accepted_where_a_float_is_expected_but_not_the_reverse():
    assert config.load(None, ["--train.learning_rate=1"]).train.learning_rate == 1.0
    with pytest.raises(ConfigError, match="train.pretrain_steps: expected an integer"):
        config.load(None, ["--train.pretrain_steps=1.5"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("--model.hidden_size=0", "model.hidden_size"),
        ("--model.num_attention_heads=-1", "model.num_attention_heads"),
        ("--model.topk_group=5", "model.topk_group"),  # n_group = 4
        ("--model.n_routed_experts=18", "model.n_routed_experts"),  # not divisible by 4 groups
        ("--model.num_experts_per_tok=9", "model.num_experts_per_tok"),  # 2 groups x 4 experts = 8 reachable
        ("--model.qk_rope_head_dim=15", "model.qk_rope_head_dim"),
        ("--model.first_k_dense_replace=5", "model.first_k_dense_replace"),  # 4 layers
        ("--model.hidden_sise=5", "model.hidden_sise"),  # unknown key
        ("--model.hidden_size=abc", "model.hidden_size"),  # wrong type
        ("--model.fp8=1", "model.fp8"),  # wrong type: booleans are true/false
        ("--model.dtype=float16", "model.dtype"),
        ("--train.batch_size=0", "train.batch_size"),
        ("--train.adam_b2=1.0", "train.adam_b2"),
        ("--data.val_fraction=1.5", "data.val_fraction"),
        ("--nosection.x=1", "nosection"),
        ("--train.batch_ramp_start=16", "train.batch_ramp_start"),  # a ramp start needs the ramp's length in tokens
        ("--train.batch_ramp_tokens=1000", "train.batch_ramp_start"),  # ... and the reverse
        ("--train.final_fraction=0.5", "train.final_fraction"),  # longer than the tail it ends (0.05)
        ("--train.seed=-1", "train.seed"),  # numpy's generators refuse negative seeds
        ("--train.pretrain_steps=99999999999999999999", "train.pretrain_steps"),  # beyond 64 bits
        ('--data.path="a\\u0000b"', "data.path"),  # a NUL character: no file system takes it
        # across sections (config_checks.validate_run): the defaults have max_position_embeddings 4096 and seq_len 128
        ("--data.seq_len=5000", "data.seq_len"),
        ("--train.context_yarn_factor=40", "train.context_yarn_factor"),  # 128 x 40 = 5120 positions
        ("--train.sample_tokens=4093", "train.sample_tokens"),  # 4093 + the prompt's up to 4 tokens > 4096
        ("--model.vocab_size=257", "model.vocab_size"),  # the byte-level BPE needs 256 bytes + 2 special tokens
        ("--model.fp8_promotion_interval=48", "model.fp8_promotion_interval"),
    ],
)
def test_invalid_values_are_rejected_with_a_message_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    assert str(err.value).startswith(field), str(err.value)


def test_the_batch_ramp_starts_at_whole_micro_batches_below_the_full_batch():
    ramp = ["--train.batch_size=4", "--train.grad_accum_steps=3", "--train.batch_ramp_tokens=100"]
    assert config.load(None, [*ramp, "--train.batch_ramp_start=8"]).train.batch_ramp_start == 8
    for start in (6, 12):  # not a multiple of the 4-sequence micro-batch; not below the full 4 x 3 = 12
        with pytest.raises(ConfigError, match="train.batch_ramp_start: must be a multiple of batch_size"):
            config.load(None, [*ramp, f"--train.batch_ramp_start={start}"])


@pytest.mark.parametrize("name, ramp", [("tiny", (0, 0)), ("small", (0, 0)), ("deepseek_v3", (3072, 469 * 10**9))])
def test_the_batch_ramp_is_off_in_tiny_and_small_and_the_reports_in_deepseek_v3(name, ramp):
    tc = config.load(ROOT / f"configs/{name}.toml").train
    assert (tc.batch_ramp_start, tc.batch_ramp_tokens) == ramp
    if name == "deepseek_v3":  # [R] §4.2: 3,072 -> 15,360 sequences over the first 469B tokens
        assert tc.batch_size * tc.grad_accum_steps == 15360


def test_malformed_toml_and_missing_files_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nhidden_size = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is not a file"):
        config.load(tmp_path)
    bad.write_bytes("[model]\nhidden_size = 3  # 3 × 1\n".encode("utf-16"))  # TOML is UTF-8 by definition
    with pytest.raises(ConfigError, match=r"bad.toml: not UTF-8 text \(byte offset 0\); save the config as UTF-8"):
        config.load(bad)


def test_the_context_extension_length_must_fit_only_when_the_stage_runs():
    stretched = ["--data.seq_len=1024", "--train.context_yarn_factor=4"]  # 4096 positions: exactly the default limit
    assert config.load(None, stretched).train.context_yarn_factor == 4
    with pytest.raises(ConfigError, match=r"stretches data.seq_len to 1024 x 5.0 = 5120 positions.* must be <= 4, "):
        config.load(None, [stretched[0], "--train.context_yarn_factor=5"])
    assert config.load(None, ["--train.context_yarn_factor=40", "--train.context_steps=0"]).train.context_steps == 0


def test_config_accepts_exactly_the_promotion_intervals_the_fp8_accumulator_can_run():
    chunk, last = fp8.jnp.arange(8), fp8.jnp.arange(8) == 7
    for interval in (16, 32, 48, 64, 96, 100, 128, 256):
        try:
            fp8._promotion_flags(chunk, last, interval, fp8.MMA_K)
            runs = True
        except ValueError:
            runs = False
        try:
            config.load(None, [f"--model.fp8_promotion_interval={interval}"])
            accepted = True
        except ConfigError:
            accepted = False
        assert accepted == runs, interval


def test_a_run_is_defined_by_what_it_trains_not_where_its_folder_corpus_or_caches_live():
    here = config.to_dict(config.load(None, ["--train.out_dir=runs/a", "--data.path=corpus"]))
    moved = ["--train.out_dir=/elsewhere/b", "--data.path=/mnt/corpus", "--data.cache_dir=/tmp/c"]
    there = config.to_dict(config.load(None, [*moved, "--train.stop_after_steps=7"]))
    assert config.run_defining(here) == config.run_defining(there)
    for changed in ("--data.seq_len=64", "--data.split_seed=1", "--train.eval_every=5", "--model.fp8=true"):
        other = config.to_dict(config.load(None, ["--train.out_dir=runs/a", "--data.path=corpus", changed]))
        assert config.run_defining(here) != config.run_defining(other), changed


def test_a_saved_model_table_alone_is_a_valid_config_whatever_its_positions():
    # the checks across sections belong to a run's config (config.load); a checkpoint's [model] table stands alone
    small = config.to_dict(ModelConfig(max_position_embeddings=32))  # below the default seq_len of 128
    assert config.from_dict({"model": small}).model.max_position_embeddings == 32


def test_override_syntax_errors_say_how_to_write_one():
    with pytest.raises(ConfigError, match="--section.field=value"):
        config.load(None, ["train.pretrain_steps=3"])


def test_config_round_trips_through_a_plain_dict():
    cfg = config.load(None, ["--model.rope_scaling.factor=2"])
    assert config.from_dict(config.to_dict(cfg)) == cfg
    assert config.from_dict({"model": config.to_dict(cfg.model)}).model == cfg.model


def test_architecture_field_names_are_those_of_hugging_face_deepseek_v3_config():
    hf_names = {
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank",
        "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
        "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "rope_theta", "rope_scaling",
        "rms_norm_eps", "num_nextn_predict_layers", "max_position_embeddings", "tie_word_embeddings",
        "initializer_range",
    }  # fmt: skip
    assert hf_names <= {f.name for f in dataclasses.fields(ModelConfig)}
