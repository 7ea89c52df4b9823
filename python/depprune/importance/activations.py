"""Scoring from calibration activations: a model and example batches to an importance.

:func:`wanda` runs the model on calibration batches and weighs each weight
by the norm of the input feature it multiplies (Sun et al. 2023).

>>> import torch
>>> from depprune.importance import wanda
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
>>> score = wanda(model, [torch.ones(4, 2)], progress=False)
>>> sorted(score.input_norms)
['0.weight', '1.weight']
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from depprune.errors import ImportanceError
from depprune.graph import Group
from depprune.importance.context import Importance, ScoreContext, _quiet, _scatter_members
from depprune.importance.weights import magnitude
from depprune.tracer import split_inputs

__all__ = ["input_square_sums", "wanda", "wanda_from_sums"]


def wanda(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    progress: bool | None = None,
) -> Importance:
    """Activation-aware importance (Wanda): ``|W| x ||input feature||_2`` over calibration data.

    Runs ``model`` on every batch of ``calibration`` (each a tensor, a tuple
    or a dict of inputs, like ``example_inputs``) with forward hooks on every
    ``nn.Linear`` (and transformers' ``Conv1D``) that add up the squared
    norm of each input feature, so memory stays at one layer's activations.
    A unit's score sums ``|W_ij| * ||X_j||`` over the weight slices it would
    remove; groups with no such weight fall back to L2 magnitude. Shows a
    progress bar over batches (``progress=False`` silences it; ``None``:
    only on a terminal).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    >>> score = wanda(model, [torch.tensor([[3.0, 0.0], [4.0, 0.0]])], progress=False)
    >>> score.input_norms["0.weight"].tolist()
    [5.0, 0.0]
    """
    sums, input_dims, counted = _input_square_sums(model, calibration, progress)
    if not counted:
        raise ImportanceError(
            "calibration gave no batches, or the model has no nn.Linear layers to read "
            "inputs of; pass an iterable of example inputs"
        )
    return wanda_from_sums(sums, input_dims)


def wanda_from_sums(sums: dict[str, torch.Tensor], input_dims: dict[str, int]) -> Importance:
    """Wanda's importance from each weight's summed squared input features (however run).

    ``sums`` maps weight names to the per-input-feature sums of squares,
    ``input_dims`` to which dim of the weight is its input (1 for
    ``nn.Linear``, 0 for transformers' ``Conv1D``).

    >>> score = wanda_from_sums({"0.weight": torch.tensor([9.0, 16.0])}, {"0.weight": 1})
    >>> score.input_norms["0.weight"].tolist()
    [3.0, 4.0]
    """
    norms = {name: total.sqrt() for name, total in sums.items()}
    fallback = magnitude(2)

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
            norm = norms.get(name)
            if norm is None:
                return None

            def weighted(rows: torch.Tensor, part: slice) -> torch.Tensor:
                # nn.Linear holds (out, in); Conv1D holds (in, out). The rows' device,
                # not the tensor's: a streamed tensor is read from disk to the CPU.
                scale = norm[None, :] if input_dims[name] == 1 else norm[part, None]
                return rows.abs_().mul_(scale.to(rows.device))

            return ctx.dim_sums(("wanda", name), tensor, dim, weighted)

        try:
            return _scatter_members(group, ctx, per_index)
        except ImportanceError:
            return fallback(group, ctx)

    score.__name__ = "wanda"
    score.input_norms = norms  # type: ignore[attr-defined]
    return score


def _input_square_sums(
    model: nn.Module, calibration: Iterable[Any], progress: bool | None
) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """Squared L2 norm of every input feature of every linear layer, over all batches.

    Also gives, per weight name, which dim of the weight is the input dim.
    """
    with input_square_sums(model) as (sums, input_dims, _):
        batches = run_batches(model, calibration, "wanda calibration", progress)
    return sums, input_dims, batches * bool(input_dims)


def run_batches(
    model: nn.Module, calibration: Iterable[Any], desc: str, progress: bool | None
) -> int:
    """Run ``model`` on every batch (a tensor, tuple or dict of inputs) without gradients,
    each moved to the model's device, with a progress bar; the number of batches run.

    >>> import torch
    >>> run_batches(torch.nn.Linear(2, 2), [torch.zeros(1, 2)] * 3, "batches", False)
    3
    """
    # The first real parameter's device: offloaded ones (accelerate) are meta placeholders.
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    batches = 0
    with torch.no_grad():
        for batch in tqdm(calibration, desc=desc, disable=_quiet(progress)):
            batch = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), batch)
            args, kwargs = split_inputs(batch)
            model(*args, **kwargs)
            batches += 1
    return batches


@contextlib.contextmanager
def input_square_sums(
    model: nn.Module,
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, int], dict[str, bool]]]:
    """Hooks on every linear layer adding up the squared norm of each input feature.

    Yields ``(sums, input_dims, switch)``: the sums fill in as the model runs
    (a module reachable under several names is counted once and listed
    under each when the block ends); ``switch["on"] = False`` pauses the
    counting (for a pass whose inputs are counted elsewhere).

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1))
    >>> with input_square_sums(model) as (sums, dims, switch):
    ...     _ = model(torch.tensor([[3.0, 4.0]]))
    >>> sums["0.weight"].tolist(), dims
    ([9.0, 16.0], {'0.weight': 1})
    """
    sums: dict[str, torch.Tensor] = {}
    input_dims: dict[str, int] = {}
    switch = {"on": True}
    hooks = []
    aliases: dict[str, list[str]] = {}
    first_name: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        is_conv1d = type(module).__name__ == "Conv1D" and hasattr(module, "nf")
        if not isinstance(module, nn.Linear) and not is_conv1d:
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        input_dims[name] = 0 if is_conv1d else 1
        if id(module) in first_name:
            aliases[first_name[id(module)]].append(name)
            continue
        first_name[id(module)] = name
        aliases[name] = []

        def hook(_module, inputs, _output, key=name) -> None:
            if not switch["on"]:
                return
            x = inputs[0].detach()
            # Reduce at once: only this layer's activation is ever held.
            total = x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)
            sums[key] = sums[key] + total if key in sums else total

        hooks.append(module.register_forward_hook(hook))
    try:
        yield sums, input_dims, switch
    finally:
        for handle in hooks:
            handle.remove()
        for name, others in aliases.items():
            for other in others:
                if name in sums:
                    sums[other] = sums[name]
