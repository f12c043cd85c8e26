"""Packed pre-training batches and evaluation windows (minidsv3/batches.py): windows of the token stream, each token a
target once per epoch, in an order that resumes exactly from a checkpoint."""

import numpy as np
import pytest

from minidsv3.batches import PackedBatches, eval_batches
from minidsv3.data import DataError


def test_a_corpus_shorter_than_one_sequence_is_refused():
    tokens = np.arange(10, dtype=np.uint16)  # 10 tokens; one sequence of T = 10 needs T + 1 = 11
    for make in (lambda: PackedBatches(tokens, 10, 2, 0), lambda: eval_batches(tokens, 10, 2, 1)):
        with pytest.raises(DataError, match="corpus has 10 tokens, fewer than one sequence of seq_len\\+1 = 11"):
            make()
    PackedBatches(tokens, 9, 2, 0)  # exactly one sequence fits


def test_windows_are_contiguous_slices_of_the_stream_and_targets_are_inputs_shifted_by_one():
    stream = np.arange(1000, dtype=np.uint16)  # token i at position i: a window's values are its positions
    batches = PackedBatches(stream, seq_len=10, batch_size=4, seed=0)
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
    batches = PackedBatches(stream, seq_len=10, batch_size=9, seed=0)
    # (1000 - 1) // 10 = 99 windows starting at 0, 10, ..., 980; 99 / 9 = 11 batches per epoch
    starts = np.concatenate([batches.next_batch()["inputs"][:, 0] for _ in range(11)])
    np.testing.assert_array_equal(np.sort(starts), np.arange(0, 990, 10))
    assert not (starts == np.sort(starts)).all()  # shuffled


def test_restoring_the_saved_state_reproduces_the_next_batches(check_resume):
    def make(seed):
        return PackedBatches(np.arange(71, dtype=np.uint16), seq_len=10, batch_size=3, seed=seed)  # 7 windows

    check_resume(make, tokens_per_batch=3 * 10)  # 15 windows from 7: the saved position is inside the third epoch


def test_a_state_saved_for_other_data_is_refused():
    saved = PackedBatches(np.arange(71, dtype=np.uint16), 10, 3, 0).state_dict()
    other = PackedBatches(np.arange(81, dtype=np.uint16), 10, 3, 0)
    with pytest.raises(DataError, match="same corpus"):
        other.load_state_dict(saved)


def test_eval_batches_are_fixed_evenly_spaced_windows():
    stream = np.arange(101, dtype=np.uint16)
    batches = eval_batches(stream, seq_len=10, batch_size=2, n_batches=3)
    # 6 windows with starts spread over [0, 101 - 11 = 90]: 0, 18, 36, 54, 72, 90
    starts = [b["inputs"][:, 0].tolist() for b in batches]
    assert starts == [[0, 18], [36, 54], [72, 90]]
    np.testing.assert_array_equal(batches[2]["targets"][1], np.arange(91, 101))


def test_the_whole_validation_stream_makes_every_token_a_target_once():
    stream = np.arange(76, dtype=np.uint16)  # 7 windows of 10 (+1) tokens; the 5-token tail is too short for one
    batches = eval_batches(stream, seq_len=10, batch_size=3, n_batches=None)
    assert [len(b["inputs"]) for b in batches] == [3, 3, 1]  # the last batch is short, never padded
    targets = np.concatenate([b["targets"].ravel() for b in batches])
    np.testing.assert_array_equal(targets, np.arange(1, 71))
