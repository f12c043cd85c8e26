"""SFT pairs and batches (minidsv3/sft.py): pairs mined from Python source or read from JSONL, loss on response tokens
only (report §5.1), and batches that resume exactly."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from minidsv3 import data, sft
from minidsv3.data import DataError, Document


def word_tokenizer(words: list[str]) -> Tokenizer:
    """A word-level tokenizer with known ids: EOT 0, PAD 1, <unk> 2, then `words` from 3, split on whitespace."""
    vocab = {data.EOT: 0, data.PAD: 1, "<unk>": 2} | {w: 3 + i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


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


def test_restoring_the_saved_state_reproduces_the_next_batches(check_resume):
    pairs = [(f"p{i}", f"r{i} r{i}") for i in range(7)]
    tokenizer = word_tokenizer([f"p{i}" for i in range(7)] + [f"r{i}" for i in range(7)])

    def make(seed):
        return sft.SFTBatches(pairs, tokenizer, seq_len=4, batch_size=3, seed=seed)

    check_resume(make, tokens_per_batch=3 * 4)  # 15 rows from 7 pairs: the saved position is inside the third epoch


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
