"""Hugging Face checkpoints in and out (minidsv3/hf.py, minidsv3/safetensors_io.py): bit-identical round trips, the
released FP8 layout, transformers 5's fused experts, every bad input, and parity with transformers'
DeepseekV3ForCausalLM (skipped without the `[peer]` extra: `pip install -e ".[dev,peer]" && pytest tests/test_hf.py`).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from test_train import train

from minidsv3 import config, data, generate, hf
from minidsv3.generate import run
from minidsv3.model import Transformer, routers, with_config
from minidsv3.run import load_run
from minidsv3.safetensors_io import SINGLE, read_file, read_folder, write_file

TINY = config.ModelConfig(
    vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
    num_nextn_predict_layers=1, max_position_embeddings=128, initializer_range=0.1,
)  # fmt: skip
YARN = dataclasses.replace(TINY, rope_scaling=config.RopeScaling(factor=4.0, original_max_position_embeddings=16))


@pytest.fixture(scope="module")
def model() -> Transformer:
    """A random model whose router biases are non-zero, negative ones included (a 0-filled group mask would fail).
    Built once: on a 2-core CPU most of these tests' time is jax compiling the model's operations."""
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for r in routers(model):
        bias = rng.normal(0.0, 0.2, r.e_score_correction_bias.shape).astype(np.float32)  # (E,)
        assert (bias < 0).any() and (bias > 0).any()
        r.e_score_correction_bias[...] = jnp.asarray(bias)
    return model


logits = nnx.jit(lambda model, ids: model(ids)[0])  # (B, T) -> (B, T, V), one compilation per config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 20
    docs = [data.Document(f"f{i}.py", text.replace("a", chr(97 + i))) for i in range(6)]
    return data.load_or_train_tokenizer(docs, 300, tmp_path_factory.mktemp("tok"))


def leaves(model: Transformer) -> dict:
    return jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]


def assert_same_state(a: Transformer, b: Transformer) -> None:
    pairs = list(zip(leaves(a), leaves(b), strict=True))
    for (path_a, x), (path_b, y) in pairs:
        assert path_a == path_b
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path_a))


# ---------------------------------------------------------------------------------------------------------------
# Round trips


def test_export_then_import_is_bit_identical_params_router_biases_config_and_tokenizer(tmp_path, tokenizer, model):
    model = with_config(model, YARN)
    out = hf.save(model, tmp_path / "out", tokenizer)
    back, tok = hf.load(out)
    assert_same_state(model, back)  # the RouterBias variables are among the leaves
    np.testing.assert_array_equal(  # and checked by name: they are not nnx.Params
        np.asarray(routers(back)[0].e_score_correction_bias[...]),
        np.asarray(routers(model)[0].e_score_correction_bias[...]),
    )
    assert back.cfg == model.cfg
    assert tok.to_str() == tokenizer.to_str()
    names = read_file(out / SINGLE)
    assert names["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names  # per-expert, as released
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight"} <= set(names)  # MTP at L + 0
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["rope_scaling"]["type"] == "yarn" and hf_config["rope_interleave"] is True


def test_run_folder_import_then_export_reproduces_the_files_in_shards(tmp_path, tokenizer, model):
    first = hf.save(model, tmp_path / "first", tokenizer)
    hf.main(["import", str(first), str(tmp_path / "run")])
    restored, tok, step = load_run(tmp_path / "run")  # what `python -m minidsv3.generate RUN_DIR` reads
    assert step == 0 and tok.to_str() == tokenizer.to_str()
    assert_same_state(model, restored)
    hf.main(["export", str(tmp_path / "run"), str(tmp_path / "second"), "--max-shard-size", "100KB"])
    shards = sorted((tmp_path / "second").glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "second" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size < 100_000 + 2**16 for s in shards)  # header + at most one tensor past the limit
    a, b = read_folder(first), read_folder(tmp_path / "second")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bfloat16_export_rounds_weights_and_keeps_the_router_in_float32(tmp_path, model):
    out = hf.save(model, tmp_path / "bf16", dtype="bfloat16")
    stored = read_file(out / SINGLE)
    assert stored["model.layers.0.self_attn.q_a_proj.weight"].dtype == ml_dtypes.bfloat16
    assert stored["model.layers.1.mlp.gate.weight"].dtype == np.float32
    back, _ = hf.load(out)
    kernel = np.asarray(model.layers[0].self_attn.q_a_proj.kernel[...])
    np.testing.assert_array_equal(
        np.asarray(back.layers[0].self_attn.q_a_proj.kernel[...]), kernel.astype(ml_dtypes.bfloat16).astype(np.float32)
    )
    np.testing.assert_array_equal(np.asarray(back.layers[1].mlp.gate.weight[...]), model.layers[1].mlp.gate.weight[...])


def test_fp8_checkpoint_imports_as_its_dequantized_weights_exactly(tmp_path, model):
    """The released layout: float8_e4m3fn weights, a float32 weight_scale_inv per block (16 x 16 here, so that the
    24-row kv_a_proj_with_mqa has a ragged last block), embedding, head, router and norms unquantized."""
    hf.save(model, tmp_path / "f32")
    tensors = read_file(tmp_path / "f32" / SINGLE)
    fp8, expected, block = {}, {}, 16
    for name, w in tensors.items():
        if not name.endswith("_proj.weight"):  # embed_tokens, lm_head, shared_head.head, gate, norms stay as they are
            fp8[name] = expected[name] = w
            continue
        rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
        scale_inv = np.zeros((rows, cols), np.float32)
        q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
        deq = np.zeros(w.shape, np.float32)
        for i in range(rows):  # block by block, the way DeepSeek's weight_dequant kernel reads it
            for j in range(cols):
                tile = np.s_[i * block : (i + 1) * block, j * block : (j + 1) * block]
                scale_inv[i, j] = np.abs(w[tile]).max() / 448.0  # E4M3's largest finite value
                q[tile] = np.clip(w[tile] / scale_inv[i, j], -448, 448).astype(ml_dtypes.float8_e4m3fn)
                deq[tile] = q[tile].astype(np.float32) * scale_inv[i, j]
        fp8 |= {name: q, f"{name}_scale_inv": scale_inv}
        expected[name] = deq
    (tmp_path / "fp8").mkdir()
    write_file(tmp_path / "fp8" / SINGLE, fp8)
    hf_config = json.loads((tmp_path / "f32" / "config.json").read_text())
    hf_config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(hf_config))
    imported, _ = hf.load(tmp_path / "fp8")
    hf.save(imported, tmp_path / "back")
    got = read_file(tmp_path / "back" / SINGLE)
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert not np.array_equal(
        expected["model.layers.0.mlp.up_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"]
    )


def test_fused_expert_layout_imports_like_the_per_expert_one(tmp_path, model):
    hf.save(model, tmp_path / "per_expert")
    tensors = read_file(tmp_path / "per_expert" / SINGLE)
    fused = {}
    for name, w in tensors.items():
        if ".mlp.experts." not in name:
            fused[name] = w
        elif name.endswith(".0.gate_proj.weight"):  # one fused pair per layer, as transformers 5 holds them
            base = name.removesuffix("0.gate_proj.weight")
            experts = range(TINY.n_routed_experts)
            gate_up = [np.concatenate([tensors[f"{base}{e}.gate_proj.weight"], tensors[f"{base}{e}.up_proj.weight"]])
                       for e in experts]  # fmt: skip
            fused[f"{base}gate_up_proj"] = np.stack(gate_up)  # (E, 2F, D)
            fused[f"{base}down_proj"] = np.stack([tensors[f"{base}{e}.down_proj.weight"] for e in experts])  # (E, D, F)
    (tmp_path / "fused").mkdir()
    write_file(tmp_path / "fused" / SINGLE, fused)
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    back, _ = hf.load(tmp_path / "fused")
    assert_same_state(model, back)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def rewrite(folder, edit) -> None:
    """Apply `edit` to the tensors of folder/model.safetensors."""
    tensors = dict(read_file(folder / SINGLE))
    edit(tensors)
    write_file(folder / SINGLE, {k: np.array(v) for k, v in tensors.items()})


@pytest.fixture(scope="module")
def good(tmp_path_factory, tokenizer, model):
    return hf.save(model, tmp_path_factory.mktemp("good") / "hf", tokenizer)


def broken(tmp_path, good, how: str):
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in good.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    if how == "no config.json":
        (folder / "config.json").unlink()
    elif how == "llama":
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    elif how == "missing":
        rewrite(folder, lambda t: t.pop("model.norm.weight"))
    elif how == "unexpected":
        rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
    elif how == "shape":
        rewrite(folder, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    elif how == "dtype":  # F32 -> I32 in the header: same size, a dtype no DeepSeek checkpoint holds
        raw = (folder / SINGLE).read_bytes()
        (folder / SINGLE).write_bytes(raw.replace(b'"dtype":"F32"', b'"dtype":"I32"', 1))
    return folder


@pytest.mark.parametrize(
    "how, says",
    [
        ("no config.json", "no config.json"),
        ("llama", "model_type 'llama' (LlamaForCausalLM) is not DeepSeek-V3"),
        ("missing", "1 missing tensor (model.norm.weight)"),
        ("unexpected", "1 unexpected tensor (model.layers.0.self_attn.extra.weight)"),
        ("shape", "model.norm.weight has shape (63,), expected (64,)"),
        ("dtype", "is I32, a dtype minidsv3 does not read"),
    ],
)
def test_bad_checkpoint_is_one_line_exit_2_and_no_run_folder(tmp_path, good, capsys, how, says):
    folder = broken(tmp_path, good, how)
    with pytest.raises(SystemExit) as e:
        hf.main(["import", str(folder), str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.*"))  # no temporary folder left either


def test_export_into_a_non_empty_folder_needs_force(tmp_path, good, capsys):
    hf.main(["import", str(good), str(tmp_path / "run")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        hf.main(["export", str(tmp_path / "run"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not empty" in err and "--force" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    hf.main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--force"])
    assert not (tmp_path / "out" / "notes.txt").exists() and (tmp_path / "out" / SINGLE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no temporary or set-aside folder left


def test_generate_samples_from_a_hugging_face_folder_as_from_the_model(good, model, tokenizer, capsys):
    generate.main([str(good), "--prompt", "def add(", "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    want = run(model, generate.encode_prompt(tokenizer, "def add("), 12, stop_token=tokenizer.token_to_id(data.EOT))
    assert out == "def add(" + tokenizer.decode(want.tokens) + "\n" and "[Hugging Face weights:" in err


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning an export: train.py --train.init_from


@pytest.mark.slow
def test_train_py_fine_tunes_an_export_from_its_weights_with_its_tokenizer_and_a_fresh_ledger(
    tmp_path, good, model, jax_cache_env
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"m{i}.py").write_text(f"def add{i}(a, b):\n    return a + b * {i}\n\n" * 40)
    lr, gamma, steps = 1e-3, 0.01, 2
    args = [f"--train.init_from={good}", f"--data.path={corpus}", f"--train.out_dir={tmp_path / 'run'}",
            "--model.dtype=float32", "--data.seq_len=16", "--train.batch_size=4", f"--train.pretrain_steps={steps}",
            "--train.context_steps=0", "--train.sft_steps=0", "--train.eval_batches=1", "--train.sample_tokens=0",
            "--train.warmup_steps=1", f"--train.learning_rate={lr}", f"--train.bias_update_speed={gamma}"]  # fmt: skip
    result = train(*args, cwd=tmp_path, env=jax_cache_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[model] takes its vocab_size 4096 -> 300, hidden_size 256 -> 64" in result.stdout  # tiny.toml's -> TINY's
    tuned, tokenizer, step = load_run(tmp_path / "run")
    # the architecture is the export's; minidsv3's own fields (dtype, FP8 blocks) are the run's (tiny.toml's)
    assert step == steps and tuned.cfg == dataclasses.replace(TINY, dtype="float32", fp8_block_size=32)
    assert tokenizer.to_str() == (good / "tokenizer.json").read_text()
    # Adam moves a weight by about lr per step, the sign rule a bias by γ: a random start would differ by ~0.1
    for (path, x), (_, y) in zip(leaves(model), leaves(tuned), strict=True):
        bound = steps * gamma if "e_score_correction_bias" in jax.tree_util.keystr(path) else 3 * steps * lr
        assert 0 < float(np.abs(np.asarray(x) - np.asarray(y)).max()) <= bound + 1e-6, jax.tree_util.keystr(path)
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())["stages"]
    assert list(ledger) == ["pretrain"] and ledger["pretrain"]["tokens"] == steps * 4 * 16  # this run's, from zero


def test_train_py_refuses_an_init_folder_without_config_json_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = train(f"--train.init_from={tmp_path / 'empty'}", f"--train.out_dir={tmp_path / 'run'}", cwd=tmp_path,
                   env=dict(os.environ))  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no config.json" in result.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers' DeepseekV3ForCausalLM (the [peer] extra)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [TINY, YARN], ids=["plain", "yarn"])
def test_transformers_loads_the_export_with_the_same_logits_and_greedy_tokens(tmp_path, tokenizer, model, cfg):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = with_config(model, cfg)
    out = hf.save(model, tmp_path / "hf", tokenizer)
    peer = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 48))  # 48 > 16: YaRN's stretch is exercised
    with torch.no_grad():
        theirs = peer(torch.tensor(ids)).logits.numpy()  # (B, T, V)
    ours = np.asarray(logits(model, jnp.asarray(ids)))
    delta = float(np.abs(theirs - ours).max())
    print(f"\n[{'yarn' if cfg.rope_scaling else 'plain'}] max |Δlogit| minidsv3 vs transformers: {delta:.2e}")
    assert delta <= 1e-4
    prompt = ids[0, :8].tolist()
    with torch.no_grad():
        peer_tokens = peer.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    assert run(model, prompt, 32).tokens == peer_tokens[0, len(prompt) :].tolist()
    auto = transformers.AutoTokenizer.from_pretrained(out)
    text = "def add(a, b):\n    return a + b  # unseen: ünïcode"
    assert auto(text)["input_ids"] == tokenizer.encode(text).ids and auto.decode(auto(text)["input_ids"]) == text
    assert auto.eos_token == data.EOT and auto.pad_token == data.PAD


@pytest.mark.slow
def test_a_model_built_and_saved_by_transformers_imports_with_the_same_logits(tmp_path):
    """The reverse: transformers' own config (rope_parameters, YaRN) and weights, with rotate_half's RoPE layout
    (rope_interleave false), which the import permutes into minidsv3's adjacent pairs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    c = TINY
    peer_cfg = transformers.DeepseekV3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads, q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim, n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
        n_group=c.n_group, topk_group=c.topk_group, first_k_dense_replace=c.first_k_dense_replace,
        max_position_embeddings=64, initializer_range=0.1, rope_interleave=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    )  # fmt: skip
    torch.manual_seed(0)
    peer = transformers.DeepseekV3ForCausalLM(peer_cfg).eval()
    for layer in peer.model.layers[c.first_k_dense_replace :]:
        layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(c.n_routed_experts) * 0.2)
    peer.save_pretrained(tmp_path / "peer")
    model, _ = hf.load(tmp_path / "peer")
    assert model.cfg.rope_scaling.factor == 4.0 and model.cfg.num_nextn_predict_layers == 0  # no MTP weights saved
    ids = np.random.default_rng(3).integers(0, c.vocab_size, (2, 48))
    with torch.no_grad():
        theirs = peer(torch.tensor(ids)).logits.numpy()
    delta = float(np.abs(theirs - np.asarray(logits(model, jnp.asarray(ids)))).max())
    print(f"\n[transformers -> minidsv3, YaRN, rope_interleave false] max |Δlogit|: {delta:.2e}")
    assert delta <= 1e-4
