"""Corpus loading, splits, tokenizer and token caches (minidsv3/data.py). Batches are in tests/test_batches.py, SFT
pairs and batches in tests/test_sft.py.

Every corpus here is built in tmp_path or in memory; the stdlib is only listed, never tokenized.
"""

import math
import os
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from minidsv3 import data
from minidsv3.batches import PackedBatches
from minidsv3.data import DataError, Document

CODE = [
    Document("a.py", 'def add(x, y):\n    """Sum."""\n    return x + y\n'),
    Document("b.py", "import os\n\nprint(os.getcwd())\n"),
    Document("c.txt", "The quick brown fox jumps over the lazy dog.\n"),
]


def many_docs(n: int) -> list[Document]:
    return [Document(f"dir{i % 3}/file{i:04d}.py", f"x = {i}\n") for i in range(n)]


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


def test_files_that_cannot_be_read_as_utf8_text_are_skipped_with_a_warning_naming_each(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "deleted.txt")  # a dangling link
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff")  # byte 0: 0x89 never starts a UTF-8 character
    (tmp_path / "linked.txt").symlink_to(tmp_path / "a.txt")  # a link to a file is followed
    os.mkfifo(tmp_path / "pipe")  # reading it would wait forever for a writer
    docs = data.load_documents(str(tmp_path))
    assert docs == [Document("a.txt", "alpha\n"), Document("linked.txt", "alpha\n")]
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        f"warning: skipped {tmp_path / name}: {why}"
        for name, why in [
            ("gone.txt", "a dangling link; point at UTF-8 text files (or remove it)"),
            ("image.png", "not valid UTF-8 at byte offset 0; convert the file to UTF-8 text or remove it"),
            ("pipe", "not a regular file; point at UTF-8 text files (or remove it)"),
        ]
    ]


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
        (root / "bin.dat").write_bytes(b"abc\xff\xfe")  # 0xff can never occur in UTF-8
        return root / "bin.dat"
    elif kind == "nothing usable":
        (root / "bin.dat").write_bytes(b"abc\xff\xfe")
        (root / "e.txt").write_text("")
    return root / "missing" if kind == "missing path" else root


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing path", ["missing: no such file or folder"]),
        ("empty folder", ["has no files"]),
        ("only hidden files", ["has no files"]),
        ("all files empty", ["none of its 2 files has text: all empty"]),
        ("empty file", ["e.txt: the file is empty"]),
        ("not UTF-8", ["bin.dat: not valid UTF-8 at byte offset 3", "convert the file to UTF-8"]),  # one file: refused
        ("nothing usable", ["none of its 2 files has text: 1 skipped (see the warnings above), the rest empty"]),
    ],
)
def test_bad_corpora_raise_a_data_error_naming_the_problem(tmp_path, kind, words):
    with pytest.raises(DataError) as e:
        data.load_documents(str(make_bad_corpus(kind, tmp_path)))
    for w in words:
        assert w in str(e.value)


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


def test_packed_windows_cross_document_separators(bpe, tmp_path):
    # the stream this module builds, cut by minidsv3/batches.py: no mask keeps a window inside one document
    stream = data.load_or_tokenize(CODE, bpe, tmp_path, "train")
    epoch = PackedBatches(stream, seq_len=8, batch_size=len(stream) // 8, seed=0)
    inputs = epoch.next_batch()["inputs"]  # every window of the epoch
    eot = bpe.token_to_id(data.EOT)
    assert (inputs == eot).sum() >= len(CODE) - 1  # separators appear inside windows, between documents
