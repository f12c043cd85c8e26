"""Batches: the token stream (N,) of minidsv3/data.py cut into (B, T) windows, in a shuffled order that resumes exactly.

Document packing (report §4.1): the stream is documents joined with `<|endoftext|>`, cut into fixed windows with no
cross-sample attention mask, so a window may span two documents. Pre-training draws windows in a fresh random order
each epoch (`PackedBatches`); evaluation reads fixed windows (`eval_batches`). Both the packed batches and the SFT
batches of minidsv3/sft.py draw their order from `EpochOrder`, an explicit PCG64 generator whose state travels with
the checkpoint, so a resumed run sees exactly the batches it would have seen.

Shape legend: B batch (sequences) · T positions (seq_len) · N tokens in the stream.
"""

from __future__ import annotations

import numpy as np

from minidsv3.data import DataError


class EpochOrder:
    """Indices 0..n-1, in a fresh random permutation each epoch. The state is the generator's state at the start of
    the epoch plus a cursor: restoring redraws the same permutation, and the next indices follow exactly."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.cursor = epoch, 0
        self.epoch_start_state = self.rng.bit_generator.state  # a dict of ints and strings
        self.order = self.rng.permutation(self.n)  # (n,)

    def take(self, k: int) -> np.ndarray:
        out = []
        while len(out) < k:  # a batch may run over the end of an epoch into the next
            if self.cursor == self.n:
                self._start_epoch(self.epoch + 1)
            m = min(k - len(out), self.n - self.cursor)
            out += self.order[self.cursor : self.cursor + m].tolist()
            self.cursor += m
        return np.array(out)  # (k,)

    def state_dict(self) -> dict:
        return {"n": self.n, "bit_generator": self.epoch_start_state, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, d: dict) -> None:
        if d["n"] != self.n:
            raise DataError(
                f"the saved data position is over {d['n']} sequences, this data has {self.n}; "
                "resume with the same corpus, tokenizer and seq_len"
            )
        self.rng.bit_generator.state = d["bit_generator"]
        self._start_epoch(d["epoch"])
        self.cursor = d["cursor"]


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict:
    """Windows of T+1 tokens at `starts`; targets are the inputs shifted by one. Every position carries loss."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int32)  # (B, T+1)
    ones = np.ones((len(starts), seq_len), np.float32)  # (B, T)
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": ones, "token_mask": ones.copy()}  # (B, T)


def _check_stream(tokens: np.ndarray, seq_len: int) -> None:
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"corpus has {len(tokens)} tokens, fewer than one sequence of seq_len+1 = {seq_len + 1}; "
            "use a larger corpus or a smaller --data.seq_len"
        )


class PackedBatches:
    """Pre-training batches: the stream (documents joined by EOT) cut into n = (N-1)//T windows of T+1 tokens, window
    i starting at i·T, so each token is a target exactly once per epoch; windows are shuffled each epoch.

    `tokens_delivered` counts B·T per batch, the tokens the device computed on (what the GPU-hour ledger counts).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        _check_stream(tokens, seq_len)
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.order = EpochOrder((len(tokens) - 1) // seq_len, seed)
        self.batches_delivered = 0
        self.tokens_delivered = 0

    def next_batch(self) -> dict:
        """{inputs, targets: (B, T) int32; loss_mask, token_mask: (B, T) float32 ones}."""
        starts = self.order.take(self.batch_size) * self.seq_len  # (B,)
        self.batches_delivered += 1
        self.tokens_delivered += self.batch_size * self.seq_len
        return windows(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        """JSON-ready position: generator state, epoch, cursor, and the counters."""
        return {"order": self.order.state_dict(), "batches": self.batches_delivered, "tokens": self.tokens_delivered}

    def load_state_dict(self, d: dict) -> None:
        self.order.load_state_dict(d["order"])
        self.batches_delivered, self.tokens_delivered = d["batches"], d["tokens"]


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int | None) -> list[dict]:
    """`n_batches` fixed batches of windows evenly spaced over the validation stream (the same every evaluation), or
    with n_batches=None the whole stream: every window i·T, each token a target once (the last batch may be short)."""
    _check_stream(tokens, seq_len)
    if n_batches is None:
        starts = np.arange((len(tokens) - 1) // seq_len, dtype=np.int64) * seq_len  # (n,)
        return [windows(tokens, starts[i : i + batch_size], seq_len) for i in range(0, len(starts), batch_size)]
    starts = np.linspace(0, len(tokens) - seq_len - 1, batch_size * n_batches).round().astype(np.int64)  # (n·B,)
    return [windows(tokens, s, seq_len) for s in starts.reshape(n_batches, batch_size)]  # each s: (B,)
