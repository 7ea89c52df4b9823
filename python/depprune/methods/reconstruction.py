"""Scoring and apply stage of reconstruction-based pruning: calibration batches in, next-layer
Gram statistics, contribution Grams and least-squares consumer weights out.

ThiNet (:mod:`depprune.methods.thinet`) and He et al.'s regression
(:mod:`depprune.methods.channel_regression`) judge a group's units by the
output of the *next layers*: its consumers, the members that are the input
dim of an ``nn.Linear`` (weight dim 1), an ``nn.Conv1d/2d/3d`` with
``groups=1`` (weight dim 1) or a transformers ``Conv1D`` (weight dim 0).
Everything they need comes from one matrix per consumer, the Gram
``G = X^T X`` of its unfolded inputs ``X`` (one row per output position, one
column per input channel and kernel offset), summed by forward hooks over
calibration batches on the original model: no activation is kept beyond the
layer being hooked. Grams are accumulated in float64; ridge terms are
relative to the mean diagonal of the matrix they regularise.

From ``G`` and the weight ``W`` (as an ``(outputs, channels * kernel)``
matrix) follow both

* the contribution Gram ``M[c, d] = <Z_c, Z_d>`` of the channels'
  contributions ``Z_c = X[:, c] W[:, c]^T`` to the consumer's output, summed
  over kernel offsets (:func:`contribution_gram`), collapsed to units
  through the graph's unit maps and summed over a group's consumers
  (:func:`unit_contribution_gram`); and
* the least-squares weights on the kept input columns that best reproduce the
  original output, ``X_kept^T Y = G[kept, :] W^T`` (:func:`least_squares`).

Reconstruction assumes the kept inputs of a consumer keep their values once
the others are gone: true for channels behind BatchNorm or elementwise
activations, approximate for a width a LayerNorm or RMSNorm spans.

>>> import torch
>>> from depprune.methods.reconstruction import collect_input_statistics, least_squares
>>> layer = torch.nn.Linear(3, 2)
>>> inputs = torch.randn(16, 3)
>>> inputs[:, 2] = inputs[:, 0] - inputs[:, 1]  # channel 2 is redundant
>>> stats = collect_input_statistics(layer, [inputs], ["weight"], progress=False)
>>> weight, bias = least_squares(stats.inputs["weight"], layer.weight, layer.bias, [0, 1])
>>> with torch.no_grad():
...     torch.allclose(inputs[:, :2] @ weight.T.float() + bias.float(), layer(inputs), atol=1e-4)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from depprune.api import (
    PruneReport,
    _check_kinds,
    _ignored_modules,
    apply_with_report,
    make_plan,
    trace,
)
from depprune.apply import named_tensors
from depprune.errors import DeppruneError, MethodError
from depprune.graph import Group
from depprune.importance import ScoreContext, _quiet, magnitude
from depprune.kinds import KINDS
from depprune.selection import check_ratios
from depprune.tracer import split_inputs

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "CalibrationStatistics",
    "InputStatistics",
    "NextLayers",
    "ReconstructionImportance",
    "collapse_to_units",
    "collect_input_statistics",
    "consumer_weights",
    "contribution_gram",
    "least_squares",
    "next_layers",
    "prune_by_reconstruction",
    "reconstructed_weights",
    "unit_contribution_gram",
    "weight_matrix",
]

#: Bytes of Gram matrices held at once during calibration (1 GiB); more passes when needed.
DEFAULT_MEMORY_BUDGET = 1 << 30

#: Elements of unfolded input converted to float64 at a time (32 MB), so a big
#: convolution's unfolded batch never sits in memory whole.
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- consumers


def _is_transformers_conv1d(module: nn.Module | None) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _input_dim(module: nn.Module | None) -> int | None:
    """The dim of ``module.weight`` that indexes its input features, or None if unsupported."""
    if isinstance(module, nn.Linear):
        return 1
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1:
        return 1
    if _is_transformers_conv1d(module):
        return 0
    return None


@dataclass(frozen=True)
class NextLayers:
    """A group's consumers (weight name, input dim), and members that read it unsupported."""

    consumers: tuple[tuple[str, int], ...]
    unsupported: tuple[str, ...]


def next_layers(group: Group, ctx: ScoreContext) -> NextLayers:
    """The members of ``group`` that are the input dim of a layer reconstruction can model.

    Members that read the units in a way the Gram cannot describe (a grouped or
    depthwise convolution's input channels, a transposed convolution's input,
    ``nn.MultiheadAttention``'s functional in-projections) are listed as
    unsupported; a depthwise convolution's *output* dim passes each channel
    through on its own, so it is neither.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> graph = depprune.trace(model, torch.zeros(1, 2))
    >>> next_layers(graph.groups[0], ScoreContext.from_model(graph, model))
    NextLayers(consumers=(('1.weight', 1),), unsupported=())
    """
    consumers: list[tuple[str, int]] = []
    unsupported: list[str] = []
    for name, dim in group.members:
        owner = ctx.owners.get(name)
        attr = name.rpartition(".")[2]
        if isinstance(owner, nn.modules.conv._ConvNd) and attr == "weight":
            if owner.transposed and dim == 0:
                unsupported.append(f"{name} is a transposed convolution's input")
                continue
            if not owner.transposed and owner.groups > 1 and dim == 1:
                unsupported.append(
                    f"{name} is a grouped convolution's input (groups={owner.groups})"
                )
                continue
        if isinstance(owner, nn.MultiheadAttention) and attr.endswith("proj_weight") and dim == 1:
            unsupported.append(f"{name} is read functionally by nn.MultiheadAttention")
            continue
        if isinstance(owner, nn.Bilinear) and attr == "weight" and dim > 0:
            unsupported.append(f"{name} is an nn.Bilinear input")
            continue
        if attr == "weight" and _input_dim(owner) == dim:
            consumers.append((name, dim))
    return NextLayers(tuple(consumers), tuple(unsupported))


def consumer_weights(
    graph: Any, model: nn.Module, groups: Iterable[Group] | None = None
) -> list[str]:
    """Names of the consumer weights of ``groups`` (all the graph's by default), in order.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> consumer_weights(depprune.trace(model, torch.zeros(1, 2)), model)
    ['1.weight']
    """
    ctx = ScoreContext.from_model(graph, model)
    names: dict[str, None] = {}
    for group in graph.groups if groups is None else groups:
        for name, _ in next_layers(group, ctx).consumers:
            names[name] = None
    return list(names)


def weight_matrix(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """A consumer's weight as a float64 ``(outputs, channels * kernel)`` matrix.

    Columns run channel-major, kernel offset minor: the order of the unfolded inputs.

    >>> weight_matrix(torch.nn.Conv2d(3, 4, 2)).shape
    torch.Size([4, 12])
    """
    weight = module.weight if weight is None else weight
    weight = weight.detach().to(torch.float64)
    if _is_transformers_conv1d(module):
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def _module_layout(module: nn.Module, matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An ``(outputs, columns)`` matrix back in the layout of ``module.weight`` (cut ``shape``)."""
    if _is_transformers_conv1d(module):
        return matrix.T.reshape(shape)
    return matrix.reshape(shape)


# --------------------------------------------------------------------------- statistics


@dataclass
class InputStatistics:
    """A consumer's unfolded inputs summed over calibration: ``X^T X``, ``X^T 1`` and rows."""

    #: ``(channels * kernel, channels * kernel)`` float64 Gram of the unfolded inputs.
    gram: torch.Tensor
    #: Column sums of the unfolded inputs (for the constant term folded into a bias).
    input_sum: torch.Tensor
    #: Rows summed: output positions over all calibration samples.
    count: int
    #: Kernel offsets per input channel (1 for a linear layer).
    kernel_size: int
    #: The dim of the consumer's weight that indexes its input channels.
    input_dim: int

    @property
    def channels(self) -> int:
        """Input channels (indices along the weight's input dim)."""
        return self.gram.shape[0] // self.kernel_size


@dataclass
class CalibrationStatistics:
    """Input statistics of consumer weights by name, and why others have none."""

    inputs: dict[str, InputStatistics] = field(default_factory=dict)
    #: Weight name -> why it has no statistics (over the budget, never ran).
    missing: dict[str, str] = field(default_factory=dict)
    #: Calibration batches each pass ran.
    batches: int = 0
    #: Calibration passes over the data (more when the Grams do not fit the budget at once).
    passes: int = 0


def _conv_rows(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The convolution's input unfolded: one row per output position, ``(N, C * K)``.

    Honours stride, dilation, padding (zeros and the other padding modes, and
    ``"same"``) for 1-, 2- and 3-d convolutions: the windows are strided
    views, so only the returned rows are copied.
    """
    spatial = module.weight.dim() - 2
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)  # unbatched input
    padding = module._reversed_padding_repeated_twice
    if any(padding):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, padding, mode=mode)
    for d in range(spatial):
        span = module.dilation[d] * (module.kernel_size[d] - 1) + 1
        x = x.unfold(2 + d, span, module.stride[d])
    # Windows are spans wide; the kernel reads every dilation-th element of them.
    x = x[(slice(None),) * (2 + spatial) + tuple(slice(None, None, s) for s in module.dilation)]
    order = (0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial))
    return x.permute(order).reshape(-1, module.weight.shape[1] * math.prod(module.kernel_size))


class _Accumulator:
    """Adds one consumer's unfolded inputs into its Gram, a sub-batch at a time."""

    def __init__(self, module: nn.Module, columns: int, kernel_size: int, input_dim: int):
        self.module = module
        self.columns = columns
        self.kernel_size = kernel_size
        self.input_dim = input_dim
        self.gram: torch.Tensor | None = None
        self.input_sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        if self.gram is None:
            self.gram = torch.zeros(
                self.columns, self.columns, dtype=torch.float64, device=x.device
            )
            self.input_sum = torch.zeros(self.columns, dtype=torch.float64, device=x.device)
        module = self.module
        if isinstance(module, nn.modules.conv._ConvNd):
            spatial = module.weight.dim() - 2
            batch = x if x.dim() == spatial + 2 else x.unsqueeze(0)
            per_sample = max(1, batch[0].numel() * math.prod(module.kernel_size))
            step = max(1, _CHUNK_ELEMENTS // per_sample)
            parts = (_conv_rows(module, batch[i : i + step]) for i in range(0, len(batch), step))
        else:
            rows = x.reshape(-1, self.columns)
            step = max(1, _CHUNK_ELEMENTS // self.columns)
            parts = (rows[i : i + step] for i in range(0, rows.shape[0], step))
        for part in parts:
            part = part.to(torch.float64)
            self.gram.addmm_(part.T, part)
            self.input_sum += part.sum(dim=0)
            self.count += part.shape[0]

    def statistics(self) -> InputStatistics:
        return InputStatistics(
            self.gram, self.input_sum, self.count, self.kernel_size, self.input_dim
        )


def _consumer_shape(module: nn.Module) -> tuple[int, int, int]:
    """(columns of the unfolded input, kernel offsets per channel, input dim) of a consumer."""
    weight = module.weight
    if _is_transformers_conv1d(module):
        return weight.shape[0], 1, 0
    kernel = math.prod(weight.shape[2:])
    return weight.shape[1] * kernel, kernel, 1


_EMPTY = object()
_NO_BATCHES = (
    "calibration gave no batches; pass a non-empty list or DataLoader of model inputs "
    "(a few hundred samples like the training data)"
)


def collect_input_statistics(
    model: nn.Module,
    calibration: Iterable[Any],
    weight_names: Iterable[str],
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool | None = None,
    description: str = "calibration",
) -> CalibrationStatistics:
    """Input Grams of the consumers owning ``weight_names``, over every calibration batch.

    Each batch is the model's inputs (a tensor, a tuple of positional inputs
    or a dict, like ``example_inputs``). The model runs in eval mode under
    ``no_grad`` (its training flags are restored afterwards, BatchNorm
    statistics do not move) with a forward hook on each consumer that adds
    its unfolded input into a float64 Gram at once. Grams that fit
    ``memory_budget`` bytes together are collected in one pass; the rest in
    further passes over the data (a one-shot iterator is kept as a list for
    that). A consumer whose Gram alone exceeds the budget, or whose forward
    never runs (a layer its parent calls functionally), is listed in
    ``missing`` with the reason. A progress bar runs over the batches
    (``progress=False`` silences it; ``None``: only on a terminal).

    >>> import torch
    >>> layer = torch.nn.Linear(2, 1)
    >>> stats = collect_input_statistics(layer, [torch.tensor([[1.0, 2.0]])], ["weight"],
    ...                                  progress=False)
    >>> stats.inputs["weight"].gram.tolist(), stats.inputs["weight"].count
    ([[1.0, 2.0], [2.0, 4.0]], 1)
    """
    if not isinstance(model, nn.Module):
        raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
    if (
        not isinstance(memory_budget, (int, np.integer))
        or isinstance(memory_budget, bool)
        or memory_budget <= 0
    ):
        raise MethodError(
            f"memory_budget is {memory_budget!r}; give the bytes of Gram matrices to hold at "
            "once as a positive integer, e.g. 1 << 30"
        )
    if isinstance(calibration, (torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
        raise MethodError(
            f"calibration must be an iterable of batches (a list or a DataLoader of model "
            f"inputs); got {type(calibration).__name__}. Wrap one batch as [batch]"
        )
    if iter(calibration) is calibration:
        calibration = list(calibration)  # a one-shot iterator cannot feed a second pass
    tensors = named_tensors(model)
    result = CalibrationStatistics()
    # One accumulator per module object: a layer under two names is hooked once.
    names_of: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name in weight_names:
        entry = tensors.get(name)
        module = entry[0] if entry else None
        if entry is None or entry[1] != "weight" or _input_dim(module) is None:
            raise MethodError(
                f"{name!r} is not the weight of an nn.Linear, an nn.Conv1d/2d/3d with groups=1 "
                "or a transformers Conv1D of this model; pass consumer_weights(graph, model)"
            )
        names_of.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    passes: list[list[int]] = []
    used = memory_budget
    for key, module in modules.items():
        columns = _consumer_shape(module)[0]
        size = columns * columns * 8
        if size > memory_budget:
            for name in names_of[key]:
                result.missing[name] = (
                    f"its input Gram needs {size / 2**20:.0f} MiB, over memory_budget="
                    f"{memory_budget / 2**20:.0f} MiB; raise memory_budget to reconstruct it"
                )
            continue
        if used + size > memory_budget:
            passes.append([])
            used = 0
        passes[-1].append(key)
        used += size
    if not passes and next(iter(calibration), _EMPTY) is _EMPTY:
        raise MethodError(_NO_BATCHES)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for number, keys in enumerate(passes):
        accumulators = {
            key: _Accumulator(modules[key], *_consumer_shape(modules[key])) for key in keys
        }
        batches = _run_calibration(
            model,
            calibration,
            accumulators,
            device,
            tqdm_options={
                "desc": f"{description} pass {number + 1}/{len(passes)}",
                "disable": _quiet(progress),
            },
        )
        if batches == 0:
            raise MethodError(_NO_BATCHES)
        result.batches = batches
        result.passes += 1
        for key, accumulator in accumulators.items():
            for name in names_of[key]:
                if accumulator.gram is None or accumulator.count == 0:
                    result.missing[name] = (
                        "its forward never ran on the calibration batches (a parent module "
                        "that reads its weight functionally?)"
                    )
                else:
                    result.inputs[name] = accumulator.statistics()
    return result


def _run_calibration(
    model: nn.Module,
    calibration: Iterable[Any],
    accumulators: Mapping[int, _Accumulator],
    device: torch.device,
    tqdm_options: dict[str, Any],
) -> int:
    """One pass over the calibration batches with a hook per accumulator; batches run."""

    def hook(accumulator: _Accumulator) -> Callable[..., None]:
        def add(_module: nn.Module, inputs: tuple, _output: Any) -> None:
            # A call with its input as a keyword leaves nothing to read: it counts as not run.
            if inputs and isinstance(inputs[0], torch.Tensor):
                accumulator.add(inputs[0].detach())

        return add

    hooks = [
        accumulator.module.register_forward_hook(hook(accumulator))
        for accumulator in accumulators.values()
    ]
    training = [(module, module.training) for module in model.modules()]
    batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in tqdm(calibration, **tqdm_options):
                moved = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), batch)
                args, kwargs = split_inputs(moved)
                try:
                    model(*args, **kwargs)
                except DeppruneError:
                    raise
                except Exception as exc:
                    raise MethodError(
                        f"the model failed on calibration batch {batches} "
                        f"({type(exc).__name__}: {exc}); each batch is the model's inputs like "
                        "example_inputs (for a loader of (inputs, labels) pass "
                        "[inputs for inputs, _ in loader])"
                    ) from exc
                batches += 1
    finally:
        for handle in hooks:
            handle.remove()
        for module, flag in training:
            module.training = flag
    return batches


# --------------------------------------------------------------------------- contributions


def contribution_gram(statistics: InputStatistics, weight: torch.Tensor) -> torch.Tensor:
    """``M[c, d] = <Z_c, Z_d>``: inner products of the input channels' output contributions.

    ``Z_c = X[:, c, :] W[:, c, :]^T`` is what input channel ``c`` adds to the
    consumer's output over all calibration positions, so
    ``M[c, d] = sum_{k, k'} G[(c, k), (d, k')] * sum_o W[o, c, k] W[o, d, k']``;
    ``weight`` is the consumer's :func:`weight_matrix`. The squared error of
    removing a set ``T`` of channels is ``1_T^T M 1_T``.

    >>> import torch
    >>> layer = torch.nn.Linear(2, 1, bias=False)
    >>> _ = layer.weight.data.copy_(torch.tensor([[1.0, 3.0]]))
    >>> stats = collect_input_statistics(layer, [torch.tensor([[1.0, 1.0]])], ["weight"],
    ...                                  progress=False)
    >>> contribution_gram(stats.inputs["weight"], weight_matrix(layer)).tolist()
    [[1.0, 3.0], [3.0, 9.0]]
    """
    weight = weight.to(statistics.gram.device, torch.float64)
    kernel = statistics.kernel_size
    if weight.shape[1] != statistics.gram.shape[0]:
        raise MethodError(
            f"the weight has {weight.shape[1]} input columns but its statistics have "
            f"{statistics.gram.shape[0]}; use the statistics collected for this weight"
        )
    products = statistics.gram * (weight.T @ weight)
    channels = statistics.channels
    return products.reshape(channels, kernel, channels, kernel).sum(dim=(1, 3))


def collapse_to_units(matrix: torch.Tensor, unit_map: np.ndarray, size: int) -> torch.Tensor:
    """Sum an index-level square matrix into a unit-level one: ``P^T matrix P``.

    ``P`` is the indicator of ``unit_map`` (index -> unit, -1 outside the
    group); the product is done as two ``index_add_`` (the sparse form of the
    indicator matmul), so a conv channel flattened into ``H * W`` linear columns
    collapses in one step.

    >>> import numpy as np, torch
    >>> collapse_to_units(torch.ones(3, 3), np.array([0, 0, -1]), 1).tolist()
    [[4.0]]
    """
    units = torch.tensor(np.asarray(unit_map), dtype=torch.long, device=matrix.device)
    inside = torch.nonzero(units >= 0).reshape(-1)
    units = units[inside]
    block = matrix.index_select(0, inside).index_select(1, inside)
    rows = torch.zeros(size, block.shape[1], dtype=matrix.dtype, device=matrix.device)
    rows.index_add_(0, units, block)
    result = torch.zeros(size, size, dtype=matrix.dtype, device=matrix.device)
    return result.index_add_(1, units, rows)


def unit_contribution_gram(
    group: Group, ctx: ScoreContext, statistics: CalibrationStatistics
) -> tuple[torch.Tensor | None, str | None]:
    """The group's unit-level contribution Gram summed over its consumers, or why there is none.

    Returns ``(gram, None)`` with a float64 ``(group.size, group.size)`` matrix,
    or ``(None, reason)`` when a consumer is unsupported, has no statistics, or
    the group has no consumer.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> graph = depprune.trace(model, torch.zeros(1, 2))
    >>> stats = collect_input_statistics(model, [torch.randn(4, 2)], ["1.weight"], progress=False)
    >>> gram, why = unit_contribution_gram(graph.groups[0], ScoreContext.from_model(graph, model),
    ...                                    stats)
    >>> gram.shape, why
    (torch.Size([3, 3]), None)
    """
    layers = next_layers(group, ctx)
    if layers.unsupported:
        return None, "; ".join(layers.unsupported)
    if not layers.consumers:
        return None, "no nn.Linear, nn.Conv with groups=1 or Conv1D reads its units"
    unit_maps = ctx.graph.unit_maps(group)
    total: torch.Tensor | None = None
    seen: set[tuple[int, int]] = set()
    for name, dim in layers.consumers:
        stats = statistics.inputs.get(name)
        if stats is None:
            why = statistics.missing.get(name, "it was not among the weights calibrated")
            return None, f"{name} has no input statistics: {why}"
        tensor = ctx.tensors[name]
        # A weight listed under two names (a shared layer) is one consumer.
        if (id(tensor), dim) in seen:
            continue
        seen.add((id(tensor), dim))
        index_gram = contribution_gram(stats, weight_matrix(ctx.owners[name], tensor))
        collapsed = collapse_to_units(index_gram, unit_maps[(name, dim)], group.size)
        total = collapsed if total is None else total + collapsed.to(total.device)
    return total, None


# --------------------------------------------------------------------------- least squares


def _ridge_solve(normal: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(normal + ridge * mean diagonal * I)^-1 rhs`` for a symmetric PSD ``normal``."""
    size = normal.shape[0]
    scale = float(torch.diagonal(normal).sum()) / max(1, size)
    if size == 0 or scale <= 0:
        # No kept input carries signal: nothing can be reconstructed from them.
        return torch.zeros(size, rhs.shape[1], dtype=normal.dtype, device=normal.device)
    eye = torch.eye(size, dtype=normal.dtype, device=normal.device)
    shift = ridge * scale
    # Escalate the ridge only as far as the factorisation needs (collinear kept inputs).
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(normal + shift * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, factor)
        shift = max(shift * 100, 1e-12 * scale)
    return torch.linalg.pinv(normal, hermitian=True) @ rhs


def least_squares(
    statistics: InputStatistics,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept_inputs: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    ridge: float = 1e-6,
    module: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Consumer weights on the kept input channels that best reproduce its original output.

    Solves ``min_A ||X W^T + b - X_kept A^T - c||^2 + r ||A||^2`` over the
    calibration rows from the Gram alone (``X_kept^T Y = G[kept, :] W^T``),
    with ``r = ridge`` times the mean diagonal of the normal matrix. With a
    ``bias`` the constant term ``c`` is solved too (the normal equations are
    centred by the input means), so the mean contribution of the removed
    channels moves into the bias; without one the fit has no constant term.

    ``weight`` is the consumer's weight in its module's layout (or already a
    :func:`weight_matrix` when ``module`` is None and it is 2-d); returns
    ``(weight, bias)`` as float64, the weight an ``(outputs, kept * kernel)``
    matrix with every original output row.

    >>> import torch
    >>> layer = torch.nn.Linear(2, 1, bias=False)
    >>> stats = collect_input_statistics(layer, [torch.tensor([[1.0, 2.0], [2.0, 4.0]])],
    ...                                  ["weight"], progress=False)
    >>> _ = layer.weight.data.copy_(torch.tensor([[1.0, 1.0]]))
    >>> weight, _ = least_squares(stats.inputs["weight"], layer.weight, None, [0], ridge=0.0)
    >>> round(weight.item(), 6)  # channel 1 is twice channel 0
    3.0
    """
    if not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise MethodError(f"ridge is {ridge!r}; give a finite ridge >= 0 (default 1e-6)")
    gram = statistics.gram
    device = gram.device
    if module is not None:
        matrix = weight_matrix(module, weight).to(device)
    else:
        matrix = weight.detach().to(device, torch.float64).reshape(weight.shape[0], -1)
    kernel = statistics.kernel_size
    kept = torch.as_tensor(np.asarray(kept_inputs), dtype=torch.long, device=device).reshape(-1)
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= statistics.channels):
        raise MethodError(
            f"kept input channels must lie in [0, {statistics.channels}); got "
            f"{kept.tolist()[:8]}; pass the consumer's plan.kept[(name, input_dim)]"
        )
    columns = (kept[:, None] * kernel + torch.arange(kernel, device=device)).reshape(-1)
    rows = gram.index_select(0, columns)
    if bias is not None:
        mean = statistics.input_sum / max(1, statistics.count)
        rows = rows - statistics.count * mean[columns, None] * mean[None, :]
    solution = _ridge_solve(rows.index_select(1, columns), rows @ matrix.T, float(ridge))
    new_weight = solution.T.contiguous()
    if bias is None:
        return new_weight, None
    new_bias = bias.detach().to(device, torch.float64) + mean @ matrix.T - mean[columns] @ solution
    return new_weight, new_bias


def _tied(tensors: Mapping[str, tuple[nn.Module, str, bool]], model: nn.Module) -> set[int]:
    """Ids of parameters registered in more than one (module, attribute): tied weights."""
    owners: dict[int, set[tuple[int, str]]] = {}
    for module, attr, is_param in tensors.values():
        if is_param:
            owners.setdefault(id(getattr(module, attr)), set()).add((id(module), attr))
    return {key for key, places in owners.items() if len(places) > 1}


def _listed(names: Sequence[str], shown: int = 3) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def reconstructed_weights(
    model: nn.Module,
    plan: Any,
    statistics: CalibrationStatistics,
    *,
    ridge: float = 1e-6,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The least-squares weights (and biases) of every consumer whose input the plan cuts.

    Computed on the uncut ``model`` and shaped as after ``plan.apply``:
    ``{tensor name: new tensor}`` in each tensor's dtype and device, plus notes
    (consumers without a bias to fold the constant term into, tied weights
    left as cut).

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1))
    >>> plan = depprune.make_plan(model, torch.zeros(1, 2), ratio=0.5)
    >>> stats = collect_input_statistics(model, [torch.randn(8, 2)], ["1.weight"], progress=False)
    >>> updates, notes = reconstructed_weights(model, plan, stats)
    >>> {name: tuple(t.shape) for name, t in updates.items()}
    {'1.weight': (1, 2), '1.bias': (1,)}
    """
    tensors = named_tensors(model)
    tied = _tied(tensors, model)
    updates: dict[str, torch.Tensor] = {}
    no_bias: list[str] = []
    tied_names: list[str] = []
    done: set[int] = set()
    for name, stats in statistics.inputs.items():
        kept_inputs = plan.kept.get((name, stats.input_dim))
        if kept_inputs is None:
            continue
        module, attr, _ = tensors[name]
        param = getattr(module, attr)
        if id(param) in done:
            continue
        done.add(id(param))
        if id(param) in tied:
            tied_names.append(name)
            continue
        prefix = name[: -len(attr)]
        bias = module._parameters.get("bias")
        new_weight, new_bias = least_squares(
            stats, param, bias, kept_inputs, ridge=ridge, module=module
        )
        output_dim = 1 if _is_transformers_conv1d(module) else 0
        kept_rows = plan.kept.get((name, output_dim))
        if kept_rows is not None:
            new_weight = new_weight.index_select(
                0, torch.as_tensor(kept_rows, dtype=torch.long, device=new_weight.device)
            )
        shape = [
            len(plan.kept[(name, d)]) if (name, d) in plan.kept else size
            for d, size in enumerate(param.shape)
        ]
        updates[name] = _module_layout(module, new_weight, shape).to(param.device, param.dtype)
        if bias is None:
            no_bias.append(name)
            continue
        if id(bias) in tied:
            tied_names.append(prefix + "bias")
            continue
        kept_bias = plan.kept.get((prefix + "bias", 0))
        if kept_bias is not None:
            new_bias = new_bias.index_select(
                0, torch.as_tensor(kept_bias, dtype=torch.long, device=new_bias.device)
            )
        updates[prefix + "bias"] = new_bias.to(bias.device, bias.dtype)
    notes = []
    if no_bias:
        notes.append(
            f"reconstruction: {_listed(no_bias)} {'has' if len(no_bias) == 1 else 'have'} no "
            "bias, so the removed channels' mean "
            "contribution is not folded into one (least squares without a constant term)"
        )
    if tied_names:
        notes.append(
            f"reconstruction: {_listed(tied_names)} {'is' if len(tied_names) == 1 else 'are'} "
            "tied to another parameter, so cut but not reconstructed (a new value would "
            "change the other too)"
        )
    return updates, notes


# --------------------------------------------------------------------------- importance


def _group_key(group: Group) -> tuple:
    """What identifies a group across traces of one model: heads and head_dim (or KV heads
    and queries per KV head) share every member, so the members alone do not."""
    return (group.index, group.size, group.unit_offset, group.members)


class ReconstructionImportance:
    """An :data:`~depprune.importance.Importance` that ranks a group from its contribution Gram.

    ``rank(gram)`` gives one score per unit (lowest removed first); groups
    without one (no supported consumer, a grouped consumer, missing
    statistics) fall back to L1 magnitude, with the reason in ``notes``.
    Grams and scores are cached per group (a second plan on the same statistics
    costs nothing), so make a new one once the weights change.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> stats = collect_input_statistics(model, [torch.randn(4, 2)], ["1.weight"], progress=False)
    >>> importance = ReconstructionImportance(stats, lambda gram: torch.diagonal(gram), "energy")
    >>> plan = depprune.make_plan(model, torch.zeros(1, 2), importance=importance, progress=False)
    >>> plan.groups[0].kept, importance.notes
    (2, {})
    """

    def __init__(
        self,
        statistics: CalibrationStatistics,
        rank: Callable[[torch.Tensor], torch.Tensor],
        name: str,
    ) -> None:
        self.statistics = statistics
        self.rank = rank
        self.__name__ = name
        #: Group key -> why the group was ranked by L1 magnitude instead.
        self.notes: dict[tuple, str] = {}
        #: Group key -> scores to use instead of ranking (set by a refining method).
        self.overrides: dict[tuple, torch.Tensor] = {}
        self._grams: dict[tuple, torch.Tensor | None] = {}
        self._scores: dict[tuple, torch.Tensor] = {}
        self._fallback = magnitude(1)

    def gram(self, group: Group, ctx: ScoreContext) -> torch.Tensor | None:
        """The group's unit contribution Gram (cached), or None when it falls back."""
        key = _group_key(group)
        if key not in self._grams:
            gram, why = unit_contribution_gram(group, ctx, self.statistics)
            self._grams[key] = gram
            if why is not None:
                self.notes[key] = (
                    f"{self.__name__}: group {group.index} ({group.members[0][0]}"
                    f"[{group.members[0][1]}]) ranked by L1 magnitude: {why}"
                )
        return self._grams[key]

    def __call__(self, group: Group, ctx: ScoreContext) -> torch.Tensor:
        key = _group_key(group)
        if key in self.overrides:
            return self.overrides[key]
        if key not in self._scores:
            gram = self.gram(group, ctx)
            self._scores[key] = (
                self._fallback(group, ctx) if gram is None else self.rank(gram).float().cpu()
            )
        return self._scores[key]


# --------------------------------------------------------------------------- the driver

#: make_plan options the methods pass through (importance, graph and verify are theirs).
_PLAN_OPTIONS = frozenset(
    {"ratios", "ignored", "round_to", "min_units", "global_ranking", "kinds", "uniform", "strict"}
)

#: Chooses a group's kept units at a keep count: (gram, keep) -> unit ids, or None to
#: keep the ranking's choice.
Refine = Callable[[torch.Tensor, int], torch.Tensor | None]


def prune_by_reconstruction(
    method: str,
    rank: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    example_inputs: Any,
    calibration: Iterable[Any],
    *,
    ratio: float = 0.5,
    reconstruct: bool = True,
    progress: bool | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ridge: float = 1e-6,
    refine: Refine | None = None,
    count_macs: bool = True,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    **plan_options: Any,
) -> PruneReport:
    """Calibrate, plan with ``rank``, optionally refine, reconstruct, cut: a method's ``prune``.

    Statistics come from the original model; the plan is made with a
    :class:`ReconstructionImportance`; ``refine(gram, keep)`` may then choose
    each cut group's kept units at the plan's keep count (the group's scores
    are permuted so that the ranking keeps exactly those, which leaves every
    count, local or global, as it was, and the plan is made again). The least
    squares weights of the consumers are computed before anything is cut;
    then the plan is applied and they are written. On any error before the cut
    the model is as it was. Returns a :class:`depprune.PruneReport` whose notes
    say which groups fell back to L1 magnitude and what reconstruction skipped.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> report = prune_by_reconstruction("energy", lambda gram: torch.diagonal(gram), model,
    ...     torch.zeros(1, 4), [torch.randn(16, 4)], ratio=0.5, progress=False)
    >>> model[2].in_features, report.params_after < report.params_before
    (4, True)
    """
    unknown = sorted(set(plan_options) - _PLAN_OPTIONS)
    if unknown:
        raise MethodError(
            f"{method}.prune got unknown option(s) {unknown}; it takes ratio, reconstruct, "
            f"progress, memory_budget, ridge, count_macs, optimizers and make_plan's "
            f"{', '.join(sorted(_PLAN_OPTIONS))} (the importance is the method's own)"
        )
    if not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise MethodError(f"ridge is {ridge!r}; give a finite ridge >= 0 (default 1e-6)")
    if not isinstance(model, nn.Module):
        raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
    ignored = _ignored_modules(plan_options.get("ignored", ()))
    # Cheap arguments are checked before calibration, which may take a while.
    check_ratios(
        model,
        ratio,
        plan_options.get("ratios"),
        ignored,
        plan_options.get("round_to"),
        plan_options.get("min_units", 1),
    )
    _check_kinds(plan_options.get("kinds"))
    graph = trace(model, example_inputs, ignored=ignored, strict=plan_options.get("strict", False))
    kinds = plan_options.get("kinds")
    wanted = set(KINDS if kinds is None else ([kinds] if isinstance(kinds, str) else kinds))
    ignored_prefixes = _module_prefixes(model, ignored)
    groups = [
        g
        for g in graph.groups
        if g.kind in wanted
        and not any(n.startswith(p) for n, _ in g.members for p in ignored_prefixes)
    ]
    statistics = collect_input_statistics(
        model,
        calibration,
        consumer_weights(graph, model, groups),
        memory_budget=memory_budget,
        progress=progress,
        description=f"{method} calibration",
    )
    importance = ReconstructionImportance(statistics, rank, method)

    def plan_with() -> Any:
        return make_plan(
            model,
            graph=graph,
            ratio=ratio,
            importance=importance,
            progress=progress,
            **plan_options,
        )

    plan = plan_with()
    if refine is not None and _refined(plan, graph, model, importance, refine):
        plan = plan_with()
    updates, notes = (
        reconstructed_weights(model, plan, statistics, ridge=ridge) if reconstruct else ({}, [])
    )
    report = apply_with_report(model, plan, graph, count_macs=count_macs, optimizers=optimizers)
    tensors = named_tensors(model)
    with torch.no_grad():
        for name, value in updates.items():
            module, attr, _ = tensors[name]
            getattr(module, attr).copy_(value)
    report.notes += [*importance.notes.values(), *notes]
    return report


def _module_prefixes(model: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    return [f"{names[id(m)]}." if names.get(id(m)) else "" for m in modules if id(m) in names]


def _refined(
    plan: Any,
    graph: Any,
    model: nn.Module,
    importance: ReconstructionImportance,
    refine: Refine,
) -> bool:
    """Set score overrides so that each cut group keeps ``refine``'s units; True if any."""
    ctx = ScoreContext.from_model(graph, model)
    changed = False
    for choice in plan.groups:
        group = graph.groups[choice.index]
        if choice.kept >= choice.size:
            continue
        gram = importance.gram(group, ctx)
        if gram is None:
            continue
        chosen = refine(gram, choice.kept)
        if chosen is None:
            continue
        removed = torch.as_tensor(plan.removed.get(choice.index, ()), dtype=torch.long)
        keep = torch.ones(group.size, dtype=torch.bool)
        keep[removed] = False
        wanted = torch.zeros(group.size, dtype=torch.bool)
        wanted[torch.as_tensor(chosen, dtype=torch.long).cpu()] = True
        if torch.equal(keep, wanted):
            continue
        scores = importance(group, ctx)
        # The group's own scores, reassigned so the chosen units rank highest: every count
        # (a global ranking's too) sees the same values, only which unit holds them moves.
        order = torch.argsort(wanted.double() * 2 + scores.double() / (scores.abs().max() + 1))
        permuted = torch.empty_like(scores)
        permuted[order] = torch.sort(scores).values
        importance.overrides[_group_key(group)] = permuted
        changed = True
    return changed
