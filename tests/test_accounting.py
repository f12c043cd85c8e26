"""Parameter and FLOP counts (minidsv3/flops.py), device peaks and the DeepSeek-V3 projection of Table 1
(minidsv3/accounting.py; report Table 1, [ISCA] Tables 2 and 4). The run's ledger is in tests/test_ledger.py."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minidsv3 import accounting, dispatch
from minidsv3.accounting import StagePlan
from minidsv3.config import load_model_config
from minidsv3.flops import count_params, flops_per_token
from minidsv3.ledger import mfu

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Hand counts for the conftest config (D=32, V=97, 3 layers of which the first is dense, H=2, q_lora_rank=24,
# kv_lora_rank=16, qk_nope=8, qk_rope=4, v=8, intermediate 48, experts 16 wide, E=8, K=2, one shared, one MTP module).
#   attention matmuls: q_a 32·24=768, q_b 24·2·12=576, kv_a 32·(16+4)=640, kv_b 16·2·(8+8)=512, o 2·8·32=512 -> 3008
#   attention norms 24+16=40; block norms 2·32=64                        -> every block starts at 3008+40+64 = 3112
#   dense MLP 3·32·48 = 4608                                             -> dense block 7720
#   one expert 3·32·16 = 1536; router 8·32 = 256                         -> MoE block 3112+256+9·1536 = 17192
#                                                                           active 3112+256+3·1536 = 7976
#   embedding = head = 97·32 = 3104; final norm 32
ATTN = 3008
TOTAL = 3104 + 3104 + 32 + 7720 + 2 * 17192  # 48344
ACTIVE = 3104 + 3104 + 32 + 7720 + 2 * 7976  # 29912
MTP_OWN = 32 + 32 + 2 * 32 * 32 + 32  # enorm, hnorm, eh_proj, norm = 2144
MTP = MTP_OWN + 17192  # 19336
MTP_ACTIVE = MTP_OWN + 7976 + 2 * 3104  # 16328, with the shared embedding and head


def test_tiny_config_parameter_counts_match_the_hand_count(cfg):
    p = count_params(cfg)
    assert p.total == TOTAL == 48344
    assert p.active == ACTIVE == 29912
    assert p.active_no_embedding == ACTIVE - 3104
    assert p.mtp == MTP == 19336
    assert p.mtp_active == MTP_ACTIVE == 16328
    assert (p.router_bias, p.mtp_router_bias) == (2 * 8, 8)


def test_query_without_compression_counts_one_q_proj(cfg):
    # q_proj 32·2·12 = 768 replaces q_a 768 + q_a_layernorm 24 + q_b 576 = 1368, in all 3 layers and the MTP block
    no_lora = dataclasses.replace(cfg, q_lora_rank=0)
    assert count_params(cfg).total - count_params(no_lora).total == 3 * (1368 - 768)
    assert count_params(cfg).mtp - count_params(no_lora).mtp == 1368 - 768


def test_tied_embeddings_drop_the_head(cfg):
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    assert count_params(cfg).total - count_params(tied).total == 3104
    assert count_params(tied).mtp_active == MTP_ACTIVE  # the head is still applied, as the embedding matrix


# Forward FLOPs per token at T = 8, causal: query t sees t keys, (8+1)/2 = 4.5 on average.
#   attention projections 2·3008 = 6016 per layer, ×3                  = 18048
#   scores 2·H·12·4.5 = 216 per layer, ×3                               =   648
#   values 2·H·8·4.5 = 144 per layer, ×3                                =   432
#   dense MLP 2·4608                                                    =  9216
#   router 2·256 = 512 per MoE layer, ×2                                =  1024
#   routed 2·K·1536 = 6144 per MoE layer, ×2                            = 12288
#   shared 2·1536 = 3072, ×2                                            =  6144
#   head 2·32·97                                                        =  6208
#   main model                                                          = 54008
# MTP (k=1), run over all 8 positions as minidsv3/mtp.py does: eh_proj 2·64·32 = 4096, projections 6016, scores 216,
#   values 144, router 512, routed 6144, shared 3072, head 6208                                  = 26408
MAIN_FWD, MTP_FWD = 54008, 26408


def test_tiny_config_forward_flops_match_the_hand_count(cfg):
    f = flops_per_token(cfg, 8, training=False)
    terms = (f.attn_proj, f.attn_scores, f.attn_values, f.dense_mlp, f.router, f.routed_experts, f.shared_experts)
    assert terms == (18048, 648, 432, 9216, 1024, 12288, 6144)
    assert f.head == 6208
    assert f.main == MAIN_FWD
    assert f.mtp == MTP_FWD
    assert f.total == MAIN_FWD + MTP_FWD


def test_training_costs_three_forward_passes(cfg):
    assert flops_per_token(cfg, 8).total == 3 * (MAIN_FWD + MTP_FWD) == 241248


def test_non_causal_attention_sees_every_key(cfg):
    # T = 8 keys instead of 4.5: scores 2·2·12·8·3 = 1152, values 2·2·8·8·3 = 768; the rest unchanged
    f = flops_per_token(cfg, 8, causal=False, include_mtp=False, training=False)
    assert (f.attn_scores, f.attn_values) == (1152, 768)
    assert f.main == MAIN_FWD - 648 - 432 + 1152 + 768
    assert f.mtp == 0


def test_deepseek_v3_has_671b_parameters_37b_active_and_an_11_5b_mtp_module():
    p = count_params(load_model_config(CONFIGS / "deepseek_v3.toml"))
    np.testing.assert_allclose(p.total, 671e9, rtol=0.005)  # [R] §1
    np.testing.assert_allclose(p.active, 37e9, rtol=0.03)  # [R] §1 (37.55B counted, notes §5)
    np.testing.assert_allclose(p.active - p.active_no_embedding, 129280 * 7168)  # the 0.927B embedding
    np.testing.assert_allclose(p.mtp, 11.5e9, rtol=0.01)  # [G] README_WEIGHTS (11.61B counted, notes §3)
    np.testing.assert_allclose(p.mtp_active, 2.4e9, rtol=0.06)  # [G] README_WEIGHTS (2.54B counted, notes §3)


def test_deepseek_v2_has_236b_parameters_and_21b_active():
    p = count_params(load_model_config(CONFIGS / "deepseek_v2.toml"))
    np.testing.assert_allclose(p.total, 236e9, rtol=0.005)  # [V2] abstract
    np.testing.assert_allclose(p.active, 21e9, rtol=0.03)
    assert p.mtp == 0


def test_deepseek_v3_trains_at_250_gflop_per_token_at_4k():
    f = flops_per_token(load_model_config(CONFIGS / "deepseek_v3.toml"), 4096)
    np.testing.assert_allclose(f.main, 250e9, rtol=0.03)  # [ISCA] Table 2
    # [ISCA] Table 4: non-causal / causal TFLOPS 432 / 385 at the same throughput
    full = flops_per_token(load_model_config(CONFIGS / "deepseek_v3.toml"), 4096, causal=False)
    np.testing.assert_allclose(full.main / f.main, 432 / 385, rtol=0.01)


def test_deepseek_v2_trains_at_155_gflop_per_token_at_4k():
    f = flops_per_token(load_model_config(CONFIGS / "deepseek_v2.toml"), 4096)
    np.testing.assert_allclose(f.main, 155e9, rtol=0.05)  # [ISCA] Table 2


def test_the_deepseek_v3_preset_reproduces_table_1():
    p = accounting.DEEPSEEK_V3_PRESET
    cfg = load_model_config(p["config"])
    costs = accounting.project(cfg, p["plans"], device_count=2048, peak_flops=989.4e12)
    pretrain, context, sft = costs
    # 14.8T / 272.8B tokens per day = 54.25 days on 2048 GPUs = 2,666,604 GPU-hours (notes §7)
    np.testing.assert_allclose(pretrain.device_hours, 2664e3, rtol=0.01)
    np.testing.assert_allclose(pretrain.device_hours * 2.0, 5.328e6, rtol=0.01)
    total = sum(c.device_hours for c in costs)
    np.testing.assert_allclose(total, 2788e3, rtol=0.01)
    np.testing.assert_allclose(total * 2.0, 5.576e6, rtol=0.01)
    assert (context.device_hours, sft.device_hours) == (119e3, 5e3)
    # the same throughput at ~250 GFLOP/token is [ISCA] Table 4's 38.94 % causal MFU against a 989 TFLOP/s peak
    np.testing.assert_allclose(mfu(pretrain.flops, pretrain.device_hours, 989.4e12), 0.3894, rtol=0.01)
    # context extension: 2 × 1000 steps of 1920 × 32K and 480 × 128K tokens = 2 × 62.9B
    np.testing.assert_allclose(context.tokens, 2 * 62.91e9, rtol=1e-3)
    assert context.seq_lens == (32768, 131072) and sft.tokens is None and sft.flops is None


def test_the_preset_command_prints_table_1_and_the_context_mfu(capsys):
    accounting.main(["project", "--preset", "deepseek-v3"])
    out = capsys.readouterr().out
    assert "| Training Costs | Pre-Training | Context Extension | Post-Training | Total |" in out
    assert "| in H800 GPU Hours | 2667K | 119K | 5K | 2791K |" in out  # 2666.7K + 119K + 5K, notes §7
    assert "Context Extension:" in out and "implied MFU" in out


def test_projection_at_a_given_mfu_divides_flops_by_the_achieved_rate(cfg):
    # 1e6 tokens at T=8: 241248 FLOP each = 2.41248e11 FLOP; at 50 % of 1e9 FLOP/s -> 482.496 device-seconds
    plans = [StagePlan("pretrain", ((1e6, 8),), mfu=0.5)]
    (cost,) = accounting.project(cfg, plans, device_count=4, peak_flops=1e9, include_mtp=True)
    np.testing.assert_allclose(cost.flops, 2.41248e11)
    np.testing.assert_allclose(cost.device_hours, 482.496 / 3600)
    with pytest.raises(ValueError, match="exactly one"):
        accounting.project(cfg, [StagePlan("sft", ((1.0, 8),), mfu=0.5, hours=1.0)], device_count=1, peak_flops=1.0)


def test_gpu_names_map_to_the_peak_table_and_other_boards_are_measured():
    assert accounting._known_device("NVIDIA H100 80GB HBM3") == "H100"
    assert accounting._known_device("NVIDIA H200") == "H200"
    assert accounting._known_device("NVIDIA H800") == "H800"
    assert accounting._known_device("NVIDIA H100 PCIe") is None
    assert accounting._known_device("NVIDIA A100-SXM4-80GB") is None


def test_cpu_peak_probe_measures_a_plausible_rate():
    peak = accounting.measure_peak(0.2, size=256)
    assert 1e8 < peak < 1e14  # a 2-core CPU runs bf16 matmuls at ~0.5-0.9 TFLOP/s


def test_flops_command_prints_the_breakdown_and_the_mtp_line(capsys):
    accounting.main(["flops", str(CONFIGS / "deepseek_v3.toml"), "--seq-len", "4096"])
    out = capsys.readouterr().out
    main = next(line for line in out.splitlines() if line.startswith("= main model"))
    np.testing.assert_allclose(float(main.split()[-2]), 250, rtol=0.03)  # causal GFLOP, [ISCA] Table 2
    assert any(line.startswith("MTP modules") for line in out.splitlines())


# ---------------------------------------------------------------------------------------------------------------
# Agreement with the built model (minidsv3/model.py)


def _built_counts(cfg) -> tuple[int, int]:
    """(nnx.Param scalars, RouterBias scalars) of an abstract Transformer (nnx.eval_shape allocates nothing)."""
    from flax import nnx

    from minidsv3.model import Transformer
    from minidsv3.moe import RouterBias

    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    biases = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, RouterBias)))
    return params, biases


@pytest.mark.parametrize(
    "change",
    [{}, {"q_lora_rank": 0}, {"tie_word_embeddings": True}, {"n_shared_experts": 0}, {"first_k_dense_replace": 0},
     {"num_nextn_predict_layers": 2}, {"num_nextn_predict_layers": 0}],
)  # fmt: skip
def test_analytic_parameter_count_equals_the_built_models(cfg, change):
    cfg = dataclasses.replace(cfg, **change)
    p = count_params(cfg)
    assert _built_counts(cfg) == (p.total + p.mtp, p.router_bias + p.mtp_router_bias)


@pytest.mark.slow
def test_analytic_parameter_count_equals_the_built_deepseek_v3():
    # ~20 s of tracing: 682.6B = 671.0B + 11.6B of MTP ([HF] lists 685B: its MTP adds copies of embedding and head)
    cfg = load_model_config(CONFIGS / "deepseek_v3.toml")
    p = count_params(cfg)
    assert _built_counts(cfg) == (p.total + p.mtp, p.router_bias + p.mtp_router_bias)


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


needs_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="pins what XLA:CPU counts")


@needs_cpu
def test_analytic_forward_flops_agree_with_xla_cost_analysis_of_the_compiled_model(cfg):
    from flax import nnx

    from minidsv3.model import Transformer

    # Wider than the fixture so that matmuls dominate the O(D) work (norms, RoPE, softmax, SiLU) as in a real model.
    cfg = dataclasses.replace(
        cfg, hidden_size=256, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, intermediate_size=512, moe_intermediate_size=128, vocab_size=512, num_hidden_layers=2,
    )  # fmt: skip
    B, T = 2, 16
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))  # shapes suffice

    def forward(state, tokens):  # targets switch the MTP module on
        return nnx.merge(graphdef, state)(tokens, targets=tokens)

    xla = _xla_flops(forward, state, jnp.zeros((B, T), jnp.int32))
    # Term by term, what the compiled forward runs against what we count:
    # - attention: mla.py computes the whole T×T score matrix and masks it, so compare with the non-causal count;
    # - routed experts: dispatch.dispatch multiplies more rows than the N·K we count, in a layout chosen at run time by a
    #   conditional whose cost XLA reports as that of its most expensive branch: N = 32 tokens, K = 2, E = 8, so
    #   capacity 16 (E·16 = 128 rows) or blocks of dispatch.block_size(64, 8) = 8 rows, (64 + 8·7) // 8 = 15 of them
    #   (120 rows): 128 rows for 64 assignments;
    # - the embedding lookup is a gather (no FLOPs in either);
    # - the rest XLA counts and we do not: norms, RoPE, softmax, SiLU, the router's top-k and the MTP loss, O(D) per
    #   token; under 2 % here (D = 256), ~8 % for the fixture's D = 32.
    f = flops_per_token(cfg, T, causal=False, training=False)
    routed_per_layer = 2 * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = cfg.num_moe_layers + cfg.num_nextn_predict_layers
    assignments = B * T * cfg.num_experts_per_tok
    assert dispatch.capacities(
        assignments // cfg.num_experts_per_tok, cfg.num_experts_per_tok, cfg.n_routed_experts
    ) == [16]
    assert dispatch.block_size(assignments, cfg.n_routed_experts) == 8
    padded_rows = max(cfg.n_routed_experts * 16, 15 * 8)
    as_compiled = f.total + (padded_rows / assignments - 1) * routed_per_layer * moe_layers  # per token
    assert as_compiled * B * T <= xla < 1.02 * as_compiled * B * T
