"""The shared correctness oracle for pruned models.

Zeroing the removed units instead of removing them must give the same output
wherever no normalisation spans the pruned axis; the parameter count after
apply must equal what the plan predicts from its kept indices.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from depprune import DependencyGraph
from depprune.importance import ScoreContext


def is_norm(module: nn.Module | None) -> bool:
    """Layers whose output depends on every element along their normalised axis."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.normalization.RMSNorm)):
        return True
    return module is not None and type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


_aten = torch.ops.aten
#: Batch-norm kernels: statistics over every dim but 1, whatever tensor they normalise.
_BATCH_NORMS = {
    getattr(_aten, name).default
    for name in ("_native_batch_norm_legit", "_native_batch_norm_legit_no_training")
    if hasattr(_aten, name)
} | {_aten.native_batch_norm.default}


def norm_spanned_groups(graph: DependencyGraph, model: nn.Module) -> set[int]:
    """Groups a normalisation spans, so zeroing cannot stand for removing (the oracle skips them).

    A member inside a layer/group/RMS norm; or an axis a batch norm takes its statistics
    over (weight standardisation: ``batch_norm`` on a conv weight spans its input channels).
    """
    owners = ScoreContext.from_model(graph, model).owners
    spanned = {
        g.index for g in graph.groups if any(is_norm(owners.get(name)) for name, _ in g.members)
    }
    log = getattr(getattr(graph, "recording", None), "log", None)
    if log is not None:
        reduced = [
            axis
            for func, inputs in zip(log.funcs, log.inputs, strict=True)
            if func in _BATCH_NORMS and inputs
            for dim, axis in enumerate(inputs[0])
            if dim != 1
        ]
        if reduced:
            _, groups = graph._analysis.groups_of_axes(np.asarray(reduced, dtype=np.int64))
            spanned |= set(groups.tolist())
    return spanned


def predicted_param_count(model: nn.Module, kept: Mapping[tuple[str, int], np.ndarray]) -> int:
    """Parameters after the plan: each tensor's kept sizes multiplied, tied ones once."""
    ctx = dict(model.named_parameters(remove_duplicate=False))
    shapes: dict[int, list[int]] = {}
    for name, param in ctx.items():
        shape = shapes.setdefault(id(param), list(param.shape))
        for dim in range(param.ndim):
            if (name, dim) in kept:
                shape[dim] = min(shape[dim], len(kept[(name, dim)]))
    return sum(int(np.prod(s)) for s in shapes.values())


def zeroed_copy(
    model: nn.Module, graph: DependencyGraph, removed: Mapping[int, np.ndarray]
) -> nn.Module:
    """A copy of ``model`` whose removed units are zero in every parameter member."""
    twin = copy.deepcopy(model)
    tensors = ScoreContext.from_model(graph, twin).tensors
    with torch.no_grad():
        for index, units in removed.items():
            group = graph.groups[index]
            drop = np.zeros(group.size, dtype=bool)
            drop[units] = True
            for (name, dim), unit_map in graph.unit_maps(group).items():
                tensor = tensors[name]
                if not isinstance(tensor, nn.Parameter):
                    continue
                hit = np.zeros(unit_map.shape, dtype=bool)
                on = unit_map >= 0
                hit[on] = drop[unit_map[on]]
                index_tensor = torch.from_numpy(np.nonzero(hit)[0]).to(tensor.device)
                tensor.index_fill_(dim, index_tensor, 0.0)
    return twin


def outputs(model: nn.Module, example_inputs) -> list[torch.Tensor]:
    """Every tensor in the model's output, flattened in order."""
    with torch.no_grad():
        if isinstance(example_inputs, Mapping):
            out = model(**example_inputs)
        elif isinstance(example_inputs, (tuple, list)):
            out = model(*example_inputs)
        else:
            out = model(example_inputs)
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def constant_outputs(tensors: list[torch.Tensor]) -> list[int]:
    """Positions of the outputs whose elements are all equal (a comparison of them cannot fail).

    Float outputs only: integer outputs (token ids, labels) may be constant on purpose.
    """
    return [
        i
        for i, t in enumerate(tensors)
        if t.is_floating_point() and t.numel() > 1 and bool((t == t.reshape(-1)[0]).all())
    ]


def assert_informative(expected: list[torch.Tensor]) -> None:
    """Refuse a reference output that is constant (a zero-initialised head, say)."""
    assert expected, "the model returned no tensor to compare"
    constant = constant_outputs(expected)
    assert not constant, (
        f"reference output(s) {constant} are constant "
        f"(every element {expected[constant[0]].reshape(-1)[0].item()!r}), so comparing "
        "them cannot fail; give the model a non-zero head (e.g. a seeded normal init)"
    )


def assert_same_outputs(expected: list[torch.Tensor], got: list[torch.Tensor], atol=1e-4):
    """Same shapes and values, and the reference is not constant (that would prove nothing)."""
    assert len(expected) == len(got)
    assert_informative(expected)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape, f"output shape {tuple(g.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(g, e, atol=atol, rtol=1e-4)


def greedy(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence again for every new token."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def assert_generates_and_reloads(model: nn.Module, ids: torch.Tensor, path) -> nn.Module:
    """``generate`` with the cache equals the no-cache greedy loop, and the model saved to
    ``path`` reloads with the same logits; returns the reloaded model."""
    logits = model(ids).logits
    model.generation_config.eos_token_id = None  # every step compared, none stopped early
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, greedy(model, ids, 3))
    model.save_pretrained(path)
    reloaded = type(model).from_pretrained(path).eval()
    assert torch.equal(reloaded(ids).logits, logits)
    return reloaded
