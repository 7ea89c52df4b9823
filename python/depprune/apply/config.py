"""Apply stage, configs: takes the fixers' sizes, gives the Hugging Face config that
describes the pruned model, proved by building the architecture from it on meta.

Fields no fixer names are sized by inference (a field whose value is a width the
plan changes); sizes the constructor derives are adopted from the rebuilt model;
Gemma-style embedding scales are folded into the weights.

>>> _EMBED_SCALES
('scalar_embed_scale', 'embed_scale')
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch
from torch import nn

from depprune.apply.cuts import masked_tensors
from depprune.apply.fixers import (
    _experts_fallback,
    _fix_experts,
    _fix_group_norm,
    _fix_layer_norm,
    _fixer_for,
    _View,
    _warn_at_caller,
)
from depprune.errors import ConfigWarning, PlanMismatchError


def _uniform_config(
    model: nn.Module, view: _View, changes: list[tuple[nn.Module, dict]]
) -> tuple[dict[str, object], list[tuple[nn.Module, dict]]]:
    """Config fields every layer agrees on, plus the hidden size from the input embedding;
    and the integer module attributes a model built from that config has (adopted).

    A config that cannot describe the pruned model (layers of different
    widths, or a head_dim the config derives from hidden_size and the head
    count) is left as it was, with a warning: the pruned model runs, but
    ``from_pretrained`` could not rebuild it.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}, []
    values: dict[str, set] = {}
    for _, attrs in changes:
        for key, value in attrs.items():
            if key.startswith("config."):
                values.setdefault(key.removeprefix("config."), set()).add(int(value))
    hidden = _hidden_width(model, view)
    if hidden is not None:
        values["hidden_size"] = {hidden}
    uneven = {key: sorted(found) for key, found in values.items() if len(found) > 1}
    if uneven:
        if any(attrs.get("config.required") for _, attrs in changes):
            raise PlanMismatchError(
                f"layers would keep different sizes {uneven}, but "
                f"{type(model).__name__}'s forward reads them from its one config; "
                "prune every layer by the same ratio (local ranking, no per-layer ratios)"
            )
        # A fixer names the field of its module's class: a shared expert built from another
        # field (DeepSeek's moe_intermediate_size) looks uneven; the rebuild search decides.
        for key in uneven:
            del values[key]
    required = values.pop("required", None) is not None
    if getattr(config, "model_type", "") == "gpt2" and "intermediate_size" in values:
        values["n_inner"] = values.pop("intermediate_size")  # GPT-2 names its MLP width so
    # Keys the config lacks stay out, except head_dim, which models read with getattr.
    new = {
        key: found.pop()
        for key, found in values.items()
        if hasattr(config, key) or key == "head_dim"
    }
    if "head_dim" in new and new["head_dim"] == getattr(config, "head_dim", None):
        del new["head_dim"]
    new = {key: value for key, value in new.items() if getattr(config, key, None) != value}
    # Rebuilt even when no field changes: a width the config has no field for shows up here.
    adopted: list[tuple[nn.Module, dict]] = []
    shapes, other = _rebuild_mismatch(model, config, new, view, changes, adopted)
    if shapes or other:
        inferred = _infer_config_fields(model, config, new, view, changes)
        if inferred is not None:
            new, adopted = inferred
            shapes, other = "", ""
    if uneven and (shapes or other):
        _config_warning(f"layers keep different sizes {uneven}", "the config is left unchanged")
        return {}, []
    if shapes:
        if required:
            raise PlanMismatchError(
                f"{type(model).__name__}'s forward reads its sizes from the config, but a config "
                f"with {new} builds {shapes}; prune every layer by the same ratio"
            )
        _config_warning(f"a config with {new} builds {shapes}", "the config is left unchanged")
        return {}, []
    if other:
        _config_warning(
            f"a model built from it has {other}",
            f"the config gets {new}, so the pruned model loads, but its outputs would differ",
        )
    return new, adopted


def _infer_config_fields(
    model: nn.Module, config, new: dict, view: _View, changes: list[tuple[nn.Module, dict]]
) -> tuple[dict, list[tuple[nn.Module, dict]]] | None:
    """Config fields no fixer names (``ffn_dim``, ``n_inner``, ``d_ff``, ``n_head``...) by what
    they size: a field whose value is a width the plan changes, to one new size, gets it.
    The proposal holds only if a model built from it on meta matches the pruned one.
    When no small subset of the proposals does, a field-by-field search (ratio fields such as
    ``expand`` included; :func:`_descend`) looks for one the rebuild proves."""
    widths: dict[int, set[int]] = {k: set(v) for k, v in view.widths.items()}
    for name, dims in view.changed.items():
        old, now = view.old_shape(name), view.shape(name)
        for dim in dims:
            widths.setdefault(int(old[dim]), set()).add(int(now[dim]))
    proposals = {}
    for key, value in vars(config).items():
        if key.startswith("_") or key in new or type(value) is not int:
            continue
        found = widths.get(value)
        if found is not None and len(found) == 1:
            proposals[key] = next(iter(found))
    # All proposals, then without one or two of them (fields that only happen to match).
    keys = sorted(proposals)
    left_out: list[tuple[str, ...]] = [()] + [(k,) for k in keys]
    if len(keys) <= 6:
        left_out += list(itertools.combinations(keys, 2))
    for drop in left_out:
        candidate = new | {k: v for k, v in proposals.items() if k not in drop}
        adopted: list[tuple[nn.Module, dict]] = []
        if _rebuild_mismatch(model, config, candidate, view, changes, adopted) == ("", ""):
            return _needed_only(model, config, candidate, proposals, view, changes, adopted)
    # Too many fields match by chance, or a field is a ratio of two sizes: search field by field.
    options = _field_options(config, new, proposals, view, widths)
    for start in (False, True) if options else ():
        candidate = _descend(model, config, new, options, view, start_proposed=start)
        adopted = []
        if _rebuild_mismatch(model, config, candidate, view, changes, adopted) == ("", ""):
            changed = {k: v for k, v in candidate.items() if k not in new}
            return _needed_only(model, config, candidate, changed, view, changes, adopted)
    return None


def _field_options(
    config, new: dict, proposals: dict, view: _View, widths: dict[int, set[int]]
) -> dict[str, list]:
    """Each field the search may change -> its values: the old one first, then the proposed ones.

    Besides the fields that equal a changed width, a field ``v`` with ``v * A == B``
    for two sizes of the model (``expand``: Mamba's inner width is ``expand *
    hidden_size``) gets the ratio of the two sizes after the cut, ``B' / A'``,
    where it is a whole number (or the field is a float).

    >>> from types import SimpleNamespace
    >>> view = SimpleNamespace(tensors={"w": torch.empty(64, 32, device="meta")})
    >>> config = SimpleNamespace(hidden_size=32, expand=2)
    >>> _field_options(config, {"hidden_size": 16}, {}, view, {32: {16}})
    {'expand': [2, 4]}
    """
    sizes = {int(s) for tensor in view.tensors.values() for s in tensor.shape}
    fields = {
        key: value
        for key, value in vars(config).items()
        if not key.startswith("_") and type(value) in (int, float) and value > 0
    }
    options: dict[str, list] = {key: [fields[key], value] for key, value in proposals.items()}
    for key, ratio in fields.items():
        if key in new or ratio == 1:
            continue  # a ratio of 1 is two equal sizes: the width proposals cover it
        for other, size in fields.items():
            whole = ratio * size
            if other == key or type(size) is not int or size not in sizes:
                continue
            if (
                whole != int(whole)
                or int(whole) not in sizes
                or len(widths.get(int(whole), ())) > 1
            ):
                continue
            after = next(iter(widths.get(int(whole), {int(whole)})))
            value = after / new.get(other, proposals.get(other, size))
            if type(ratio) is int:
                if value != int(value):
                    continue
                value = int(value)
            found = options.setdefault(key, [ratio])
            if value != ratio and value not in found:
                found.append(value)
    return {key: values for key, values in options.items() if len(values) > 1}


#: Pairs of field changes one round of :func:`_descend` tries when no single change helps.
_MAX_PAIRS = 300


def _descend(
    model: nn.Module, config, new: dict, options: dict[str, list], view: _View, *, start_proposed
) -> dict:
    """The fields' values, one field at a time, that leave the fewest tensor sizes wrong.

    Starts from the old values (``start_proposed=False``) or from the first
    proposal of every field, and takes, round by round, the change that leaves the fewest
    dims different.
    """
    choice = {key: values[1 if start_proposed else 0] for key, values in options.items()}

    def candidate(assigned: dict) -> dict:
        return new | {k: v for k, v in assigned.items() if v != options[k][0]}

    best = _mismatch_count(model, config, candidate(choice), view)
    # Steepest descent: the best single change each round (the first improvement may block the
    # one that fixes everything: a head count that fits a stale ``expand``).
    for _ in range(4):
        if best == 0:
            break
        singles = [(k, v) for k, values in options.items() for v in values if v != choice[k]]
        trials = [choice | {key: value} for key, value in singles]
        scored = [
            (_mismatch_count(model, config, candidate(t), view), i) for i, t in enumerate(trials)
        ]
        if min(scored, default=(math.inf, -1))[0] >= best:
            # Fields a config checks together (heads * head_dim == expand * hidden) move in pairs.
            pairs = [(a, b) for a, b in itertools.combinations(singles, 2) if a[0] != b[0]][
                :_MAX_PAIRS
            ]
            trials = [choice | dict(pair) for pair in pairs]
            scored = [
                (_mismatch_count(model, config, candidate(t), view), i)
                for i, t in enumerate(trials)
            ]
        score, index = min(scored, default=(math.inf, -1))
        if score >= best:
            break
        choice, best = trials[index], score
    return candidate(choice)


def _mismatch_count(model: nn.Module, config, new: dict, view: _View) -> float:
    """How far a model built from the updated config is from the pruned one: the dims whose
    sizes differ, a million per tensor one of them lacks, infinite if it cannot be built."""
    rebuilt = _rebuilt(model, config, new)
    if isinstance(rebuilt, Exception):
        return math.inf
    built = rebuilt.state_dict()
    ours = _as_unmasked(model)
    if built.keys() != ours.keys():
        return 1e6 * len(set(built) ^ set(ours))
    wrong = 0
    for name, tensor in built.items():
        mine = ours[name]
        if mine in view.tensors:
            expected = tuple(view.shape(mine))
            if tensor.dim() != len(expected):
                wrong += tensor.dim() + len(expected)
            else:
                wrong += sum(a != b for a, b in zip(tensor.shape, expected, strict=True))
    return wrong


def _rebuilt(model: nn.Module, config, new: dict) -> nn.Module | Exception:
    """The architecture built on meta from ``config`` with ``new`` set, or why it could not be."""
    import copy

    candidate = copy.deepcopy(config)
    for key, value in new.items():
        setattr(candidate, key, value)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # save_pretrained validates the config (hidden size a multiple of the heads).
            validate = getattr(candidate, "validate", None)
            if callable(validate):
                validate()
            return type(model)(candidate)
    except Exception as exc:  # a config the architecture rejects is not describable either
        return exc


def _needed_only(
    model: nn.Module,
    config,
    candidate: dict,
    proposals: dict,
    view: _View,
    changes: list[tuple[nn.Module, dict]],
    adopted: list[tuple[nn.Module, dict]],
) -> tuple[dict, list[tuple[nn.Module, dict]]]:
    """The candidate without the proposals the rebuild does not need: a field that only
    equals a changed width (``eos_token_id`` 2 when two experts become one) stays as it was."""
    for key in sorted(k for k in proposals if k in candidate):
        fewer = {k: v for k, v in candidate.items() if k != key}
        trial: list[tuple[nn.Module, dict]] = []
        if _rebuild_mismatch(model, config, fewer, view, changes, trial) == ("", ""):
            candidate, adopted = fewer, trial
    return candidate, adopted


def _hidden_width(model: nn.Module, view: _View) -> int | None:
    """The hidden size after the cut, read from the input embedding; None if unknown."""
    try:
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    except (NotImplementedError, AttributeError):
        # transformers' PreTrainedModel raises this for models without input embeddings.
        return None
    names = {id(mod): name for name, mod in model.named_modules()}
    if id(embeddings) not in names:
        return None
    if isinstance(embeddings, nn.Embedding):
        return int(view.shape(f"{names[id(embeddings)]}.weight")[1])
    if isinstance(getattr(embeddings, "projection", None), nn.Conv2d):
        # Vision transformers embed patches with a conv: its channels are the hidden size.
        return int(view.shape(f"{names[id(embeddings)]}.projection.weight")[0])
    return None


def _config_warning(why: str, what: str) -> None:
    _warn_at_caller(
        category=ConfigWarning,
        message=f"the pruned model runs correctly, but its config cannot fully describe it ({why}); "
        f"{what}. Prune every layer by the same ratio, and heads rather than head_dim "
        "(kinds=('hidden', 'heads', 'neurons')), to keep a config from_pretrained rebuilds "
        "exactly",
    )


#: Float attributes of scaled embeddings (Gemma's sqrt(hidden_size)) a config recomputes.
_EMBED_SCALES = ("scalar_embed_scale", "embed_scale")


def _fold_scales(
    model: nn.Module, view: _View, changes: list[tuple[nn.Module, dict]]
) -> list[tuple[nn.Module, dict]]:
    """Move a scaled embedding's old scale into its weights, so the new scale holds.

    The pruned model computes ``E[x] * old``; reloaded, it computes ``E'[x] * new``:
    with ``E' = E * old / new`` both are the old function. A head tied to the
    embedding would read ``E'`` too, so the final norm before it scales by
    ``new / old`` (``(1 + w)`` norms as Gemma's: ``w' = (1 + w) * c - 1``).
    """
    import inspect

    extra: list[tuple[nn.Module, dict]] = []
    names = {id(m): n for n, m in model.named_modules()}
    for module, attrs in changes:
        if not isinstance(module, nn.Embedding):
            continue
        for key, new_scale in list(attrs.items()):
            if key not in _EMBED_SCALES or not isinstance(new_scale, float):
                continue
            factor = float(getattr(module, key)) / new_scale
            weight = f"{names[id(module)]}.weight"
            view.folds[weight] = lambda t, f=factor: t.mul_(f)
            buffer = module._buffers.get("embed_scale")
            if buffer is not None:
                extra.append((module, {"embed_scale": torch.full_like(buffer, new_scale)}))
            head = getattr(model, "get_output_embeddings", lambda: None)()
            tied = head is not None and getattr(head, "weight", None) is module.weight
            norm = getattr(getattr(model, "model", None), "norm", None)
            if tied and norm is not None and getattr(norm, "weight", None) is not None:
                source = inspect.getsource(type(norm).forward)
                offset = "1.0 + self.weight" in source or "1 + self.weight" in source
                c = 1.0 / factor
                view.folds[f"{names[id(norm)]}.weight"] = (
                    (lambda t, c=c: t.add_(1.0).mul_(c).sub_(1.0))
                    if offset
                    else (lambda t, c=c: t.mul_(c))
                )
    return extra


def _rebuild_mismatch(
    model: nn.Module,
    config,
    new: dict,
    view: _View,
    changes: list[tuple[nn.Module, dict]],
    adopted: list[tuple[nn.Module, dict]] | None = None,
) -> tuple[str, str]:
    """How a model built from the updated config (on meta) differs: (shapes, other), "" if not.

    Tensor shapes must match; numbers the modules keep (attention ``scaling``
    derived from head_dim) must match the pruned modules'; and no buffer the
    constructor recomputes from the config (RoPE's ``inv_freq``) may be cut.
    """
    rebuilt = _rebuilt(model, config, new)
    if isinstance(rebuilt, Exception):
        return f"no model ({type(rebuilt).__name__}: {rebuilt})", ""
    built = rebuilt.state_dict()
    ours = _as_unmasked(model)
    if built.keys() != ours.keys():
        extra = sorted(set(built) ^ set(ours))
        return f"other tensors ({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''})", ""
    for name, tensor in built.items():
        mine = ours[name]
        if mine in view.tensors and tuple(tensor.shape) != tuple(view.shape(mine)):
            return f"{name} of shape {tuple(tensor.shape)}, not {tuple(view.shape(mine))}", ""
    saved = rebuilt.state_dict().keys()
    for name, _ in rebuilt.named_buffers():
        if name not in saved and name in view.changed:
            return "", f"{name} recomputed from the config, not the pruned one"
    pending = {id(module): attrs for module, attrs in changes}
    modules = dict(model.named_modules())
    for name, built in rebuilt.named_modules():
        module = modules.get(name)
        if module is None:
            continue
        after = {**vars(module), **pending.get(id(module), {})}
        for key, value in vars(built).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if key not in after or after[key] == value:
                    continue
                if (
                    key in _EMBED_SCALES
                    and isinstance(module, nn.Embedding)
                    and isinstance(value, float)
                    and adopted is not None
                ):
                    # sqrt(hidden_size) embedding scaling: folded into the weights (_fold_scales).
                    adopted.append((module, {key: value}))
                    continue
                if type(value) is int and type(after[key]) is int and adopted is not None:
                    # A size the constructor derives from the config (a layer's embed_dim):
                    # the pruned module takes it, and the replay proves its forward with it.
                    adopted.append((module, {key: value}))
                    continue
                return "", f"{name or 'the model'}.{key} = {value}, not {after[key]}"
    return "", ""


def _as_unmasked(model: nn.Module) -> dict[str, str]:
    """The model's state names as an unmasked model has them -> the model's own names.

    ``torch.nn.utils.prune`` keeps ``<name>_orig`` and a ``<name>_mask`` buffer for a
    masked ``<name>``: the config describes the weight, not how it is masked.
    """
    names = {name: name for name in model.state_dict()}
    for module_name, _, tensor_name in masked_tensors(model):
        full = f"{module_name}.{tensor_name}" if module_name else tensor_name
        names.pop(f"{full}_mask", None)
        if names.pop(f"{full}_orig", None) is not None:
            names[full] = f"{full}_orig"
    return names


def _attribute_changes(model: nn.Module, view: _View) -> list[tuple[nn.Module, dict]]:
    changes = []
    fallbacks = []
    # The modules above some cut tensor, by "name." prefix: one set, not a scan per module.
    above = {""} if view.changed else set()
    for name in view.changed:
        parts = name.split(".")
        above.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))
    for module_name, module in model.named_modules():
        fixer = _fixer_for(module)
        prefix = f"{module_name}." if module_name else ""
        if fixer is None or prefix not in above:
            continue
        if fixer in (_fix_layer_norm, _fix_group_norm) and module.weight is None:
            continue
        changes.append((module, fixer(module, prefix, view)))
        if fixer is _fix_experts:
            fallback = _experts_fallback(module, prefix, view)
            if fallback is not None and all(fallback[0] is not m for m, _ in fallbacks):
                fallbacks.append(fallback)
    config_changes, adopted = _uniform_config(model, view, changes)
    adopted += _fold_scales(model, view, adopted)
    changes = [(m, {k: v for k, v in a.items() if "." not in k}) for m, a in changes]
    if config_changes:
        changes.append((model.config, config_changes))
    # Sizes the modules keep that the new config derives (a layer's hidden_size, embed_dim);
    # fixers' values win where both name one.
    return changes + adopted + fallbacks
