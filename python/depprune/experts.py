"""Expert removal: takes a mixture-of-experts model, gives its MoE layers, each routed
expert's importance, the experts to keep, and the cut that removes the others exactly.

A MoE layer is found by structure, not by class: a module with a router (a
module owning a 2-d ``weight`` of ``[experts, hidden]``: transformers'
``TopKRouter``, an ``nn.Linear`` gate) and experts that agree on the count,
either fused (transformers 5: a child whose every tensor has the expert dim
first, ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, GPT-OSS's
biases) or one module per expert in an ``nn.ModuleList``. Removing expert
``e`` removes router row ``e`` with the router's per-expert vectors (a
bias, DeepSeek's ``e_score_correction_bias``), slice ``e`` of every fused
tensor or child ``e`` of the list; the integer attributes and config fields
that count the experts follow. A shared expert (Qwen2-MoE's
``shared_expert``, DeepSeek's ``shared_experts``) is an ordinary MLP that
every token takes: it stays. Tokens that chose a removed expert take their
next choice, and the router normalises over the experts left.

Group-limited routing (DeepSeek-V3's ``n_group``: contiguous groups of
experts, each token picks groups first) keeps its groups: every group keeps
the same number of experts. The fewest experts a router runs with (its
top-k, and more where its code needs it, as DeepSeek's top-2 inside each
group) is proved by running a meta twin of the router cut to that size.

>>> import torch, transformers
>>> config = transformers.MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
>>> model = transformers.MixtralForCausalLM(config)
>>> layers = find_expert_layers(model)
>>> kept = choose_experts(layers, routing_importance(model, [torch.tensor([[1, 2, 3]])],
...                                                  progress=False), 0.5)
>>> remove_experts(model, expert_cuts(model, layers, kept))
>>> model.config.num_local_experts, tuple(model.model.layers[0].mlp.experts.down_proj.shape)
(2, (2, 8, 8))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils import _pytree as pytree

from depprune.errors import ImportanceError, PlanMismatchError, SelectionError
from depprune.importance.activations import run_batches
from depprune.selection import lowest
from depprune.shadow import ShadowError, meta_shadow
from depprune.structure import StructuralCuts

__all__ = [
    "ExpertCuts",
    "ExpertImportance",
    "ExpertLayer",
    "choose_experts",
    "expert_cuts",
    "expert_magnitude",
    "find_expert_layers",
    "remove_experts",
    "routing_importance",
]

#: Attributes and config fields that give the experts each token is routed to.
_TOP_K_NAMES = ("top_k", "num_experts_per_tok", "moe_topk", "moe_k", "topk", "experts_per_token")
#: Attributes and config fields that split the experts into groups a token picks first.
_GROUP_NAMES = ("n_group", "num_group", "n_groups", "num_expert_group", "num_expert_groups")
#: Names that say a module is a router when several modules could be one.
_ROUTER_HINTS = ("gate", "router", "gating")


def _counts_experts(name: str) -> bool:
    """An attribute or config field that counts routed experts (``num_local_experts``,
    ``n_routed_experts``, ``moe_num_experts``), not shared ones or experts per token."""
    return name.endswith("experts") and "shared" not in name and not name.startswith("_")


@dataclass(frozen=True)
class ExpertLayer:
    """One mixture-of-experts block, as :func:`find_expert_layers` finds it.

    >>> layer = ExpertLayer("mlp", 4, 2, "mlp.gate.weight", (("mlp.gate.weight", 0),))
    >>> layer.router_module, layer.min_experts
    ('mlp.gate', 1)
    """

    #: Module path of the MoE block (``"model.layers.0.mlp"``).
    name: str
    num_experts: int
    #: Experts each token is routed to, read from the router, the block or the config.
    top_k: int | None
    #: Parameter name of the router weight ``[num_experts, hidden]``.
    router: str
    #: Every (parameter or buffer name, dim) indexed by expert: router rows and per-expert
    #: vectors, every fused expert tensor.
    tensors: tuple[tuple[str, int], ...]
    #: Paths of ``nn.ModuleList``s holding one module per expert.
    children: tuple[str, ...] = ()
    #: Paths of the fused experts modules (every tensor of which has the expert dim first).
    experts: tuple[str, ...] = ()
    #: Group-limited routing: the experts form this many contiguous, equal groups.
    groups: int | None = None
    #: The fewest experts the layer can keep: its top-k, or more where its router needs it.
    min_experts: int = 1
    #: (module path, integer attribute) pairs inside the block that hold ``num_experts``.
    attributes: tuple[tuple[str, str], ...] = ()

    @property
    def router_module(self) -> str:
        """The block's child that routes (hooked to read its choices)."""
        prefix = f"{self.name}." if self.name else ""
        child = self.router.removeprefix(prefix).split(".")[0]
        return prefix + child


def find_expert_layers(model: nn.Module) -> list[ExpertLayer]:
    """Every mixture-of-experts block of ``model``, found by structure (see the module docs).

    Works on any device, meta included (only shapes are read). A block whose
    router cannot be told apart from another module of the same shape, or
    whose per-expert vectors cannot be told from hidden-sized ones (the
    expert count equals the hidden size), raises :class:`SelectionError`;
    build its :class:`ExpertLayer` by hand.

    >>> import torch
    >>> from torch import nn
    >>> class MoE(nn.Module):  # one module per expert, a linear gate
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.top_k, self.gate = 2, nn.Linear(3, 4, bias=False)
    ...         self.experts = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))
    >>> [layer] = find_expert_layers(nn.Sequential(MoE()))
    >>> layer.name, layer.num_experts, layer.top_k, layer.tensors, layer.children
    ('0', 4, 2, (('0.gate.weight', 0),), ('0.experts',))
    """
    config = getattr(model, "config", None)
    probes: dict[tuple, int] = {}
    layers = []
    for name, block in model.named_modules():
        layer = _expert_layer(name, block, config, probes)
        if layer is not None:
            layers.append(layer)
    return layers


def _expert_layer(
    name: str, block: nn.Module, config: Any, probes: dict[tuple, int]
) -> ExpertLayer | None:
    """``block`` as an :class:`ExpertLayer`, or None when it is no MoE block."""
    fused = {c: n for c, child in block.named_children() if (n := _fused_count(child))}
    lists = {
        c: len(child)
        for c, child in block.named_children()
        if isinstance(child, nn.ModuleList) and _uniform_list(child)
    }
    for count in sorted(set(fused.values()) | set(lists.values()), reverse=True):
        experts = tuple(c for c, n in fused.items() if n == count)
        children = tuple(c for c, n in lists.items() if n == count)
        router = _router(name, block, count, experts + children)
        if router is None:
            continue
        owner_name = router.split(".")[0]
        owner = block.get_submodule(owner_name)
        # Settings are read where the router keeps them, else the block, else a config.
        sources = [*owner.modules(), block, getattr(block, "config", None), config]
        top_k = _int_setting(sources, _TOP_K_NAMES, 1)
        if not experts and top_k is None and not _named_router(router, owner):
            continue  # a list of blocks and a head of the same size: no sign of routing
        groups = _int_setting(sources, _GROUP_NAMES, 2)
        if groups is not None and count % groups:
            groups = None  # not a grouping of these experts
        prefix = f"{name}." if name else ""
        tensors = _router_tensors(prefix, block, router, count)
        tensors += [
            (f"{prefix}{c}.{t}", 0)
            for c in experts
            for t, _ in _named_tensors(block.get_submodule(c))
        ]
        attributes = _count_attributes(prefix, block, count, set(children))
        layer = ExpertLayer(
            name=name,
            num_experts=count,
            top_k=top_k,
            router=prefix + router,
            tensors=tuple(tensors),
            children=tuple(prefix + c for c in children),
            experts=tuple(prefix + c for c in experts),
            groups=groups,
            attributes=tuple(attributes),
        )
        return replace(
            layer, min_experts=_smallest_count(layer, owner, prefix + owner_name, probes)
        )
    return None


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied ones under each of their names."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def _expert_list(model: nn.Module, path: str) -> nn.ModuleList:
    experts = model.get_submodule(path)
    if not isinstance(experts, nn.ModuleList):
        raise PlanMismatchError(
            f"{path} is a {type(experts).__name__}, not the list of experts the layer names; "
            "find the layers again on this model"
        )
    return experts


def _fused_count(module: nn.Module) -> int:
    """The expert count of a fused experts module (every tensor's first dim), or 0."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return 0
    tensors = [t for _, t in _named_tensors(module)]
    if not tensors or not any(t.dim() >= 3 for t in tensors):
        return 0
    if any(t.dim() < 1 for t in tensors) or len({t.shape[0] for t in tensors}) != 1:
        return 0
    # A module holding a linear layer's 2-d weight is a block (a router inside), not experts.
    for sub in module.modules():
        weight = sub._parameters.get("weight")
        if weight is not None and weight.dim() == 2:
            return 0
    count = int(tensors[0].shape[0])
    return count if count >= 2 else 0


def _uniform_list(modules: nn.ModuleList) -> bool:
    """A list of two or more modules of one class, each with parameters."""
    return (
        len(modules) >= 2
        and len({type(m) for m in modules}) == 1
        and all(next(m.parameters(), None) is not None for m in modules)
    )


def _router(name: str, block: nn.Module, count: int, experts: Sequence[str]) -> str | None:
    """The block-relative name of the one router weight ``[count, hidden]``, or None."""
    candidates = {}
    for path, module in block.named_modules():
        if not path or path.split(".")[0] in experts:
            continue
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() == 2 and weight.shape[0] == count:
            candidates[f"{path}.weight"] = module
    if len(candidates) > 1:
        # A shared expert's layer can have as many rows as there are experts: names decide.
        hinted = {p: m for p, m in candidates.items() if "shared" not in p and _named_router(p, m)}
        if len(hinted) != 1:
            raise SelectionError(
                f"{name or 'the model'} has {count} experts and several modules that could "
                f"route to them ({', '.join(candidates)}); build its ExpertLayer by hand, "
                "naming the router weight"
            )
        candidates = hinted
    return next(iter(candidates), None)


def _named_router(path: str, module: nn.Module) -> bool:
    """Whether a module's name or class says it routes (``gate``, ``router``, ``TopKRouter``)."""
    names = (path.lower(), type(module).__name__.lower())
    return any(hint in text for hint in _ROUTER_HINTS for text in names)


def _router_tensors(
    prefix: str, block: nn.Module, router: str, count: int
) -> list[tuple[str, int]]:
    """The router's rows and every per-expert vector of the router and of the block itself."""
    weight = block.get_parameter(router)
    hidden = int(weight.shape[1])
    owner_name = router.split(".")[0]
    weight_owner = block.get_submodule(router.removesuffix(".weight"))
    found = [(prefix + router, 0)]
    own = [
        (n, t) for n, t in [*block._parameters.items(), *block._buffers.items()] if t is not None
    ]
    places = [(f"{owner_name}.", _named_tensors(block.get_submodule(owner_name))), ("", own)]
    for place, tensors in places:
        for tname, tensor in tensors:
            if tensor is weight or tensor.dim() < 1 or tensor.shape[0] != count:
                continue
            own_bias = tensor is getattr(weight_owner, "bias", None)
            if hidden == count and not own_bias:
                raise SelectionError(
                    f"{prefix + place + tname} has {count} entries, as many as there are experts "
                    f"and hidden features in {prefix[:-1] or 'the model'}, so which it follows "
                    "cannot be read from shapes; build the layer's ExpertLayer by hand"
                )
            found.append((prefix + place + tname, 0))
    return found


def _int_setting(sources: Sequence[Any], names: Sequence[str], least: int) -> int | None:
    """The first integer >= ``least`` named one of ``names`` on the first source having one."""
    for source in sources:
        for key in names:
            value = getattr(source, key, None)
            if type(value) is int and value >= least:
                return value
    return None


def _count_attributes(
    prefix: str, block: nn.Module, count: int, lists: set[str]
) -> list[tuple[str, str]]:
    """Integer attributes counting the experts, in the block outside the per-expert lists."""
    found = []
    for path, module in block.named_modules():
        if path.split(".")[0] in lists:
            continue
        for key, value in vars(module).items():
            if _counts_experts(key) and type(value) is int and value == count:
                found.append(((prefix + path).removesuffix("."), key))
    return found


def _relative(path: str, root: str) -> str:
    """``path`` below the module ``root`` ("" for the root itself)."""
    return path[len(root) + 1 :] if path != root else ""


def _smallest_count(layer: ExpertLayer, router: nn.Module, router_name: str, probes: dict) -> int:
    """The fewest experts (at least top-k, a multiple of the groups) the router runs with,
    proved on a meta twin; top-k when the router cannot be run alone."""
    step = layer.groups or 1
    least = math.ceil(max(layer.top_k or 1, 1) / step) * step
    inside = router_name + "."
    tensors = [(_relative(n, router_name), d) for n, d in layer.tensors if n.startswith(inside)]
    attributes = [
        (_relative(p, router_name), a)
        for p, a in layer.attributes
        if p == router_name or p.startswith(inside)
    ]
    # Routers of one class, shapes and settings answer alike: probe each kind once.
    key = (
        type(router),
        tuple((n, tuple(t.shape), t.dtype) for n, t in _named_tensors(router)),
        tuple(sorted((k, v) for k, v in vars(router).items() if type(v) in (int, float, bool))),
        least,
        step,
        layer.num_experts,
    )
    if key not in probes:
        counts = range(least, layer.num_experts + 1, step)
        runs = _router_runs(router, tensors, attributes, layer.num_experts)
        probes[key] = (
            next((c for c in counts if _router_runs(router, tensors, attributes, c)), least)
            if runs
            else least
        )
    return probes[key]


def _router_runs(
    router: nn.Module,
    tensors: Sequence[tuple[str, int]],
    attributes: Sequence[tuple[str, str]],
    count: int,
) -> bool:
    """Whether a meta twin of ``router``, cut to ``count`` experts, routes a few tokens."""
    try:
        twin = meta_shadow(router).eval()
    except ShadowError:
        return False
    for name, dim in tensors:
        module_path, _, attr = name.rpartition(".")
        owner = twin.get_submodule(module_path)
        old = getattr(owner, attr)
        new = torch.empty(
            (*old.shape[:dim], count, *old.shape[dim + 1 :]), dtype=old.dtype, device="meta"
        )
        if isinstance(old, nn.Parameter):
            owner._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            owner._buffers[attr] = new
    for path, attr in attributes:
        setattr(twin.get_submodule(path), attr, count)
    weight = twin.get_parameter(tensors[0][0])  # the router weight comes first
    try:
        with torch.no_grad():
            twin(torch.empty(3, weight.shape[1], dtype=weight.dtype, device="meta"))
    except Exception:
        return False
    return True


# -- importance --------------------------------------------------------------------------


@dataclass
class ExpertImportance:
    """Each layer's experts scored: higher is more important.

    >>> ExpertImportance({"mlp": torch.tensor([3.0, 1.0])}, "frequency").scores["mlp"].tolist()
    [3.0, 1.0]
    """

    #: Per :attr:`ExpertLayer.name`: a float64 CPU tensor ``[num_experts]``.
    scores: dict[str, torch.Tensor]
    metric: str


#: What :func:`routing_importance` adds up for each expert.
ROUTING_METRICS = ("frequency", "gate_mass")


def routing_importance(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    metric: str = "frequency",
    layers: Sequence[ExpertLayer] | None = None,
    progress: bool | None = None,
) -> ExpertImportance:
    """How much the router uses each expert on calibration data.

    Runs ``model`` under ``torch.no_grad()`` on every batch of ``calibration``
    (each a tensor, a tuple or a dict of inputs, as
    :func:`depprune.importance.wanda` takes them) with a forward hook on each
    layer's router. ``metric="frequency"`` counts the tokens routed to each
    expert (its top-k picks), ``"gate_mass"`` adds up the routing weights it
    gets. The router's own choices are read where it returns them (the
    integer top-k ids and their weights, as transformers' routers do); a
    router returning scores over every expert gives them as weights where
    each row has at most top-k nonzero entries (Llama 4), else as logits,
    turned into choices by softmax and top-k. Only the router's output is
    read: a block that changes the choice after it (a bias of its own on the
    router's logits) is not seen. Shows a progress bar over
    batches (``progress=False`` silences it; ``None``: only on a terminal).

    >>> import torch, transformers
    >>> config = transformers.MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    >>> model = transformers.MixtralForCausalLM(config)
    >>> score = routing_importance(model, [torch.tensor([[1, 2, 3]])], progress=False)
    >>> score.scores["model.layers.0.mlp"].sum().item()  # 3 tokens, 2 experts each
    6.0
    """
    if metric not in ROUTING_METRICS:
        raise ImportanceError(
            f"metric {metric!r} is not one of {ROUTING_METRICS}: 'frequency' counts the tokens "
            "routed to each expert, 'gate_mass' adds up their routing weights"
        )
    layers = find_expert_layers(model) if layers is None else list(layers)
    if not layers:
        raise ImportanceError(
            f"{type(model).__name__} has no mixture-of-experts layer (a router and experts); "
            "there are no experts to score"
        )
    modules = dict(model.named_modules())
    totals = {layer.name: torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers}
    calls = dict.fromkeys(totals, 0)

    def hook_for(layer: ExpertLayer) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            by_weight = metric == "gate_mass"
            chosen, weights = _routing(output, layer, by_weight)
            totals[layer.name] += _per_expert(
                chosen, weights if by_weight else None, layer.num_experts
            )
            calls[layer.name] += 1

        return hook

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "meta":
        raise ImportanceError(
            "the model's weights are on the meta device, so it cannot route real tokens; load "
            "the weights first"
        )
    handles = [
        modules[layer.router_module].register_forward_hook(hook_for(layer)) for layer in layers
    ]
    try:
        batches = run_batches(model, calibration, "expert routing", progress)
    finally:
        for handle in handles:
            handle.remove()
    if not batches:
        raise ImportanceError("calibration gave no batches; pass an iterable of example inputs")
    unused = [name for name, n in calls.items() if not n]
    if unused:
        raise ImportanceError(
            f"the routers of {', '.join(unused)} never ran on the calibration batches; pass "
            "inputs that reach every MoE layer, or leave those layers out of layers="
        )
    return ExpertImportance(totals, metric)


def _routing(
    output: Any, layer: ExpertLayer, need_weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The experts each token was routed to (``[..., k]`` ids, -1 for none) and their weights."""
    count = layer.num_experts
    leaves = [t.detach() for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
    floats = [t for t in leaves if t.is_floating_point()]
    integers = [
        t
        for t in leaves
        if not t.is_floating_point() and t.dtype != torch.bool and t.dim() and t.shape[-1] <= count
    ]
    # Ids come with their weights, of one shape (a per-expert token count does not).
    paired = [t for t in integers if any(f.shape == t.shape for f in floats)]
    ids = next(iter(paired or integers), None)
    dense = next((t for t in floats if t.dim() and t.shape[-1] == count), None)
    if ids is not None:
        weights = next((t for t in floats if t.shape == ids.shape), None)
        if weights is None and need_weights:
            if dense is None:
                raise ImportanceError(
                    f"the router of {layer.name} returns expert ids but no weights or scores; "
                    "use metric='frequency'"
                )
            weights = dense.float().softmax(-1).gather(-1, ids.long().clamp(0, count - 1))
        return ids, weights
    if dense is None:
        raise ImportanceError(
            f"the router of {layer.name} returns neither expert ids nor scores over its "
            f"{count} experts; score the experts with expert_magnitude instead"
        )
    if layer.top_k is None:
        raise ImportanceError(
            f"the router of {layer.name} returns scores but the layer's top-k is unknown; pass "
            "layers= with ExpertLayer.top_k set"
        )
    scores = dense.float().reshape(-1, count)
    # Scores over every expert with at most top-k nonzero per row are the routing weights.
    is_weights = bool((scores >= 0).all()) and int((scores != 0).sum(-1).max()) <= layer.top_k
    values, ids = (scores if is_weights else scores.softmax(-1)).topk(layer.top_k, dim=-1)
    if is_weights:
        ids = ids.masked_fill(values == 0, -1)
    return ids, values


def _per_expert(chosen: torch.Tensor, weights: torch.Tensor | None, count: int) -> torch.Tensor:
    """Tokens (or weights, when given) per expert, as float64 on the CPU; ids outside
    ``[0, count)`` (a padding id) count for none."""
    flat = chosen.reshape(-1).long()
    slot = torch.where((flat >= 0) & (flat < count), flat, count)  # the spare slot counts none
    if weights is None:
        total = torch.bincount(slot, minlength=count + 1)
    else:
        total = torch.zeros(count + 1, device=slot.device).index_add_(
            0, slot, weights.reshape(-1).float()
        )
    return total[:count].to("cpu", torch.float64)


def expert_magnitude(
    model: nn.Module, layers: Sequence[ExpertLayer] | None = None
) -> ExpertImportance:
    """Each expert's weight norm: the L2 norm of all its tensors (router rows left out).

    >>> import torch
    >>> from torch import nn
    >>> class MoE(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.top_k, self.gate = 1, nn.Linear(2, 2, bias=False)
    ...         self.experts = nn.ModuleList(nn.Linear(2, 2, bias=False) for _ in range(2))
    >>> model = MoE()
    >>> with torch.no_grad():
    ...     _ = model.experts[0].weight.fill_(1.0), model.experts[1].weight.fill_(2.0)
    >>> expert_magnitude(model).scores[""].tolist()
    [2.0, 4.0]
    """
    layers = find_expert_layers(model) if layers is None else list(layers)
    tensors = _all_tensors(model)
    scores = {}
    for layer in layers:
        inside = tuple(f"{e}." for e in layer.experts)
        fused = [
            tensors[name].detach().movedim(dim, 0)
            for name, dim in layer.tensors
            if name.startswith(inside)
        ]
        lists = [_expert_list(model, path) for path in layer.children]
        if any(t.is_meta for t in fused) or any(
            p.is_meta for experts in lists for p in experts.parameters()
        ):
            raise ImportanceError(
                f"the experts of {layer.name} are on the meta device, so they have no weights "
                "to measure; load the weights first"
            )
        squares = [t.reshape(layer.num_experts, -1).float().square().sum(1) for t in fused]
        for experts in lists:
            # One module per expert: a reduction per expert's parameter, not per weight.
            squares.append(torch.stack([_square_sum(expert) for expert in experts]))
        total = sum(
            (s.to("cpu", torch.float64) for s in squares),
            torch.zeros(layer.num_experts, dtype=torch.float64),
        )
        scores[layer.name] = total.sqrt()
    return ExpertImportance(scores, "magnitude")


def _square_sum(module: nn.Module) -> torch.Tensor:
    """The sum of squares of every parameter of ``module``, as a float on the CPU."""
    return sum(
        (p.detach().float().square().sum().cpu() for p in module.parameters()), torch.zeros(())
    )


# -- selection ---------------------------------------------------------------------------


def choose_experts(
    layers: Sequence[ExpertLayer],
    importance: ExpertImportance | Mapping[str, torch.Tensor],
    ratio_or_count: float | int,
    *,
    min_experts: int | None = None,
    multiple_of: int = 1,
    uniform: bool = True,
) -> dict[str, np.ndarray]:
    """The best-scored experts of each layer: ``{layer name: sorted kept ids}``.

    A float is the fraction of experts to remove (``0.25`` removes a quarter,
    rounded down); an int is the number each layer keeps. Every layer keeps
    at least its :attr:`~ExpertLayer.min_experts` (its top-k, or more where
    its router needs it) and ``min_experts``, a multiple of ``multiple_of``;
    with group-limited routing every group keeps the same number of its own
    best experts. ``uniform=True`` keeps the same count in every layer (one
    config field holds it); ``uniform=False`` ranks the experts of all
    layers together, each layer's scores divided by their mean, so layers
    the calibration uses unevenly keep different counts. On equal scores the
    lower id goes first, as in :func:`depprune.selection.lowest`.

    >>> import torch
    >>> layers = [ExpertLayer(f"{i}", 4, 2, f"{i}.gate.weight", ((f"{i}.gate.weight", 0),))
    ...           for i in range(2)]
    >>> scores = {"0": torch.tensor([5.0, 0.0, 3.0, 9.0]), "1": torch.tensor([1.0, 1.0, 1.0, 8.0])}
    >>> {k: v.tolist() for k, v in choose_experts(layers, scores, 0.5).items()}
    {'0': [0, 3], '1': [2, 3]}
    >>> {k: v.tolist() for k, v in choose_experts(layers, scores, 0.5, uniform=False).items()}
    {'0': [0, 2, 3], '1': [2, 3]}
    """
    layers = list(layers)
    scores = _checked_scores(layers, importance)
    _check_choice(ratio_or_count, min_experts, multiple_of)
    if not layers:
        return {}
    floors = {x.name: max(x.min_experts, x.top_k or 1, min_experts or 1) for x in layers}
    steps = {x.name: math.lcm(multiple_of, x.groups or 1) for x in layers}
    for layer in layers:
        if isinstance(ratio_or_count, int) and ratio_or_count > layer.num_experts:
            raise SelectionError(
                f"{layer.name} has {layer.num_experts} experts, so it cannot keep "
                f"{ratio_or_count}; pass a count up to {layer.num_experts} or a ratio"
            )
    if uniform:
        sizes = sorted({x.num_experts for x in layers})
        if len(sizes) > 1:
            raise SelectionError(
                f"uniform=True keeps one count in every layer, but the layers have {sizes} "
                "experts; pass uniform=False, or choose for the layers of each size apart"
            )
        step, floor = math.lcm(*steps.values()), max(floors.values())
        keep = _keep_count(sizes[0], _target(sizes[0], ratio_or_count), floor, step)
        counts = dict.fromkeys(floors, keep)
    else:
        counts = _global_counts(layers, scores, ratio_or_count, floors, steps)
    return {x.name: _kept(scores[x.name], counts[x.name], x.groups) for x in layers}


def _checked_scores(
    layers: Sequence[ExpertLayer], importance: ExpertImportance | Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    given = importance.scores if isinstance(importance, ExpertImportance) else importance
    scores = {}
    for layer in layers:
        score = given.get(layer.name)
        if score is None:
            raise SelectionError(
                f"the importance has no scores for {layer.name}; score every layer chosen for "
                f"(it scores {sorted(given)[:4]})"
            )
        score = torch.as_tensor(score).detach().to("cpu", torch.float64)
        if score.shape != (layer.num_experts,) or not bool(torch.isfinite(score).all()):
            raise SelectionError(
                f"the scores of {layer.name} must be {layer.num_experts} finite numbers, one per "
                f"expert; got shape {tuple(score.shape)}"
            )
        scores[layer.name] = score
    return scores


def _check_choice(ratio_or_count: float | int, min_experts: int | None, multiple_of: int) -> None:
    if isinstance(ratio_or_count, bool) or not isinstance(ratio_or_count, (int, float)):
        raise SelectionError(
            f"ratio_or_count is {ratio_or_count!r}; pass a float in [0, 1), the fraction of "
            "experts to remove, or an int, the number each layer keeps"
        )
    if isinstance(ratio_or_count, float) and not 0.0 <= ratio_or_count < 1.0:
        raise SelectionError(
            f"the ratio {ratio_or_count!r} must be in [0, 1): the fraction of experts to remove "
            "(pass an int to give the number kept)"
        )
    if isinstance(ratio_or_count, int) and ratio_or_count < 1:
        raise SelectionError(
            f"every layer keeps at least one expert; got a count of {ratio_or_count}"
        )
    for name, value in (("min_experts", min_experts), ("multiple_of", multiple_of)):
        if value is not None and (type(value) is not int or value < 1):
            raise SelectionError(f"{name} is {value!r}; it must be a positive expert count")


def _target(size: int, ratio_or_count: float | int) -> int:
    """Experts a layer of ``size`` keeps before its constraints."""
    if isinstance(ratio_or_count, int):
        return ratio_or_count
    return size - math.floor(ratio_or_count * size + 1e-9)


def _keep_count(size: int, target: int, floor: int, step: int) -> int:
    return min(size, math.ceil(max(target, floor) / step) * step)


def _global_counts(
    layers: Sequence[ExpertLayer],
    scores: Mapping[str, torch.Tensor],
    ratio_or_count: float | int,
    floors: Mapping[str, int],
    steps: Mapping[str, int],
) -> dict[str, int]:
    """Counts from one ranking of every layer's experts, each layer's scores over their mean."""
    flat = torch.cat([scores[x.name] / scores[x.name].mean().clamp_min(1e-12) for x in layers])
    owner = torch.cat([torch.full((x.num_experts,), i) for i, x in enumerate(layers)])
    budget = sum(x.num_experts - _target(x.num_experts, ratio_or_count) for x in layers)
    order = torch.argsort(flat, stable=True)[:budget]
    removed = torch.bincount(owner[order], minlength=len(layers)).tolist()
    return {
        x.name: _keep_count(
            x.num_experts, x.num_experts - removed[i], floors[x.name], steps[x.name]
        )
        for i, x in enumerate(layers)
    }


def _kept(scores: torch.Tensor, keep: int, groups: int | None) -> np.ndarray:
    """The ``keep`` best experts, sorted; with groups, the same number from each group."""
    size = scores.numel()
    if groups:
        per = size // groups
        order = torch.argsort(scores.view(groups, per), dim=1, stable=True)[
            :, : per - keep // groups
        ]
        removed = (order + torch.arange(groups)[:, None] * per).reshape(-1).numpy()
    else:
        removed = lowest(scores, size - keep)
    return np.setdiff1d(np.arange(size, dtype=np.int64), removed)


# -- the cut -----------------------------------------------------------------------------


@dataclass
class ExpertCuts:
    """What removing the experts changes, for :func:`remove_experts` (or a plan) to apply.

    >>> cuts = ExpertCuts({("gate.weight", 0): np.array([0, 2])}, {}, {"gate": {"num_experts": 2}}, {})
    >>> cuts.notes
    []
    """

    #: (tensor name, dim) -> kept indices, for :func:`depprune.apply.apply_kept_indices`.
    kept: dict[tuple[str, int], np.ndarray]
    #: ``nn.ModuleList`` path -> kept child positions, for
    #: :func:`depprune.apply.containers.drop_children`.
    children: dict[str, np.ndarray]
    #: Module name -> integer attribute -> new value (``num_experts`` of routers and experts).
    attributes: dict[str, dict[str, int]]
    #: Config field -> new value (``num_local_experts``, ``n_routed_experts``); a field of a
    #: sub-config is dotted (``text_config.num_local_experts``).
    config: dict[str, int]
    #: What the config cannot express (layers keeping different counts), if anything.
    notes: list[str] = field(default_factory=list)


def expert_cuts(
    model: nn.Module, layers: Sequence[ExpertLayer], kept: Mapping[str, Iterable[int]]
) -> ExpertCuts:
    """The cut that keeps only ``kept`` experts of each named layer; ``model`` is not changed.

    ``layers`` should list every MoE layer of the model (as
    :func:`find_expert_layers` gives them): config fields and attributes of
    modules above the layers change only when every layer of that size keeps
    the same count (else :attr:`ExpertCuts.notes` says why not). A layer
    kept fewer than its top-k experts, fewer than its router runs with, or
    unequal counts of its expert groups raises :class:`SelectionError`.

    >>> import numpy as np, torch
    >>> from torch import nn
    >>> class MoE(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.top_k, self.gate = 1, nn.Linear(2, 3)
    ...         self.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    >>> model = MoE()
    >>> cuts = expert_cuts(model, find_expert_layers(model), {"": [0, 2]})
    >>> sorted(cuts.kept), cuts.children
    ([('gate.bias', 0), ('gate.weight', 0)], {'experts': array([0, 2])})
    """
    layers = list(layers)
    by_name = {x.name: x for x in layers}
    tensors = _all_tensors(model)
    cuts = ExpertCuts({}, {}, {}, {})
    new_count = {x.name: x.num_experts for x in layers}
    for name, ids in kept.items():
        layer = by_name.get(name)
        if layer is None:
            raise PlanMismatchError(
                f"kept names {name!r}, which is not one of the layers given ({sorted(by_name)[:4]}); "
                "pass the layers find_expert_layers found for this model"
            )
        _check_layer_matches(model, layer, tensors)
        ids = _checked_ids(layer, ids)
        new_count[name] = len(ids)
        if len(ids) == layer.num_experts:
            continue
        for key in layer.tensors:
            cuts.kept[key] = ids
        for path in layer.children:
            cuts.children[path] = ids
        for path, attr in layer.attributes:
            cuts.attributes.setdefault(path, {})[attr] = len(ids)
    _shared_counts(model, layers, new_count, cuts)
    return cuts


def _check_layer_matches(
    model: nn.Module, layer: ExpertLayer, tensors: Mapping[str, torch.Tensor]
) -> None:
    for name, dim in layer.tensors:
        tensor = tensors.get(name)
        if tensor is None or tensor.dim() <= dim or tensor.shape[dim] != layer.num_experts:
            raise PlanMismatchError(
                f"{layer.name} lists {name}[{dim}] with {layer.num_experts} experts, but the model "
                f"has {'no such tensor' if tensor is None else tuple(tensor.shape)}; find the "
                "layers again on this model"
            )
    for path in layer.children:
        if len(_expert_list(model, path)) != layer.num_experts:
            raise PlanMismatchError(
                f"{path} is not a list of {layer.num_experts} experts in this model; find the "
                "layers again on this model"
            )


def _checked_ids(layer: ExpertLayer, ids: Iterable[int]) -> np.ndarray:
    """Sorted, unique expert ids the layer can keep and still route."""
    array = np.asarray(list(ids) if not isinstance(ids, (np.ndarray, torch.Tensor)) else ids)
    size, count = layer.num_experts, array.size
    if array.ndim != 1 or not count or not np.issubdtype(array.dtype, np.integer):
        raise SelectionError(f"the kept experts of {layer.name} must be a non-empty list of ids")
    array = array.astype(np.int64)
    if (np.diff(array) <= 0).any() or array[0] < 0 or array[-1] >= size:
        raise SelectionError(
            f"the kept experts of {layer.name} must be sorted, unique ids in [0, {size}); got "
            f"{array[:8].tolist()}"
        )
    if layer.top_k is not None and count < layer.top_k:
        raise SelectionError(
            f"{layer.name} routes every token to its top {layer.top_k} experts, so it cannot keep "
            f"{count}; keep at least {layer.top_k} (choose_experts does), or lower the model's "
            "experts per token first"
        )
    if count < layer.min_experts:
        raise SelectionError(
            f"the router of {layer.name} cannot run with {count} experts (a meta twin of it "
            f"fails below {layer.min_experts}); keep at least {layer.min_experts}"
        )
    if layer.groups:
        per_group = np.bincount(array // (size // layer.groups), minlength=layer.groups)
        if (per_group != per_group[0]).any():
            raise SelectionError(
                f"{layer.name} routes to {layer.groups} groups of {size // layer.groups} experts "
                f"first, so every group must keep the same number; these keep "
                f"{per_group.tolist()} (choose_experts keeps groups even)"
            )
    return array


def _shared_counts(
    model: nn.Module, layers: Sequence[ExpertLayer], new_count: Mapping[str, int], cuts: ExpertCuts
) -> None:
    """Counts held above the layers: attributes of the modules containing them (a model's
    ``num_experts`` for its auxiliary loss) and config fields, where the layers agree."""
    above = _new_counts_above(layers, new_count)
    for path, counts in above.items():
        module = model.get_submodule(path)
        for key, value in vars(module).items():
            if _counts_experts(key) and type(value) is int and len(counts.get(value, ())) == 1:
                cuts.attributes.setdefault(path, {})[key] = next(iter(counts[value]))
    model_wide = above.get("", {})
    for prefix, config in _configs(model):
        for key, value in vars(config).items():
            if not (_counts_experts(key) and type(value) is int and value in model_wide):
                continue
            if len(model_wide[value]) == 1:
                cuts.config[prefix + key] = next(iter(model_wide[value]))
            else:
                cuts.notes.append(
                    f"layers of {value} experts keep {sorted(model_wide[value])}, but "
                    f"{prefix + key} holds one count for all of them: the config keeps {value}, "
                    "so from_pretrained cannot rebuild the model; keep one count in every layer "
                    "(choose_experts(..., uniform=True))"
                )


def _new_counts_above(
    layers: Sequence[ExpertLayer], new_count: Mapping[str, int]
) -> dict[str, dict[int, set[int]]]:
    """For every module above the layers (not inside one): old expert count -> the new
    counts of the layers below it that had it, for the counts any layer changes."""
    blocks = tuple(f"{x.name}." for x in layers)
    found: dict[str, dict[int, set[int]]] = {}
    for layer in layers:
        parts = layer.name.split(".") if layer.name else []
        for depth in range(len(parts)):
            path = ".".join(parts[:depth])
            if not path.startswith(blocks):
                found.setdefault(path, {}).setdefault(layer.num_experts, set()).add(
                    new_count[layer.name]
                )
    return {
        path: {old: new for old, new in counts.items() if new != {old}}
        for path, counts in found.items()
    }


def _configs(model: nn.Module) -> list[tuple[str, Any]]:
    """The model's Hugging Face config and its sub-configs, with their dotted prefixes."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict"):
        return []
    subs = [
        (f"{k}.", v) for k, v in vars(config).items() if hasattr(v, "to_dict") and v is not config
    ]
    return [("", config), *subs]


def remove_experts(
    model: nn.Module, cuts: ExpertCuts, *, optimizers: Iterable[Optimizer] = ()
) -> None:
    """Apply :func:`expert_cuts`' cut to ``model`` in place: all or nothing.

    Config fields first, then the per-expert module lists, then every tensor
    and attribute (:func:`depprune.apply.apply_kept_indices`, which proves
    the config by a rebuild); on any error each step is undone and the model
    is as it was. ``optimizers`` keep training the kept experts.

    >>> import torch
    >>> from torch import nn
    >>> class MoE(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.top_k, self.gate = 1, nn.Linear(2, 3)
    ...         self.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    >>> model = MoE()
    >>> remove_experts(model, expert_cuts(model, find_expert_layers(model), {"": [0, 2]}))
    >>> model.gate, len(model.experts)
    (Linear(in_features=2, out_features=2, bias=True), 2)
    """
    from depprune.plan import Plan  # the plan imports the apply stage this module feeds

    structure = StructuralCuts(
        children={name: np.asarray(kept, np.int64) for name, kept in cuts.children.items()},
        sizes={name: len(model.get_submodule(name)) for name in cuts.children},
        tensors=dict(cuts.kept),
        attributes=cuts.attributes,
        config=cuts.config,
    )
    Plan(kept={}, shapes={}, structure=structure).apply(model, verify=False, optimizers=optimizers)
