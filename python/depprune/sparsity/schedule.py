"""Iterative pruning: takes a final ratio and a number of steps, gives the ratio after each step
and a pruner that cuts the model a little at a time, between rounds of training.

:func:`ratio_schedule` gives the cumulative ratio of the *original* width removed
after each of N steps: ``"linear"`` (Torch-Pruning's linear schedule),
``"cubic"`` (Zhu & Gupta's gradual pruning, ``r_f * (1 - (1 - t/N)**3)``: fast
early, slow late) or ``"geometric"`` (the same fraction of what remains at every
step). :class:`IterativePruner` follows one: step t re-traces the pruned model
and cuts every group to what one-shot pruning at ``r_t`` keeps of its
*original* size (``ratio * size`` floored, ``round_to`` and ``min_units`` as
one-shot), so the last step ends exactly at one-shot's widths for the final
ratio wherever the proof accepts them. Where it refutes a count (a hidden size
the heads do not divide), one-shot keeps that group whole, while a step may
already have cut it to an accepted count on the way; it then stays there.
Where units factor as outer x inner (query heads x head_dim, conv groups x
group width), a step too small to cut the outer factor cuts the inner one, as
one-shot pruning at that step's ratio would, so the result can differ from
one-shot's at the final ratio. Under ``global_ranking`` the ranking chooses each group's count, so a
step removes ``1 - (1 - r_t) / (1 - r_(t-1))`` of what is left instead
(:func:`step_ratio`).

>>> import torch, depprune
>>> from depprune.sparsity import IterativePruner, ratio_schedule
>>> [round(r, 3) for r in ratio_schedule(0.5, 4, "cubic")]
[0.289, 0.438, 0.492, 0.5]
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
>>> x, y = torch.randn(32, 4), torch.randn(32, 2)
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
>>> pruner = IterativePruner(model, x[:1], final_ratio=0.5, steps=2)
>>> while not pruner.done:
...     for _ in range(5):  # train, then prune a little
...         optimizer.zero_grad()
...         torch.nn.functional.mse_loss(model(x), y).backward()
...         optimizer.step()
...     report = pruner.step(optimizers=[optimizer])  # the optimizer follows the cut
...     print(model[0].out_features)
12
8
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

import depprune
from depprune.errors import MethodError
from depprune.importance import Importance
from depprune.selection import units_to_keep

__all__ = ["SCHEDULES", "IterativePruner", "ratio_schedule", "step_ratio"]

#: The schedules :func:`ratio_schedule` knows.
SCHEDULES = ("linear", "cubic", "geometric")


def ratio_schedule(final_ratio: float, steps: int, kind: str = "linear") -> list[float]:
    """The cumulative ratio of the original width removed after each of ``steps`` steps.

    The last entry is ``final_ratio`` exactly.

    >>> ratio_schedule(0.75, 3)
    [0.25, 0.5, 0.75]
    >>> [round(r, 4) for r in ratio_schedule(0.75, 2, "geometric")]  # half of what remains
    [0.5, 0.75]
    """
    if isinstance(final_ratio, bool) or not isinstance(final_ratio, (int, float)):
        raise MethodError(f"final_ratio must be a number in [0, 1); got {final_ratio!r}")
    if not 0.0 <= final_ratio < 1.0:
        raise MethodError(
            f"final_ratio is {final_ratio!r}; it is the fraction of units to remove in the "
            "end, in [0, 1)"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MethodError(f"steps is {steps!r}; pass a positive whole number of pruning steps")
    if kind not in SCHEDULES:
        raise MethodError(f"the schedule is {kind!r}; choose one of {', '.join(SCHEDULES)}")
    final = float(final_ratio)
    ratios = []
    for t in range(1, steps + 1):
        progress = t / steps
        if kind == "linear":
            ratios.append(final * t / steps)
        elif kind == "cubic":
            ratios.append(final * (1.0 - (1.0 - progress) ** 3))
        else:
            ratios.append(1.0 - (1.0 - final) ** progress)
    ratios[-1] = final
    return ratios


def step_ratio(previous: float, current: float) -> float:
    """The ratio to remove from a model already pruned by ``previous`` to reach ``current``
    of its original width: ``1 - (1 - current) / (1 - previous)``.

    >>> round(step_ratio(0.25, 0.5), 4)  # 75% left, 50% wanted: a third of what is left
    0.3333
    """
    if not 0.0 <= previous <= current < 1.0:
        raise MethodError(
            f"cumulative ratios must grow within [0, 1); got {previous!r} then {current!r}"
        )
    # (c - p) / (1 - p) is 1 - (1 - c) / (1 - p) without the cancellation.
    return max(0.0, (current - previous) / (1.0 - previous))


#: Options of depprune.prune that the pruner sets itself.
_OWN = frozenset(
    {"model", "example_inputs", "graph", "ratio", "importance", "optimizers", "keep_units"}
)


class IterativePruner:
    """Prunes ``model`` in place to ``final_ratio`` over ``steps`` calls of :meth:`step`.

    ``schedule`` is a kind of :func:`ratio_schedule` or the list of cumulative
    ratios itself (growing, ending at ``final_ratio``); ``importance`` scores
    units at every step (L2 magnitude by default; a
    :meth:`~depprune.sparsity.GroupRegularizer.importance` works on the
    re-traced model too, but build a new regulariser after each step); every
    other keyword is an option of :func:`depprune.prune` (``global_ranking``,
    ``round_to``, ``ignored``, ...), and ``ratios`` maps modules to their own
    *final* ratios, each on the same schedule.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 10), torch.nn.ReLU(), torch.nn.Linear(10, 1))
    >>> pruner = IterativePruner(model, torch.zeros(1, 2), final_ratio=0.5, steps=2)
    >>> [pruner.step().plan.groups[0].kept for _ in range(2)], pruner.done
    ([8, 5], True)
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        final_ratio: float,
        steps: int,
        schedule: str | Iterable[float] = "linear",
        importance: Importance | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
        if importance is not None and not callable(importance):
            raise MethodError(
                f"importance must be a callable (group, ctx) -> scores, such as "
                f"depprune.importance.magnitude(); got {type(importance).__name__}"
            )
        allowed = set(inspect.signature(depprune.prune).parameters) - _OWN
        unknown = sorted(set(options) - allowed)
        if unknown:
            own = sorted(set(options) & _OWN)
            raise MethodError(
                f"IterativePruner got {', '.join(unknown)}, "
                + (
                    "which it sets itself (use final_ratio, importance=, step(optimizers=))"
                    if own
                    else f"which depprune.prune does not take; options: {', '.join(sorted(allowed))}"
                )
            )
        self.schedule = _checked_schedule(final_ratio, steps, schedule)
        self.final_ratio = float(final_ratio)
        ratios = options.pop("ratios", None)
        if ratios is not None and not isinstance(ratios, Mapping):
            raise MethodError(
                f"ratios must map a module (or a tuple of modules) to its final ratio; got "
                f"{type(ratios).__name__}"
            )
        #: Each scope's cumulative ratios: its own final ratio on the same schedule.
        self.scope_schedules = {
            scope: _scaled(self.schedule, schedule, value, steps)
            for scope, value in (ratios or {}).items()
        }
        self.model = model
        self.example_inputs = example_inputs
        #: Each group's units before the first step, by kind and members (names outlive cuts;
        #: a grouped conv's conv_groups and channels share a first member, not a kind).
        self.original_sizes = {
            (g.kind, g.members): g.size
            for g in depprune.trace(
                model,
                example_inputs,
                ignored=options.get("ignored", ()),
                strict=options.get("strict", False),
            ).groups
        }
        self.importance = importance
        self.options = options
        self.steps = steps
        #: Steps done so far.
        self.steps_taken = 0

    @property
    def done(self) -> bool:
        """Whether every step has been taken."""
        return self.steps_taken == self.steps

    @property
    def ratio(self) -> float:
        """The fraction of the original width removed so far (per the schedule)."""
        return self.schedule[self.steps_taken - 1] if self.steps_taken else 0.0

    def step(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> depprune.PruneReport:
        """Re-trace the model and prune it in place to the next cumulative ratio.

        ``optimizers`` keep training the cut model (their state is cut to
        match). Returns the step's :class:`~depprune.PruneReport`; raises
        :class:`~depprune.MethodError` once :attr:`done`. On an error the
        model is left as it was and the step can be retried.
        """
        if self.done:
            raise MethodError(
                f"all {self.steps} pruning steps are done (the model is at its final ratio "
                f"{self.final_ratio}); make a new IterativePruner to prune further"
            )
        t = self.steps_taken

        def this_step(schedule: list[float]) -> float:
            return step_ratio(schedule[t - 1] if t else 0.0, schedule[t])

        graph = depprune.trace(
            self.model,
            self.example_inputs,
            ignored=self.options.get("ignored", ()),
            strict=self.options.get("strict", False),
        )
        report = depprune.prune(
            self.model,
            graph=graph,
            ratio=this_step(self.schedule),
            ratios={scope: this_step(s) for scope, s in self.scope_schedules.items()} or None,
            importance=self.importance,
            optimizers=optimizers,
            keep_units=self._units_at(graph, t),
            **self.options,
        )
        self.steps_taken += 1
        return report

    def _units_at(self, graph: Any, t: int) -> dict[int, int] | None:
        """Units each group keeps after step ``t``: its scope's ratio of its original size.

        Counting from the original sizes, not step by step, ends exactly where
        one-shot pruning at the final ratio would (a step's floor would
        otherwise keep a unit of a small group, two KV heads, at every step).
        Global ranking chooses its own counts, so it gets the step's ratio.
        """
        if self.options.get("global_ranking"):
            return None
        names = {id(m): name for name, m in self.model.named_modules(remove_duplicate=False)}
        scoped = []
        for scope, schedule in self.scope_schedules.items():
            modules = scope if isinstance(scope, tuple) else (scope,)
            for module in modules:
                name = names.get(id(module))
                if name is not None:
                    scoped.append((f"{name}." if name else "", schedule[t]))
        round_to = self.options.get("round_to")
        min_units = self.options.get("min_units", 1)
        keep = {}
        for g in graph.groups:
            original = self.original_sizes.get((g.kind, g.members))
            if original is None:
                continue
            producer = g.members[0][0]
            # The most specific scope holding the producer, as selection decides.
            matches = [(len(prefix), r) for prefix, r in scoped if producer.startswith(prefix)]
            ratio = max(matches)[1] if matches else self.schedule[t]
            keep[g.index] = min(g.size, units_to_keep(original, ratio, round_to, min_units))
        return keep


def _scaled(ratios: list[float], schedule: Any, final_ratio: float, steps: int) -> list[float]:
    """The schedule ``ratios`` follows, ending at ``final_ratio`` instead."""
    own = ratio_schedule(final_ratio, steps, schedule if isinstance(schedule, str) else "linear")
    end = ratios[-1]
    if isinstance(schedule, str) or not end:
        return own
    return [final_ratio * r / end for r in ratios[:-1]] + [own[-1]]


def _checked_schedule(final_ratio: float, steps: int, schedule: Any) -> list[float]:
    if isinstance(schedule, str):
        return ratio_schedule(final_ratio, steps, schedule)
    ratio_schedule(final_ratio, steps)  # checks final_ratio and steps
    try:
        ratios = [float(r) for r in schedule]
    except (TypeError, ValueError):
        raise MethodError(
            f"schedule must be one of {', '.join(SCHEDULES)} or a list of cumulative ratios; "
            f"got {schedule!r}"
        ) from None
    growing = all(0.0 <= a <= b < 1.0 for a, b in itertools.pairwise([0.0, *ratios]))
    if len(ratios) != steps or not growing or not math.isclose(ratios[-1], final_ratio):
        raise MethodError(
            f"a schedule list needs {steps} cumulative ratios growing in [0, 1) and ending at "
            f"final_ratio {final_ratio}; got {ratios}"
        )
    return ratios
