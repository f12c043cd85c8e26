"""Bad input at the command line: one line `error: ...` on stderr, exit status 2, no traceback, nothing written.

Each CLI gets one real subprocess (what a user sees, interpreter exit included); the other cases call its `main(argv)`
in the same process, where an unexpected exception would fail the test instead of printing a traceback.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from minidsv3 import accounting, checkpoint, config, data, generate
from minidsv3.model import Transformer
from minidsv3.step import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def last_error_line(main, argv: list[str], capsys) -> str:
    """Run a CLI's main on bad input in-process: it must exit with status 2; returns the last line it printed on
    stderr (argparse's own `prog: error: ...` or ours `error: ...`)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2, argv
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "error: " in lines[-1], (argv, lines)
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------------
# python -m minidsv3.accounting


def test_accounting_cli_on_a_missing_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = cli("minidsv3.accounting", "params", str(tmp_path / "nowhere.toml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("error: ") and "nowhere.toml" in result.stderr


def test_accounting_names_the_config_at_fault_for_each_command(tmp_path, capsys):
    not_toml = tmp_path / "notes.toml"
    not_toml.write_text("this is not = = TOML\n")
    inconsistent = tmp_path / "inconsistent.toml"
    inconsistent.write_text("[model]\nn_group = 4\ntopk_group = 5\n")  # M groups out of G < M
    cases = [
        (["params", str(tmp_path / "nowhere.toml")], "nowhere.toml"),
        (["flops", str(not_toml)], "notes.toml"),
        (["project", str(inconsistent), "--stage", "sft", "-", "-", "hours=5"], "model.topk_group"),
        (["project"], "give a CONFIG"),
    ]
    for argv, names in cases:
        line = last_error_line(accounting.main, argv, capsys)
        assert line.startswith("error: ") and names in line, (argv, line)


def test_accounting_rejects_out_of_range_numbers_naming_the_option(capsys):
    tiny = str(ROOT / "configs/tiny.toml")
    cases = [
        (["flops", tiny, "--seq-len", "-5"], "--seq-len"),
        (["flops", tiny, "--seq-len", "4k"], "--seq-len"),
        (["project", "--preset", "deepseek-v3", "--devices", "0"], "--devices"),
        (["project", "--preset", "deepseek-v3", "--price", "-1"], "--price"),
        (["project", "--preset", "deepseek-v3", "--price", "nan"], "--price"),
    ]
    for argv, option in cases:
        line = last_error_line(accounting.main, argv, capsys)
        assert f"argument {option}" in line, (argv, line)


def test_accounting_rejects_a_malformed_stage_plan_naming_the_part_at_fault(capsys):
    cases = [
        (["pretrain", "lots", "4096", "mfu=0.4"], "TOKENS"),
        (["pretrain", "1e12", "4096", "mfu=high"], "RATE"),
        (["pretrain", "1e12", "4096", "mfu=0"], "mfu must be in (0, 1]"),
        (["pretrain", "0", "4096", "mfu=0.4"], "TOKENS"),
        (["context", "1e9,1e9", "32768", "hours=10"], "one per token count"),
        (["pretrain", "1e12", "4096.5", "mfu=0.4"], "SEQ_LEN"),
        (["sft", "-", "-", "mfu=0.4"], "hours= only"),
        (["warmup", "1e12", "4096", "mfu=0.4"], "NAME"),
    ]
    for stage, names in cases:
        line = last_error_line(accounting.main, ["project", "--preset", "deepseek-v3", "--stage", *stage], capsys)
        assert line.startswith(f"error: --stage {' '.join(stage)}: ") and names in line, line


# ---------------------------------------------------------------------------------------------------------------
# python -m minidsv3.generate


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as train.py leaves it: config.json and the checkpoints of steps 1 and 2 with train.py's meta. It
    is made without training (the errors under test are about the folder and the request, not the weights), from a
    dense one-layer model without MTP, which compiles generation fastest."""
    folder = tmp_path_factory.mktemp("generate") / "run"
    model_fields = {
        "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
        "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "num_attention_heads": 2, "q_lora_rank": 16,
        "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
    }  # fmt: skip
    cfg = config.from_dict({"model": model_fields, "train": {"out_dir": str(folder)}})
    docs = [data.Document(f"m{i}.py", f"def f{i}(x):\n    return x * {i}\n" * 8) for i in range(4)]
    tokenizer = data.load_or_train_tokenizer(docs, cfg.model.vocab_size, tmp_path_factory.mktemp("cache"))
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_dict(cfg), indent=2))
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, cfg.train)
    for step in (1, 2):
        meta = {"step": step, "config": config.to_dict(cfg), "model_config": config.to_dict(cfg.model),
                "tokenizer": tokenizer.to_str()}  # fmt: skip
        checkpoint.save(folder, step, model, optimizer, meta, keep=2)
    return folder


def digest(folder: Path) -> dict[str, str]:
    """Every path under `folder` with its content's hash: equal digests mean nothing was written, made or removed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(folder.rglob("*"))
    }


def damaged_copy(run_dir: Path, to: Path, steps: tuple[int, ...], *, garbage: bool = True) -> Path:
    """A copy of the run whose checkpoints `steps` have every array file overwritten with garbage, or (garbage=False)
    their model part removed."""
    shutil.copytree(run_dir, to)
    for step in steps:
        folder = to / "checkpoints" / str(step)
        if not garbage:
            shutil.rmtree(folder / "model")
            continue
        for f in folder.rglob("*"):
            if f.is_file() and f.suffix != ".json" and "metadata" not in f.name.lower():
                f.write_bytes(b"garbage")
    return to


def test_generate_cli_with_no_readable_checkpoint_refuses_in_one_line_and_writes_nothing(run_dir, tmp_path):
    # NOTE: parts missing rather than garbage: Orbax, failing on garbage arrays, leaves TensorStore reads in flight
    # whose callbacks may print "RuntimeError: Event loop is closed" tracebacks (checkpoint.py's to silence)
    broken = damaged_copy(run_dir, tmp_path / "run", steps=(1, 2), garbage=False)
    before = digest(broken)
    result = cli("minidsv3.generate", str(broken), "--max-new-tokens", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no warnings before it
    assert result.stderr.startswith(f"error: {broken.absolute() / 'checkpoints' / '2'}: checkpoint is unreadable")
    assert result.stdout == "" and digest(broken) == before


def test_generate_rejects_options_out_of_range_before_loading_the_run(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"  # were the run loaded first, every case would say "no run with a checkpoint here"
    cases = [
        (["--max-new-tokens", "-3"], "max_new_tokens must be >= 1"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--temperature", "nan"], "temperature must be >= 0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-k", "-2"], "top_k must be >= 0"),
        (["--seed", "-1"], "seed must be in [0, 2**32)"),
        (["--top-k", "two"], "argument --top-k"),  # argparse's own type check
    ]
    for options, message in cases:
        line = last_error_line(generate.main, [str(nowhere), *options], capsys)
        assert message in line, (options, line)


def test_generate_rejects_a_prompt_or_a_length_the_model_cannot_take(run_dir, capsys):
    before = digest(run_dir)
    cases = [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "a\udcff"], "the prompt is not valid text"),  # what undecodable argv bytes become
        (["--max-new-tokens", "5000"], "exceeds the model's max_position_embeddings (4096)"),
        (["--speculative"], "speculative decoding needs"),  # this model has no MTP module
    ]
    for options, message in cases:
        line = last_error_line(generate.main, [str(run_dir), *options], capsys)
        assert line.startswith("error: ") and message in line, (options, line)
    assert digest(run_dir) == before


def test_generate_names_the_missing_or_damaged_run_folder_file(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a run")
    cases = [(tmp_path / "nowhere", "no run with a checkpoint here"), (tmp_path / "empty", "no run with a checkpoint"),
             (tmp_path / "a_file", "no run with a checkpoint here")]  # fmt: skip
    for name, content, message in [
        ("not_json", "{model: 1", "config.json: not valid JSON"),
        ("a_list", "[1, 2]", "config.json: expected a JSON object"),
        ("invalid", '{"model": {"hidden_size": -32}}', "config.json: model.hidden_size: must be > 0"),
    ]:
        shutil.copytree(run_dir, tmp_path / name)
        (tmp_path / name / "config.json").write_text(content)
        cases.append((tmp_path / name, message))
    before = digest(tmp_path)
    for folder, message in cases:
        line = last_error_line(generate.main, [str(folder), "--max-new-tokens", "2"], capsys)
        assert line.startswith("error: ") and message in line, (folder, line)
    assert digest(tmp_path) == before


def test_generate_falls_back_to_the_newest_readable_checkpoint_and_says_which(run_dir, tmp_path, capsys):
    broken = damaged_copy(run_dir, tmp_path / "run", steps=(2,))
    before = digest(broken)
    generate.main([str(broken), "--max-new-tokens", "2"])  # returns: exit status 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"warning: {broken.absolute() / 'checkpoints' / '2'}: checkpoint is unreadable")
    assert "using the checkpoint of step 1 instead" in lines[0] and "checkpoint of step 1:" in lines[-1]
    assert out.startswith("def ") and digest(broken) == before
