"""Apply stage: takes old -> new parameter swaps and kept indices, gives optimizers that follow.

The optimizers' state and param groups follow the cut. Pruning replaces every cut parameter with a new ``nn.Parameter``; an
optimizer made before would keep training the old tensors. Here every
per-parameter state tensor (SGD's ``momentum_buffer``, Adam's ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``, any state shaped like the parameter) is
cut with the parameter's own kept indices, on the state's device and in its
dtype; scalar state (``step``) is kept; the state entry moves to the new
parameter and every param group points at it. Building and committing are
separate steps, so :func:`depprune.apply.apply_kept_indices` builds all new
state before the first tensor is swapped and commits only after the last.

>>> import torch
>>> model = torch.nn.Linear(3, 4)
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> model(torch.ones(2, 3)).sum().backward()
>>> optimizer.step()
>>> old, keep = model.weight, torch.tensor([0, 2])
>>> model.weight = torch.nn.Parameter(old.detach()[keep])
>>> remap_optimizers([optimizer], [(old, model.weight, {0: keep})])
>>> optimizer.param_groups[0]["params"][0] is model.weight
True
>>> optimizer.state[model.weight]["momentum_buffer"].shape
torch.Size([2, 3])
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from depprune.apply.cuts import cut_tensor
from depprune.errors import PlanMismatchError

__all__ = [
    "OptimizerRemap",
    "caller_name",
    "check_optimizer_state",
    "checked_optimizers",
    "optimizers_referencing",
    "prepare_remap",
    "remap_optimizers",
]

#: (old tensor, new tensor, {dim: kept indices}): one swap of the cut.
Swap = tuple[torch.Tensor, torch.Tensor, Mapping[int, torch.Tensor]]


def checked_optimizers(optimizers: Optimizer | Iterable[Optimizer]) -> tuple[Optimizer, ...]:
    """The optimizers as a tuple, each once; anything else raises :class:`PlanMismatchError`.

    One optimizer alone is taken as a list of one. A wrapper that shares its
    inner optimizer's param groups (accelerate's) counts as that optimizer.

    >>> import torch
    >>> sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    >>> checked_optimizers(sgd) == (sgd,), checked_optimizers([sgd, sgd]) == (sgd,)
    (True, True)
    >>> checked_optimizers([sgd.param_groups])
    Traceback (most recent call last):
    ...
    depprune.errors.PlanMismatchError: optimizers= takes torch.optim.Optimizer objects, ...
    """
    if isinstance(optimizers, Optimizer):
        return (optimizers,)
    if isinstance(optimizers, (str, bytes, Mapping)) or not isinstance(optimizers, Iterable):
        raise PlanMismatchError(
            f"optimizers= takes a list of torch.optim.Optimizer objects, not a "
            f"{type(optimizers).__name__}; pass optimizers=[optimizer]"
        )
    found: dict[int, Optimizer] = {}
    for position, optimizer in enumerate(optimizers):
        if not isinstance(optimizer, Optimizer):
            raise PlanMismatchError(
                f"optimizers= takes torch.optim.Optimizer objects, but item {position} is a "
                f"{type(optimizer).__name__}; pass the optimizer itself "
                "(optimizers=[optimizer]), not its param groups or state"
            )
        found.setdefault(id(optimizer.param_groups), optimizer)
    return tuple(found.values())


def _state_dims(
    value: object, old: torch.Tensor, dims: Mapping[int, torch.Tensor], where: str
) -> dict[int, torch.Tensor] | None:
    """The dims to cut a state value along (``{}`` or ``None``: keep it as it is).

    A tensor shaped like the parameter is cut along every cut dim; one with
    the parameter's rank whose dims are its sizes or 1 (Adafactor's row and
    column statistics) along the dims it spans; a one-element tensor is
    scalar state. Anything else cannot follow the cut and raises.
    """
    if not isinstance(value, torch.Tensor):
        if isinstance(value, (list, tuple)) and any(
            isinstance(item, torch.Tensor) and item.numel() > 1 for item in value
        ):
            raise _uncuttable(where, f"a {type(value).__name__} of tensors")
        return None
    if value.shape == old.shape:
        return dict(dims)
    if value.numel() <= 1:
        return None
    if value.dim() == old.dim() and all(
        s in (1, o) for s, o in zip(value.shape, old.shape, strict=True)
    ):
        kept = {dim: index for dim, index in dims.items() if value.shape[dim] != 1}
        if value.shape[0] == 1 and any(index.dim() == 2 for index in kept.values()):
            # A statistic shared by the slices cannot keep other indices in each.
            raise _uncuttable(where, f"shape {tuple(value.shape)}, shared by slices cut apart")
        return kept
    raise _uncuttable(where, f"shape {tuple(value.shape)}")


def _uncuttable(where: str, what: str) -> PlanMismatchError:
    return PlanMismatchError(
        f"{where} is {what}, which depprune cannot cut like the parameter; nothing was "
        "changed. Create the optimizer after pruning, or drop that parameter's state first "
        "(optimizer.state.pop(parameter))"
    )


def _cuts(old: torch.Tensor, dims: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The dims that really shrink (a tied name may list a dim that keeps everything)."""
    return {
        dim: index
        for dim, index in dims.items()
        if index.dim() == 2 or index.numel() < old.shape[dim]
    }


def check_optimizer_state(
    optimizers: Sequence[Optimizer],
    cut: Iterable[tuple[torch.Tensor, Mapping[int, torch.Tensor]]],
) -> None:
    """Raise :class:`PlanMismatchError` if some state of a cut parameter cannot be cut.

    ``cut`` pairs each old tensor with its kept indices per dim. Nothing is
    built; :func:`depprune.apply.apply_kept_indices` calls this before a
    ``low_memory`` cut, which builds each tensor's state only when it swaps.

    >>> import torch
    >>> weight = torch.nn.Parameter(torch.ones(4, 3))
    >>> optimizer = torch.optim.SGD([weight], lr=0.1)
    >>> optimizer.state[weight]["basis"] = torch.ones(7)
    >>> check_optimizer_state([optimizer], [(weight, {0: torch.tensor([0, 1])})])
    Traceback (most recent call last):
    ...
    depprune.errors.PlanMismatchError: SGD state 'basis' of a parameter of shape (4, 3) is ...
    """
    for old, dims in cut:
        dims = _cuts(old, dims)
        for optimizer in optimizers:
            for key, value in optimizer.state.get(old, {}).items():
                _state_dims(value, old, dims, _where(optimizer, key, old))


def _where(optimizer: Optimizer, key: object, old: torch.Tensor) -> str:
    return f"{type(optimizer).__name__} state {key!r} of a parameter of shape {tuple(old.shape)}"


def _cut_value(value: object, old: torch.Tensor, dims: Mapping[int, torch.Tensor], where: str):
    cuts = _state_dims(value, old, dims, where)
    if not cuts:
        return value
    assert isinstance(value, torch.Tensor)
    # The parameter's own cut: a sharded (DTensor) state is cut shard by shard like it.
    return cut_tensor(value, {dim: index.to(value.device) for dim, index in cuts.items()})


@dataclass
class _Move:
    """One parameter of one optimizer: its new state (built) and where its groups list it."""

    optimizer: Optimizer
    old: torch.Tensor
    new: torch.Tensor
    entry: dict | None  # the new state; None where the old parameter had none
    slot: tuple[list, int] | None  # (a param group's params list, position)


class OptimizerRemap:
    """New optimizer state for cut parameters, built but not yet in any optimizer.

    Made by :func:`prepare_remap`; :meth:`commit` moves every state entry to
    the new parameter and repoints the param groups, all or nothing.

    >>> import torch
    >>> old = torch.nn.Parameter(torch.ones(4))
    >>> optimizer = torch.optim.Adam([old])
    >>> new = torch.nn.Parameter(torch.ones(2))
    >>> remap = prepare_remap([optimizer], [(old, new, {0: torch.tensor([1, 3])})])
    >>> optimizer.param_groups[0]["params"][0] is old  # nothing changed yet
    True
    >>> remap.commit()
    >>> optimizer.param_groups[0]["params"][0] is new
    True
    """

    def __init__(self, moves: list[_Move]) -> None:
        self._moves = moves

    def __len__(self) -> int:
        return len(self._moves)

    def commit(self) -> None:
        """Put the new state and parameters in; on any exception undo every step, then raise."""
        undo: list = []
        try:
            for move in self._moves:
                state = move.optimizer.state
                if move.entry is not None:
                    undo.append((state, move.old, state[move.old], move.new))
                    state[move.new] = move.entry
                    del state[move.old]
                if move.slot is not None:
                    params, position = move.slot
                    undo.append((params, position, move.old, None))
                    params[position] = move.new
        except BaseException:
            for target, key, old_value, new_key in reversed(undo):
                if new_key is not None:
                    target.pop(new_key, None)
                target[key] = old_value
            raise


def prepare_remap(optimizers: Sequence[Optimizer], swaps: Iterable[Swap]) -> OptimizerRemap:
    """Build the new state of every swapped parameter the optimizers hold; change nothing.

    Raises :class:`PlanMismatchError` for state that cannot follow the cut
    (see :func:`check_optimizer_state`). Call this inside
    ``torch.inference_mode(False)``, so the new state can be updated in place.

    >>> import torch
    >>> old = torch.nn.Parameter(torch.ones(4))
    >>> optimizer = torch.optim.SGD([old], lr=0.1)
    >>> len(prepare_remap([optimizer], [(old, torch.nn.Parameter(old[:2]), {0: torch.arange(2)})]))
    1
    """
    swaps = list(swaps)
    moves: list[_Move] = []
    for optimizer in optimizers:
        slots = {
            id(param): (group["params"], position)
            for group in optimizer.param_groups
            for position, param in enumerate(group["params"])
        }
        for old, new, dims in swaps:
            slot = slots.get(id(old))
            state = optimizer.state.get(old)
            if slot is None and state is None:
                continue
            entry = None
            if state is not None:
                cuts = _cuts(old, dims)
                entry = {
                    key: _cut_value(value, old, cuts, _where(optimizer, key, old))
                    for key, value in state.items()
                }
            moves.append(_Move(optimizer, old, new, entry, slot))
    return OptimizerRemap(moves)


def remap_optimizers(optimizers: Optimizer | Iterable[Optimizer], swaps: Iterable[Swap]) -> None:
    """Make ``optimizers`` train the new tensors of ``swaps`` with their state cut to match.

    Each swap is ``(old parameter, new parameter, {dim: kept indices})``.
    Every state tensor shaped like the old parameter is cut with the same
    indices (``index_select`` per dim, on the state's device and dtype),
    scalar state such as ``step`` is kept, the entry moves to the new
    parameter, and each param group lists the new parameter where it listed
    the old. All new state is built first, so on any error the optimizers
    are as they were. :meth:`depprune.Plan.apply` does this for you with
    ``optimizers=[...]``.

    >>> import torch
    >>> old = torch.nn.Parameter(torch.arange(4.0))
    >>> optimizer = torch.optim.Adam([old])
    >>> old.grad = torch.ones(4)
    >>> optimizer.step()
    >>> keep = torch.tensor([0, 3])
    >>> new = torch.nn.Parameter(old.detach()[keep])
    >>> remap_optimizers(optimizer, [(old, new, {0: keep})])
    >>> state = optimizer.state[new]
    >>> state["exp_avg"].shape, int(state["step"]), old in optimizer.state
    (torch.Size([2]), 1, False)
    """
    optimizers = checked_optimizers(optimizers)
    with torch.inference_mode(False), torch.no_grad():
        remap = prepare_remap(optimizers, swaps)
    remap.commit()


def optimizers_referencing(tensors: Iterable[torch.Tensor]) -> list[tuple[Optimizer, int]]:
    """Every live optimizer that holds some of ``tensors``, with how many; never raises.

    One pass in C over the objects Python's garbage collector tracks, for
    the instances of every Optimizer class (a few milliseconds), so
    :func:`depprune.apply.apply_kept_indices` calls it only when a cut
    tensor outlived the cut. Any error gives an empty list: this only feeds
    a warning.

    >>> import torch
    >>> weight = torch.nn.Parameter(torch.ones(2))
    >>> optimizer = torch.optim.SGD([weight], lr=0.1)
    >>> [(type(o).__name__, n) for o, n in optimizers_referencing([weight])]
    [('SGD', 1)]
    """
    try:
        wanted = {id(tensor) for tensor in tensors}
        if not wanted:
            return []
        # Instances of heap types refer to their class, so one walk in C over the
        # referrers of every Optimizer class finds them (a Python pass over all objects
        # took 0.15 s in a process with torchvision loaded).
        classes = _subclasses(Optimizer)
        # type(), not isinstance(): some module proxies warn when asked for __class__.
        found = [obj for obj in gc.get_referrers(*classes) if type(obj) in classes]
        seen: set[int] = set()
        result = []
        for optimizer in found:
            if id(optimizer.param_groups) in seen:
                continue  # a wrapper and the optimizer it wraps
            seen.add(id(optimizer.param_groups))
            held = {
                id(param)
                for group in optimizer.param_groups
                for param in group["params"]
                if id(param) in wanted
            }
            held.update(id(key) for key in optimizer.state if id(key) in wanted)
            if held:
                result.append((optimizer, len(held)))
        return result
    except Exception:
        return []


def _subclasses(cls: type) -> set[type]:
    found, todo = {cls}, [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def caller_name(obj: object) -> str | None:
    """The name ``obj`` has in the first frame outside depprune (the user's code), if any.

    >>> sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    >>> caller_name(sgd)
    'sgd'
    """
    try:
        package = os.path.dirname(os.path.abspath(__file__))
        frame = sys._getframe(1)
        while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
            frame = frame.f_back
        if frame is not None:
            for scope in (frame.f_locals, frame.f_globals):
                for name, value in scope.items():
                    if value is obj and not name.startswith("_"):
                        return name
    except Exception:
        pass
    return None
