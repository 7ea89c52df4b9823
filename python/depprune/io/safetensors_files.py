"""io stage, the file format: safetensors headers read and written, tensors cut as raw bytes.

A safetensors file is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data offsets) and the tensors' bytes. Reading and
writing the format directly, not through ``safetensors.torch``, lets the
writer put the header first and then stream one tensor at a time, so a
checkpoint larger than memory is cut with about one tensor resident.
Cutting works on the raw bytes viewed as integers of the element's width,
so every dtype (bf16, fp8, int4-packed excepted) is cut bit for bit.

>>> import os, tempfile, numpy as np
>>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
>>> entry = TensorEntry("w", "F32", (2, 3), 0, 24)
>>> with open(path, "wb") as out:
...     write_header(out, [entry], {"format": "pt"})
...     _ = out.write(np.arange(6, dtype=np.float32).tobytes())
>>> header = read_header(path)
>>> header.tensors["w"].shape, header.metadata
((2, 3), {'format': 'pt'})
>>> raw = read_bytes(path, header, header.tensors["w"])
>>> cut_bytes(raw, header.tensors["w"], {1: np.array([0, 2])}).view(np.float32).tolist()
[0.0, 2.0, 3.0, 5.0]
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

from depprune.apply.cuts import cut_tensor
from depprune.errors import CheckpointError

__all__ = [
    "DIRECT_ALIGNMENT",
    "DTYPE_BYTES",
    "FileHeader",
    "TensorEntry",
    "buffer_for",
    "copy_range",
    "cut_bytes",
    "read_bytes",
    "read_header",
    "torch_dtype",
    "write_all",
    "write_header",
]

#: Bytes per element of every safetensors dtype a cut can index (packed 4- and 6-bit
#: types are absent: their elements do not start on byte boundaries).
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

_TORCH_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}

# Integers of each element width: the bytes are moved, never converted.
_RAW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: Headers above this are refused: a corrupt length must not allocate gigabytes.
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: dtype code, shape and byte range in the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class FileHeader:
    """A parsed header: where the data starts, the tensors by name, the metadata."""

    path: str
    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def torch_dtype(code: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype code, or None where torch has none.

    >>> torch_dtype("BF16")
    torch.bfloat16
    """
    name = _TORCH_DTYPES.get(code)
    return getattr(torch, name, None) if name else None


def read_header(path: str | os.PathLike) -> FileHeader:
    """Parse the header of the safetensors file at ``path``, checking every offset.

    >>> read_header(os.devnull)
    Traceback (most recent call last):
    ...
    depprune.errors.CheckpointError: ... is not a safetensors file: it is shorter than its 8-byte header length
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path} is not a safetensors file: it is shorter than its 8-byte header length"
                )
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER:
                raise CheckpointError(
                    f"{path} is not a safetensors file: its header claims {length} bytes"
                )
            text = handle.read(length)
            size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(text.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as exc:
        raise CheckpointError(f"{path} has a damaged safetensors header ({exc})") from exc
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            valid = (
                isinstance(dtype, str)
                and all(type(s) is int and s >= 0 for s in shape)
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end
            )
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(
                f"{path} has a malformed header entry for {name!r}: {info!r:.120}"
            )
        entry = TensorEntry(name, dtype, shape, begin, end)
        width = DTYPE_BYTES.get(dtype)
        if width is not None and entry.nbytes != width * math.prod(shape):
            raise CheckpointError(
                f"{path}: {name!r} is {dtype} of shape {list(shape)} but holds "
                f"{entry.nbytes} bytes; the file is damaged"
            )
        tensors[name] = entry
    data_start = 8 + length
    if any(data_start + t.end > size for t in tensors.values()):
        raise CheckpointError(f"{path} is truncated: its header points past the end of the file")
    return FileHeader(path, data_start, tensors, dict(metadata))


def write_header(
    out: BinaryIO, entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None
) -> None:
    """Write the header for ``entries`` (whose offsets must tile the data in order)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [entry.begin, entry.end],
        }
    text = json.dumps(header, separators=(",", ":")).encode()
    # Padded with spaces to 8 bytes, as the reference writer does, so data stays aligned.
    text += b" " * (-len(text) % 8)
    out.write(struct.pack("<Q", len(text)))
    out.write(text)


#: O_DIRECT transfers start, end and land on multiples of this (the largest common block).
DIRECT_ALIGNMENT = 4096


def buffer_for(nbytes: int) -> np.ndarray:
    """A reusable read buffer for tensors of up to ``nbytes``, direct reads included.

    torch's allocator backs large blocks with huge pages, so filling it costs
    far fewer page faults than a fresh ``np.empty``.
    """
    return torch.empty(nbytes + 3 * DIRECT_ALIGNMENT, dtype=torch.uint8).numpy()


def read_bytes(
    path: str,
    header: FileHeader,
    entry: TensorEntry,
    *,
    into: np.ndarray | None = None,
    direct: bool = False,
) -> np.ndarray:
    """The raw bytes of one tensor (a view of ``into`` when given, see :func:`buffer_for`).

    ``direct=True`` reads with ``O_DIRECT``: the disk writes into the buffer
    and the page cache is bypassed, which on a checkpoint larger than memory
    halves the kernel's CPU time (no copy, no cache to fill and evict). Where
    the filesystem refuses ``O_DIRECT`` the read is buffered.
    """
    start = header.data_start + entry.begin
    if into is None:
        into = buffer_for(entry.nbytes)
    if into.size < entry.nbytes + 3 * DIRECT_ALIGNMENT:
        raise ValueError("the read buffer is smaller than the tensor")
    if direct and hasattr(os, "O_DIRECT"):
        first = start // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
        last = -(-(start + entry.nbytes) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        shift = -into.ctypes.data % DIRECT_ALIGNMENT
        window = into[shift : shift + last - first]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            fd = -1  # the filesystem has no O_DIRECT: read through the page cache below
        if fd >= 0:
            try:
                done = _read_fully(fd, window, first, stop=start + entry.nbytes - first)
            except OSError:
                done = -1  # e.g. EINVAL from a device with larger blocks
            finally:
                os.close(fd)
            if done >= start + entry.nbytes - first:
                return window[start - first : start - first + entry.nbytes]
    target = into[: entry.nbytes]
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            done = _read_fully(fd, target, start, stop=entry.nbytes)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CheckpointError(f"cannot read {entry.name!r} from {path}: {exc.strerror}") from exc
    if done < entry.nbytes:
        raise CheckpointError(f"{path} ended inside {entry.name!r}; the file is truncated")
    return target


def _read_fully(fd: int, target: np.ndarray, offset: int, *, stop: int) -> int:
    """``preadv`` into ``target`` from ``offset`` until ``stop`` bytes or the file's end."""
    view = memoryview(target).cast("B")
    done = 0
    while done < stop:
        count = os.preadv(fd, [view[done:]], offset + done)
        if not count:
            break
        done += count
    return done


def cut_bytes(raw: np.ndarray, entry: TensorEntry, kept: Mapping[int, np.ndarray]) -> np.ndarray:
    """The bytes of ``entry`` keeping ``kept[dim]`` indices along each cut dim."""
    width = DTYPE_BYTES.get(entry.dtype)
    if width is None:
        raise CheckpointError(
            f"{entry.name!r} is stored as {entry.dtype}, whose elements are not whole bytes, "
            "so it cannot be cut on disk; dequantize the checkpoint first"
        )
    values = torch.from_numpy(raw).view(_RAW[width]).view(entry.shape)
    index = {d: torch.from_numpy(np.ascontiguousarray(k, dtype=np.int64)) for d, k in kept.items()}
    return cut_tensor(values, index).contiguous().view(torch.uint8).reshape(-1).numpy()


def write_all(target: BinaryIO, data: np.ndarray | bytes) -> None:
    """Write every byte of ``data`` to an unbuffered file (one write stops at 2 GiB on Linux)."""
    view = memoryview(data).cast("B")
    while view:
        count = target.write(view)
        if not count:
            raise CheckpointError(f"writing {target.name} failed: the disk may be full")
        view = view[count:]


def copy_range(source: BinaryIO, target: BinaryIO, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``source`` to the end of unbuffered ``target``.

    In the kernel (``copy_file_range``) where the system has it, so an uncut
    tensor never passes through this process's memory; else in 64 MiB chunks.
    """
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < count:
                moved = os.copy_file_range(
                    source.fileno(), target.fileno(), count - done, offset + done
                )
                if moved == 0:
                    break
                done += moved
        except OSError:
            pass  # another filesystem or an old kernel: the chunked copy below finishes it
    chunk = 64 << 20
    while done < count:
        source.seek(offset + done)
        data = source.read(min(chunk, count - done))
        if not data:
            raise CheckpointError(f"{source.name} ended early; the file is truncated")
        write_all(target, data)
        done += len(data)
