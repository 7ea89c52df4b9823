"""Pruning mid-training keeps the optimizer: its state and param groups follow the cut."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn

import depprune
from depprune.apply import apply_kept_indices
from depprune.apply import cuts as apply_module
from depprune.apply.optimizer_state import remap_optimizers
from tests.tiny_models import TINY_DECODER, tokens

STALE = "still holds"


def _tiny_llama(tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY_DECODER, tie_word_embeddings=tie)
    )


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    for step in range(steps):
        optimizer.zero_grad()
        ids = tokens(step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()


def _llama_kept(model: nn.Module) -> dict:
    """Every other hidden channel, KV head and MLP neuron removed."""
    graph = depprune.trace(model, tokens(0))
    removed = {
        group: list(range(1, group.size, 2))
        for group in graph.groups
        if group.kind in ("hidden", "heads", "neurons")
    }
    return graph.kept_indices(graph.keep_mask(removed))


def _sliced(tensor: torch.Tensor, name: str, kept: dict) -> torch.Tensor:
    for dim in range(tensor.dim()):
        if (name, dim) in kept:
            tensor = tensor.index_select(dim, torch.as_tensor(kept[(name, dim)]))
    return tensor


def _snapshot(optimizer: torch.optim.Optimizer) -> tuple[list, dict]:
    """The param groups' parameters and every state tensor (cloned), to compare later."""
    groups = [list(group["params"]) for group in optimizer.param_groups]
    state = {
        id(param): {key: value.clone() for key, value in entry.items()}
        for param, entry in optimizer.state.items()
    }
    return groups, state


def _assert_unchanged(optimizer: torch.optim.Optimizer, snapshot: tuple[list, dict]) -> None:
    groups, state = snapshot
    assert [list(group["params"]) for group in optimizer.param_groups] == groups
    assert {id(param) for param in optimizer.state} == state.keys()
    for param, entry in optimizer.state.items():
        assert entry.keys() == state[id(param)].keys()
        for key, value in entry.items():
            assert torch.equal(value, state[id(param)][key]), key


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_llama_adam_state_follows_the_cut(low_memory, tie):
    model = _tiny_llama(tie)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    _train(model, optimizer)
    old = dict(model.named_parameters())
    old_state = {name: dict(optimizer.state[param]) for name, param in old.items()}
    kept = _llama_kept(model)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{STALE}")
        apply_kept_indices(model, kept, low_memory=low_memory, optimizers=[optimizer])

    new = dict(model.named_parameters())
    held = [param for group in optimizer.param_groups for param in group["params"]]
    # Every parameter of the pruned model is trained, once, and no replaced one is.
    assert {id(p) for p in held} == {id(p) for p in new.values()}
    assert len(held) == len(new)
    assert {id(p) for p in optimizer.state} == {id(p) for p in new.values()}
    replaced = {id(p) for name, p in old.items() if new[name] is not p}
    assert len(replaced) > 10
    assert not replaced & {id(p) for p in held}
    for name, param in new.items():
        state = optimizer.state[param]
        assert state.keys() == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert torch.equal(state["step"], old_state[name]["step"])
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert state[key].shape == param.shape
            assert torch.equal(state[key], _sliced(old_state[name][key], name, kept)), (name, key)
    assert model.lm_head.weight.shape[1] < TINY_DECODER["hidden_size"]
    # And training goes on.
    _train(model, optimizer, steps=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


#: Hidden neurons 1, 4 and 6 removed from the MLP.
KEEP = torch.tensor([0, 2, 3, 5, 7])
MLP_KEPT = {("0.weight", 0): KEEP, ("0.bias", 0): KEEP, ("2.weight", 1): KEEP}

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(
        params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    "adam-amsgrad": lambda params: torch.optim.Adam(params, lr=0.01, amsgrad=True),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.5, centered=True),
}


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_next_step_equals_the_unpruned_step_on_kept_entries(kind):
    model = _mlp()
    optimizer = OPTIMIZERS[kind](model.parameters())
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    # The unpruned reference: model and optimizer copied together, so they stay linked.
    reference, reference_optimizer = copy.deepcopy((model, optimizer))
    apply_kept_indices(model, MLP_KEPT, optimizers=[optimizer])

    grads = {
        name: torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        for i, (name, p) in enumerate(reference.named_parameters())
    }
    for name, param in reference.named_parameters():
        param.grad = grads[name]
    for name, param in model.named_parameters():
        param.grad = _sliced(grads[name], name, MLP_KEPT)
    reference_optimizer.step()
    optimizer.step()

    for name, param in model.named_parameters():
        expected = _sliced(reference.get_parameter(name).detach(), name, MLP_KEPT)
        assert torch.equal(param.detach(), expected), name


def test_prune_threads_optimizers_through_plan_apply():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 6)
    model(x).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{STALE}")
        depprune.prune(model, x, ratio=0.5, optimizers=[optimizer])
    assert model[0].out_features == 4
    held = optimizer.param_groups[0]["params"]
    assert [p.shape for p in held] == [p.shape for p in model.parameters()]
    assert all(a is b for a, b in zip(held, model.parameters(), strict=True))
    assert optimizer.state[model[2].weight]["momentum_buffer"].shape == (3, 4)


def test_an_optimizer_left_out_is_named_in_a_warning():
    model = _tiny_llama()
    optimizer = torch.optim.Adam(model.parameters())
    _train(model, optimizer, steps=1)
    kept = _llama_kept(model)
    with pytest.warns(
        UserWarning, match=r"Adam optimizer 'optimizer' still holds \d+ parameters that were cut"
    ):
        apply_kept_indices(model, kept)
    assert any(id(p) not in {id(q) for q in model.parameters()} for p in optimizer.state)


def test_only_the_optimizer_left_out_is_named():
    model = _mlp()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=STALE) as record:
        apply_kept_indices(model, MLP_KEPT, optimizers=[first])
    messages = [str(w.message) for w in record if STALE in str(w.message)]
    assert len(messages) == 1
    assert "SGD optimizer 'second' still holds 1 parameter that was cut" in messages[0]
    assert "optimizers=[second]" in messages[0]
    assert second.param_groups[0]["params"][0] is not model[2].weight  # stale, as warned


def test_no_warning_without_optimizers():
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_kept_indices(model, MLP_KEPT)
    assert model[0].out_features == 5


def test_nothing_searches_for_optimizers_when_no_cut_tensor_is_held(monkeypatch):
    """The search walks every object of the process (0.1 s beside torchvision): the cut's
    own bookkeeping must let go of the old tensors so that the common case skips it."""
    import depprune.apply as apply_module

    def searched(tensors):
        raise AssertionError(f"searched for optimizers holding {len(list(tensors))} tensors")

    monkeypatch.setattr(apply_module, "optimizers_referencing", searched)
    for low_memory in (False, True):
        model = _tiny_llama()
        apply_kept_indices(model, _llama_kept(model), low_memory=low_memory)


def _snapshot_model(model: nn.Module) -> dict:
    return {name: (p, p.detach().clone()) for name, p in model.named_parameters()}


def _assert_model_unchanged(model: nn.Module, snapshot: dict) -> None:
    assert dict(model.named_parameters()).keys() == snapshot.keys()
    for name, param in model.named_parameters():
        assert param is snapshot[name][0], name
        assert torch.equal(param.detach(), snapshot[name][1]), name


def test_a_failed_swap_leaves_model_and_optimizer_unchanged(monkeypatch):
    model = _tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters())
    _train(model, optimizer, steps=2)
    kept = _llama_kept(model)
    before, state = _snapshot_model(model), _snapshot(optimizer)
    assign = apply_module._Cut.assign
    calls = []

    def failing_assign(self, new, undo):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        assign(self, new, undo)

    monkeypatch.setattr(apply_module._Cut, "assign", failing_assign)
    with pytest.raises(depprune.PlanMismatchError, match="disk on fire"):
        apply_kept_indices(model, kept, optimizers=[optimizer])
    _assert_model_unchanged(model, before)
    _assert_unchanged(optimizer, state)
    assert model.config.hidden_size == TINY_DECODER["hidden_size"]


class _FailingState(dict):
    """An optimizer state that refuses its third new entry."""

    def __init__(self, *args):
        super().__init__(*args)
        self.writes = 0

    def __setitem__(self, key, value):
        self.writes += 1
        if self.writes == 3:
            raise RuntimeError("state is read-only")
        super().__setitem__(key, value)


def test_a_failed_optimizer_commit_undoes_everything():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    optimizer.state = _FailingState(optimizer.state)
    before, state = _snapshot_model(model), _snapshot(optimizer)
    with pytest.raises(depprune.PlanMismatchError, match=r"optimizers.*state is read-only"):
        apply_kept_indices(model, MLP_KEPT, optimizers=[optimizer])
    _assert_model_unchanged(model, before)
    _assert_unchanged(optimizer, state)
    assert model[0].out_features == 8


def test_low_memory_out_of_memory_leaves_optimizer_matching_the_model(monkeypatch):
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    build = apply_module._Cut.build
    calls = []

    def failing_build(self):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError
        return build(self)

    monkeypatch.setattr(apply_module._Cut, "build", failing_build)
    with pytest.raises(depprune.ResourceError, match="partly cut"):
        apply_kept_indices(model, MLP_KEPT, low_memory=True, optimizers=[optimizer])
    held = optimizer.param_groups[0]["params"]
    assert all(a is b for a, b in zip(held, model.parameters(), strict=True))
    assert sum(p.shape != q.shape for p, q in zip(held, _mlp().parameters(), strict=True)) == 1
    for param in held:
        assert optimizer.state[param]["exp_avg"].shape == param.shape


@pytest.mark.parametrize(
    "bad",
    [5, "adam", {"lr": 0.1}, [None], "param_groups"],
    ids=["int", "str", "dict", "none-item", "param-groups"],
)
@pytest.mark.parametrize("low_memory", [False, True])
def test_a_bad_optimizers_argument_raises_and_changes_nothing(bad, low_memory):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if bad == "param_groups":
        bad = [optimizer.param_groups]
    before = _snapshot_model(model)
    with pytest.raises(depprune.DeppruneError, match=r"optimizers=\[optimizer\]"):
        apply_kept_indices(model, MLP_KEPT, low_memory=low_memory, optimizers=bad)
    _assert_model_unchanged(model, before)
    with pytest.raises(depprune.DeppruneError, match=r"torch\.optim\.Optimizer"):
        depprune.prune(model, torch.randn(2, 6), optimizers=bad)
    _assert_model_unchanged(model, before)


@pytest.mark.parametrize("low_memory", [False, True])
def test_state_that_cannot_follow_the_cut_raises_before_any_change(low_memory):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    optimizer.state[model[2].weight]["preconditioner"] = torch.eye(8)
    before, state = _snapshot_model(model), _snapshot(optimizer)
    with pytest.raises(depprune.PlanMismatchError, match=r"'preconditioner'.*shape \(8, 8\)"):
        apply_kept_indices(model, MLP_KEPT, low_memory=low_memory, optimizers=[optimizer])
    _assert_model_unchanged(model, before)
    _assert_unchanged(optimizer, state)


def test_adafactor_factored_statistics_are_cut_along_their_dims():
    model = _mlp()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=0.01)
    x = torch.randn(4, 6)
    model(x).sum().backward()
    optimizer.step()
    row_before = optimizer.state[model[0].weight]["row_var"].clone()
    apply_kept_indices(model, MLP_KEPT, optimizers=optimizer)
    state = optimizer.state[model[0].weight]
    assert torch.equal(state["row_var"], row_before[KEEP])
    assert state["col_var"].shape[-1] == 6
    assert optimizer.state[model[2].weight]["col_var"].shape[-1] == 5
    model(x).sum().backward()
    optimizer.step()


def test_remap_optimizers_on_its_own():
    old = nn.Parameter(torch.arange(12.0).reshape(3, 4))
    optimizer = torch.optim.SGD([old], lr=0.1, momentum=0.9)
    old.grad = torch.ones(3, 4)
    optimizer.step()
    buffer = optimizer.state[old]["momentum_buffer"].clone()
    rows, columns = torch.tensor([0, 2]), torch.tensor([1, 3])
    new = nn.Parameter(old.detach()[rows][:, columns])
    remap_optimizers([optimizer, optimizer], [(old, new, {0: rows, 1: columns})])
    assert optimizer.param_groups[0]["params"] == [new]
    assert torch.equal(optimizer.state[new]["momentum_buffer"], buffer[rows][:, columns])
    assert old not in optimizer.state
