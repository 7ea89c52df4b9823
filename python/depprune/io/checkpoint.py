"""io stage, the checkpoint: a Hugging Face safetensors directory to tensors by name.

:class:`Checkpoint` reads the index (``model.safetensors.index.json``) or the
single ``model.safetensors``, and every shard's header, so shapes and dtypes
of a 70B checkpoint are known after reading a few megabytes. Tensors are
read one at a time, on request.

>>> import os, tempfile, torch
>>> from safetensors.torch import save_file
>>> folder = tempfile.mkdtemp()
>>> save_file({"w": torch.ones(2, 3)}, os.path.join(folder, "model.safetensors"))
>>> checkpoint = Checkpoint(folder)
>>> checkpoint.names, checkpoint.shape("w"), checkpoint.dtype("w")
(['w'], (2, 3), torch.float32)
>>> checkpoint.read("w").sum().item()
6.0
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from depprune.errors import CheckpointError
from depprune.io.safetensors_files import (
    FileHeader,
    TensorEntry,
    read_bytes,
    read_header,
    torch_dtype,
)

__all__ = ["INDEX_NAME", "SINGLE_NAME", "Checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Checkpoint:
    """The tensors of a safetensors checkpoint (a directory, or one ``.safetensors`` file)."""

    def __init__(self, path: str | os.PathLike, *, direct: bool | None = None) -> None:
        path = Path(path)
        if path.is_file() and path.suffix == ".safetensors":
            self.folder, files = path.parent, [path.name]
            self.index: dict | None = None
        elif path.is_dir():
            self.folder = path
            files, self.index = _shard_files(path)
        else:
            raise CheckpointError(
                f"{os.fspath(path)!r} is not a checkpoint directory or a .safetensors file"
                + ("" if path.exists() else " (it does not exist)")
            )
        self.headers: dict[str, FileHeader] = {
            name: read_header(self.folder / name) for name in files
        }
        #: Which file holds each tensor.
        self.file_of: dict[str, str] = {}
        for file, header in self.headers.items():
            for name in header.tensors:
                if name in self.file_of:
                    raise CheckpointError(
                        f"{name!r} is stored twice, in {self.file_of[name]} and {file}; "
                        "the checkpoint is damaged"
                    )
                self.file_of[name] = file
        if self.index is not None:
            _check_index(self.index, self.file_of)
        #: Read with O_DIRECT (bypassing the page cache): by default when the checkpoint
        #: is larger than half the memory, so caching it would only evict other data.
        self.direct = _larger_than_half_the_memory(self.nbytes) if direct is None else direct

    @property
    def names(self) -> list[str]:
        """Every tensor name, in file and offset order (the order reads are sequential in)."""
        return list(self.file_of)

    def entry(self, name: str) -> TensorEntry:
        """The header entry of tensor ``name``."""
        file = self.file_of.get(name)
        if file is None:
            raise CheckpointError(f"the checkpoint in {self.folder} has no tensor {name!r}")
        return self.headers[file].tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def dtype(self, name: str) -> torch.dtype | None:
        """The torch dtype of ``name`` (None for a dtype this torch lacks)."""
        return torch_dtype(self.entry(name).dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in every file."""
        return sum(t.nbytes for h in self.headers.values() for t in h.tensors.values())

    @property
    def config(self) -> dict | None:
        """``config.json`` as a dict, or None when the checkpoint has none."""
        path = self.folder / "config.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc

    def read_raw(self, name: str, into: np.ndarray | None = None) -> np.ndarray:
        """The bytes of tensor ``name`` as a uint8 array (in ``into``, a reusable buffer
        from :func:`~depprune.io.safetensors_files.buffer_for`, when given)."""
        entry = self.entry(name)
        header = self.headers[self.file_of[name]]
        return read_bytes(header.path, header, entry, into=into, direct=self.direct)

    @property
    def largest(self) -> int:
        """Bytes of the largest tensor (what a read buffer must hold)."""
        return max((t.nbytes for h in self.headers.values() for t in h.tensors.values()), default=0)

    def read(self, name: str, into: np.ndarray | None = None) -> torch.Tensor:
        """Tensor ``name`` on the CPU, in its stored dtype (a view of ``into`` when given)."""
        entry = self.entry(name)
        dtype = torch_dtype(entry.dtype)
        if dtype is None:
            raise CheckpointError(
                f"{name!r} is stored as {entry.dtype}, which this torch cannot represent"
            )
        return torch.from_numpy(self.read_raw(name, into)).view(dtype).reshape(entry.shape)

    def __repr__(self) -> str:
        return (
            f"Checkpoint({os.fspath(self.folder)!r}, {len(self.file_of)} tensors in "
            f"{len(self.headers)} files, {self.nbytes / 2**30:.2f} GiB)"
        )


def _larger_than_half_the_memory(nbytes: int) -> bool:
    try:
        return nbytes > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return False


def _shard_files(folder: Path) -> tuple[list[str], dict | None]:
    """The safetensors files of ``folder``, from its index when it has one."""
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise ValueError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the index {index_path}: {exc}") from exc
        files = sorted(set(weight_map.values()))
        for file in files:
            if Path(file).name != file or not (folder / file).is_file():
                raise CheckpointError(
                    f"the index {index_path} names the shard {file!r}, which is not a file "
                    f"in {folder}; the checkpoint is incomplete"
                )
        return files, index
    if (folder / SINGLE_NAME).is_file():
        return [SINGLE_NAME], None
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return found, None
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt*")
    )
    hint = (
        f"; it holds {', '.join(others[:3])}: convert them with "
        "model.save_pretrained(folder) (safetensors is the default)"
        if others
        else ""
    )
    raise CheckpointError(
        f"{folder} has no {SINGLE_NAME}, no {INDEX_NAME}"
        + (f" and {len(found)} loose .safetensors files" if found else "")
        + hint
    )


def _check_index(index: dict, file_of: dict[str, str]) -> None:
    """The index and the shards' headers must name the same tensors in the same files."""
    weight_map = index["weight_map"]
    for name, file in weight_map.items():
        if file_of.get(name) != file:
            where = file_of.get(name)
            raise CheckpointError(
                f"the index puts {name!r} in {file}, but "
                + (f"it is in {where}" if where else "no shard holds it")
                + "; the checkpoint is damaged"
            )
    extra = [name for name in file_of if name not in weight_map]
    if extra:
        raise CheckpointError(
            f"shards hold tensors the index does not list ({', '.join(extra[:3])}); "
            "the checkpoint is damaged"
        )
