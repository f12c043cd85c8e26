"""Corpus and tokenizer: everything between text on disk and the token stream (N,) the batches are cut from.

The default corpus is the Python standard library's own source: the `*.py` files under `sysconfig`'s stdlib folder,
without `site-packages` and without any `test`/`tests`/`idle_test` folder (about 730 files, 12 MB, 3.5M tokens at a
4096 vocabulary on CPython 3.11). We chose it because it is already on every machine that can run this project, so a
run needs no download and no network; because it is real, varied, structured text that a small model can visibly
learn; and because its functions come with docstrings, which give us supervised fine-tuning pairs for free (prompt =
signature + docstring, response = body). It differs between Python versions, so the caller records `manifest(docs)`
(file count, bytes, content hash) in the run folder. Any UTF-8 file or folder can replace it (`--data.path`).

A folder corpus is read recursively in sorted order; hidden files and folders are left out, and so are linked folders
(links to files are followed). A file that cannot be used is skipped with a warning on stderr naming it and why: not
UTF-8, unreadable (permissions), a dangling link, or not a regular file (a FIFO or device, which would block). A corpus
is a collection, and one stray binary file should not stop a run; the warning shows it, and the manifest's hash
changes with what was read, so a run continued on a corpus read differently is refused. Nothing usable left is an
error, and a single-file corpus or an SFT file that cannot be used is refused with one line.

Tokenizer and token arrays are cached by content hash. `new_files` lets the caller hold new cache entries in memory
and write them (`write_files`) only once every input is checked, so a refused run leaves no files behind.

What the report does and how we follow it (report §4.1, notes §5):
- byte-level BPE (128K vocabulary in the report; `vocab_size` here), trained with the `tokenizers` library;
- document packing: documents joined with `<|endoftext|>` into one stream (`encode_documents`), which
  minidsv3/batches.py cuts into fixed windows with no cross-sample attention mask, so a window may span two documents;
- SFT with the loss on response tokens only (minidsv3/sft.py).
NOTE: differs from the report: no fill-in-the-middle (PSM at rate 0.1) and no random splitting of merged
punctuation/line-break tokens; SFT examples are padded one per row instead of packed with sample masking, which
wastes some compute but keeps the masks readable.

Shape legend: N tokens in the stream · V vocab.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # document separator, and end of sequence for SFT responses
PAD = "<|pad|>"  # fills SFT rows; never a target with loss
_TOKENIZER_RECIPE = "bytelevel-bpe-digits-v2"  # part of the cache key: change it when the training recipe changes
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class DataError(ValueError):
    """The data cannot be used; the one-line message names the problem and how to fix it."""


class Document(NamedTuple):
    name: str  # path relative to the corpus root (posix), or the file name for a single-file corpus
    text: str


# ---------------------------------------------------------------------------------------------------------------
# Corpus


def _list_files(root: Path, skip_dirs: set[str]) -> list[str]:
    """Relative posix paths of the files under `root`, sorted; hidden files and folders are skipped, and so are
    links to folders (os.walk does not follow them)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: warn_skipped(f"{e.filename}: {e.strerror}")):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(found)


def decode_text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {e.start}; convert the file to UTF-8 text or remove it"
        ) from None


def read_text(path: Path) -> str:
    """The text of a UTF-8 file, or a DataError naming it and why: a dangling link, not a regular file, unreadable,
    not UTF-8."""
    if not path.is_file():  # follows links; False for a folder, a FIFO or a device, whose reading could block
        what = "a dangling link" if path.is_symlink() and not path.exists() else "not a regular file"
        raise DataError(f"{path}: {what}; point at UTF-8 text files (or remove it)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); fix its permissions or remove it") from None
    return decode_text(path, data)


def warn_skipped(problem: str) -> None:
    print(f"warning: skipped {problem}", file=sys.stderr)


def stdlib_files() -> tuple[Path, list[str]]:
    """The default corpus: (stdlib root, sorted relative paths of its *.py files, tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, [p for p in _list_files(root, _SKIPPED_STDLIB_DIRS) if p.endswith(".py")]


def load_documents(path: str) -> list[Document]:
    """Read the corpus: "" = the stdlib's source; a UTF-8 file; or a folder of them (recursive, sorted, no hidden),
    skipping with a warning each file that cannot be used."""
    if path == "":
        root, names = stdlib_files()
    else:
        root = Path(path)
        if not root.exists():
            raise DataError(f"{path}: no such file or folder; point --data.path at a UTF-8 text file or folder")
        if not root.is_dir():  # a single-file corpus: all or nothing
            text = read_text(root)
            if not text:
                raise DataError(f"{path}: the file is empty; the corpus needs some text")
            return [Document(root.name, text)]
        names = _list_files(root, {"__pycache__"})
        if not names:
            raise DataError(f"{path}: the folder has no files (hidden ones are skipped); add UTF-8 text files")
    docs, skipped = [], 0
    for name in names:
        try:
            docs.append(Document(name, read_text(root / name)))
        except DataError as e:
            warn_skipped(str(e))
            skipped += 1
    docs = [d for d in docs if d.text]  # an empty file would only add a separator
    if not docs:
        why = f"{skipped} skipped (see the warnings above), the rest empty" if skipped else "all empty"
        raise DataError(f"{root}: none of its {len(names)} files has text: {why}; the corpus needs UTF-8 text files")
    return docs


def manifest(docs: list[Document]) -> dict:
    """What the run was trained on: file count, UTF-8 bytes and a sha256 over names and texts (length-prefixed)."""
    h = hashlib.sha256()
    n_bytes = 0
    for d in docs:
        name, text = d.name.encode("utf-8"), d.text.encode("utf-8")
        h.update(f"{len(name)}:{len(text)}:".encode() + name + text)
        n_bytes += len(text)
    return {"files": len(docs), "bytes": n_bytes, "sha256": h.hexdigest()}


def _hash_unit(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, key): the same key lands in the same split whatever else is in the corpus."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hold_out(keys: list[str], val_fraction: float, seed: int) -> list[bool]:
    """True for the items held out: those whose hash falls below `val_fraction`, then at least one on each side."""
    u = [_hash_unit(k, seed) for k in keys]
    held = [x < val_fraction for x in u]
    # Tiny corpora can land all on one side; move the item whose hash is nearest the threshold. Only then can adding
    # an item move another one.
    if not any(held):
        held[int(np.argmin(u))] = True
    if all(held):
        held[int(np.argmax(u))] = False
    return held


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, val) by whole files, each file placed by a hash of (seed, name), so no text leaks across the split.

    A single-file corpus cannot be split by files; it is cut at a line boundary instead and its last `val_fraction`
    of lines (at least one) are held out, as nanoGPT does with Shakespeare: a contiguous tail leaks less than scattered
    lines, whose neighbours would be in training. The seed plays no part there.
    """
    if not docs:
        raise DataError("the corpus is empty; nothing to split")
    if len(docs) == 1:
        (doc,) = docs
        lines = io.StringIO(doc.text, newline="").readlines()  # splits on \n, \r\n, \r only
        if len(lines) < 2:
            raise DataError(f"{doc.name}: a one-line, one-file corpus cannot be split into train and validation")
        cut = len(lines) - min(len(lines) - 1, max(1, round(len(lines) * val_fraction)))
        return (
            [Document(f"{doc.name}:1-{cut}", "".join(lines[:cut]))],
            [Document(f"{doc.name}:{cut + 1}-{len(lines)}", "".join(lines[cut:]))],
        )
    held = hold_out([d.name for d in docs], val_fraction, seed)
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and token caches


def _train_tokenizer(docs: list[Document], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: text -> UTF-8 bytes -> merges learned on `docs`; all 256 bytes are in the vocabulary, so any
    text encodes losslessly, seen in training or not. Special tokens come first: EOT = 0, PAD = 1.

    Digits are split one by one before BPE (as DeepSeek's and LLaMA's tokenizers do), so that 123 is 1 2 3 and a
    number's digits are learnable, not arbitrary merged tokens (the RL task's arithmetic, minidsv3/tasks.py)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([d.text for d in docs], trainer, length=len(docs))
    return tokenizer


def write_files(files: dict[Path, bytes]) -> None:
    """Write each file (folders made as needed) to a temporary name, then rename: a crash never leaves half a file."""
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)


def _cache(path: Path, content: bytes, new_files: dict[Path, bytes] | None) -> None:
    """Write a new cache entry now, or hold it in `new_files` for the caller to write (write_files)."""
    if new_files is None:
        write_files({path: content})
    else:
        new_files[path] = content


def load_or_train_tokenizer(
    train_docs: list[Document], vocab_size: int, cache_dir: str | Path, new_files: dict[Path, bytes] | None = None
) -> Tokenizer:
    """The BPE tokenizer of `train_docs`, cached as `tokenizer-<key>.json`, key = hash(training manifest, vocab)."""
    if vocab_size < 258:
        raise DataError(f"vocab_size {vocab_size} < 258 (256 bytes + 2 special tokens); raise --model.vocab_size")
    key_text = json.dumps([manifest(train_docs)["sha256"], vocab_size, _TOKENIZER_RECIPE])
    path = Path(cache_dir) / f"tokenizer-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.json"
    if path.exists():
        tokenizer = Tokenizer.from_file(str(path))
    else:
        tokenizer = _train_tokenizer(train_docs, vocab_size)
        _cache(path, tokenizer.to_str().encode("utf-8"), new_files)
    # A literal "<|endoftext|>" inside a document is text, not a separator (this setting is not saved in the JSON).
    tokenizer.encode_special_tokens = True
    return tokenizer


def encode_documents(docs: list[Document], tokenizer: Tokenizer) -> np.ndarray:
    """One stream: doc_0 EOT doc_1 EOT ... (N,) uint16 when the vocabulary fits, else uint32."""
    eot = special_id(tokenizer, EOT)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    encodings = tokenizer.encode_batch([d.text for d in docs])  # parallel over documents in Rust
    return np.concatenate([np.array(e.ids + [eot], dtype) for e in encodings])  # (N,)


def load_or_tokenize(
    docs: list[Document], tokenizer: Tokenizer, cache_dir: str | Path, name: str,
    new_files: dict[Path, bytes] | None = None,
) -> np.ndarray:  # fmt: skip
    """The token stream of `docs` (N,), cached as `tokens-<name>-<key>.npy`: memory-mapped when read from the cache,
    in memory when just encoded."""
    key_text = manifest(docs)["sha256"] + hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
    path = Path(cache_dir) / f"tokens-{name}-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")  # (N,)
    tokens = encode_documents(docs, tokenizer)  # (N,)
    npy = io.BytesIO()
    np.save(npy, tokens)
    _cache(path, npy.getvalue(), new_files)
    return tokens


def special_id(tokenizer: Tokenizer, token: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise DataError(f"the tokenizer has no {token} token; use one made by load_or_train_tokenizer")
    return i


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """H = -Σ p_v ln p_v in nats/token: the loss of a model that ignores context, the first baseline to beat."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size)  # (V,)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
