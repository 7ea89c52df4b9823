"""Retraining stage, Scratch-E/B: a pruned model in, fresh weights (architecture kept) and epochs out.

Liu et al. (ICLR 2019) find that a pruned architecture trained from a random
initialisation matches or beats fine-tuning the inherited weights: Scratch-E
trains it for as many epochs as the full model, Scratch-B for the same
compute (more epochs, as the pruned model is cheaper per epoch). This module
gives the two pieces: :func:`scratch` re-initialises a model in place with
each module's own initialisation (masks of non-structured pruning kept: the
sparse pattern is the architecture), :func:`scratch_budget` the epochs, and
:func:`scratch_from_plan` builds the pruned architecture from a plan on a
freshly built model.

>>> import torch, depprune
>>> from depprune.from_scratch import scratch, scratch_budget
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> report = depprune.prune(model, torch.randn(2, 8), ratio=0.5)
>>> before = model[0].weight.detach().clone()
>>> _ = scratch(model, seed=0)
>>> model[0].weight.shape, bool((model[0].weight != before).all())
(torch.Size([8, 8]), True)
>>> scratch_budget(report.macs_before, report.macs_after, epochs=160, mode="B")
320
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from depprune.apply import masked_tensors
from depprune.errors import MethodError

__all__ = ["scratch", "scratch_budget", "scratch_from_plan"]

#: What re-initialises one module's own parameters in place.
Init = Callable[[nn.Module], Any]


def _own_reset(module: nn.Module) -> Callable[[], Any] | None:
    """The module's own initialisation: ``reset_parameters`` (torch's ``_reset_parameters``
    for MultiheadAttention and Transformer)."""
    for attribute in ("reset_parameters", "_reset_parameters"):
        method = getattr(module, attribute, None)
        if callable(method):
            return method
    return None


def _hugging_face_base() -> type | None:
    transformers = sys.modules.get("transformers")
    return getattr(transformers, "PreTrainedModel", None) if transformers else None


def _post_order(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """(name, module, the Hugging Face model whose init covers it) children before parents,
    each module once: the order modules initialise when built."""
    base = _hugging_face_base()
    seen: set[int] = set()
    order: list[tuple[str, nn.Module, nn.Module | None]] = []

    def visit(name: str, module: nn.Module, owner: nn.Module | None) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        # A sub-model dispatches to its own _init_weights, as transformers does.
        if base is not None and isinstance(module, base):
            owner = module
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, owner)
        order.append((name, module, owner))

    visit("", model, None)
    return order


def _check(model: nn.Module, init: Init | None) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """The modules in build order; raises before anything changes if one cannot be reset."""
    if not isinstance(model, nn.Module):
        raise MethodError(f"scratch needs an nn.Module; got {type(model).__name__}")
    if init is not None and not callable(init):
        raise MethodError(
            f"init must be a callable init(module) that re-initialises the module's own "
            f"parameters in place; got {type(init).__name__}"
        )
    order = _post_order(model)
    uncovered = []
    for name, module, owner in order:
        where = name or type(model).__name__
        if parametrize.is_parametrized(module):
            raise MethodError(
                f"module {where!r} is parametrized (torch.nn.utils.parametrize), whose "
                "originals its own init does not reach; remove the parametrizations "
                "(parametrize.remove_parametrizations) before scratch, then register them again"
            )
        own = [attr for attr, p in module._parameters.items() if p is not None]
        for attr in own:
            parameter = module._parameters[attr]
            if isinstance(parameter, nn.parameter.UninitializedParameter):
                raise MethodError(
                    f"{where}.{attr} is a lazy parameter not materialised yet; run one forward "
                    "pass before scratch"
                )
            if parameter.is_meta:
                raise MethodError(
                    f"{where}.{attr} is on the meta device, which holds no values to "
                    "initialise; materialise the model (model.to_empty(device=...)) first"
                )
        if own and owner is None and _own_reset(module) is None and init is None:
            uncovered.append(f"{where} ({type(module).__name__}: {', '.join(own)})")
    if uncovered:
        raise MethodError(
            f"these modules own parameters but no reset_parameters, so scratch cannot "
            f"re-initialise them and would leave them trained: {'; '.join(uncovered)}. Pass "
            "scratch(model, init=fn), where fn(module) re-initialises such a module's own "
            "parameters in place, or give the module a reset_parameters method"
        )
    return order


@contextlib.contextmanager
def _originals_exposed(module: nn.Module, masked: dict[int, list[str]]) -> Iterator[None]:
    """Inside, ``module.weight`` of a masked weight is ``weight_orig`` itself, so an init writes
    the parameter; on exit the masked product is recomputed and the mask stays as it was."""
    names = masked.get(id(module), [])
    for tensor_name in names:
        # The plain attribute torch.nn.utils.prune recomputes before every forward.
        object.__setattr__(module, tensor_name, module._parameters[tensor_name + "_orig"])
    try:
        yield
    finally:
        for tensor_name in names:
            hook = next(
                h
                for h in module._forward_pre_hooks.values()
                if isinstance(h, torch_prune.BasePruningMethod) and h._tensor_name == tensor_name
            )
            object.__setattr__(module, tensor_name, hook.apply_mask(module))


@contextlib.contextmanager
def _hugging_face_flags_cleared(module: nn.Module) -> Iterator[None]:
    """transformers' init functions skip tensors marked ``_is_hf_initialized`` (loaded ones)."""
    marked = [
        t
        for t in (module, *module.parameters(recurse=False), *module.buffers(recurse=False))
        if getattr(t, "_is_hf_initialized", False)
    ]
    for t in marked:
        t._is_hf_initialized = False
    try:
        yield
    finally:
        for t in marked:
            t._is_hf_initialized = True


@contextlib.contextmanager
def _seeded(model: nn.Module, seed: int | None) -> Iterator[None]:
    """A forked RNG seeded with ``seed`` (the global RNG untouched); no fork for None."""
    if seed is None:
        yield
        return
    devices = sorted(
        {t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda}
    )
    with torch.random.fork_rng(devices=devices):
        # Only the generators the init uses: torch.manual_seed would also queue a seed for
        # CUDA devices not initialised yet, outside the fork.
        torch.random.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def scratch(model: nn.Module, *, seed: int | None = None, init: Init | None = None) -> nn.Module:
    """Re-initialise every parameter of ``model`` in place, its architecture kept; returns it.

    Each module gets its own initialisation, in the order a fresh build runs
    them (children first): ``reset_parameters`` where it exists (torch's
    layers; BatchNorm also resets its running statistics), and for a Hugging
    Face ``PreTrainedModel`` then its ``_init_weights`` on every module (what
    ``post_init`` runs: its ``initializer_range``, norms to one), flags of
    loaded weights notwithstanding. A module owning parameters with neither
    gets ``init(module)``, which must re-initialise them in place; without an
    ``init`` scratch raises :class:`MethodError` naming them, before anything
    changes, rather than leave them trained.

    A ``torch.nn.utils.prune`` mask is kept: ``weight_orig`` is re-initialised
    and the mask stays, so the masked weights stay zero (Rethinking's Scratch
    on non-structured pruning: the sparse pattern is the architecture).

    With ``seed`` the initialisation draws from a forked RNG seeded with it:
    the same seed gives the same weights and the global RNG is untouched.
    Without, it draws from the global RNG as a fresh build would.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> _ = model[1].running_mean.fill_(5.0)
    >>> a = scratch(model, seed=1)[0].weight.detach().clone()
    >>> torch.equal(scratch(model, seed=1)[0].weight, a), model[1].running_mean.tolist()
    (True, [0.0, 0.0, 0.0, 0.0])
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise MethodError(f"seed must be an int (or None for the global RNG); got {seed!r}")
    order = _check(model, init)
    masked: dict[int, list[str]] = {}
    for _, module, tensor_name in masked_tensors(model):
        masked.setdefault(id(module), []).append(tensor_name)
    user_modules = [
        (name, module)
        for name, module, owner in order
        if init is not None
        and owner is None
        and _own_reset(module) is None
        and any(p is not None for p in module._parameters.values())
    ]
    with _seeded(model, seed), torch.no_grad():
        # The user's init first, so that if it fails the model is restored as it was.
        saved = {
            id(module): {
                k: t.detach().clone() for k, t in module.state_dict(keep_vars=True).items()
            }
            for _, module in user_modules
        }
        for name, module in user_modules:
            try:
                with _originals_exposed(module, masked):
                    init(module)  # type: ignore[misc]
            except Exception as exc:
                for _, done in user_modules:
                    done.load_state_dict(saved[id(done)])
                raise MethodError(
                    f"init failed on module {name!r} ({type(module).__name__}): "
                    f"{type(exc).__name__}: {exc}; the model is unchanged. init(module) must "
                    "re-initialise that module's own parameters in place"
                ) from exc
        del saved
        for _, module, _ in order:
            reset = _own_reset(module)
            if reset is not None:
                with _originals_exposed(module, masked):
                    reset()
        # transformers' post_init: every module through its model's _init_weights, after build.
        for _, module, owner in order:
            if owner is not None:
                with _originals_exposed(module, masked), _hugging_face_flags_cleared(module):
                    owner._init_weights(module)  # type: ignore[operator]
    return model


def _positive(value: Any, what: str) -> Fraction:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise MethodError(
            f"{what} is {value!r}; it must be a positive number (a PruneReport's macs_before "
            "and macs_after, counted with count_macs=True)"
        )
    return Fraction(value)


def scratch_budget(
    macs_full: float | None,
    macs_pruned: float | None,
    epochs: int,
    mode: str = "B",
    cap: float | None = None,
) -> int:
    """Epochs to train a pruned model from scratch: Scratch-E (``"E"``) or Scratch-B (``"B"``).

    Scratch-E trains for the full model's ``epochs``. Scratch-B trains for the
    same compute: ``epochs * macs_full / macs_pruned`` epochs, rounded down as
    the paper's code does (``int(160 * flops_full / flops_pruned)``), so never
    more compute than the full model's. ``cap`` limits Scratch-B to that
    multiple of ``epochs`` (rounded down): on ImageNet the paper trains for at
    most twice the epochs (``cap=2``: a model more than 2x cheaper trains for
    180 epochs instead of 90), on CIFAR without a cap.

    >>> scratch_budget(4e9, 1e9, epochs=160, mode="E"), scratch_budget(4e9, 1e9, epochs=160)
    (160, 640)
    >>> scratch_budget(4e9, 1e9, epochs=90, cap=2), scratch_budget(3, 2, epochs=5)
    (180, 7)
    """
    if mode not in ("E", "B"):
        raise MethodError(
            f"mode is {mode!r}; use 'E' (as many epochs as the full model) or 'B' (the same "
            "compute: more epochs for a cheaper model)"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise MethodError(f"epochs is {epochs!r}; it must be the full model's epochs, an int >= 1")
    if cap is not None and (
        isinstance(cap, bool)
        or not isinstance(cap, (int, float))
        or not math.isfinite(cap)
        or cap < 1
    ):
        raise MethodError(
            f"cap is {cap!r}; it is the most epochs Scratch-B may train, as a multiple of "
            "epochs (the paper's ImageNet runs: 2), a number >= 1, or None for no cap"
        )
    if mode == "E":
        return epochs
    full = _positive(macs_full, "macs_full")
    pruned = _positive(macs_pruned, "macs_pruned")
    if pruned > full:
        raise MethodError(
            f"macs_pruned ({macs_pruned}) is more than macs_full ({macs_full}); pass the full "
            "model's MACs first, then the pruned model's"
        )
    budget = math.floor(epochs * full / pruned)
    if cap is not None:
        budget = min(budget, math.floor(epochs * Fraction(cap)))
    return int(budget)


def scratch_from_plan(
    fresh_model: nn.Module,
    plan: Any,
    *,
    example_inputs: Any = None,
    seed: int | None = None,
    init: Init | None = None,
) -> nn.Module:
    """The architecture of ``plan`` on a freshly built model, freshly initialised; returns it.

    The plan carries the pruned architecture and no weights: it is applied to
    ``fresh_model`` (a new build of the architecture the plan was made for,
    proved on ``example_inputs`` or the inputs the plan keeps), then
    :func:`scratch` re-initialises it. The re-initialisation matters: a slice
    of a fresh initialisation still has the scale of the full layer's fan-in,
    while ``reset_parameters`` scales to the pruned one. Equivalent to
    ``plan.apply(fresh_model)`` then ``scratch(fresh_model)``, except that the
    checks of :func:`scratch` run before the cut, so that bad input changes
    nothing (an error raised by ``init`` itself leaves the cut model).

    >>> import torch, depprune
    >>> def build():
    ...     return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> plan = depprune.make_plan(build(), torch.randn(2, 8), ratio=0.75)
    >>> scratch_from_plan(build(), plan, seed=0)[0].weight.shape
    torch.Size([4, 8])
    """
    from depprune.plan import Plan

    if not isinstance(plan, Plan):
        raise MethodError(
            f"plan must be a depprune.Plan (from depprune.make_plan or Plan.load); got "
            f"{type(plan).__name__}"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise MethodError(f"seed must be an int (or None for the global RNG); got {seed!r}")
    _check(fresh_model, init)
    plan.apply(fresh_model, example_inputs=example_inputs)
    return scratch(fresh_model, seed=seed, init=init)
