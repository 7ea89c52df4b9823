"""Apply stage: takes a model and kept indices, cuts every coupled tensor and fixes sizes.

The stage is a package, one job a file: :mod:`~depprune.apply.cuts` (check the
plan, build each cut tensor), :mod:`~depprune.apply.fixers` (module sizes),
:mod:`~depprune.apply.config` (the Hugging Face config, proved by a rebuild),
:mod:`~depprune.apply.optimizer_state` (optimizer state follows the cut), and
here the swap itself. All or nothing: the whole plan is checked and every new
tensor is built before the first module is touched, so on any error the model
is exactly as it was; tied parameters stay tied.

>>> import torch, depprune
>>> from depprune.apply import apply_kept_indices
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
>>> kept = {("0.weight", 0): torch.tensor([0, 2]), ("0.bias", 0): torch.tensor([0, 2]),
...         ("1.weight", 1): torch.tensor([0, 2])}
>>> apply_kept_indices(model, kept)
>>> model[0].out_features, model[1].in_features
(2, 2)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from depprune.apply.config import _attribute_changes
from depprune.apply.cuts import (
    _ABSENT,
    Kept,
    _Cut,
    _plan_cuts,
    _refresh_masked,
    masked_tensors,
    named_tensors,
)
from depprune.apply.fixers import FIXERS, _named_attributes, _View, _warn_at_caller
from depprune.apply.optimizer_state import (
    caller_name,
    check_optimizer_state,
    checked_optimizers,
    optimizers_referencing,
    prepare_remap,
)
from depprune.distributed.accelerate import write_indexes
from depprune.distributed.dtensor import refresh_sharded, reshard_registered
from depprune.errors import PlanMismatchError, ResourceError

__all__ = [
    "FIXERS",
    "PlanMismatchError",
    "apply_kept_indices",
    "masked_tensors",
    "named_tensors",
    "value_changes",
]


def value_changes(
    model: nn.Module, kept: Kept, widths: Mapping[int, Iterable[int]] | None = None
) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], list[str]]:
    """The value changes the cut makes beyond removing indices; ``model`` is not changed.

    Gives the folds by tensor name (a cut tensor's new values are
    ``fold(cut)``, in place, in its dtype: a Gemma-style embedding scale
    moved into the weights when the hidden size shrinks) and the names of
    tensors the fixers replace with new values (a scale buffer). What a cut
    made elsewhere (a checkpoint on disk) must reproduce to equal
    :func:`apply_kept_indices`.

    >>> import numpy as np, torch
    >>> value_changes(torch.nn.Linear(3, 4), {("weight", 0): np.array([1])})
    ({}, [])
    """
    with torch.inference_mode(False), torch.no_grad():
        cuts, changed = _plan_cuts(model, kept)
        view = _View(model, cuts, changed, widths)
        changes = _attribute_changes(model, view)
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    replaced = [
        f"{names[id(module)]}.{attr}" if names[id(module)] else attr
        for module, attrs in changes
        for attr, value in attrs.items()
        if isinstance(value, torch.Tensor)
    ]
    return dict(view.folds), replaced


def apply_kept_indices(
    model: nn.Module,
    kept: Kept,
    *,
    low_memory: bool = False,
    optimizers: Iterable[Optimizer] = (),
    attributes: Mapping[str, Mapping[str, int]] | None = None,
    widths: Mapping[int, Iterable[int]] | None = None,
    warn_optimizers: bool = True,
) -> None:
    """Cut every (parameter or buffer, dim) of ``model`` down to its kept indices.

    ``widths`` maps traced sizes the plan changes to their new sizes (a plan's
    :attr:`~depprune.Plan.widths`): config fields may be sized by them.

    ``attributes`` maps module names to integer attributes to set as well (those
    :func:`depprune.verify.infer_attributes` found and the replay proved).

    ``kept`` maps ``(name, dim)`` to the indices to keep along that dim (as
    from :meth:`depprune.DependencyGraph.kept_indices`). The whole plan and
    every attribute change is checked first: :class:`PlanMismatchError`
    before anything changes.

    By default every cut tensor is built before the first is swapped in, so
    any failure leaves the model as it was, at the cost of holding the old
    and new tensors at once. ``low_memory=True`` builds and swaps one tensor
    at a time, so the old one is freed at once (peak: the model plus its
    largest cut tensor); only running out of memory midway can then leave
    some tensors cut, and it is raised as :class:`ResourceError` naming them.

    ``optimizers`` made before the cut keep training the model: every state
    tensor of a cut parameter is cut with its indices and the param groups
    list the new parameter (:mod:`depprune.apply.optimizer_state`). Their new state
    is built with the new tensors and committed after the last swap, so on
    any error they are as they were too; with ``low_memory=True`` each
    parameter's state is cut and repointed right after that parameter is
    swapped, so the optimizers always match the (maybe partly) cut model.
    Any other optimizer still holding a cut parameter afterwards gets a
    warning naming it (``warn_optimizers=False`` skips that search, for a copy
    no optimizer can hold: the proof's shadow).

    >>> import numpy as np, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    >>> keep = np.array([1, 3])
    >>> apply_kept_indices(model, {("0.weight", 0): keep, ("0.bias", 0): keep,
    ...                            ("1.weight", 1): keep}, low_memory=True)
    >>> model[0], model(torch.zeros(5, 3)).shape
    (Linear(in_features=3, out_features=2, bias=True), torch.Size([5, 2]))
    """
    optimizers = checked_optimizers(optimizers)
    # Outside inference mode, so the new parameters can still be trained.
    with torch.inference_mode(False), torch.no_grad():
        reshard_registered(model)  # FSDP2: the sharded parameters are the ones to cut
        cuts, changed = _plan_cuts(model, kept)
        view = _View(model, cuts, changed, widths)
        attribute_changes = _attribute_changes(model, view)
        for name, fold in view.folds.items():
            key = id(view.tensors[name])
            for cut in cuts:
                if cut.key == key:
                    cut.fold = fold
        attribute_changes += _named_attributes(model, attributes or {})
        del view  # it holds the tensors being cut, which must not look held by someone else
        # Weak: a cut tensor alive after the cut is held elsewhere (maybe by an optimizer).
        old_tensors = [weakref.ref(cut.current()) for cut in cuts]
        if low_memory:
            check_optimizer_state(optimizers, [(cut.current(), cut.dims) for cut in cuts])
        else:
            try:
                for cut in cuts:
                    cut.new = cut.build()
            except BaseException:
                _discard_staged(cuts)  # offloaded values written aside
                raise
        swaps = [] if low_memory else [(cut.current(), cut.new, cut.dims) for cut in cuts]
        remap = prepare_remap(optimizers, swaps)
        del swaps
    # Nothing above touched the model; from here on only assignments happen, and if
    # one fails (a read-only attribute, a config validator) every earlier one is undone.
    undo: list[tuple[object, str, object, bool]] = []
    where = ""
    try:
        for module, attributes in attribute_changes:
            for attr, value in attributes.items():
                where, old = f"{type(module).__name__}.{attr}", getattr(module, attr, _ABSENT)
                setattr(module, attr, value)
                undo.append((module, attr, old, False))
        if not low_memory:
            for cut in cuts:
                cut.assign(cut.new, undo)
            where = "a torch.nn.utils.prune mask"
            _refresh_masked(model, changed, undo)
            where = "an offload folder's index.json"
            undo.append(write_indexes([cut.mirror for cut in cuts if cut.mirror]))
            where = "FSDP's sharded parameters"
            undo.append(refresh_sharded(model))
            where = "the optimizers' parameters"
            remap.commit()  # last: it undoes itself if it fails
    except BaseException as exc:
        _undo(undo)
        _discard_staged(cuts)
        if not isinstance(exc, Exception):
            raise  # Ctrl-C, SystemExit: undone, and passed on as they are
        raise PlanMismatchError(
            f"setting {where} failed ({type(exc).__name__}: {exc}); every change was undone, "
            "so the model is as it was"
        ) from exc
    del undo, remap
    if low_memory:
        _swap_one_by_one(cuts, optimizers)
        _refresh_masked(model, changed, None)
        write_indexes([cut.mirror for cut in cuts if cut.mirror])
        refresh_sharded(model)
    _discard_staged(cuts)  # the backups of offloaded values the cut replaced
    if warn_optimizers:
        _warn_stale_optimizers(old_tensors)


def _warn_stale_optimizers(old_tensors: list[weakref.ref]) -> None:
    """Warn about each optimizer that still holds tensors the cut replaced."""
    stale = [tensor for tensor in (ref() for ref in old_tensors) if tensor is not None]
    if not stale:
        return  # the common case: no walk over the process's objects
    for optimizer, count in optimizers_referencing(stale):
        name = caller_name(optimizer)
        _warn_at_caller(
            f"{type(optimizer).__name__} optimizer {name or hex(id(optimizer))!r} still holds "
            f"{count} {'parameter that was' if count == 1 else 'parameters that were'} cut, so "
            "it would keep training the old tensors; "
            f"pass optimizers=[{name or 'optimizer'}] to plan.apply (or depprune.prune) to "
            "carry its state over, or create the optimizer after pruning"
        )


def _discard_staged(cuts: list[_Cut]) -> None:
    for cut in cuts:
        if cut.mirror is not None:
            cut.mirror.discard()


def _undo(undo: list) -> None:
    for entry in reversed(undo):
        if callable(entry):
            entry()  # storage outside the module (an offload folder, FSDP's bookkeeping)
            continue
        target, attr, old, is_slot = entry
        if is_slot:
            target[attr] = old  # type: ignore[index]
        elif old is _ABSENT:
            delattr(target, attr)  # a field the plan added (a config's head_dim)
        else:
            setattr(target, attr, old)


def _swap_one_by_one(cuts: list[_Cut], optimizers: Sequence[Optimizer]) -> None:
    done = 0
    with torch.inference_mode(False), torch.no_grad():
        for cut in cuts:
            try:
                new = cut.build()
                # This tensor's optimizer state: built before its swap, put in right after.
                remap = prepare_remap(optimizers, [(cut.current(), new, cut.dims)])
            except (torch.OutOfMemoryError, MemoryError) as exc:
                raise ResourceError(
                    f"out of memory while cutting {cut.owners[0][1]!r} of "
                    f"{type(cut.owners[0][0]).__name__} after {done} of {len(cuts)} tensors; "
                    "the model (and the optimizers given) are partly cut: reload it, free "
                    "memory and apply again"
                ) from exc
            except BaseException as exc:
                # The old tensors already swapped are freed: say what state is left.
                if hasattr(exc, "add_note"):
                    exc.add_note(
                        f"depprune: low_memory apply stopped after cutting {done} of "
                        f"{len(cuts)} tensors; the model is partly cut: reload it"
                    )
                raise
            cut.assign(new, None)
            remap.commit()
            del remap  # it holds the old tensor: free it before the next cut
            done += 1
