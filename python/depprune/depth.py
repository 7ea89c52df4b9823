"""Depth stage: a model and example inputs to its removable blocks, their scores, the kept ones.

Depth pruning removes whole repeated blocks (decoder layers, residual
blocks, encoder blocks) instead of channels. This module finds them, scores
them and chooses which to drop; ``depprune.apply.containers.drop_children``
rebuilds the containers.

- :func:`find_layer_lists` finds, by one hooked forward on the meta shadow,
  every ``nn.ModuleList`` / ``nn.Sequential`` whose children repeat a class
  and which of those children can be skipped without changing any shape.
- :func:`block_influence` scores each removable child on calibration data by
  how much it changes its input (ShortGPT's Block Influence, or the angular
  distance of Gromov et al. 2024); :func:`given_layers` takes the user's own.
- :func:`choose_layers` turns scores and a ratio (or a count) into the kept
  children of every list.

>>> import torch
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])
>>> with torch.no_grad():  # block 2 passes its input through unchanged
...     _ = model[2].weight.copy_(torch.eye(4)), model[2].bias.zero_()
>>> lists = find_layer_lists(model, torch.zeros(1, 4))
>>> importance = block_influence(model, [torch.randn(16, 4)], lists=lists, progress=False)
>>> choose_layers(lists, importance, 1)
{'': array([0, 1, 3])}
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from depprune.errors import DeppruneError, ImportanceError, SelectionError, TraceError
from depprune.importance.context import _quiet
from depprune.shadow import ShadowError, meta_inputs, meta_shadow
from depprune.tracer import model_inputs, running_stats_kept, split_inputs

__all__ = [
    "LayerImportance",
    "LayerList",
    "block_influence",
    "choose_layers",
    "find_layer_lists",
    "given_layers",
]

METRICS = ("cosine", "angular")


@dataclass(frozen=True)
class LayerList:
    """A container of repeated blocks and which of its children can be removed.

    ``name`` is the container's module path (``""`` for the model itself),
    ``size`` its number of children, ``removable`` the positions (0-based,
    in the container's order) of the children whose removal is a
    shape-preserving skip, and ``child_names`` the children's own names
    (``"0"``, ``"1"``, ... in a ``ModuleList``; torchvision's ViT names
    them ``"encoder_layer_0"``, ...).

    >>> LayerList("model.layers", 4, (0, 1, 2, 3))
    LayerList(name='model.layers', size=4, removable=(0, 1, 2, 3))
    """

    name: str
    size: int
    removable: tuple[int, ...]
    child_names: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def child_path(self, position: int) -> str:
        """The module path of the child at ``position``.

        >>> LayerList("encoder.layers", 2, (0, 1), ("encoder_layer_0", "encoder_layer_1")).child_path(1)
        'encoder.layers.encoder_layer_1'
        >>> LayerList("", 2, (0, 1)).child_path(0)
        '0'
        """
        child = self.child_names[position] if self.child_names else str(position)
        return f"{self.name}.{child}" if self.name else child


@dataclass
class LayerImportance:
    """Scores of the children of every layer list: higher is more important.

    ``scores`` maps each :attr:`LayerList.name` to a float64 CPU tensor of
    the list's ``size``; children that cannot be removed score ``+inf``.
    ``exact=True`` (user-given layers) tells :func:`choose_layers` to remove
    exactly the children scored ``-inf`` and to ignore ratios.

    >>> score = LayerImportance({"h": torch.tensor([0.5, float("inf")], dtype=torch.float64)}, "cosine")
    >>> score.metric, score.exact, score.scores["h"].tolist()
    ('cosine', False, [0.5, inf])
    """

    scores: dict[str, torch.Tensor]
    metric: str
    exact: bool = False


# ---------------------------------------------------------------------------------------
# Discovery


def find_layer_lists(model: nn.Module, example_inputs: Any) -> list[LayerList]:
    """The containers of repeated blocks in ``model`` that have removable children.

    A candidate is a child of an ``nn.ModuleList`` or ``nn.Sequential``
    that has parameters and shares its class with another child of the
    same container (a container may mix classes; parameter-free children
    such as activations are never candidates: removing them saves
    nothing). One forward of the meta shadow (the model itself under
    ``torch.no_grad()`` in eval mode when it has no shadow or its forward
    needs real values) records, with forward hooks, each child's first
    tensor input (positional first, then the ``hidden_states`` keyword,
    then any keyword) and its output (a tensor, or the first tensor of a
    tuple or ``ModelOutput``). A candidate is removable when it ran exactly
    once, appears once in the model's lists, its output has its input's
    shape and dtype, and it sits on a chain: its input is the previous
    child's output object, or its output is the next child's input.
    Removing it is then a skip that changes no shape downstream.

    Nested lists are resolved from the outside in, so that no reported list
    lies inside another's removable child. A removable child that returns
    what a list inside it computed, untouched, is a *stage* (a ConvNeXt or
    Swin stage in torchvision's ``features``, a timm stage in ``stages``):
    it is not removable, its inner list is. Any other removable child is a
    *block* (a MobileNet inverted residual adds its input to what its
    ``conv`` list computed): it is removed whole, and the lists inside it
    are not reported. Lists without removable children are not reported
    either. The HF decoder stack is found where the model keeps it:
    ``model.layers`` in a ``LlamaForCausalLM`` (``layers`` in a bare
    ``LlamaModel``), ``transformer.h`` in GPT-2, ``model.decoder.layers``
    in OPT.

    Raises :class:`~depprune.errors.TraceError` when ``example_inputs`` do
    not run the model. The model is not changed.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> find_layer_lists(model, torch.zeros(2, 3))  # the first Linear changes the width
    [LayerList(name='', size=3, removable=(1, 2))]
    """
    candidates = _candidate_lists(model)
    if not candidates:
        return []
    seen = _observe(model, example_inputs, candidates)
    places = Counter(id(child) for _, children, _ in candidates for child in children)
    skips = {
        name: [
            i
            for i in repeated
            if places[id(children[i])] == 1
            and seen.calls[(name, i)].is_skip()
            and ((name, i) in seen.chained or (name, i + 1) in seen.chained)
        ]
        for name, children, repeated in candidates
    }
    inside = _lists_inside([name for name, _, _ in candidates])
    hidden: set[str] = set()
    lists = []
    for name, children, _ in sorted(candidates, key=lambda c: _depth(c[0])):
        if name in hidden:
            continue
        child_names = tuple(model.get_submodule(name)._modules)
        removable = []
        for i in skips[name]:
            path = f"{name}.{child_names[i]}" if name else child_names[i]
            nested = [inner for inner in inside.get(path, ()) if skips[inner]]
            if not nested:
                removable.append(i)
            elif not seen.stages.get((name, i)):
                removable.append(i)  # a block: removed whole, its insides stay as they are
                hidden.update(inside[path])
        if removable:
            lists.append(LayerList(name, len(children), tuple(removable), child_names))
    order = {name: k for k, (name, _, _) in enumerate(candidates)}
    return sorted(lists, key=lambda entry: order[entry.name])


def _depth(name: str) -> int:
    return name.count(".") + bool(name)


def _lists_inside(names: list[str]) -> dict[str, list[str]]:
    """For every module path, the candidate lists at it or below it."""
    inside: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".") if name else []
        for k in range(1, len(parts) + 1):
            inside.setdefault(".".join(parts[:k]), []).append(name)
    return inside


def _candidate_lists(model: nn.Module) -> list[tuple[str, list[nn.Module | None], list[int]]]:
    """(name, children, positions of repeated parameterised children) of every container."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module._modules.values())
        weighted = [c is not None and next(c.parameters(), None) is not None for c in children]
        classes = Counter(type(c) for c, w in zip(children, weighted, strict=True) if w)
        repeated = [i for i, c in enumerate(children) if weighted[i] and classes[type(c)] >= 2]
        if repeated:
            found.append((name, children, repeated))
    return found


@dataclass
class _Calls:
    """How one child was called: how often, and its first call's shapes and output."""

    count: int = 0
    input_shape: tuple | None = None
    output_shape: tuple | None = None
    output: Any = None  # a weak reference to the latest output tensor
    output_version: int = -1  # its version counter then: an in-place op changes it

    def is_skip(self) -> bool:
        """Ran once, giving a tensor of its input tensor's shape and dtype."""
        return (
            self.count == 1
            and self.input_shape is not None
            and self.input_shape == self.output_shape
        )

    def gave(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is this child's latest output, not changed in place since."""
        return (
            self.output is not None
            and self.output() is tensor
            and tensor._version == self.output_version
        )


@dataclass
class _Seen:
    """What the hooked forward saw, per ``(list name, position)`` of every child."""

    calls: dict[tuple[str, int], _Calls]
    chained: set[tuple[str, int]]  # its first input was the previous child's latest output
    stages: dict[tuple[str, int], bool]  # its output was an inner list child's, untouched


def _observe(model: nn.Module, example_inputs: Any, candidates: list) -> _Seen:
    """One hooked forward: the meta shadow first, the model itself when that cannot run."""
    try:
        twin = meta_shadow(model)
    except ShadowError:
        twin = None
    if twin is not None:
        try:
            args, kwargs = meta_inputs(model_inputs(twin, example_inputs))
            return _hooked_forward(twin, args, kwargs, candidates)
        except DeppruneError:
            raise
        except Exception:
            pass  # its forward needs real values (a custom kernel, a check on data)
    args, kwargs = model_inputs(model, example_inputs)
    try:
        return _hooked_forward(model, args, kwargs, candidates)
    except DeppruneError:
        raise
    except Exception as exc:
        raise TraceError(
            f"example_inputs did not run model {type(model).__name__}: {type(exc).__name__}: "
            f"{exc}. Pass the inputs its forward takes: a tensor, a tuple of positional "
            "inputs or a dict of keyword inputs"
        ) from exc


def _hooked_forward(target: nn.Module, args: tuple, kwargs: dict, candidates: list) -> _Seen:
    """Run ``target`` once in eval mode with hooks on every child of the candidate lists.

    Tensor identity is checked in the hooks, while the tensors compared are
    alive (earlier outputs are held by weak reference), so no activation
    outlives its use.
    """
    modules = dict(target.named_modules())
    inside = _lists_inside([name for name, _, _ in candidates])
    calls: dict[int, _Calls] = {}
    slots: dict[tuple[str, int], nn.Module] = {}
    before: dict[int, list[tuple[tuple[str, int], nn.Module]]] = {}  # child: (slot, previous)
    within: dict[int, list[tuple[tuple[str, int], list[nn.Module]]]] = {}  # child: inner children
    for name, _, _ in candidates:
        children = list(modules[name]._modules.items())
        for i, (child_name, child) in enumerate(children):
            if child is None:
                continue
            slot = (name, i)
            slots[slot] = child
            calls.setdefault(id(child), _Calls())
            previous = children[i - 1][1] if i else None
            if previous is not None:
                before.setdefault(id(child), []).append((slot, previous))
            path = f"{name}.{child_name}" if name else child_name
            inner = [m for n in inside.get(path, ()) for m in modules[n]._modules.values() if m]
            within.setdefault(id(child), []).append((slot, inner))
    chained: set[tuple[str, int]] = set()
    stages: dict[tuple[str, int], bool] = {}

    def hook(module, hook_args, hook_kwargs, output) -> None:
        record = calls[id(module)]
        record.count += 1
        x, y = _first_tensor(hook_args, hook_kwargs), _first_tensor(output)
        # The latest output is what the next child may take in, even from a shared block.
        record.output = weakref.ref(y) if y is not None else None
        record.output_version = -1 if y is None else y._version
        if record.count > 1 or x is None or y is None:
            return
        record.input_shape, record.output_shape = (x.shape, x.dtype), (y.shape, y.dtype)
        for slot, previous in before.get(id(module), ()):
            if calls[id(previous)].gave(x):
                chained.add(slot)
        for slot, inner in within[id(module)]:
            stages[slot] = any(calls[id(m)].gave(y) for m in inner)

    unique = {id(child): child for child in slots.values()}.values()
    handles = [child.register_forward_hook(hook, with_kwargs=True) for child in unique]
    flags = [(module, module.training) for module in target.modules()]
    try:
        target.eval()
        with torch.no_grad(), running_stats_kept(target):
            target(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    by_slot = {slot: calls[id(child)] for slot, child in slots.items()}
    return _Seen(by_slot, chained, stages)


def _first_tensor(value: Any, extra: Mapping | None = None) -> torch.Tensor | None:
    """The first tensor of a tensor, tuple, list or mapping (a ModelOutput), then of ``extra``.

    For keyword inputs, ``hidden_states`` comes first: it is what HF blocks chain.
    """
    if isinstance(value, torch.Tensor):
        return value
    items: list = []
    if isinstance(value, Mapping):
        items = list(value.values())
    elif isinstance(value, (tuple, list)):
        items = list(value)
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    if extra:
        hidden = extra.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            return hidden
        return _first_tensor(extra)
    return None


# ---------------------------------------------------------------------------------------
# Importance


def block_influence(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    metric: str = "cosine",
    lists: Sequence[LayerList] | None = None,
    dim: int | None = None,
    progress: bool | None = None,
) -> LayerImportance:
    """How much each removable block changes its input, over calibration batches.

    Runs the real ``model`` (eval mode, ``torch.no_grad()``) on every batch
    of ``calibration`` (a tensor, a tuple or a dict of inputs each, like
    ``example_inputs``; tensors are moved to the model's first parameter's
    device) with forward hooks on the removable children of ``lists``
    (found with :func:`find_layer_lists` on the first batch when ``None``).
    Per call, ``cos`` is the cosine between the block's input and output at
    each position: along the last dim for ``(batch, seq, hidden)`` or
    ``(batch, features)`` tensors, along the channel dim 1 at every spatial
    position for 4-D and 5-D conv feature maps (``dim`` overrides both; pass
    ``dim=-1`` for channels-last maps). ``metric="cosine"`` scores the mean
    of ``1 - cos`` (ShortGPT's Block Influence, Men et al. 2024),
    ``"angular"`` the mean of ``arccos(cos) / pi`` (Gromov et al. 2024).
    Positions where a dict batch's ``attention_mask`` is 0 (padding) are
    left out when the mask has the positions' shape. The mean is over all
    positions of all batches, summed in float64 on the activations' device
    (one scalar per block per batch). Shows a progress bar over batches
    (``progress=False`` silences it; ``None``: only on a terminal).

    Raises :class:`~depprune.errors.ImportanceError` when the model's
    weights are on the meta device, calibration is empty, a list has no
    removable child, or a block's output no longer has its input's shape.
    The model is left as it was (hooks removed, training flags restored).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> with torch.no_grad():  # block 0 doubles its input: same direction, cos 1
    ...     _ = model[0].weight.copy_(2 * torch.eye(2)), model[0].bias.zero_()
    ...     _ = model[1].weight.copy_(torch.tensor([[0.0, -1.0], [1.0, 0.0]])), model[1].bias.zero_()
    >>> score = block_influence(model, [torch.tensor([[1.0, 0.0], [0.0, 3.0]])], progress=False)
    >>> score.scores[""].tolist()  # block 1 turns every input by 90 degrees
    [0.0, 1.0]
    >>> block_influence(model, [torch.eye(2)], metric="angular", progress=False).scores[""].tolist()
    [0.0, 0.5]
    """
    if metric not in METRICS:
        raise ImportanceError(f"unknown block influence metric {metric!r}; use one of {METRICS}")
    parameter = next(iter(model.parameters()), None)
    if parameter is None or parameter.is_meta:
        raise ImportanceError(
            "block_influence needs real weights, but the model's are on the meta device "
            "(or it has none); load the weights before scoring its blocks"
        )
    device = parameter.device
    batches = iter(calibration)
    first = next(batches, _NO_BATCH)
    if first is _NO_BATCH:
        raise ImportanceError(
            "calibration gave no batches; pass an iterable of example inputs "
            "(tensors, tuples or dicts, like example_inputs)"
        )
    move = lambda batch: pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), batch)  # noqa: E731
    first = move(first)
    if lists is None:
        lists = find_layer_lists(model, first)
        if not lists:
            raise ImportanceError(
                f"{type(model).__name__} has no removable repeated blocks (children of a "
                "ModuleList or Sequential that share a class and keep their input's shape); "
                "depth pruning cannot score it"
            )
    targets = _removable_children(model, lists)
    sums: dict[tuple[str, int], torch.Tensor] = {}
    counts: dict[tuple[str, int], torch.Tensor | int] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def measure(keys: tuple, path: str, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        if x is None or y is None or x.shape != y.shape:
            raise ImportanceError(
                f"block {path} gave an output of shape "
                f"{None if y is None else tuple(y.shape)} for an input of shape "
                f"{None if x is None else tuple(x.shape)}; only shape-preserving blocks can "
                "be scored: pass the lists find_layer_lists gives for these inputs"
            )
        along = dim if dim is not None else (1 if x.ndim in (4, 5) else -1)
        compute = torch.promote_types(x.dtype, torch.float32)  # bf16 and fp16 lose too much
        cos = nn.functional.cosine_similarity(x.to(compute), y.to(compute), dim=along)
        cos = cos.clamp_(-1, 1)
        values = (torch.arccos(cos) / math.pi if metric == "angular" else 1 - cos).double()
        mask = current["mask"]
        if mask is not None and mask.shape == values.shape:
            weight = (mask != 0).to(device=values.device, dtype=values.dtype)
            total, count = (values * weight).sum(), weight.sum()
        else:
            total, count = values.sum(), values.numel()
        for key in keys:
            sums[key] = sums[key] + total if key in sums else total
            counts[key] = counts.get(key, 0) + count

    by_module: dict[int, tuple[nn.Module, str, list]] = {}
    for key, path, child in targets:
        by_module.setdefault(id(child), (child, path, []))[2].append(key)
    handles = []
    flags = [(m, m.training) for m in model.modules()]
    try:
        for child, path, keys in by_module.values():
            hook = _measuring(measure, tuple(keys), path)
            handles.append(child.register_forward_hook(hook, with_kwargs=True))
        model.eval()
        with torch.no_grad():
            stream = itertools.chain([first], map(move, batches))
            for number, batch in enumerate(
                tqdm(
                    stream,
                    desc="block influence",
                    total=_length(calibration),
                    disable=_quiet(progress),
                )
            ):
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                current["mask"] = mask if isinstance(mask, torch.Tensor) else None
                args, kwargs = split_inputs(batch)
                try:
                    model(*args, **kwargs)
                except DeppruneError:
                    raise
                except Exception as exc:
                    raise ImportanceError(
                        f"calibration batch {number} did not run model {type(model).__name__}: "
                        f"{type(exc).__name__}: {exc}. Pass batches its forward takes"
                    ) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    scores = {}
    for layer_list in lists:
        score = torch.full((layer_list.size,), math.inf, dtype=torch.float64)
        for i in layer_list.removable:
            key = (layer_list.name, i)
            if key not in sums:
                raise ImportanceError(
                    f"block {layer_list.child_path(i)} never ran on the calibration batches; "
                    "pass batches that run every block, or lists without it"
                )
            score[i] = sums[key].item() / max(float(counts[key]), 1.0)
        scores[layer_list.name] = score
    return LayerImportance(scores, metric)


_NO_BATCH = object()


def _length(calibration: Iterable[Any]) -> int | None:
    """The number of batches for the progress bar, when the iterable knows it."""
    try:
        return len(calibration)  # type: ignore[arg-type]
    except TypeError:
        return None


def _measuring(measure: Any, keys: tuple, path: str) -> Any:
    """A forward hook handing a block's first input and output tensors to ``measure``."""

    def hook(_module, hook_args, hook_kwargs, output) -> None:
        measure(keys, path, _first_tensor(hook_args, hook_kwargs), _first_tensor(output))

    return hook


def _removable_children(
    model: nn.Module, lists: Sequence[LayerList]
) -> list[tuple[tuple[str, int], str, nn.Module]]:
    """``((list name, position), path, child)`` of each removable child; checks the lists fit."""
    found = []
    for layer_list in lists:
        if not isinstance(layer_list, LayerList):
            raise ImportanceError(
                f"lists must hold LayerList entries (from find_layer_lists); "
                f"got {type(layer_list).__name__}"
            )
        try:
            container = model.get_submodule(layer_list.name)
        except AttributeError:
            container = None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or (
            len(container._modules) != layer_list.size
        ):
            raise ImportanceError(
                f"layer list {layer_list.name!r} is not a ModuleList or Sequential of "
                f"{layer_list.size} children in {type(model).__name__}; pass the lists "
                "find_layer_lists gives for this model"
            )
        if not layer_list.removable:
            raise ImportanceError(
                f"layer list {layer_list.name!r} has no removable child; leave it out of lists"
            )
        children = list(container._modules.items())
        for i in layer_list.removable:
            if not 0 <= i < layer_list.size or children[i][1] is None:
                raise ImportanceError(
                    f"layer list {layer_list.name!r} names child {i}, which it does not have "
                    f"({layer_list.size} children); pass the lists find_layer_lists gives"
                )
            child_name, child = children[i]
            path = f"{layer_list.name}.{child_name}" if layer_list.name else child_name
            found.append(((layer_list.name, i), path, child))
    return found


def given_layers(
    model: nn.Module,
    example_inputs_or_lists: Any,
    removed: Mapping[str, Iterable[int]],
) -> LayerImportance:
    """The user's choice of blocks to remove, checked against the removable ones.

    ``example_inputs_or_lists`` is either the example inputs (the lists are
    then found with :func:`find_layer_lists`) or a sequence of
    :class:`LayerList`. ``removed`` maps list names to the positions of the
    children to remove. The result scores them ``-inf``, the other
    removable children 0 and the rest ``+inf``, with ``exact=True``:
    :func:`choose_layers` removes exactly these.

    Raises :class:`~depprune.errors.SelectionError` naming the list and the
    position when a name is not a layer list or a position is not
    removable (the message lists the removable ones).

    >>> import torch
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])
    >>> chosen = given_layers(model, torch.zeros(1, 4), {"": [2, 1]})
    >>> chosen.exact, chosen.scores[""].tolist()
    (True, [0.0, -inf, -inf, 0.0])
    >>> choose_layers(find_layer_lists(model, torch.zeros(1, 4)), chosen, 0.0)
    {'': array([0, 3])}
    """
    value = example_inputs_or_lists
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, LayerList) for v in value):
        lists = list(value)
    else:
        lists = find_layer_lists(model, value)
    by_name = {layer_list.name: layer_list for layer_list in lists}
    if not isinstance(removed, Mapping):
        raise SelectionError(
            f"removed must map layer list names to child positions, e.g. "
            f"{{'model.layers': [3, 4]}}; got {type(removed).__name__}"
        )
    scores = {}
    for layer_list in lists:
        score = torch.full((layer_list.size,), math.inf, dtype=torch.float64)
        score[list(layer_list.removable)] = 0.0
        scores[layer_list.name] = score
    for name, positions in removed.items():
        if name not in by_name:
            raise SelectionError(
                f"{name!r} is not a layer list of {type(model).__name__} with removable "
                f"children; the lists are {sorted(by_name) or 'none'}"
            )
        layer_list = by_name[name]
        for position in _positions(name, positions):
            if position not in layer_list.removable:
                raise SelectionError(
                    f"child {position} of layer list {name!r} cannot be removed (its removal "
                    f"would change a shape, or it is shared or out of range: {layer_list.size} "
                    f"children); the removable ones are {list(layer_list.removable)}"
                )
            scores[name][position] = -math.inf
    return LayerImportance(scores, "given", exact=True)


def _positions(name: str, positions: Iterable[int]) -> list[int]:
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Iterable):
        raise SelectionError(
            f"the positions to remove from {name!r} must be a list of integers; "
            f"got {type(positions).__name__}"
        )
    values = list(positions)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SelectionError(
                f"the positions to remove from {name!r} must be integers; got {value!r}"
            )
    return [int(v) for v in values]


# ---------------------------------------------------------------------------------------
# Selection


def choose_layers(
    lists: Sequence[LayerList],
    importance: LayerImportance,
    ratio_or_count: float | int | Mapping[str, float | int],
    *,
    consecutive: bool = False,
    min_layers: int = 1,
) -> dict[str, np.ndarray]:
    """The sorted kept child positions of every list that loses a child.

    ``ratio_or_count`` is a float ratio in ``[0, 1]`` of each list's
    removable children (rounded half up: 0.25 of 2 removes 1), an int
    count per list, or a mapping from list names to either (lists not
    named lose nothing). The number is capped at the removable children and
    so that at least ``min_layers`` children stay in the list. The
    lowest-scoring removable children go; on equal scores the lower
    position goes first. ``consecutive=True`` removes instead the run of
    adjacent removable children with the lowest summed score (Gromov et al.
    2024 drop a contiguous block of layers), the earliest on ties. An
    ``exact`` importance (:func:`given_layers`) removes exactly its
    ``-inf`` children and ignores ``ratio_or_count``.

    Raises :class:`~depprune.errors.SelectionError` for a ratio outside
    ``[0, 1]``, a negative count, unknown list names, scores that do not fit
    a list or hold NaN, an exact choice leaving fewer than ``min_layers``
    children, or no run of adjacent removable children long enough.

    >>> lists = [LayerList("layers", 5, (0, 1, 2, 3, 4))]
    >>> scores = LayerImportance({"layers": torch.tensor([0.9, 0.2, 0.5, 0.1, 0.8], dtype=torch.float64)}, "cosine")
    >>> choose_layers(lists, scores, 0.4)
    {'layers': array([0, 2, 4])}
    >>> choose_layers(lists, scores, 2, consecutive=True)  # 0.5 + 0.1 is the cheapest pair
    {'layers': array([0, 1, 4])}
    >>> choose_layers(lists, scores, 1.0, min_layers=2)
    {'layers': array([0, 4])}
    """
    if isinstance(min_layers, bool) or not isinstance(min_layers, int) or min_layers < 0:
        raise SelectionError(f"min_layers must be a non-negative integer; got {min_layers!r}")
    names = [layer_list.name for layer_list in lists]
    if isinstance(ratio_or_count, Mapping):
        unknown = sorted(set(ratio_or_count) - set(names))
        if unknown:
            raise SelectionError(
                f"ratios name {unknown}, which are not layer lists; the lists are {sorted(names)}"
            )
        amounts = dict(ratio_or_count)
    else:
        amounts = dict.fromkeys(names, ratio_or_count)
    kept = {}
    for layer_list in lists:
        scores = _list_scores(layer_list, importance)
        removable = np.zeros(layer_list.size, dtype=bool)
        removable[list(layer_list.removable)] = True
        if importance.exact:
            drop = np.flatnonzero(scores == -np.inf)
            if not removable[drop].all():
                raise SelectionError(
                    f"the given layers remove children {drop[~removable[drop]].tolist()} of "
                    f"{layer_list.name!r}, which are not removable; the removable ones are "
                    f"{list(layer_list.removable)}"
                )
            if layer_list.size - drop.size < min_layers:
                raise SelectionError(
                    f"removing {drop.size} children of {layer_list.name!r} leaves "
                    f"{layer_list.size - drop.size}, fewer than min_layers={min_layers}; "
                    "remove fewer or lower min_layers"
                )
        else:
            if layer_list.name not in amounts:
                continue
            count = _count(layer_list, amounts[layer_list.name])
            count = max(0, min(count, len(layer_list.removable), layer_list.size - min_layers))
            if consecutive:
                drop = _cheapest_run(layer_list, scores, removable, count)
            else:
                order = np.lexsort((np.arange(layer_list.size), scores))
                drop = order[removable[order]][:count]
        if drop.size:
            kept[layer_list.name] = np.setdiff1d(np.arange(layer_list.size), drop)
    return kept


def _list_scores(layer_list: LayerList, importance: LayerImportance) -> np.ndarray:
    score = importance.scores.get(layer_list.name)
    if score is None:
        raise SelectionError(
            f"the importance has no scores for layer list {layer_list.name!r}; score the same "
            f"lists you choose from (it has {sorted(importance.scores)})"
        )
    values = torch.as_tensor(score).detach().to("cpu", torch.float64).numpy()
    if values.shape != (layer_list.size,):
        raise SelectionError(
            f"the scores of layer list {layer_list.name!r} have shape {values.shape}, but the "
            f"list has {layer_list.size} children; score the same lists you choose from"
        )
    if np.isnan(values).any():
        raise SelectionError(
            f"the scores of layer list {layer_list.name!r} hold NaN at "
            f"{np.flatnonzero(np.isnan(values)).tolist()}; check the calibration data"
        )
    return values


def _count(layer_list: LayerList, amount: Any) -> int:
    """Children to remove from one list: a ratio of its removable ones, or a count."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float, np.integer, np.floating)):
        raise SelectionError(
            f"the amount to remove from {layer_list.name!r} must be a ratio (float in [0, 1]) "
            f"or a count (int); got {amount!r}"
        )
    if isinstance(amount, (int, np.integer)):
        if amount < 0:
            raise SelectionError(
                f"cannot remove {amount} children from {layer_list.name!r}; "
                "give a count of 0 or more"
            )
        return int(amount)
    if not 0.0 <= amount <= 1.0:
        raise SelectionError(
            f"the layer ratio for {layer_list.name!r} is {amount}; give a float in [0, 1] "
            "(the share of removable children to remove) or an int count"
        )
    return math.floor(amount * len(layer_list.removable) + 0.5)


def _cheapest_run(
    layer_list: LayerList, scores: np.ndarray, removable: np.ndarray, length: int
) -> np.ndarray:
    """Positions of the ``length`` adjacent removable children with the lowest summed score."""
    if length == 0:
        return np.zeros(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view
    windows_ok = windows(removable, length).all(axis=1) if length <= removable.size else None
    if windows_ok is None or not windows_ok.any():
        runs = np.diff(np.flatnonzero(np.diff(np.concatenate(([0], removable, [0])))))[::2]
        raise SelectionError(
            f"layer list {layer_list.name!r} has no {length} adjacent removable children (the "
            f"longest run is {int(runs.max(initial=0))}); remove fewer or drop consecutive=True"
        )
    sums = windows(np.where(removable, scores, 0.0), length).sum(axis=1)
    sums[~windows_ok] = np.inf
    start = int(np.argmin(sums))
    return np.arange(start, start + length)
