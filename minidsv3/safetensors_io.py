"""safetensors files, read and written with numpy alone: one file or shards with an index, and the FP8 blocks of
DeepSeek-V3's released weights de-quantized on the way in.

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {"dtype", "shape",
"data_offsets": [begin, end]}} (offsets into the bytes after the header), then the raw little-endian tensor bytes
([ST] format description). Its own numpy path knows neither bfloat16 nor float8, the two formats DeepSeek releases in,
so this module reads and writes the bytes itself and views them through `ml_dtypes` (installed with jax); no torch.
Past a size limit the tensors go into `model-0000i-of-0000n.safetensors` shards named by
`model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {name: file}}), as transformers writes them.

FP8 ([G] README_WEIGHTS, report §3.3): a released linear weight (O, I) is float8_e4m3fn with a float32
`<name>_scale_inv` of shape (ceil(O/128), ceil(I/128)), one per 128 x 128 block (the last block of a row or column
may be smaller); the weight is fp8 x scale_inv, block by block. The embedding, head, router and norms are not FP8.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {  # safetensors' name -> numpy dtype, for the dtypes a checkpoint of this architecture may hold
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class FormatError(ValueError):
    """A file that is not what it should be; the message names it and the problem."""


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_folder(folder: Path, block: tuple[int, int] = (128, 128)) -> dict[str, np.ndarray]:
    """Every tensor of `folder` (an index and its shards, or model.safetensors) as float32 arrays, FP8 weights
    de-quantized with their `weight_scale_inv` blocks of `block` = (rows, columns)."""
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FormatError(f"{folder / INDEX}: not a safetensors index (no weight_map of name -> file)") from None
    elif (folder / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise FormatError(f"{folder}: neither {SINGLE} nor {INDEX}; the weights are missing")
    raw = {}
    for name in files:
        raw.update(read_file(folder / name))
    return dequantize(raw, block)


def read_file(path: Path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file, in their stored dtype (memory-mapped, read-only)."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        raise FormatError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    data = np.memmap(path, np.uint8, mode="r", offset=8 + length) if path.stat().st_size > 8 + length else None
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise FormatError(
                f"{path}: {name} is {info['dtype']}, a dtype minidsv3 does not read ({', '.join(DTYPES)}, F8_E4M3 with"
                " its weight_scale_inv); convert the checkpoint to bfloat16 or float32"
            )
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or data is None or end > data.size:
            raise FormatError(
                f"{path}: {name}'s bytes do not match its shape {shape}; the file is truncated or damaged"
            )
        tensors[name] = data[begin:end].view(dtype).reshape(shape)
    return tensors


def dequantize(raw: dict[str, np.ndarray], block: tuple[int, int]) -> dict[str, np.ndarray]:
    """float32 tensors; each `<w>_scale_inv` multiplies its FP8 weight `<w>` block by block and disappears."""
    out = {}
    for name, x in raw.items():
        if name.endswith("_scale_inv"):
            continue
        scale_inv = raw.get(f"{name}_scale_inv")
        if x.dtype == DTYPES["F8_E4M3"]:
            if scale_inv is None:
                raise FormatError(f"{name} is F8_E4M3 without its {name}_scale_inv; the checkpoint is incomplete")
            x = dequantize_blocks(x, np.asarray(scale_inv, np.float32), block, name)
        out[name] = np.asarray(x, np.float32)
    return out


def dequantize_blocks(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], name: str) -> np.ndarray:
    """w (O, I) fp8, scale_inv (ceil(O/rows), ceil(I/columns)) -> w · scale_inv per block (O, I) float32."""
    (o, i), (rows, cols) = w.shape, block
    if scale_inv.shape != (-(-o // rows), -(-i // cols)):
        raise FormatError(
            f"{name}_scale_inv has shape {scale_inv.shape}, expected {(-(-o // rows), -(-i // cols))} for a {w.shape}"
            f" weight in {rows} x {cols} blocks"
        )
    per_element = np.repeat(np.repeat(scale_inv, rows, axis=0)[:o], cols, axis=1)[:, :i]  # (O, I), ragged last blocks
    return w.astype(np.float32) * per_element


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_folder(folder: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """`tensors` into `folder`: model.safetensors, or shards of at most `max_shard_bytes` (a tensor larger than that
    gets a shard of its own) with model.safetensors.index.json."""
    shards, size = [[]], 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += x.nbytes
    if len(shards) == 1:
        write_file(folder / SINGLE, tensors)
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_file(folder / file, {name: tensors[name] for name in names})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2))


def write_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """One safetensors file; the header is padded with spaces to a multiple of 8 bytes, as the format recommends."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # "pt": what transformers expects to find
    for name, x in tensors.items():
        header[name] = {"dtype": names[x.dtype], "shape": list(x.shape), "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes())
