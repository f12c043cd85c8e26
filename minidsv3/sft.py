"""Supervised fine-tuning pairs and batches (report §5.1: the loss on response tokens only).

The embedded pairs come from the corpus itself: every function with a docstring gives a prompt (its signature and
docstring) and a response (its body), a few thousand pairs from the standard library. `--data.sft_path` takes a JSONL
file of {"prompt", "response"} objects instead. The held-out split is by a hash of each pair, as `data.split_documents`
splits files.

Shape legend: B batch (rows, one pair each) · T positions (seq_len).
"""

from __future__ import annotations

import ast
import io
import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from minidsv3.batches import EpochOrder
from minidsv3.data import EOT, PAD, DataError, Document, decode_text, hold_out, special_id


def _function_pair(f: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> tuple[str, str] | None:
    """(def line(s) through the end of the docstring, the rest of the body), dedented to the def's column."""
    body = f.body
    first = body[0]
    has_doc = (
        isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    )
    if not has_doc or len(body) < 2 or body[1].lineno <= first.end_lineno:  # no docstring, or no code after it
        return None
    indent = lines[f.lineno - 1][: f.col_offset]  # f.lineno is the `def` line; decorators are left out
    prompt = "".join(line.removeprefix(indent) for line in lines[f.lineno - 1 : first.end_lineno])
    response = "".join(line.removeprefix(indent) for line in lines[first.end_lineno : f.end_lineno])
    return prompt, response


def extract_pairs(
    docs: list[Document], max_pairs: int = 4000, min_chars: int = 40, max_chars: int = 1500
) -> list[tuple[str, str]]:
    """(prompt, response) for every function with a docstring in the Python documents, in document and line order.

    Responses shorter than `min_chars` and pairs longer than `max_chars` are skipped (the default keeps most pairs
    within a few hundred tokens). Beyond `max_pairs`, an evenly spaced subset is kept, so all files stay represented.
    Documents that do not parse as Python are skipped.
    """
    pairs = []
    for doc in docs:
        try:
            with warnings.catch_warnings():  # e.g. SyntaxWarning for invalid escapes in old stdlib strings
                warnings.simplefilter("ignore")
                tree = ast.parse(doc.text)
        except (SyntaxError, ValueError, RecursionError):
            continue
        lines = io.StringIO(doc.text, newline="").readlines()  # the line breaks `ast` counts, unlike str.splitlines
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for f in sorted(funcs, key=lambda n: (n.lineno, n.col_offset)):
            pair = _function_pair(f, lines)
            if pair and len(pair[1]) >= min_chars and len(pair[0]) + len(pair[1]) <= max_chars:
                pairs.append(pair)
    if len(pairs) > max_pairs:
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int)]
    return pairs


def load_jsonl(path: str) -> list[tuple[str, str]]:
    """Pairs from a JSONL file of {"prompt": str, "response": str} objects, one per line (blank lines allowed)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file; point --data.sft_path at a JSONL file of prompt/response objects")
    pairs = []
    for number, line in enumerate(decode_text(p, p.read_bytes()).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg}); write one object per line") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
            raise DataError(f'{path}:{number}: expected an object with string "prompt" and "response" keys')
        pairs.append((row["prompt"], row["response"]))
    if not pairs:
        raise DataError(f"{path}: no prompt/response pairs in the file")
    return pairs


def split_pairs(pairs: list[tuple[str, str]], val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val) placed by a hash of (seed, prompt, response), as `split_documents` places files."""
    if len(pairs) < 2:
        raise DataError(f"{len(pairs)} SFT pair(s) cannot be split into train and validation; supply at least 2")
    held = hold_out([f"{p}\0{r}" for p, r in pairs], val_fraction, seed)
    return [x for x, h in zip(pairs, held) if not h], [x for x, h in zip(pairs, held) if h]


def _encode_pairs(pairs: list[tuple[str, str]], tokenizer: Tokenizer, seq_len: int) -> list[tuple[list, list]]:
    """Token ids of prompts and responses, encoded apart so the boundary is exact. Pairs whose prompt alone fills
    the window (more than T tokens) are dropped: no response token would be left to learn from."""
    prompts = tokenizer.encode_batch([p for p, _ in pairs])
    responses = tokenizer.encode_batch([r for _, r in pairs])
    encoded = [(p.ids, r.ids) for p, r in zip(prompts, responses) if len(p.ids) <= seq_len]
    if not encoded:
        raise DataError(f"all {len(pairs)} SFT prompts are longer than seq_len={seq_len} tokens; raise --data.seq_len")
    return encoded


def _sft_batch(encoded: list[tuple[list, list]], indices: np.ndarray, seq_len: int, eot: int, pad: int) -> dict:
    """Rows prompt + response + EOT, cut to T+1 tokens and padded. loss_mask marks targets that are response or EOT;
    token_mask marks real (non-padding) inputs."""
    rows = np.full((len(indices), seq_len + 1), pad, np.int32)  # (B, T+1)
    loss_mask = np.zeros((len(indices), seq_len), np.float32)  # (B, T)
    token_mask = np.zeros((len(indices), seq_len), np.float32)  # (B, T)
    for b, i in enumerate(indices):
        prompt, response = encoded[i]
        ids = (prompt + response + [eot])[: seq_len + 1]
        rows[b, : len(ids)] = ids
        # Target t is ids[t+1]: it is a response token (or EOT) from t+1 = len(prompt) up to the last real token.
        # With an empty prompt the first response token has nothing before it to predict it from.
        loss_mask[b, max(len(prompt) - 1, 0) : len(ids) - 1] = 1.0  # (T,)
        token_mask[b, : len(ids)] = 1.0  # (T,)  inputs are the row's first T tokens; those past len(ids) are PAD
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": loss_mask, "token_mask": token_mask}


class SFTBatches:
    """Fine-tuning batches: one (prompt, response) pair per row, shuffled each epoch by an explicit generator.

    `tokens_delivered` counts B·T per batch, padding included: that is what the device computed on.
    """

    def __init__(self, pairs: list[tuple[str, str]], tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int):
        self.encoded = _encode_pairs(pairs, tokenizer, seq_len)
        self.n_dropped = len(pairs) - len(self.encoded)
        self.eot, self.pad = special_id(tokenizer, EOT), special_id(tokenizer, PAD)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.order = EpochOrder(len(self.encoded), seed)
        self.batches_delivered = 0
        self.tokens_delivered = 0

    def next_batch(self) -> dict:
        """{inputs, targets: (B, T) int32; loss_mask, token_mask: (B, T) float32}."""
        indices = self.order.take(self.batch_size)  # (B,)
        self.batches_delivered += 1
        self.tokens_delivered += self.batch_size * self.seq_len
        return _sft_batch(self.encoded, indices, self.seq_len, self.eot, self.pad)

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "batches": self.batches_delivered, "tokens": self.tokens_delivered}

    def load_state_dict(self, d: dict) -> None:
        self.order.load_state_dict(d["order"])
        self.batches_delivered, self.tokens_delivered = d["batches"], d["tokens"]


def eval_batches(
    pairs: list[tuple[str, str]], tokenizer: Tokenizer, seq_len: int, batch_size: int, n_batches: int
) -> list[dict]:
    """`n_batches` fixed batches of pairs evenly spaced over `pairs` (repeating when there are fewer than B·n)."""
    encoded = _encode_pairs(pairs, tokenizer, seq_len)
    eot, pad = special_id(tokenizer, EOT), special_id(tokenizer, PAD)
    indices = np.linspace(0, len(encoded) - 1, batch_size * n_batches).round().astype(np.int64)  # (n·B,)
    return [_sft_batch(encoded, i, seq_len, eot, pad) for i in indices.reshape(n_batches, batch_size)]
