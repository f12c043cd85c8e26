"""What a model is: its parameter count and its training FLOPs per token, both derived by hand from the config.

Report §1 and Table 1 (notes §7); [ISCA] Tables 2 and 4 for FLOPs per token; notes §5 for the parameter check.
minidsv3/accounting.py turns these into device-hours and Table 1.

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
"Active per token" replaces E routed experts by K. V3 gives 671.03B total and 37.55B active (notes §5).

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
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from minidsv3.config import ModelConfig

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
    mtp: int  # unique to the MTP modules, the shared embedding and head excluded (11.61B for V3, notes §3)
    mtp_active: int  # per token in the MTP modules, the shared embedding and head included (2.54B, notes §3)
    router_bias: int  # e_score_correction_bias of the main model's MoE layers
    mtp_router_bias: int  # ... and of the MTP modules' MoE layers


def count_params(cfg: ModelConfig) -> ParamCount:
    """Count every nnx.Param of the model, the MTP modules separately (notes §5 check: 671.03B / 37.55B / 11.61B)."""
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
