"""Hugging Face checkpoints in and out: a run as `DeepseekV3ForCausalLM` safetensors, and DeepSeek-V3-architecture
checkpoints (bfloat16, float32, or the released FP8 blocks) into minidsv3.

    python -m minidsv3.hf export runs/tiny hf/tiny [--dtype bfloat16] [--force]   # then from_pretrained("hf/tiny")
    python -m minidsv3.hf import hf/tiny runs/imported                            # a run folder generate.py reads
    python train.py --train.init_from=hf/tiny --train.out_dir=runs/finetune       # fine-tune from it

How it works. minidsv3's attribute names are the release's tensor names ([G] README_WEIGHTS, [HF] config), so the
mapping is a rule on names, written once in `hf_names`: `layers.3.self_attn.q_b_proj.kernel` is
`model.layers.3.self_attn.q_b_proj.weight`, transposed (a minidsv3 kernel is (in, out), a torch Linear's weight
(out, in)). Three places differ:
- routed experts: minidsv3 stacks them (E, D, F); the files hold one tensor per expert,
  `mlp.experts.{e}.{gate,up,down}_proj.weight`, as released and as transformers 5 writes them (it fuses them into
  `gate_up_proj` (E, 2F, D) and `down_proj` (E, D, F) when it loads; a folder in that fused layout is read too).
- MTP module k (report §2.2) is stored as `model.layers.{num_hidden_layers + k}`: `enorm`, `hnorm`, `eh_proj`, a
  whole decoder layer, `shared_head.norm` and, as copies of the main model's, `embed_tokens` and `shared_head.head`
  (the release stores them per module; vLLM loads the first copy, transformers ignores the module). Import counts the
  MTP modules in the files, not in config.json (transformers saves a config that says 1 and no module), and takes
  the embedding and head from the main model.
- RoPE: minidsv3 rotates adjacent pairs (layers.apply_rope), the release's layout; exports say `rope_interleave:
  true`, and a folder saved with `rope_interleave: false` (halves rotated, `rotate_half`) has its rotary rows of
  q_b_proj and kv_a_proj_with_mqa permuted into pairs on the way in.

config.json is a `DeepseekV3Config` in the release's own keys (`rope_theta`, `rope_scaling` with "type": "yarn",
`topk_method`, `scoring_func`, `torch_dtype`), which transformers 4 and 5 and vLLM read; minidsv3's own fields (the
FP8 simulation, the matmul dtype) ride along under "minidsv3", so export -> import gives back the same ModelConfig.
Routing other than DeepSeek-V3's (sigmoid scores, the bias-corrected top-k "noaux_tc") is refused: a DeepSeek-V2
checkpoint's softmax routing is a function minidsv3 does not compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util
from tokenizers import Tokenizer

from minidsv3 import checkpoint, config, data
from minidsv3.ledger import Ledger
from minidsv3.model import Transformer
from minidsv3.safetensors_io import FormatError, read_folder, write_folder
from minidsv3.step import make_optimizer

# ModelConfig fields that DeepseekV3Config names the same (num_nextn_predict_layers: the MTP depth)
HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
    "norm_topk_prob", "first_k_dense_replace", "num_nextn_predict_layers", "rope_theta", "rope_scaling",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "initializer_range", "aux_loss_alpha",
)  # fmt: skip
OWN_FIELDS = tuple(f.name for f in dataclasses.fields(config.ModelConfig) if f.name not in HF_FIELDS)
ARCHITECTURES = ("deepseek_v3", "deepseek_v2")  # model_type values of the DeepSeek-V3 architecture family
DEFAULT_MAX_SHARD = 5 * 10**9  # bytes per safetensors shard, transformers' long-standing default
ROPE_KEYS = {"type", "rope_type", "rope_theta"} | {f.name for f in dataclasses.fields(config.RopeScaling)}


class HFError(ValueError):
    """A folder or option that cannot be exported or imported; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Names: minidsv3's state path -> the release's tensor names


def hf_names(path: tuple, cfg: config.ModelConfig) -> list[str]:
    """The tensor names of one minidsv3 array: one, or one per expert for the stacked routed experts (E, ...)."""
    parts = [str(p) for p in path]
    if parts[0] == "mtp":  # MTP module k is layer num_hidden_layers + k; its block's tensors sit directly in it
        rest = parts[3:] if parts[2] == "block" else ["shared_head", *parts[2:]] if parts[2] == "norm" else parts[2:]
        prefix, parts = f"model.layers.{cfg.num_hidden_layers + int(parts[1])}.", rest
    else:
        prefix = "" if parts[0] == "lm_head" else "model."
    name = prefix + ".".join(parts)
    if _parent(path) == "experts":  # layers.i.mlp.experts.gate_proj (E, D, F)
        base, proj = name.rsplit(".", 1)
        return [f"{base}.{e}.{proj}.weight" for e in range(cfg.n_routed_experts)]
    if parts[-1] == "kernel":
        return [name.removesuffix("kernel") + "weight"]
    return [f"{name}.weight" if parts[-1] == "embed_tokens" else name]  # the embedding is a bare Param


def _parent(path: tuple) -> str:
    """The name of the module holding the array at `path` ("" for a top-level array)."""
    return str(path[-2]) if len(path) > 1 else ""


def is_transposed(path: tuple) -> bool:
    """A kernel (in, out) and an expert's (D, F) or (F, D) are stored as torch's (out, in)."""
    return path[-1] == "kernel" or _parent(path) == "experts"


def mtp_copies(cfg: config.ModelConfig, depth: int) -> dict[str, str]:
    """The release's per-module copies of the shared embedding and head: name -> the main model's tensor name."""
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    copies = {}
    for k in range(depth):
        layer = f"model.layers.{cfg.num_hidden_layers + k}"
        copies |= {
            f"{layer}.embed_tokens.weight": "model.embed_tokens.weight",
            f"{layer}.shared_head.head.weight": head,
        }
    return copies


def _flat_state(model: Transformer) -> dict[tuple, object]:
    """{path: array} of every variable: parameters and the router biases (RouterBias)."""
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))


# ---------------------------------------------------------------------------------------------------------------
# Export


def save(
    model: Transformer, out_dir: str | Path, tokenizer: Tokenizer | None = None, *, dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD, force: bool = False,
) -> Path:  # fmt: skip
    """Write `model` (and its tokenizer) to `out_dir` as a DeepseekV3ForCausalLM folder; return its path.

    Written into a temporary folder next to `out_dir` and renamed into place: an error leaves nothing half-written.
    A non-empty `out_dir` is refused unless `force`, and then replaced whole."""
    if dtype not in ("float32", "bfloat16"):
        raise HFError(f"--dtype {dtype}: must be float32 or bfloat16")
    if max_shard_bytes <= 0:
        raise HFError(f"--max-shard-size {max_shard_bytes}: must be > 0")
    out_dir = _check_target(Path(out_dir), force)
    cfg = model.cfg
    tensors = {}
    for path, x in _flat_state(model).items():
        x = np.asarray(x)
        # the router's weight and bias stay float32 (transformers keeps them so: _keep_in_fp32_modules_strict)
        stored = np.float32 if _parent(path) == "gate" or dtype == "float32" else ml_dtypes.bfloat16
        for e, name in enumerate(hf_names(path, cfg)):
            y = x[e] if _parent(path) == "experts" else x
            tensors[name] = np.ascontiguousarray((y.T if is_transposed(path) else y).astype(stored))
    for name, main in mtp_copies(cfg, cfg.num_nextn_predict_layers).items():
        tensors[name] = tensors[main]
    ids = _special_ids(tokenizer)

    def write(tmp: Path) -> None:
        write_folder(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config_json(cfg, dtype, ids), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2))
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_str())
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(cfg, ids), indent=2))

    _write_atomically(out_dir, write)
    return out_dir


def config_json(cfg: config.ModelConfig, dtype: str, ids: dict) -> dict:
    """config.json of a DeepseekV3ForCausalLM with this architecture, in the release's keys."""
    fields = config.to_dict(cfg)
    hf = {k: fields.get(k) for k in HF_FIELDS}  # rope_scaling None when the run never used YaRN
    hf["q_lora_rank"] = cfg.q_lora_rank or None  # the release's "no query compression"
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **hf,
        "num_key_value_heads": cfg.num_attention_heads, "hidden_act": "silu", "attention_bias": False,
        "rope_interleave": True, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1,
        "torch_dtype": dtype, **{k: v for k, v in ids.items() if k != "pad_token_id"},
        "minidsv3": {k: fields[k] for k in OWN_FIELDS},
    }  # fmt: skip


def tokenizer_config(cfg: config.ModelConfig, ids: dict) -> dict:
    """tokenizer_config.json: AutoTokenizer builds a PreTrainedTokenizerFast around tokenizer.json."""
    special = {data.EOT: ("bos_token", "eos_token"), data.PAD: ("pad_token",)}
    tokens = {role: token for token, roles in special.items() for role in roles if f"{role}_id" in ids}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", **tokens, "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }  # fmt: skip


def _special_ids(tokenizer: Tokenizer | None) -> dict:
    """bos/eos = <|endoftext|> (documents are separated by it, data.py), pad = <|pad|>, where the tokenizer has them."""
    if tokenizer is None:
        return {}
    eot, pad = tokenizer.token_to_id(data.EOT), tokenizer.token_to_id(data.PAD)
    ids = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": pad}
    return {k: v for k, v in ids.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------------
# Import


def load(folder: str | Path) -> tuple[Transformer, Tokenizer | None]:
    """The model of a Hugging Face folder (single file or sharded; per-expert or fused experts; bfloat16, float32 or
    FP8 with weight_scale_inv blocks) and its tokenizer (None without tokenizer.json). Raises HFError naming the
    problem: no config.json, another architecture, missing or unexpected tensors, a wrong shape or dtype."""
    folder = Path(folder)
    hf = _read_config(folder)
    block = tuple((hf.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    try:
        tensors = read_folder(folder, block)
    except FormatError as e:
        raise HFError(str(e)) from None
    tensors = _split_fused_experts(tensors)
    depth = len({int(m[1]) for n in tensors if (m := re.match(r"model\.layers\.(\d+)\.", n))} - set(
        range(hf.get("num_hidden_layers", 0))
    ))  # fmt: skip
    cfg = model_config(hf, depth, folder / "config.json")
    if hf.get("rope_interleave", True) is False:
        tensors = _halves_to_pairs(tensors, cfg)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # shapes only; the files give the values
    flat = _flat_state(model)
    expected = {name: path for path in flat for name in hf_names(path, cfg)}
    optional = set(mtp_copies(cfg, depth)) | {n for n in tensors if n.endswith("rotary_emb.inv_freq")}
    _check_names(folder, set(tensors), set(expected), optional)
    values = {}
    for path, abstract in flat.items():
        names = hf_names(path, cfg)
        want = abstract.shape[1:] if _parent(path) == "experts" else abstract.shape
        want = want[::-1] if is_transposed(path) else want
        for name in names:
            if tensors[name].shape != want:
                raise HFError(
                    f"{folder}: {name} has shape {tensors[name].shape}, expected {want} from config.json; the weights"
                    " and config.json come from different models"
                )
        arrays = [tensors[n].T if is_transposed(path) else tensors[n] for n in names]  # per expert (D, F) etc.
        values[path] = jax.numpy.asarray(np.stack(arrays) if _parent(path) == "experts" else arrays[0])
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    nnx.update(model, state)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.encode_special_tokens = True  # as data.load_or_train_tokenizer: "<|endoftext|>" in a text is text
    return model, tokenizer


def with_architecture(cfg: config.Config, arch: config.ModelConfig) -> tuple[config.Config, list[str]]:
    """`cfg` with its [model]'s architecture (HF_FIELDS) replaced by `arch`'s, checked again as a run
    (train.init_from: the weights decide the shapes); minidsv3's own fields (dtype, FP8) stay the run's. Also
    returns what changed, as "field old -> new"."""
    tables, theirs = config.to_dict(cfg), config.to_dict(arch)  # a None field (rope_scaling) is left out
    ours = tables["model"]
    changed = [f"{k} {ours.get(k)} -> {theirs.get(k)}" for k in HF_FIELDS if ours.get(k) != theirs.get(k)]
    tables["model"] = {k: v for k, v in ours.items() if k not in HF_FIELDS} | {
        k: theirs[k] for k in HF_FIELDS if k in theirs
    }
    return config.validate_run(config.from_dict(tables)), changed


def is_hf_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a Hugging Face model (its config.json names a model_type), not a minidsv3 run folder."""
    try:
        return "model_type" in json.loads((Path(folder) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def _read_config(folder: Path) -> dict:
    """config.json as a dict, after checking that it describes the DeepSeek-V3 architecture."""
    path = folder / "config.json"
    if not path.is_file():
        raise HFError(f"{folder}: no config.json, so not a Hugging Face model folder; give the folder that holds it")
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HFError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(hf, dict) or hf.get("model_type") not in ARCHITECTURES:
        kind = hf.get("model_type") if isinstance(hf, dict) else None
        arch = ",".join(hf.get("architectures") or []) if isinstance(hf, dict) else ""
        raise HFError(
            f"{path}: model_type {kind!r} ({arch or 'no architectures'}) is not DeepSeek-V3; minidsv3 reads"
            f" checkpoints of model_type {' or '.join(ARCHITECTURES)} only"
        )
    return hf


def model_config(hf: dict, depth: int, where: Path) -> config.ModelConfig:
    """The ModelConfig of a config.json (with `depth` MTP modules, as found in the files)."""
    same_function = {  # fields that would make the checkpoint compute another function than minidsv3's
        "hidden_act": "silu", "scoring_func": "sigmoid", "topk_method": "noaux_tc", "attention_bias": False,
        "moe_layer_freq": 1,
    }  # fmt: skip
    for key, ours in same_function.items():
        if key in hf and hf[key] != ours:
            raise HFError(f"{where}: {key} = {hf[key]!r}, but minidsv3 computes DeepSeek-V3's {key} = {ours!r}")
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5 keeps rope_theta and the scaling here
    theta = hf.get("rope_theta", rope.get("rope_theta"))
    scaling = hf.get("rope_scaling") or rope
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind not in ("default", "yarn") or set(scaling) - ROPE_KEYS:
        unknown = sorted(set(scaling) - ROPE_KEYS) or [kind]
        raise HFError(f"{where}: rope scaling {', '.join(map(str, unknown))} is not supported (plain RoPE or YaRN)")
    values = {k: hf[k] for k in HF_FIELDS if k in hf and k not in ("rope_theta", "rope_scaling")}
    values |= {"num_nextn_predict_layers": depth, "q_lora_rank": hf.get("q_lora_rank") or 0}
    if theta is not None:
        values["rope_theta"] = theta
    if kind == "yarn":
        values["rope_scaling"] = {k: v for k, v in scaling.items() if k not in ("rope_type", "rope_theta")}
        values["rope_scaling"]["type"] = "yarn"
    missing = [k for k in HF_FIELDS if k not in values and k not in ("rope_scaling", "aux_loss_alpha")]
    if missing:
        raise HFError(f"{where}: lacks {', '.join(missing[:4])}; a DeepseekV3Config names every architecture field")
    values |= {k: v for k, v in (hf.get("minidsv3") or {}).items() if k in OWN_FIELDS}
    try:
        return config.from_dict({"model": values}).model
    except config.ConfigError as e:
        raise HFError(f"{where}: {e}") from None


def _split_fused_experts(tensors: dict) -> dict:
    """transformers 5's fused layout, `experts.gate_up_proj` (E, 2F, D) and `experts.down_proj` (E, D, F), as the
    per-expert tensors of the release."""
    out = {}
    for name, x in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj") and x.ndim == 3:
            f = x.shape[1] // 2  # gate rows first: transformers chunks the product into (gate, up)
            base = name.removesuffix("gate_up_proj")
            out |= {f"{base}{e}.gate_proj.weight": x[e, :f] for e in range(x.shape[0])}
            out |= {f"{base}{e}.up_proj.weight": x[e, f:] for e in range(x.shape[0])}
        elif name.endswith("mlp.experts.down_proj") and x.ndim == 3:
            base = name.removesuffix("down_proj")
            out |= {f"{base}{e}.down_proj.weight": x[e] for e in range(x.shape[0])}
        else:
            out[name] = x
    return out


def _halves_to_pairs(tensors: dict, cfg: config.ModelConfig) -> dict:
    """Rotary rows in rotate_half's layout (dims j and j + R/2 rotate together) permuted into adjacent pairs (2j,
    2j + 1): row 2j takes row j, row 2j + 1 takes row j + R/2, in each head of q_b_proj (q_proj) and in the k^R
    rows of kv_a_proj_with_mqa."""
    r, x = cfg.qk_rope_head_dim, cfg.qk_head_dim
    pairs = np.stack([np.arange(r // 2), np.arange(r // 2) + r // 2], axis=-1).reshape(r)  # (R,) [0, R/2, 1, ...]
    out = dict(tensors)
    for name, w in tensors.items():
        if name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
            heads = w.reshape(-1, x, w.shape[-1])  # (H, X, in): per head [q^C | q^R]
            out[name] = np.concatenate([heads[:, :-r], heads[:, -r:][:, pairs]], axis=1).reshape(w.shape)
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):  # (C + R, D): [c^KV | k^R]
            out[name] = np.concatenate([w[:-r], w[-r:][pairs]])
    return out


def _check_names(folder: Path, found: set, expected: set, optional: set) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected - optional)
    for what, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise HFError(
                f"{folder}: {len(names)} {what} tensor{'s' * (len(names) > 1)} ({', '.join(names[:3])}{more}); the"
                " weights do not match config.json's DeepSeek-V3 architecture"
            )


# ---------------------------------------------------------------------------------------------------------------
# A run folder from an imported model, and writing folders whole


def import_run(folder: str | Path, run_dir: str | Path, *, force: bool = False) -> Path:
    """A run folder (config.json, a step-0 checkpoint) holding the model and tokenizer of a Hugging Face folder, so
    that `python -m minidsv3.generate RUN_DIR` samples from it and `export` writes it back."""
    run_dir = _check_target(Path(run_dir), force)
    model, tokenizer = load(folder)
    if tokenizer is None:
        raise HFError(f"{folder}: no tokenizer.json; a run folder needs the model's tokenizer")
    # the checkpoint of a run trained for 0 steps: [data] and [train] are the defaults, no stage to run
    stages_off = {"out_dir": str(run_dir), "pretrain_steps": 0, "context_steps": 0, "sft_steps": 0}
    resolved = config.to_dict(config.from_dict({"model": config.to_dict(model.cfg), "train": stages_off}))
    meta = {
        "step": 0, "loaders": {}, "ledger": Ledger("none (imported)", 0.0, False).to_dict(), "config": resolved,
        "model_config": config.to_dict(model.cfg), "tokenizer": tokenizer.to_str(),
        "imported_from": str(Path(folder).absolute()),
    }  # fmt: skip

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(resolved, indent=2))
        train_cfg = config.from_dict({"train": stages_off}).train
        checkpoint.save(tmp, 0, model, make_optimizer(model, train_cfg), meta, keep=1)  # a fresh optimizer state

    _write_atomically(run_dir, write)
    return run_dir


def _check_target(target: Path, force: bool) -> Path:
    target = target.absolute()
    if target.exists() and not target.is_dir():
        raise HFError(f"{target}: exists and is not a folder; choose another path")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise HFError(f"{target}: not empty; choose another folder, or pass --force to replace it")
    existing = next(p for p in (target.parent, *target.parent.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HFError(f"{existing}: not writable; choose another folder")
    return target


def _write_atomically(target: Path, write) -> None:
    """write(tmp) into a fresh folder beside `target`, then rename it to `target` (replacing what was there)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f"{tmp.name}.old")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    """'5GB', '200MB', '64KB' or a byte count -> bytes."""
    m = re.fullmatch(r"(\d+)\s*([KMG]B)?", text.strip().upper())
    if not m:
        raise HFError(f"--max-shard-size {text!r}: give bytes, or a number with KB, MB or GB (e.g. 5GB)")
    return int(m[1]) * {None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m[2]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minidsv3.hf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a run folder -> a DeepseekV3ForCausalLM folder")
    ex.add_argument("run_dir", type=Path)
    ex.add_argument("out_dir", type=Path)
    ex.add_argument("--dtype", default="float32", help="float32 or bfloat16 (the router stays float32)")
    ex.add_argument("--max-shard-size", default="5GB", help="split the weights into shards of at most this size")
    ex.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    im = sub.add_parser("import", help="a Hugging Face DeepSeek-V3 folder -> a run folder")
    im.add_argument("folder", type=Path)
    im.add_argument("run_dir", type=Path)
    im.add_argument("--force", action="store_true", help="replace a non-empty RUN_DIR")
    a = p.parse_args(argv)
    try:
        if a.command == "export":
            from minidsv3.run import load_run

            shard = parse_size(a.max_shard_size)
            _check_target(a.out_dir, a.force)  # before the slow loading
            model, tokenizer, step = load_run(a.run_dir)
            out = save(model, a.out_dir, tokenizer, dtype=a.dtype, max_shard_bytes=shard, force=a.force)
            print(f"wrote {out} from the checkpoint of step {step}")
        else:
            print(f"wrote {import_run(a.folder, a.run_dir, force=a.force)}")
    except (HFError, checkpoint.CheckpointError, config.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
