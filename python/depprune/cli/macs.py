"""io stage, on the command line: MACs one unit of each group removes, from a meta forward.

A hidden unit of a 4 -> 2 -> 3 MLP removes the 4 MACs feeding it and the 3 reading it:

>>> import torch, depprune
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU(), torch.nn.Linear(2, 3))
>>> macs_per_unit(depprune.trace(model, torch.zeros(1, 4)), model, torch.zeros(1, 4))
{0: 7}
"""

from __future__ import annotations

from typing import Any

__all__ = ["macs_per_unit"]


def macs_per_unit(graph: Any, model: Any, example_inputs: Any) -> dict[int, int] | str:
    """Multiply-accumulates of the weight layers removed with one unit of each group.

    One forward pass of a meta-device twin under torch's ``FlopCounterMode``
    gives each module's own MACs (its total less its children's); a
    module's MACs are shared over its weight matrices by size (exact for
    Linear and convolution layers) and a unit removes, from each member's
    weight, the share of the indices it covers. Attention score products
    and other MACs between activations are not counted. Returns the reason
    as a string when the model cannot be counted.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> inputs = torch.zeros(3, 8)
    >>> macs_per_unit(depprune.trace(model, inputs), model, inputs)  # 3 rows x (8 in + 4 out)
    {0: 36}
    """
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from depprune.shadow import meta_inputs, meta_shadow
    from depprune.tracer import model_inputs, running_stats_kept

    try:
        twin = meta_shadow(model)
        args, kwargs = model_inputs(twin, meta_inputs(example_inputs))
    except Exception as exc:
        return f"the model has no meta-device twin to count on ({type(exc).__name__})"
    counted = None
    for grad in (False, True):  # FlopCounterMode fails under no_grad on some models
        counter = FlopCounterMode(display=False)
        try:
            with torch.set_grad_enabled(grad), running_stats_kept(twin), counter:
                twin(*args, **kwargs)
        except Exception as exc:
            counted = f"torch's FlopCounterMode cannot run it ({type(exc).__name__})"
            continue
        counted = counter.get_flop_counts()
        break
    if isinstance(counted, str) or counted is None:
        return counted or "nothing was counted"
    root = type(twin).__name__
    totals = {
        key[len(root) + 1 :] if key != root else "": sum(ops.values())
        for key, ops in counted.items()
        if key == root or key.startswith(root + ".")
    }
    macs_of: dict[int, float] = {}
    for name, module in twin.named_modules():
        prefix = f"{name}." if name else ""
        own = totals.get(name, 0) - sum(
            totals.get(prefix + child, 0) for child, _ in module.named_children()
        )
        weights = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
        size = sum(p.numel() for p in weights)
        for param in weights:
            macs_of[id(param)] = macs_of.get(id(param), 0) + own / 2 * param.numel() / size
    tensors = dict(twin.named_parameters(remove_duplicate=False))
    result = {}
    for group in graph.groups:
        total, counted_members = 0.0, set()
        for (name, dim), unit_map in graph.unit_maps(group).items():
            param = tensors.get(name)
            if param is None or (id(param), dim) in counted_members:
                continue  # a buffer, or a tied tensor listed under a second name
            counted_members.add((id(param), dim))
            covered = int(np.count_nonzero(unit_map >= 0))
            total += macs_of.get(id(param), 0.0) * covered / param.shape[dim] / group.size
        result[group.index] = round(total)
    return result
