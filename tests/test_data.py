"""Corpus loading, splits, tokenizer and token caches, packed batches (minidsv3/data.py) and SFT pairs and batches
(minidsv3/sft.py).

Every corpus here is built in tmp_path or in memory; the stdlib is only listed, never tokenized.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from minidsv3 import data, sft
from minidsv3.data import DataError, Document

CODE = [
    Document("a.py", 'def add(x, y):\n    """Sum."""\n    return x + y\n'),
    Document("b.py", "import os\n\nprint(os.getcwd())\n"),
    Document("c.txt", "The quick brown fox jumps over the lazy dog.\n"),
]


def many_docs(n: int) -> list[Document]:
    return [Document(f"dir{i % 3}/file{i:04d}.py", f"x = {i}\n") for i in range(n)]


def word_tokenizer(words: list[str]) -> Tokenizer:
    """A word-level tokenizer with known ids: EOT 0, PAD 1, <unk> 2, then `words` from 3, split on whitespace."""
    vocab = {data.EOT: 0, data.PAD: 1, "<unk>": 2} | {w: 3 + i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Corpus and manifest


def test_the_default_corpus_lists_several_hundred_stdlib_files_outside_tests_and_site_packages():
    root, names = data.stdlib_files()
    assert 300 < len(names) < 3000
    assert names == sorted(names)
    assert all(n.endswith(".py") for n in names)
    for name in names:
        assert not {"test", "tests", "idle_test", "site-packages"} & set(Path(name).parts[:-1]), name
    assert "os.py" in names and "json/decoder.py" in names
    assert (root / "os.py").is_file()


def test_a_folder_corpus_is_read_recursively_in_sorted_order_without_hidden_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "z.txt").write_text("zeta\n")
    (tmp_path / "sub" / "a.txt").write_text("alpha é\n")
    (tmp_path / "b.txt").write_text("beta\n")
    (tmp_path / ".hidden.txt").write_text("secret\n")
    (tmp_path / ".git" / "config").write_text("secret\n")
    (tmp_path / "empty.txt").write_text("")
    docs = data.load_documents(str(tmp_path))
    assert docs == [Document("b.txt", "beta\n"), Document("sub/a.txt", "alpha é\n"), Document("z.txt", "zeta\n")]


def test_the_manifest_counts_files_and_utf8_bytes_and_its_hash_sees_every_name_and_text():
    docs = [Document("a", "é"), Document("b", "xy")]
    m = data.manifest(docs)
    assert (m["files"], m["bytes"]) == (2, 2 + 2)  # "é" is two bytes in UTF-8
    assert m["sha256"] == data.manifest(list(docs))["sha256"]
    assert m["sha256"] != data.manifest([Document("a", "é"), Document("c", "xy")])["sha256"]
    assert m["sha256"] != data.manifest([Document("a", "é"), Document("b", "xz")])["sha256"]
    # the boundary between name and text counts: ("ab", "c") is not ("a", "bc")
    assert data.manifest([Document("ab", "c")])["sha256"] != data.manifest([Document("a", "bc")])["sha256"]


def make_bad_corpus(kind: str, root: Path) -> Path:
    if kind == "only hidden files":
        (root / ".hidden").write_text("x")
    elif kind == "all files empty":
        (root / "e1").write_text("")
        (root / "e2").write_text("")
    elif kind == "empty file":
        (root / "e.txt").write_text("")
        return root / "e.txt"
    elif kind == "not UTF-8":
        (root / "ok.txt").write_text("fine\n")
        (root / "bin.dat").write_bytes(b"abc\xff\xfe")  # 0xff can never occur in UTF-8
    return root / "missing" if kind == "missing path" else root


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing path", ["missing: no such file or folder"]),
        ("empty folder", ["has no files"]),
        ("only hidden files", ["has no files"]),
        ("all files empty", ["all 2 files are empty"]),
        ("empty file", ["e.txt: the file is empty"]),
        ("not UTF-8", ["bin.dat: not valid UTF-8 at byte offset 3", "corpus must be UTF-8"]),
    ],
)
def test_bad_corpora_raise_a_data_error_naming_the_problem(tmp_path, kind, words):
    with pytest.raises(DataError) as e:
        data.load_documents(str(make_bad_corpus(kind, tmp_path)))
    for w in words:
        assert w in str(e.value)


def test_a_corpus_shorter_than_one_sequence_is_refused():
    tokens = np.arange(10, dtype=np.uint16)  # 10 tokens; one sequence of T = 10 needs T + 1 = 11
    for make in (lambda: data.PackedBatches(tokens, 10, 2, 0), lambda: data.eval_batches(tokens, 10, 2, 1)):
        with pytest.raises(DataError, match="corpus has 10 tokens, fewer than one sequence of seq_len\\+1 = 11"):
            make()
    data.PackedBatches(tokens, 9, 2, 0)  # exactly one sequence fits


# ---------------------------------------------------------------------------------------------------------------
# Splits


def test_the_same_seed_gives_the_same_split_and_another_seed_a_different_one():
    docs = many_docs(60)
    train, val = data.split_documents(docs, 0.25, seed=0)
    assert (train, val) == data.split_documents(docs, 0.25, seed=0)
    assert (train, val) != data.split_documents(docs, 0.25, seed=1)


def test_files_go_whole_to_exactly_one_side_in_corpus_order():
    docs = many_docs(60)
    train, val = data.split_documents(docs, 0.25, seed=0)
    assert sorted(train + val) == sorted(docs)  # the same Documents, texts untouched, none in both
    assert not set(train) & set(val)
    assert train == [d for d in docs if d in train] and val == [d for d in docs if d in val]


def test_the_held_out_share_is_close_to_val_fraction():
    _, val = data.split_documents(many_docs(2000), 0.1, seed=3)
    assert 140 < len(val) < 260  # binomial(2000, 0.1): mean 200, sd 13.4


def test_adding_a_file_moves_no_other_file():
    docs = many_docs(50)
    train, val = data.split_documents(docs, 0.3, seed=7)
    new = Document("dir0/new.py", "y = 1\n")
    train2, val2 = data.split_documents(docs + [new], 0.3, seed=7)
    assert [d for d in train2 if d != new] == train
    assert [d for d in val2 if d != new] == val


def test_a_two_file_corpus_still_has_one_file_on_each_side():
    docs = many_docs(2)
    for fraction in (0.001, 0.999):
        train, val = data.split_documents(docs, fraction, seed=0)
        assert len(train) == 1 and len(val) == 1


def test_a_single_file_corpus_holds_out_its_last_lines():
    text = "".join(f"line {i}\n" for i in range(1, 11))  # 10 lines
    train, val = data.split_documents([Document("book.txt", text)], 0.2, seed=0)
    # 10 lines · 0.2 = 2 held-out lines: 9 and 10
    assert train == [Document("book.txt:1-8", "".join(f"line {i}\n" for i in range(1, 9)))]
    assert val == [Document("book.txt:9-10", "line 9\nline 10\n")]
    with pytest.raises(DataError, match="one-line"):
        data.split_documents([Document("one.txt", "just one line")], 0.2, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and token caches


@pytest.fixture
def bpe(tmp_path) -> Tokenizer:
    return data.load_or_train_tokenizer(CODE * 3, 300, tmp_path / "cache")


def test_the_tokenizer_round_trips_code_and_unicode_it_never_saw(bpe):
    assert bpe.token_to_id(data.EOT) == 0 and bpe.token_to_id(data.PAD) == 1
    assert bpe.get_vocab_size() <= 300
    text = "def f(x):\n\treturn x  # héllo wörld 🚀 ∑ 漢字\r\n    pass\n"
    ids = bpe.encode(text).ids
    assert 0 not in ids and 1 not in ids
    assert bpe.decode(ids) == text


def test_a_literal_endoftext_inside_a_document_is_text_not_a_separator(bpe):
    ids = bpe.encode(f"a{data.EOT}b").ids
    assert bpe.token_to_id(data.EOT) not in ids
    assert bpe.decode(ids) == f"a{data.EOT}b"


def test_the_tokenizer_cache_is_reused_without_retraining(tmp_path, monkeypatch):
    first = data.load_or_train_tokenizer(CODE, 300, tmp_path)
    (path,) = tmp_path.glob("tokenizer-*.json")
    mtime = path.stat().st_mtime_ns

    def no_training(*args):
        raise AssertionError("retrained although the cache should have been used")

    monkeypatch.setattr(data, "_train_tokenizer", no_training)
    again = data.load_or_train_tokenizer(CODE, 300, tmp_path)
    assert again.get_vocab() == first.get_vocab()
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="retrained"):  # another vocabulary size is another tokenizer
        data.load_or_train_tokenizer(CODE, 301, tmp_path)


def test_a_vocabulary_smaller_than_the_byte_alphabet_is_refused(tmp_path):
    with pytest.raises(DataError, match="258"):
        data.load_or_train_tokenizer(CODE, 257, tmp_path)


def test_the_token_stream_is_each_document_followed_by_the_separator(bpe, tmp_path):
    stream = data.load_or_tokenize(CODE, bpe, tmp_path, "train")
    assert stream.dtype == np.uint16 and stream.ndim == 1
    eot = bpe.token_to_id(data.EOT)
    ends = np.flatnonzero(stream == eot)
    assert len(ends) == len(CODE) and ends[-1] == len(stream) - 1
    pieces = np.split(np.asarray(stream), ends[:-1] + 1)
    assert [bpe.decode(p[:-1].tolist()) for p in pieces] == [d.text for d in CODE]


def test_token_arrays_are_cached_and_memory_mapped(bpe, tmp_path, monkeypatch):
    first = data.load_or_tokenize(CODE, bpe, tmp_path, "train")
    monkeypatch.setattr(data, "encode_documents", lambda *a: (_ for _ in ()).throw(AssertionError("re-encoded")))
    again = data.load_or_tokenize(CODE, bpe, tmp_path, "train")
    assert isinstance(again, np.memmap)
    np.testing.assert_array_equal(again, first)
    with pytest.raises(AssertionError, match="re-encoded"):  # other documents are another cache entry
        data.load_or_tokenize(CODE[:2], bpe, tmp_path, "train")


def test_unigram_entropy_matches_hand_computed_values():
    assert math.isclose(data.unigram_entropy(np.array([0, 0, 1, 1]), 4), math.log(2))  # two equally likely tokens
    # p = (3/4, 1/4): -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.75·0.287682 + 0.25·1.386294 = 0.215762 + 0.346574 = 0.562335
    assert math.isclose(data.unigram_entropy(np.array([2, 2, 2, 3], np.uint16), 4), 0.562335, rel_tol=1e-5)
    assert data.unigram_entropy(np.array([5, 5, 5]), 8) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Packed pre-training batches


def test_windows_are_contiguous_slices_of_the_stream_and_targets_are_inputs_shifted_by_one():
    stream = np.arange(1000, dtype=np.uint16)  # token i at position i: a window's values are its positions
    batches = data.PackedBatches(stream, seq_len=10, batch_size=4, seed=0)
    batch = batches.next_batch()
    assert batch["inputs"].shape == (4, 10) and batch["inputs"].dtype == np.int32
    assert batch["targets"].dtype == np.int32
    for row_in, row_tgt in zip(batch["inputs"], batch["targets"]):
        start = row_in[0]
        assert start % 10 == 0  # windows start at multiples of T
        np.testing.assert_array_equal(row_in, np.arange(start, start + 10))
        np.testing.assert_array_equal(row_tgt, row_in + 1)
    for key in ("loss_mask", "token_mask"):
        assert batch[key].dtype == np.float32 and (batch[key] == 1).all()
    assert batches.tokens_delivered == 4 * 10


def test_one_epoch_uses_every_window_exactly_once():
    stream = np.arange(1000, dtype=np.uint16)
    batches = data.PackedBatches(stream, seq_len=10, batch_size=9, seed=0)
    # (1000 - 1) // 10 = 99 windows starting at 0, 10, ..., 980; 99 / 9 = 11 batches per epoch
    starts = np.concatenate([batches.next_batch()["inputs"][:, 0] for _ in range(11)])
    np.testing.assert_array_equal(np.sort(starts), np.arange(0, 990, 10))
    assert not (starts == np.sort(starts)).all()  # shuffled


def test_packed_windows_cross_document_separators(bpe, tmp_path):
    stream = data.load_or_tokenize(CODE, bpe, tmp_path, "train")
    batches = data.PackedBatches(stream, seq_len=8, batch_size=len(stream) // 8, seed=0)
    inputs = batches.next_batch()["inputs"]  # every window of the epoch
    eot = bpe.token_to_id(data.EOT)
    assert (inputs == eot).sum() >= len(CODE) - 1  # separators appear inside windows, between documents


@pytest.mark.parametrize("kind", ["packed", "sft"])
def test_restoring_the_saved_state_reproduces_the_next_batches(kind):
    if kind == "packed":

        def make(seed):
            return data.PackedBatches(np.arange(71, dtype=np.uint16), seq_len=10, batch_size=3, seed=seed)  # 7 windows
    else:
        pairs = [(f"p{i}", f"r{i} r{i}") for i in range(7)]
        tokenizer = word_tokenizer([f"p{i}" for i in range(7)] + [f"r{i}" for i in range(7)])

        def make(seed):
            return sft.SFTBatches(pairs, tokenizer, seq_len=4, batch_size=3, seed=seed)

    original = make(seed=5)
    for _ in range(5):  # 15 rows from 7: the saved position is inside the third epoch
        original.next_batch()
    saved = json.loads(json.dumps(original.state_dict()))
    restored = make(seed=123)
    restored.load_state_dict(saved)
    assert restored.tokens_delivered == original.tokens_delivered == 5 * 3 * (10 if kind == "packed" else 4)
    for _ in range(4):
        a, b = original.next_batch(), restored.next_batch()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_a_state_saved_for_other_data_is_refused():
    saved = data.PackedBatches(np.arange(71, dtype=np.uint16), 10, 3, 0).state_dict()
    other = data.PackedBatches(np.arange(81, dtype=np.uint16), 10, 3, 0)
    with pytest.raises(DataError, match="same corpus"):
        other.load_state_dict(saved)


def test_eval_batches_are_fixed_evenly_spaced_windows():
    stream = np.arange(101, dtype=np.uint16)
    batches = data.eval_batches(stream, seq_len=10, batch_size=2, n_batches=3)
    # 6 windows with starts spread over [0, 101 - 11 = 90]: 0, 18, 36, 54, 72, 90
    starts = [b["inputs"][:, 0].tolist() for b in batches]
    assert starts == [[0, 18], [36, 54], [72, 90]]
    np.testing.assert_array_equal(batches[2]["targets"][1], np.arange(91, 101))


def test_the_whole_validation_stream_makes_every_token_a_target_once():
    stream = np.arange(76, dtype=np.uint16)  # 7 windows of 10 (+1) tokens; the 5-token tail is too short for one
    batches = data.eval_batches(stream, seq_len=10, batch_size=3, n_batches=None)
    assert [len(b["inputs"]) for b in batches] == [3, 3, 1]  # the last batch is short, never padded
    targets = np.concatenate([b["targets"].ravel() for b in batches])
    np.testing.assert_array_equal(targets, np.arange(1, 71))


# ---------------------------------------------------------------------------------------------------------------
# SFT


SOURCE = '''import functools


class Greeter:
    @functools.cache
    def greet(self, name):
        """Return a greeting
        for name."""
        message = "hello " + name
        return message

    def bare(self):
        return 1


async def fetch(url):
    """Fetch."""
    return await get(url)


def only_doc():
    """Nothing else."""


def same_line():
    """Doc."""; return 1
'''


def test_sft_pairs_take_signature_and_docstring_as_prompt_and_the_rest_of_the_body_as_response():
    pairs = sft.extract_pairs([Document("g.py", SOURCE), Document("notes.txt", "not python (")], min_chars=0)
    assert pairs == [
        (
            'def greet(self, name):\n    """Return a greeting\n    for name."""\n',
            '    message = "hello " + name\n    return message\n',
        ),
        ('async def fetch(url):\n    """Fetch."""\n', "    return await get(url)\n"),
    ]
    assert sft.extract_pairs([Document("g.py", SOURCE)], min_chars=30) == pairs[:1]  # the 26-char body is cut


def test_beyond_max_pairs_an_evenly_spaced_subset_is_kept():
    source = "".join(f'def f{i}():\n    """Doc {i}."""\n    return {i}\n\n' for i in range(5))
    pairs = sft.extract_pairs([Document("m.py", source)], max_pairs=3, min_chars=0)
    assert [p.splitlines()[0] for p, _ in pairs] == ["def f0():", "def f2():", "def f4():"]  # indices 0, 2, 4 of 5


def test_sft_loss_falls_on_response_tokens_and_eos_only():
    tokenizer = word_tokenizer(["p1", "p2", "p3", "r1", "r2"])  # ids p1..p3 = 3..5, r1 r2 = 6 7; EOT 0, PAD 1
    (batch,) = sft.eval_batches([("p1 p2 p3", "r1 r2")], tokenizer, seq_len=8, batch_size=1, n_batches=1)
    # row = p1 p2 p3 r1 r2 EOT PAD PAD PAD (T + 1 = 9); inputs are its first 8, targets its last 8
    np.testing.assert_array_equal(batch["inputs"], [[3, 4, 5, 6, 7, 0, 1, 1]])
    np.testing.assert_array_equal(batch["targets"], [[4, 5, 6, 7, 0, 1, 1, 1]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 0, 0, 0]])  # targets r1 r2 EOT
    np.testing.assert_array_equal(batch["token_mask"], [[1, 1, 1, 1, 1, 1, 0, 0]])  # inputs up to EOT, no PAD
    assert batch["loss_mask"].dtype == np.float32 and batch["inputs"].dtype == np.int32


def test_with_an_empty_prompt_every_target_but_padding_carries_loss():
    tokenizer = word_tokenizer(["r1", "r2"])  # r1 r2 = 3 4
    (batch,) = sft.eval_batches([("", "r1 r2")], tokenizer, seq_len=4, batch_size=1, n_batches=1)
    # row = r1 r2 EOT PAD PAD: nothing predicts r1, the targets r2 and EOT carry loss
    np.testing.assert_array_equal(batch["inputs"], [[3, 4, 0, 1]])
    np.testing.assert_array_equal(batch["targets"], [[4, 0, 1, 1]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["token_mask"], [[1, 1, 1, 0]])


def test_sft_rows_longer_than_the_window_are_cut_and_keep_loss_on_the_response():
    tokenizer = word_tokenizer(["p1", "p2", "p3", "r1", "r2"])
    (batch,) = sft.eval_batches([("p1 p2 p3", "r1 r2")], tokenizer, seq_len=4, batch_size=1, n_batches=1)
    # p1 p2 p3 r1 r2 EOT cut to T + 1 = 5 tokens: p1 p2 p3 r1 r2
    np.testing.assert_array_equal(batch["targets"], [[4, 5, 6, 7]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1]])
    np.testing.assert_array_equal(batch["token_mask"], [[1, 1, 1, 1]])


def test_sft_pairs_whose_prompt_fills_the_window_are_dropped():
    tokenizer = word_tokenizer(["p1", "p2", "p3", "r1"])
    batches = sft.SFTBatches([("p1 p2 p3", "r1"), ("p1", "r1")], tokenizer, seq_len=2, batch_size=2, seed=0)
    assert batches.n_dropped == 1
    np.testing.assert_array_equal(batches.next_batch()["inputs"], [[3, 6], [3, 6]])  # only p1 -> r1 is left
    assert batches.tokens_delivered == 2 * 2  # B·T, padding included
    with pytest.raises(DataError, match="longer than seq_len=2"):
        sft.SFTBatches([("p1 p2 p3", "r1")], tokenizer, seq_len=2, batch_size=1, seed=0)


def test_sft_pairs_split_deterministically_with_one_on_each_side():
    pairs = [(f"prompt {i}", f"response {i}") for i in range(40)]
    train, val = sft.split_pairs(pairs, 0.25, seed=0)
    assert (train, val) == sft.split_pairs(pairs, 0.25, seed=0)
    assert (train, val) != sft.split_pairs(pairs, 0.25, seed=1)
    assert sorted(train + val) == sorted(pairs)
    assert [len(s) for s in sft.split_pairs(pairs[:2], 0.001, seed=0)] == [1, 1]
    with pytest.raises(DataError, match="at least 2"):
        sft.split_pairs(pairs[:1], 0.25, seed=0)


def test_sft_jsonl_is_read_and_bad_files_are_refused_naming_the_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "é", "response": "", "extra": 1}\n')
    assert sft.load_jsonl(str(good)) == [("a", "b"), ("é", "")]
    cases = {
        "missing.jsonl": (None, "no such file"),
        "bad.jsonl": ('{"prompt": "a", "response": "b"}\n{"prompt": \n', "bad.jsonl:2: not valid JSON"),
        "keys.jsonl": ('{"prompt": "a"}\n', 'keys.jsonl:1: expected an object with string "prompt" and "response"'),
        "empty.jsonl": ("\n\n", "no prompt/response pairs"),
    }
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(DataError) as e:
            sft.load_jsonl(str(tmp_path / name))
        assert message in str(e.value), name
