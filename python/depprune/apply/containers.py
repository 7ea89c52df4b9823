"""Apply stage, depth: takes kept child indices of module lists, gives the model without
the others, its layer numbers and Hugging Face config updated, proved by a rebuild.

A removed child is gone from its ``nn.ModuleList`` or ``nn.Sequential`` (the
kept ones renumbered, so a state dict stays contiguous); integer attributes
that number layers (``layer_idx``, which the KV cache is indexed by) follow;
and the config of the nearest model above the list gets the layer count, the
per-layer lists (``layer_types``) sliced and the fields that name layers
(``mlp_only_layers``, ``first_k_dense_replace``, ``max_window_layers``)
remapped, accepted only if a model built from it on meta has the pruned
model's tensors and per-module settings (sliding or full attention, dense
or MoE). What no config field can express raises before anything changes.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
>>> drop_children(model, {"": [0, 2]})
>>> model
Sequential(
  (0): Linear(in_features=4, out_features=4, bias=True)
  (1): Linear(in_features=4, out_features=4, bias=True)
)
"""

from __future__ import annotations

import copy
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from depprune.apply.optimizer_state import checked_optimizers
from depprune.errors import PlanMismatchError

__all__ = ["drop_children", "renamed_after_drop"]

#: Integer module attributes that number a layer inside its list (0- or 1-based).
LAYER_NUMBERS = ("layer_idx", "layer_id", "layer_index", "layer_number", "block_idx")

#: Config fields that count the layers of a list.
_COUNT = re.compile(r"^(num_hidden_layers|num_layers|n_layers?|num_blocks|depth)$")


def drop_children(
    model: nn.Module,
    kept_children: Mapping[str, Iterable[int]],
    *,
    optimizers: Iterable[Optimizer] = (),
) -> None:
    """Keep only the listed children of each named ``ModuleList``/``Sequential`` of ``model``.

    ``kept_children`` maps a container's module name (``""`` for the model
    itself) to the sorted child positions it keeps. Layer numbers inside the
    kept children and the config follow (see the module docs); a config
    change a rebuild refutes raises :class:`PlanMismatchError` with the model
    unchanged. ``optimizers`` forget the removed parameters.

    >>> import torch
    >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
    >>> drop_children(blocks, {"": [1, 3]})
    >>> len(blocks)
    2
    """
    undo = drop_with_undo(model, kept_children, optimizers=optimizers)
    del undo


def drop_with_undo(
    model: nn.Module,
    kept_children: Mapping[str, Iterable[int]],
    *,
    optimizers: Iterable[Optimizer] = (),
) -> Callable[[], None]:
    """:func:`drop_children`, returning a function that puts everything back."""
    optimizers = checked_optimizers(optimizers)
    plan = _checked(model, kept_children)
    if not plan:
        return lambda: None
    config_fields = _config_changes(model, plan)
    dropped = {
        id(p)
        for _, container, kept in plan
        for i, child in enumerate(container)
        if i not in kept
        for p in child.parameters()
    }
    undo: list[Callable[[], None]] = []
    try:
        for name, container, kept in plan:
            undo.append(_renumber(container, kept))
            undo.append(_replace(model, name, container, kept))
        for config, fields in config_fields:
            old = {key: getattr(config, key) for key in fields}
            for key, value in fields.items():
                setattr(config, key, value)
            undo.append(lambda c=config, o=old: [setattr(c, k, v) for k, v in o.items()])
        for optimizer in optimizers:
            undo.append(_forget(optimizer, dropped))
    except BaseException as exc:
        for step in reversed(undo):
            step()
        if not isinstance(exc, Exception):
            raise
        raise PlanMismatchError(
            f"removing children failed ({type(exc).__name__}: {exc}); every change was undone"
        ) from exc

    def put_back() -> None:
        for step in reversed(undo):
            step()

    return put_back


def renamed_after_drop(name: str, kept_children: Mapping[str, Sequence[int]]) -> str | None:
    """``name`` (a parameter, buffer or module) after the drop; ``None`` if it goes.

    >>> renamed_after_drop("model.layers.3.mlp.weight", {"model.layers": [0, 3]})
    'model.layers.1.mlp.weight'
    >>> renamed_after_drop("model.layers.2.mlp.weight", {"model.layers": [0, 3]}) is None
    True
    """
    # Innermost lists first, so that an outer renumbering does not hide an inner list.
    for container in sorted(kept_children, key=len, reverse=True):
        prefix = f"{container}." if container else ""
        if not name.startswith(prefix):
            continue
        head, _, rest = name[len(prefix) :].partition(".")
        if not head.isdigit():
            continue
        kept = list(kept_children[container])
        position = int(head)
        if position not in kept:
            return None
        new = kept.index(position)
        name = f"{prefix}{new}" + (f".{rest}" if rest else "")
    return name


def _checked(
    model: nn.Module, kept_children: Mapping[str, Iterable[int]]
) -> list[tuple[str, nn.Module, list[int]]]:
    modules = dict(model.named_modules(remove_duplicate=False))
    plan = []
    for name, kept in kept_children.items():
        container = modules.get(name)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            what = "no module" if container is None else f"a {type(container).__name__}"
            raise PlanMismatchError(
                f"the plan removes children of {name!r}, which is {what} of "
                f"{type(model).__name__}, not an nn.ModuleList or nn.Sequential; was the plan "
                "made for another model?"
            )
        kept = [int(i) for i in np.asarray(list(kept), dtype=np.int64)]
        size = len(container)
        if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= size:
            raise PlanMismatchError(
                f"the kept children of {name!r} must be sorted, unique positions in [0, {size}) "
                f"and at least one; got {kept[:8]}"
            )
        if len(kept) < size:
            plan.append((name, container, kept))
    return plan


def _renumber(container: nn.Module, kept: list[int]) -> Callable[[], None]:
    """Layer numbers in the kept children that equal their old position (or it plus one)."""
    changes = []
    for new, old in enumerate(kept):
        for module in container[old].modules():
            for attr in LAYER_NUMBERS:
                value = getattr(module, attr, None)
                if type(value) is int and value - old in (0, 1) and new != old:
                    changes.append((module, attr, value, new + value - old))
    for module, attr, _, value in changes:
        setattr(module, attr, value)
    return lambda: [setattr(m, a, old) for m, a, old, _ in changes]


def _replace(
    model: nn.Module, name: str, container: nn.Module, kept: list[int]
) -> Callable[[], None]:
    """Rebuild the container's children in place (its identity, hooks and type stay)."""
    old = container._modules
    keys = list(old)
    if isinstance(container, nn.Sequential) and not all(k.isdigit() for k in keys):
        new = OrderedDict((keys[i], old[keys[i]]) for i in kept)  # named children keep names
    else:
        new = OrderedDict((str(j), old[keys[i]]) for j, i in enumerate(kept))
    container._modules = new

    def put_back() -> None:
        container._modules = old

    return put_back


def _forget(optimizer: Optimizer, dropped: set[int]) -> Callable[[], None]:
    groups = [list(group["params"]) for group in optimizer.param_groups]
    state = {p: s for p, s in optimizer.state.items() if id(p) in dropped}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in dropped]
    for p in state:
        del optimizer.state[p]

    def put_back() -> None:
        for group, params in zip(optimizer.param_groups, groups, strict=True):
            group["params"] = params
        optimizer.state.update(state)

    return put_back


def _owner_config(model: nn.Module, name: str) -> tuple[str, Any]:
    """The deepest module at or above ``name`` with a Hugging Face config, and the config."""
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        prefix = ".".join(parts[:depth])
        module = model.get_submodule(prefix) if prefix else model
        config = getattr(module, "config", None)
        if hasattr(config, "to_dict"):
            return prefix, config
    return "", None


def _config_changes(
    model: nn.Module, plan: list[tuple[str, nn.Module, list[int]]]
) -> list[tuple[Any, dict[str, Any]]]:
    """The config fields every dropped list changes, proved by a rebuild of the top model.

    Counts, per-layer lists and lists of layer indices always follow; an integer
    field that names a layer ("the first k layers are dense") is remapped only if
    the rebuild agrees, and left alone if it agrees without it.
    """
    changes: dict[int, tuple[Any, dict[str, Any], dict[str, Any]]] = {}
    for name, container, kept in plan:
        _, config = _owner_config(model, name)
        if config is None:
            continue
        _, sure, maybe = changes.setdefault(id(config), (config, {}, {}))
        size = len(container)
        for key, value in vars(config).items():
            if key.startswith("_") or type(value) is bool:
                continue
            if type(value) is int and value == size and _COUNT.match(key):
                sure[key] = len(kept)
            elif isinstance(value, (list, tuple)) and len(value) == size and "layers" not in key:
                sure[key] = type(value)(value[i] for i in kept)  # one entry per layer
            elif isinstance(value, (list, tuple)) and "layer" in key and _indices(value, size):
                sure[key] = type(value)(kept.index(i) for i in value if i in kept)
            elif type(value) is int and ("layer" in key or "first_k" in key) and value < size:
                maybe[key] = sum(1 for i in kept if i < value)  # "the first k layers"
    tries = [
        [(c, {**sure, **maybe}) for c, sure, maybe in changes.values()],
        [(c, sure) for c, sure, _ in changes.values()],
    ]
    found = [(c, f) for c, f in tries[0] if f]
    if not found or not hasattr(type(model), "config_class"):
        return found  # not a Hugging Face model: no constructor to prove the config by
    first = _rebuild_difference(model, plan, found)
    if not first:
        return found
    second = [(c, f) for c, f in tries[1] if f]
    if second != found and not _rebuild_difference(model, plan, second):
        return second
    if not _rebuild_difference(model, plan, []):
        return []  # a list the config does not count (per-expert modules that equal the depth)
    raise PlanMismatchError(
        f"no config describes {type(model).__name__} without those layers: with "
        f"{_fields_text(found)} it builds {first}; remove other layers (the config's "
        "per-layer pattern cannot express this choice), or keep the depth"
    )


def _indices(value: Sequence[Any], size: int) -> bool:
    return all(type(i) is int and 0 <= i < size for i in value)


def _rebuild_difference(
    model: nn.Module,
    plan: list[tuple[str, nn.Module, list[int]]],
    found: list[tuple[Any, dict[str, Any]]],
) -> str:
    """How a model built on meta from the new config differs from the pruned one; ""."""
    from depprune.shadow import ShadowError, meta_shadow

    try:
        shadow = meta_shadow(model)
    except ShadowError:
        return ""  # nothing to compare against; the plan's forward check still runs
    twins = dict(zip(map(id, _configs_of(model)), _configs_of(shadow), strict=True))
    for config, fields in found:
        for key, value in fields.items():
            setattr(twins[id(config)], key, value)
    modules = dict(shadow.named_modules(remove_duplicate=False))
    for name, _, kept in plan:
        _renumber(modules[name], kept)
        _replace(shadow, name, modules[name], kept)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rebuilt = type(model)(copy.deepcopy(shadow.config))
    except Exception as exc:
        return f"no model ({type(exc).__name__}: {exc})"
    return _structure_difference(shadow, rebuilt)


def _configs_of(model: nn.Module) -> list[Any]:
    """Every distinct config object held by the model's modules, in module order."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "to_dict"):
            for sub in [config, *_sub_configs(config)]:
                seen.setdefault(id(sub), sub)
    return list(seen.values())


def _sub_configs(config: Any) -> list[Any]:
    return [v for v in vars(config).values() if hasattr(v, "to_dict") and v is not config]


def _fields_text(found: list[tuple[Any, dict[str, Any]]]) -> str:
    return ", ".join(f"{k}={v!r}" for _, fields in found for k, v in fields.items())


def _structure_difference(ours: nn.Module, rebuilt: nn.Module) -> str:
    """Tensor names and shapes, then every module's plain settings; "" when equal."""
    mine, built = ours.state_dict(), rebuilt.state_dict()
    if mine.keys() != built.keys():
        extra = sorted(set(mine) ^ set(built))
        return f"other tensors ({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''})"
    for key, tensor in built.items():
        if tensor.shape != mine[key].shape:
            return f"{key} of shape {tuple(tensor.shape)}, not {tuple(mine[key].shape)}"
    modules = dict(ours.named_modules())
    for name, module in rebuilt.named_modules():
        twin = modules.get(name)
        if twin is None or type(twin) is not type(module):
            return f"a {type(module).__name__} at {name!r}"
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training":
                continue
            if type(value) in (int, float, bool, str) and vars(twin).get(key) != value:
                return f"{name or 'the model'}.{key} = {value!r}, not {vars(twin).get(key)!r}"
    return ""
