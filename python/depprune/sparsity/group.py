"""Sparse training stage: takes a model and its dependency graph, gives DepGraph's group regulariser.

DepGraph (Fang et al., CVPR 2023) trains before pruning with a penalty that
pushes every parameter a unit would remove towards zero *together*, so the
units pruning later removes are already near zero in every coupled layer.
For unit k of a group, its importance is

    I_k = sum over the group's members of ||the member's slice for unit k||^2

(a unit may own several indices of a member: a head owns its head_dim rows, a
conv channel flattened into a linear owns H*W input columns), and the penalty
is ``sum_k gamma_k * I_k`` with

    gamma_k = strength * 2 ** (alpha * (I_max - I_k) / (I_max - I_min))

so units that are already weak are pushed up to ``2**alpha`` times harder
(every gamma is ``strength`` when all units are equal). The strengths are
constants between refreshes: :meth:`GroupRegularizer.update_strengths`, or
every ``update_every`` training steps. Torch-Pruning's ``GroupNormPruner``
has the same shape (it puts the group *norm* sqrt(I_k) in the exponent and
adds ``strength * gamma * w``, half this gradient).

Two ways to train with it: add ``reg.penalty()`` (a float32 scalar, also
under ``torch.autocast``) to the loss, or call ``reg.step()`` between
``loss.backward()`` and ``optimizer.step()``: it adds the penalty's gradient
``2 * gamma_k * w`` to every ``.grad`` in place, without autograd, one fused
``addcmul_`` per member. Only Parameters count (never buffers), a tied
parameter counts once, and parameters with ``requires_grad=False`` count in
I_k but get no gradient.

``grouping`` is the paper's ablation: ``"full"`` (every parameter of the
group, norms included), ``"linear"`` (only the weights and biases of convs,
linears and transformers' ``Conv1D``) or ``"none"`` (each member alone: its
own I_k and gamma_k, not the group's). After training, :meth:`importance`
scores each unit by its group norm sqrt(I_k) under the same grouping (under
``"none"``: the norm of the group's first parameter member, the layer the
group is named after), for :func:`depprune.make_plan`:

- **learned sparsity**: ``global_ranking=True`` ranks all groups together
  (each group's norms divided by their mean), so groups the regulariser made
  sparse lose more units and the others fewer;
- **uniform sparsity**: the default local ranking removes ``ratio`` of every
  group, the weakest units of each.

Under ``DistributedDataParallel`` pass the wrapped model (its ``.module``
names are used; trace the unwrapped module). ``step()`` runs after
``backward()`` has averaged the gradients across ranks and adds a function of
the parameters alone, which every rank holds identically, so the ranks stay
in sync with no communication; ``penalty()``'s gradient is identical on every
rank and averaging leaves it unchanged.

>>> import torch, depprune
>>> from depprune.sparsity import GroupRegularizer
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> x, y = torch.randn(32, 4), torch.randn(32, 2)
>>> graph = depprune.trace(model, x[:1])
>>> reg = GroupRegularizer(model, graph, strength=1e-3, update_every=10)
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> for _ in range(20):
...     optimizer.zero_grad()
...     torch.nn.functional.mse_loss(model(x), y).backward()
...     reg.step()  # or: (loss + reg.penalty()).backward()
...     optimizer.step()
>>> learned = depprune.prune(model, x[:1], ratio=0.5, importance=reg.importance(),
...                          global_ranking=True,  # or local ranking: uniform sparsity
...                          optimizers=[optimizer])
>>> model[0].out_features
4
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from depprune.apply import named_tensors
from depprune.errors import ImportanceError, MethodError
from depprune.graph import DependencyGraph, Group
from depprune.importance import Importance, ScoreContext
from depprune.importance.context import Power
from depprune.kinds import KINDS

__all__ = ["GROUPINGS", "GroupRegularizer", "unwrapped"]

#: The grouping strategies of DepGraph's ablation.
GROUPINGS = ("full", "linear", "none")

ParamDim = tuple[str, int]


def unwrapped(model: nn.Module) -> nn.Module:
    """The module whose parameter names a graph uses: DDP/DataParallel's ``.module``,
    ``torch.compile``'s original module.

    >>> import torch
    >>> inner = torch.nn.Linear(2, 2)
    >>> unwrapped(torch.nn.DataParallel(inner)) is inner
    True
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def is_linear_layer(module: nn.Module | None) -> bool:
    """A conv, a linear, or transformers' ``Conv1D`` (a linear stored transposed).

    >>> is_linear_layer(torch.nn.Conv2d(1, 1, 1)), is_linear_layer(torch.nn.LayerNorm(2))
    (True, False)
    """
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def check_number(value: object, what: str, fix: str) -> float:
    """``value`` as a float when it is a finite number >= 0, else MethodError naming ``fix``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodError(f"{what} must be a number >= 0; got {value!r} ({fix})")
    if not math.isfinite(value) or value < 0:
        raise MethodError(f"{what} must be a finite number >= 0; got {value!r} ({fix})")
    return float(value)


@dataclass
class _Member:
    """One penalised (parameter, dim): where it lives and its per-index strengths."""

    name: str
    dim: int
    module: nn.Module
    attr: str
    parameter: nn.Parameter
    #: Unit of every index along ``dim`` plus one (0: not in the group), on the parameter's device.
    shifted_units: torch.Tensor
    #: The dims summed to get one value per index along ``dim``.
    other_dims: tuple[int, ...]
    #: Shape that broadcasts a per-index vector along ``dim``.
    index_shape: tuple[int, ...]
    #: gamma of each index's unit (0 outside the group), float32, on the parameter's device.
    index_strengths: torch.Tensor | None = None


@dataclass
class _Part:
    """Members whose units share one I_k and gamma_k: a group, or one member under "none"."""

    key: int | tuple[int, ParamDim]
    size: int
    members: list[_Member]
    #: Units some member indexes (the others have no I_k and take no part in I_min, I_max).
    covered: torch.Tensor
    strengths: torch.Tensor | None = None


class GroupRegularizer:
    """DepGraph's group-level sparsity penalty over every group of ``graph``.

    ``strength`` scales every gamma_k, ``alpha`` sets how much harder the
    weakest unit is pushed (``2**alpha`` times), ``grouping`` is ``"full"``,
    ``"linear"`` or ``"none"`` (see the module docstring), ``update_every``
    refreshes the strengths every N calls of :meth:`step` or :meth:`penalty`
    (one per training step; None: only :meth:`update_strengths`), ``kinds``
    limits it to groups of those kinds and ``ignored`` skips groups with a
    member in those modules, as in :func:`depprune.make_plan`. A group with no
    member to penalise (``"linear"`` on norms alone) is left out.

    ``graph`` must be traced from this model (the unwrapped module under DDP);
    after pruning, build a new regulariser from a new trace: the old one
    raises :class:`~depprune.MethodError` rather than penalise stale tensors.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 2.0], [3.0, 0.0]]))
    ...     _ = model[0].bias.zero_()
    ...     _ = model[1].weight.zero_()
    >>> reg = GroupRegularizer(model, depprune.trace(model, torch.zeros(1, 2)), strength=1.0)
    >>> reg.unit_importance()[0].tolist(), reg.unit_strengths()[0].tolist()
    ([1.0, 5.0, 9.0], [16.0, 4.0, 1.0])
    >>> reg.penalty().item()  # 16*1 + 4*5 + 1*9
    45.0
    """

    def __init__(
        self,
        model: nn.Module,
        graph: DependencyGraph,
        *,
        strength: float = 1e-4,
        alpha: float = 4.0,
        grouping: str = "full",
        update_every: int | None = None,
        kinds: Iterable[str] | None = None,
        ignored: Iterable[nn.Module] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
        if not isinstance(graph, DependencyGraph):
            raise MethodError(
                f"graph must be a DependencyGraph; got {type(graph).__name__} (build it with "
                "depprune.trace(model, example_inputs))"
            )
        self.strength = check_number(strength, "strength", "e.g. 1e-4")
        self.alpha = check_number(alpha, "alpha", "the paper uses 4: the weakest unit 16x")
        if grouping not in GROUPINGS:
            raise MethodError(f"grouping is {grouping!r}; choose one of {', '.join(GROUPINGS)}")
        if update_every is not None and (
            isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1
        ):
            raise MethodError(
                f"update_every is {update_every!r}; pass a positive number of steps, or None "
                "to refresh only with update_strengths()"
            )
        self.model = unwrapped(model)
        self.graph = graph
        self.grouping = grouping
        self.update_every = update_every
        #: Calls of step() and penalty() so far (the training steps update_every counts).
        self.calls = 0
        wanted = _checked_kinds(kinds)
        skipped = _ignored_prefixes(self.model, ignored)
        self._parts = self._build_parts(wanted, skipped)
        if not self._parts:
            raise MethodError(
                f"no group of the graph has a parameter to penalise under grouping={grouping!r}"
                f"{' and these kinds/ignored modules' if kinds or skipped else ''}; check that "
                "the graph was traced from this model, or use grouping='full'"
            )
        self.update_strengths()

    def _build_parts(self, wanted: frozenset[str], skipped: tuple[str, ...]) -> list[_Part]:
        tensors = named_tensors(self.model)
        parts: list[_Part] = []
        for group in self.graph.groups:
            if group.kind and group.kind not in wanted:
                continue
            if skipped and any(name.startswith(skipped) for name, _ in group.members):
                continue
            members: list[_Member] = []
            seen: set[tuple[int, int]] = set()
            for (name, dim), unit_map in self.graph.unit_maps(group).items():
                if name not in tensors:
                    raise MethodError(
                        f"the graph names {name!r}, which the model does not have; trace the "
                        "model you regularise (under DDP, its .module) with depprune.trace"
                    )
                module, attr, is_parameter = tensors[name]
                parameter = getattr(module, attr)
                # Tied parameters count once; buffers never.
                if not is_parameter or (id(parameter), dim) in seen:
                    continue
                seen.add((id(parameter), dim))
                if self.grouping == "linear" and not (
                    is_linear_layer(module) and attr in ("weight", "bias")
                ):
                    continue
                members.append(_member(name, dim, module, attr, parameter, unit_map))
            if not any(m.parameter.requires_grad for m in members):
                continue
            if self.grouping == "none":
                parts.extend(
                    _part((group.index, (m.name, m.dim)), group.size, [m])
                    for m in members
                    if m.parameter.requires_grad
                )
            else:
                parts.append(_part(group.index, group.size, members))
        return parts

    def _check_current(self) -> None:
        for part in self._parts:
            for m in part.members:
                if m.module._parameters.get(m.attr) is not m.parameter:
                    raise MethodError(
                        f"{m.name} is no longer the parameter this regulariser was built on "
                        "(the model was pruned or its weights replaced); build a new "
                        "GroupRegularizer from depprune.trace(model, example_inputs)"
                    )

    def _tick(self) -> None:
        self._check_current()
        self.calls += 1
        if self.update_every and self.calls % self.update_every == 0:
            self.update_strengths()

    @torch.no_grad()
    def unit_importance(self) -> dict[int | tuple[int, ParamDim], torch.Tensor]:
        """I_k of every unit now (float32): by group index, or ``(group, (name, dim))``
        under ``grouping="none"``.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> reg = GroupRegularizer(model, depprune.trace(model, torch.zeros(1, 2)))
        >>> reg.unit_importance()[0].shape
        torch.Size([3])
        """
        self._check_current()
        return {part.key: _part_importance(part) for part in self._parts}

    def unit_strengths(self) -> dict[int | tuple[int, ParamDim], torch.Tensor]:
        """gamma_k of every unit, as last refreshed, keyed like :meth:`unit_importance`.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> reg = GroupRegularizer(model, depprune.trace(model, torch.zeros(1, 2)), strength=0.5)
        >>> bool(reg.unit_strengths()[0].min() == 0.5)
        True
        """
        return {part.key: part.strengths.clone() for part in self._parts}

    @property
    def members(self) -> dict[int | tuple[int, ParamDim], tuple[ParamDim, ...]]:
        """The (parameter, dim) pairs each part penalises, keyed like :meth:`unit_importance`.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> GroupRegularizer(model, depprune.trace(model, torch.zeros(1, 2))).members
        {0: (('0.weight', 0), ('0.bias', 0), ('1.weight', 1))}
        """
        return {part.key: tuple((m.name, m.dim) for m in part.members) for part in self._parts}

    @torch.no_grad()
    def update_strengths(self) -> None:
        """Recompute every gamma_k from the parameters as they are now.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> reg = GroupRegularizer(model, depprune.trace(model, torch.zeros(1, 2)))
        >>> reg.update_strengths()
        """
        self._check_current()
        for part in self._parts:
            importance = _part_importance(part)
            # Masked, not indexed: no device sync inside a training loop.
            highest = importance.masked_fill(~part.covered, -math.inf).max()
            lowest = importance.masked_fill(~part.covered, math.inf).min()
            spread = highest - lowest
            # All units equal: nothing to tell apart, every gamma is the base strength.
            exponent = torch.where(
                spread > 0,
                self.alpha * (highest - importance) / spread.clamp_min(torch.finfo().tiny),
                torch.zeros_like(importance),
            )
            strengths = self.strength * torch.exp2(exponent)
            part.strengths = strengths
            with_outside = torch.cat([strengths.new_zeros(1), strengths])
            for m in part.members:
                m.index_strengths = with_outside.to(m.shifted_units.device)[m.shifted_units]

    def penalty(self) -> torch.Tensor:
        """``sum_k gamma_k * I_k`` over every part: a float32 scalar to add to the loss.

        Differentiable, computed in float32 whatever the parameters' dtype or
        an enclosing ``torch.autocast``. Counts as one training step for
        ``update_every``.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> reg = GroupRegularizer(model, depprune.trace(model, torch.zeros(1, 2)))
        >>> penalty = reg.penalty()
        >>> penalty.dtype, penalty.requires_grad
        (torch.float32, True)
        """
        self._tick()
        total: torch.Tensor | None = None
        for part in self._parts:
            for m in part.members:
                squares = m.parameter.float().square()
                per_index = squares.sum(dim=m.other_dims) if m.other_dims else squares
                term = (per_index * m.index_strengths).sum()
                total = term if total is None else total + term.to(total.device)
        return total

    @torch.no_grad()
    def step(self) -> None:
        """Add the penalty's gradient ``2 * gamma_k * w`` to every parameter's ``.grad``.

        Call it after ``loss.backward()`` and before ``optimizer.step()``; a
        trainable parameter without a gradient gets one. Counts as one
        training step for ``update_every``.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> reg = GroupRegularizer(model, depprune.trace(model, torch.zeros(1, 2)))
        >>> reg.step()
        >>> model[0].weight.grad.shape
        torch.Size([3, 2])
        """
        self._tick()
        for part in self._parts:
            for m in part.members:
                parameter = m.parameter
                if not parameter.requires_grad:
                    continue
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                grad = parameter.grad
                scale = m.index_strengths.view(m.index_shape).to(grad.dtype)
                grad.addcmul_(parameter, scale, value=2.0)

    def importance(self) -> Importance:
        """Each unit's group norm sqrt(I_k) under this grouping, for :func:`depprune.make_plan`.

        Scores any graph's groups from the model it is given (so it also
        works on a re-traced, already pruned model). Under ``"linear"`` a group
        with no conv or linear member is scored by all its parameters; under
        ``"none"`` a unit's score is the norm of its slice of the group's first
        parameter member.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> reg = GroupRegularizer(model, depprune.trace(model, torch.zeros(1, 2)))
        >>> plan = depprune.make_plan(model, torch.zeros(1, 2), ratio=0.5,
        ...                           importance=reg.importance(), global_ranking=True)
        >>> plan.groups[0].kept
        2
        """
        return group_norm(self.grouping)


def group_norm(grouping: str = "full") -> Importance:
    """The group L2 norm sqrt(I_k) of every unit, over the members ``grouping`` selects.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> graph = depprune.trace(model, torch.zeros(1, 2))
    >>> group_norm("linear")(graph.groups[0], ScoreContext.from_model(graph, model)).shape
    torch.Size([3])
    """
    if grouping not in GROUPINGS:
        raise MethodError(f"grouping is {grouping!r}; choose one of {', '.join(GROUPINGS)}")

    squares = Power(2)

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        chosen: list[tuple[str, int, torch.Tensor, object]] = []
        seen: set[tuple[int, int]] = set()
        for (name, dim), unit_map in ctx.graph.unit_maps(group).items():
            tensor = ctx.tensors.get(name)
            if tensor is None:
                raise ImportanceError(
                    f"the graph names {name!r}, which the model does not have; score a model "
                    "with the graph traced from it"
                )
            if not isinstance(tensor, nn.Parameter) or (id(tensor), dim) in seen:
                continue
            seen.add((id(tensor), dim))
            chosen.append((name, dim, tensor, unit_map))
        if not chosen:
            raise ImportanceError(
                f"group {group.index} has no parameter member to take a norm of; use "
                "depprune.importance.random() or pass a callable"
            )
        if grouping == "none":
            chosen = chosen[:1]
        elif grouping == "linear":
            linear = [
                c
                for c in chosen
                if is_linear_layer(ctx.owners.get(c[0]))
                and c[0].rpartition(".")[2] in ("weight", "bias")
            ]
            chosen = linear or chosen
        device = chosen[0][2].device
        total = torch.zeros(group.size + 1, dtype=torch.float32, device=device)
        for _, dim, tensor, unit_map in chosen:
            values = ctx.dim_sums("squares", tensor, dim, squares).to(device)
            # A copy: the graph caches unit maps read-only.
            shifted = torch.tensor(unit_map, device=device) + 1
            total.index_add_(0, shifted, values)
        return total[1:].sqrt()

    score.__name__ = f"group_norm_{grouping}"
    return score


def _member(
    name: str, dim: int, module: nn.Module, attr: str, parameter: nn.Parameter, unit_map
) -> _Member:
    shifted = torch.tensor(unit_map, dtype=torch.long, device=parameter.device) + 1
    index_shape = [1] * parameter.dim()
    index_shape[dim] = parameter.shape[dim]
    return _Member(
        name=name,
        dim=dim,
        module=module,
        attr=attr,
        parameter=parameter,
        shifted_units=shifted,
        other_dims=tuple(d for d in range(parameter.dim()) if d != dim),
        index_shape=tuple(index_shape),
    )


def _part(key: int | tuple[int, ParamDim], size: int, members: list[_Member]) -> _Part:
    device = members[0].parameter.device
    counts = torch.zeros(size + 1, dtype=torch.long, device=device)
    for m in members:
        units = m.shifted_units.to(device)
        counts.index_add_(0, units, torch.ones_like(units))
    return _Part(key=key, size=size, members=members, covered=counts[1:] > 0)


def _part_importance(part: _Part) -> torch.Tensor:
    """I_k of every unit of ``part``: one square-sum and index_add_ per member."""
    device = part.covered.device
    total = torch.zeros(part.size + 1, dtype=torch.float32, device=device)
    for m in part.members:
        squares = m.parameter.detach().float().square()
        per_index = squares.sum(dim=m.other_dims) if m.other_dims else squares
        local = torch.zeros(part.size + 1, dtype=torch.float32, device=per_index.device)
        local.index_add_(0, m.shifted_units, per_index)
        total += local.to(device)
    return total[1:]


def _checked_kinds(kinds: Iterable[str] | None) -> frozenset[str]:
    if kinds is None:
        return frozenset(KINDS)
    if isinstance(kinds, str):
        kinds = (kinds,)
    wanted = frozenset(kinds) if isinstance(kinds, Iterable) else frozenset()
    unknown = sorted(str(k) for k in wanted - set(KINDS))
    if not wanted or unknown:
        raise MethodError(
            f"kinds is {kinds!r}; pass kind names from {', '.join(KINDS)}, or None for all"
        )
    return wanted


def _ignored_prefixes(model: nn.Module, ignored: Iterable[nn.Module]) -> tuple[str, ...]:
    if isinstance(ignored, nn.Module):
        ignored = (ignored,)
    if not isinstance(ignored, Iterable):
        raise MethodError(
            f"ignored must be a module or an iterable of modules; got {type(ignored).__name__}"
        )
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    prefixes = []
    for module in ignored:
        if id(module) not in names:
            raise MethodError(
                f"{type(module).__name__} object in ignored is not a submodule of "
                f"{type(model).__name__}; pass modules of the model being regularised"
            )
        name = names[id(module)]
        prefixes.append(f"{name}." if name else "")
    return tuple(prefixes)
