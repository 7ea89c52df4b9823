"""io stage, streamed scoring: an importance and a checkpoint to scores read from the files.

:func:`streamed` wraps any criterion built on ``ctx.dim_sums`` (magnitude,
Wanda, LAMP's sums, a user's own): when it asks for a tensor's per-dim
sums, the tensor is read from the checkpoint, reduced in float32 chunks and
dropped, so scoring a model larger than memory holds one tensor at a time
and reads each once. The model it scores may be a meta-device skeleton.

>>> import os, tempfile, torch, depprune
>>> from safetensors.torch import save_file
>>> from depprune.io import Checkpoint
>>> from depprune.importance import magnitude, score_groups, ScoreContext
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False), torch.nn.Linear(3, 1, bias=False))
>>> folder = tempfile.mkdtemp()
>>> save_file({k: v.detach() for k, v in model.state_dict().items()},
...           os.path.join(folder, "model.safetensors"))
>>> graph = depprune.trace(model, torch.zeros(1, 2))
>>> skeleton = model.to("meta")
>>> ctx = ScoreContext.from_model(graph, skeleton)
>>> scores = score_groups(graph.groups, streamed(magnitude(2), Checkpoint(folder)), ctx)
>>> scores[0].shape
torch.Size([3])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from depprune.graph import Group
from depprune.importance.context import Importance, ScoreContext, Transform, _all_dim_sums
from depprune.io.checkpoint import Checkpoint
from depprune.io.safetensors_files import buffer_for

__all__ = ["streamed"]


@dataclass
class _StreamedContext(ScoreContext):
    """A ScoreContext whose per-dim sums come from the checkpoint's files."""

    checkpoint: Checkpoint | None = None
    #: id of each model tensor -> the name the checkpoint stores it under.
    stored: dict[int, str] = field(default_factory=dict)
    #: Stored names in the order scoring asks for them (group by group, member by member).
    order: list[str] = field(default_factory=list)
    _ahead: dict[str, Future] = field(default_factory=dict)
    _reader: ThreadPoolExecutor | None = None

    def dim_sums(
        self, key: Hashable, tensor: torch.Tensor, dim: int, transform: Transform
    ) -> torch.Tensor:
        cached = self._sums.get((key, id(tensor)))
        if cached is None:
            name = self.stored.get(id(tensor))
            if name is None or self.checkpoint is None:
                # Not stored (a buffer the constructor makes): the model's own values.
                return super().dim_sums(key, tensor, dim, transform)
            values = self._read(name)
            cached = self._sums[(key, id(tensor))] = _all_dim_sums(values, transform)
        return cached[dim]

    def _read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, and the next one in ``order`` read in the background meanwhile.

        Two buffers take turns (this tensor's, the next one's), so reading
        allocates nothing; the caller is done with a tensor when it asks for
        the next.
        """
        assert self.checkpoint is not None
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1)
            self._position = {n: i for i, n in enumerate(self.order)}
            self._asked: set[str] = set()
            self._buffers = [buffer_for(self.checkpoint.largest) for _ in range(2)]
            self._turn = 0
        future = self._ahead.pop(name, None)
        if future is None:
            # Not the one read ahead: that read's buffer is the next one, so let it finish.
            for pending in self._ahead.values():
                pending.exception()
            self._ahead.clear()
            values = self.checkpoint.read(name, self._next_buffer())
        else:
            values = future.result()
        self._asked.add(name)
        position = self._position.get(name)
        # One ahead: the disk reads the next tensor while this one is reduced.
        for upcoming in self.order[position + 1 :] if position is not None else ():
            if upcoming not in self._asked:
                self._ahead[upcoming] = self._reader.submit(
                    self.checkpoint.read, upcoming, self._next_buffer()
                )
                break
        return values

    def _next_buffer(self) -> np.ndarray:
        self._turn ^= 1
        return self._buffers[self._turn]


def streamed(
    importance: Importance, checkpoint: Checkpoint, names: Mapping[str, str] | None = None
) -> Importance:
    """``importance`` with every tensor it sums read from ``checkpoint`` instead of the model.

    Give the result to :func:`depprune.make_plan` as ``importance=`` with a
    model whose tensor names are the checkpoint's (typically its meta-device
    skeleton, :func:`depprune.io.load_skeleton`); ``names`` maps the model's
    tensor names to the checkpoint's where they differ
    (:func:`depprune.io.skeleton.stored_as`); by default they are the same.
    """
    state: dict[str, object] = {}

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        if state.get("ctx") is not ctx:
            where = names if names is not None else {n: n for n in checkpoint.file_of}
            stored = {}
            for name, tensor in ctx.tensors.items():
                if name in where:
                    stored.setdefault(id(tensor), where[name])
            order: dict[str, None] = {}
            for each in ctx.graph.groups:
                for name, _ in each.members:
                    found = stored.get(id(ctx.tensors[name])) if name in ctx.tensors else None
                    if found is not None:
                        order.setdefault(found)
            state["ctx"] = ctx
            state["streamed"] = _StreamedContext(
                ctx.graph,
                ctx.tensors,
                ctx.owners,
                checkpoint=checkpoint,
                stored=stored,
                order=list(order),
            )
        return importance(group, state["streamed"])  # type: ignore[arg-type]

    # What the criterion carries (globally_comparable, Wanda's input_norms) stays visible.
    score.__dict__.update(getattr(importance, "__dict__", {}))
    score.__name__ = getattr(importance, "__name__", "importance")
    return score
